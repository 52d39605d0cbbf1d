"""Experiment trackers beyond Lightning's built-in CSV and TensorBoard loggers, as optional extras.

``conf/logger/mlflow.yaml`` and ``conf/logger/wandb.yaml`` build their loggers here, so that a run
without the tracker's package stops before training with the ``pip install`` line of the extra that
provides it, rather than Lightning's generic requirement message.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

log = logging.getLogger(__name__)


def _require(module: str, extra: str, logger: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(
            f"logger={logger} needs the {module!r} package, which is not installed: "
            f'pip install "tl-lightning[{extra}]" (or choose logger=csv|tensorboard|none)'
        )


def mlflow_logger(**kwargs: Any) -> MLFlowLogger:
    """A Lightning ``MLFlowLogger``, after checking that MLflow is installed.

    Args:
        **kwargs: Passed to ``lightning.pytorch.loggers.MLFlowLogger`` (``experiment_name``,
            ``run_name``, ``tracking_uri``, ``tags``, ...).

    Raises:
        ModuleNotFoundError: If ``mlflow`` is not importable, naming the ``mlflow`` extra.

    Example::

        logger = mlflow_logger(experiment_name="train", tracking_uri="sqlite:///mlruns.db")
    """
    _require("mlflow", "mlflow", "mlflow")
    return MLFlowLogger(**kwargs)


def wandb_logger(**kwargs: Any) -> WandbLogger:
    """A Lightning ``WandbLogger`` that gets its own W&B run, after checking that W&B is installed.

    Lightning's ``WandbLogger`` reuses a W&B run still open in the process, and nothing finishes the
    run when training ends; the runs of a sequential sweep (Hydra's basic launcher) would all land in
    the first run. So a W&B run left open in the process is finished first (its data is kept).

    Args:
        **kwargs: Passed to ``lightning.pytorch.loggers.WandbLogger`` (``project``, ``name``,
            ``save_dir``, ``offline``, ...).

    Raises:
        ModuleNotFoundError: If ``wandb`` is not importable, naming the ``wandb`` extra.

    Example::

        logger = wandb_logger(project="train", save_dir="outputs/run", offline=True)
    """
    _require("wandb", "wandb", "wandb")
    import wandb

    if wandb.run is not None:
        log.info("finishing W&B run %s, left open by an earlier run in this process", wandb.run.name)
        wandb.finish()
    return WandbLogger(**kwargs)
