"""tl-lightning: transfer learning with PyTorch Lightning, timm and Hydra."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tl_lightning.run.inference import TrainedModel

__version__ = "0.2.0"


def load(path: str | Path) -> TrainedModel:
    """A trained model ready for inference, from a ``train.py`` checkpoint or an ``export.py`` safetensors.

    The model is rebuilt from the file's own description (config, class names, preprocessing),
    nothing is downloaded, and the weights are loaded with ``weights_only=True``; LoRA/IA3 adapters
    are merged. It classifies images or texts, as its backbone takes (``model.modality``), with
    :func:`tl_lightning.run.inference.predict`. Importing ``tl_lightning`` stays light: the inference
    code is imported on the first call. Multi-task and domain-pair checkpoints load with their
    module's ``load_from_checkpoint`` instead.

    Args:
        path: ``outputs/train/<run>/checkpoints/*.ckpt`` or a ``model.safetensors`` export.

    Returns:
        A :class:`~tl_lightning.run.inference.TrainedModel`: ``module`` (eval mode, CPU),
        ``class_names``, ``data_config``, ``modality``.

    Raises:
        FileNotFoundError, ValueError: As :func:`tl_lightning.run.inference.load_trained`.

    Example::

        import tl_lightning
        from tl_lightning.run.inference import predict

        model = tl_lightning.load("outputs/train/<run>/checkpoints/last.ckpt")
        rows = predict(model, ["a joy from start to finish"], top_k=1)  # a text model
    """
    from tl_lightning.run.inference import load_trained

    return load_trained(path)
