"""Use a trained model: load a checkpoint (or a safetensors export), predict image files, export.

A checkpoint written by ``train.py`` describes itself (``checkpoint["tl_lightning"]``: the resolved
config, class names and the backbone's preprocessing), so :func:`load_trained` rebuilds the module
from it, loads the weights (``weights_only=True``) and knows the evaluation transform. The
safetensors export written by :func:`export_safetensors` carries the same description in its
metadata and loads the same way.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from hydra.utils import get_class
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tl_lightning.backbones import DataConfig
from tl_lightning.data.base import ClassificationDataModule, as_data_config
from tl_lightning.data.grayscale import GrayscaleDataModule
from tl_lightning.data.images import IMAGE_EXTENSIONS, load_rgb, to_rgb8
from tl_lightning.modules import DomainAdaptationModule, MultiTaskModule
from tl_lightning.run.checkpointing import METADATA_KEY, load_checkpoint, upgrade_metadata
from tl_lightning.run.pipeline import rebuild_module, rebuild_transform

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (*IMAGE_EXTENSIONS, ".gif")  # image folders' files, and GIFs (their first frame)
LIST_SUFFIXES = (".txt",)
OUTPUT_SUFFIXES = (".csv", ".json")
_METADATA_FIELDS = ("config", "class_names", "data_config")
_SOURCE_HEAD = "heads.source."


@dataclass
class TrainedModel:
    """A fine-tuned module in eval mode with what it needs to classify images.

    Args:
        module: The rebuilt ``TransferModule`` holding the trained weights (eval mode, CPU).
        class_names: Target class names, in logit order.
        data_config: The backbone's preprocessing (mean, std, interpolation, crop).
        image_size: Side length the model was trained at (``data.image_size``, else the backbone's).
        metadata: ``checkpoint["tl_lightning"]`` as stored.
    """

    module: nn.Module
    class_names: list[str]
    data_config: DataConfig
    image_size: int
    metadata: dict

    def transform(self) -> Callable:
        """PIL image (any mode) -> normalised tensor, as the run's data module prepared its evaluation images.

        The image is first brought to 8-bit RGB by :func:`~tl_lightning.data.images.to_rgb8`, the
        conversion training applies to every file it reads (a palette image's colours, not its
        indices; alpha dropped; 16-bit levels scaled), then handed to the data module's
        ``eval_transform``. The grayscale data modules (digits, MNIST-5k, Fashion-MNIST) learn from
        grey levels, so for them it is reduced to its luma first (ITU-R 601-2, Pillow's ``"L"``),
        which keeps a grey picture's levels exactly.
        """
        config = self.metadata["config"]
        evaluate = rebuild_transform(config, self.metadata["data_config"])
        grey = issubclass(_data_class(config) or object, GrayscaleDataModule)
        return partial(_prepare, evaluate=evaluate, grey=grey)

    def serving_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a server needs (backbone and target head), contiguous, by name."""
        return {k: v.contiguous() for k, v in self.module.state_dict().items()}


def _prepare(image: Image.Image, evaluate: Callable, grey: bool) -> torch.Tensor:
    rgb = to_rgb8(image)
    return evaluate(rgb.convert("L") if grey else rgb)


def _data_class(config: dict) -> type | None:
    """The class the stored ``data._target_`` names (``None``: no target, or not importable)."""
    return _class_of((config.get("data") or {}).get("_target_"))


def _class_of(target: str | None) -> type | None:
    try:
        found = get_class(target) if target else None
    except (ImportError, ValueError):
        return None
    return found if isinstance(found, type) else None


def load_trained(path: str | Path) -> TrainedModel:
    """Rebuild the fine-tuned model from a ``train.py`` checkpoint or an ``export.py`` safetensors file.

    Args:
        path: ``checkpoints/*.ckpt`` of a run, or ``model.safetensors`` written by ``export.py``.
            The adapters of a ``strategy=lora|ia3`` checkpoint are merged into plain weights.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is corrupt, lacks the ``tl_lightning`` metadata (or one of its
            fields), holds weights of another model, or is a multi-task or domain-adaptation run
            (only single-task checkpoints classify images); the message names the file.

    Example::

        model = load_trained("outputs/train/<run>/checkpoints/last.ckpt")
        probabilities = model.module(model.transform()(image)[None]).softmax(-1)
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        metadata, state_dict = _read_safetensors(path)
    else:
        checkpoint = load_checkpoint(path)
        metadata, state_dict = checkpoint.get(METADATA_KEY), checkpoint.get("state_dict")
    _check_metadata(metadata, state_dict, path)
    _check_single_task(metadata, path)
    try:
        module = rebuild_module(metadata["config"], len(metadata["class_names"]), metadata["data_config"])
    except Exception as error:  # Hydra wraps the factory's error; add which file's config failed
        raise ValueError(
            f"{str(path)!r}: cannot rebuild the model its stored config describes: {error}"
        ) from error
    _load_weights(module, state_dict, path)
    if metadata["config"].get("adapter") is not None:  # strategy=lora|ia3
        from tl_lightning.adapters.peft import merge_adapter

        merge_adapter(module)  # plain weights again: no adapter modules, no extra inference cost
        metadata = {**metadata, "config": {**metadata["config"], "adapter": None}}
    data_config = as_data_config(metadata["data_config"])
    image_size = (metadata["config"].get("data") or {}).get("image_size") or data_config.input_size[-1]
    return TrainedModel(module.eval(), list(metadata["class_names"]), data_config, int(image_size), metadata)


def _read_safetensors(path: Path) -> tuple[dict | None, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get(METADATA_KEY)
        state_dict = load_file(str(path))
        metadata = upgrade_metadata(json.loads(stored)) if stored else None
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ValueError(f"model file {str(path)!r} is not a readable safetensors file: {error}") from error
    return metadata, state_dict


def _check_metadata(metadata: dict | None, state_dict: dict | None, path: Path) -> None:
    if not isinstance(metadata, dict):
        raise ValueError(
            f"{str(path)!r} has no {METADATA_KEY!r} metadata (config, class names, preprocessing): it was "
            "not written by this project's train.py or export.py, so the model cannot be rebuilt"
        )
    missing = [k for k in _METADATA_FIELDS if k not in metadata]
    if missing:
        raise ValueError(
            f"{str(path)!r}: {METADATA_KEY!r} metadata lacks {missing}; expected {list(_METADATA_FIELDS)}"
        )
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError(f"{str(path)!r} holds no 'state_dict' weights")


def _check_single_task(metadata: dict, path: Path) -> None:
    """Stop on a multi-task or domain-pair run: say what predict.py/export.py take and what to do instead."""
    config = metadata["config"]
    data = config.get("data") or {}
    data_class = _data_class(config)
    module_class = _class_of((config.get("module") or {}).get("_target_")) or object
    multi_task = issubclass(module_class, MultiTaskModule) or isinstance(data.get("tasks"), dict)
    domain_pair = issubclass(module_class, DomainAdaptationModule)
    single_data = data_class is None or issubclass(data_class, ClassificationDataModule)
    if single_data and not (multi_task or domain_pair):
        return  # a single-task run (rebuild_transform names a data class it cannot use)
    supported = (
        f"{str(path)!r} is a checkpoint of strategy={metadata.get('strategy')} (module "
        f"{config['module'].get('_target_')}, data {data.get('_target_')}): predict.py and export.py "
        "support single-task checkpoints only, a tl_lightning.modules.TransferModule trained on one image "
        "data module (data=digits|mnist5k|fashion_mnist|image_folder|torchvision). "
    )
    if multi_task:
        tasks = ", ".join(f"{name}: {(n or {}).get('_target_')}" for name, n in data.get("tasks", {}).items())
        raise ValueError(
            supported + f"To classify the images of one of its tasks ({tasks}), train that task as a "
            "single-task run on its own data module (e.g. python train.py data=mnist5k "
            "strategy=full_finetune) and predict with or export that run's checkpoint"
        )
    node = config.get("backbone") or {}
    while isinstance(node.get("backbone"), dict):  # a backbone=source_checkpoint run: its inner backbone
        node = node["backbone"]
    backbone = " ".join(
        f"++backbone.backbone.{key}={_override(value)}" for key, value in node.items() if key != "pretrained"
    )
    target = (data.get("target") or {}).get("_target_")
    raise ValueError(
        supported + f"To classify target-domain images ({target}), train a single-task run on that data "
        "starting from this run's adapted backbone, e.g. python train.py data=<the target data> "
        f"strategy=linear_probe backbone=source_checkpoint backbone.path={path} {backbone}, and predict with "
        "or export that run's checkpoint"
    )


def _override(value) -> str:
    """``value`` as a Hydra command-line override value (scalars and lists of them)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _load_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Load every weight of ``module``; the source head (not rebuilt) is the only thing left out."""
    own = module.state_dict()
    weights = {k: v for k, v in state_dict.items() if k in own or not k.startswith(_SOURCE_HEAD)}
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = sorted(k for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(
            f"{str(path)!r} does not fit the model its config describes: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatch {shapes[:3]}"
        )
    module.load_state_dict(weights)


def collect_inputs(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image paths from image files, folders (searched recursively, sorted) and ``.txt`` lists.

    A list file holds one path per line (blank lines and ``#`` comments skipped); relative paths
    are relative to the list file's folder.

    Raises:
        FileNotFoundError: If an input or a listed path does not exist, naming it.
        ValueError: If a file is neither an image nor a list (the message lists the allowed
            suffixes), or nothing is found.
    """
    entries = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    paths: list[Path] = []
    for entry in entries:
        paths.extend(_expand(Path(entry), source="inputs"))
    if not paths:
        raise ValueError(f"inputs={[str(e) for e in entries]} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def _expand(path: Path, source: str) -> Iterator[Path]:
    if not path.exists():
        raise FileNotFoundError(f"{source}: {str(path)!r} does not exist")
    if path.is_dir():
        yield from sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        yield path
    elif path.suffix.lower() in LIST_SUFFIXES:
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                listed = Path(line).expanduser()
                yield from _expand(listed if listed.is_absolute() else path.parent / listed, source=str(path))
    else:
        raise ValueError(
            f"{source}: {str(path)!r} is neither an image ({', '.join(IMAGE_SUFFIXES)}), a folder, "
            f"nor a list of paths ({', '.join(LIST_SUFFIXES)})"
        )


def prepare_images(model: TrainedModel, paths: Sequence[Path]) -> torch.Tensor:
    """The ``(len(paths), C, S, S)`` model inputs :func:`predict` feeds for ``paths``.

    Every file is decoded by :func:`~tl_lightning.data.images.load_rgb`, the function the run's
    data modules read image files with, then prepared by :meth:`TrainedModel.transform`, so a file
    gives the tensor the run's evaluation gives it, whatever its mode (palette, RGBA, LA, CMYK, L,
    16-bit, RGB).

    Args:
        model: From :func:`load_trained`.
        paths: Image files.

    Raises:
        ValueError: If a file cannot be decoded or prepared, naming it.

    Example::

        inputs = prepare_images(load_trained("run/checkpoints/last.ckpt"), [Path("cat.gif")])
    """
    transform = model.transform()
    images = []
    for path in paths:
        image = load_rgb(path)  # names the file when it cannot be decoded
        try:
            images.append(transform(image))
        except (RuntimeError, TypeError, ValueError) as error:
            raise ValueError(f"cannot prepare image {str(path)!r} as the run did: {error}") from error
    return torch.stack(images)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU) or any ``torch.device`` string.

    Raises:
        ValueError: If ``device`` is not a device name or is not available, naming ``device``.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:<index>") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device=cpu")
    return resolved


@torch.no_grad()
def predict(
    model: TrainedModel, paths: Sequence[Path], top_k: int = 5, batch_size: int = 32, device: str = "auto"
) -> list[dict]:
    """Top-``k`` classes with probabilities for every image, in input order.

    Args:
        model: From :func:`load_trained`.
        paths: Image files (see :func:`collect_inputs`).
        top_k: Classes reported per image, ``1..len(class_names)``.
        batch_size: Images per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...

    Returns:
        ``[{"path": str, "predictions": [{"class": name, "probability": p}, ...]}, ...]``.

    Raises:
        ValueError: On an out-of-range ``top_k`` or ``batch_size``, or an unreadable image.
    """
    if not 1 <= top_k <= len(model.class_names):
        raise ValueError(f"top_k={top_k} must be in 1..{len(model.class_names)} (the number of classes)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    target = resolve_device(device)
    module = model.module.to(target)
    rows = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = prepare_images(model, chunk).to(target)
        top = module(images).float().softmax(dim=-1).topk(top_k, dim=-1)
        for path, probs, indices in zip(chunk, top.values.tolist(), top.indices.tolist(), strict=True):
            ranked = [
                {"class": model.class_names[i], "probability": p} for i, p in zip(indices, probs, strict=True)
            ]
            rows.append({"path": str(path), "predictions": ranked})
    return rows


def _check_output(output: str | Path) -> Path:
    output = Path(output)
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output={str(output)!r} must end in one of {list(OUTPUT_SUFFIXES)}")
    return output


def write_predictions(rows: list[dict], output: str | Path) -> Path:
    """Write :func:`predict` rows as CSV (``path, class_1, probability_1, ...``) or JSON, by suffix.

    Raises:
        ValueError: If ``output`` ends in neither ``.csv`` nor ``.json``.
    """
    output = _check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".json":
        output.write_text(json.dumps(rows, indent=2))
        return output
    k = len(rows[0]["predictions"]) if rows else 0
    with output.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["path", *[f"{field}_{r}" for r in range(1, k + 1) for field in ("class", "probability")]]
        )
        for row in rows:
            ranked = [v for p in row["predictions"] for v in (p["class"], f"{p['probability']:.6f}")]
            writer.writerow([row["path"], *ranked])
    return output


def export_safetensors(model: TrainedModel, output: str | Path) -> Path:
    """Write the weights with the run's description (``tl_lightning`` metadata, JSON) as safetensors.

    :func:`load_trained` (and so ``predict.py``) reads the file back.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.serving_state_dict(), str(output), metadata={METADATA_KEY: json.dumps(model.metadata)})
    return output


def export_onnx(model: TrainedModel, output: str | Path) -> Path:
    """Write an ONNX graph: ``images`` (normalised, ``(batch, 3, S, S)``) -> ``logits``.

    The batch dimension is dynamic. The graph's metadata properties (JSON) hold what a server needs
    around it: ``class_names``, ``data_config`` (mean, std, interpolation, crop), ``image_size`` and
    ``data`` (the data module whose ``eval_transform`` prepared the training run's images).
    """
    import onnx

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, model.data_config.input_size[0], model.image_size, model.image_size)
    program = torch.onnx.export(
        model.module.cpu().eval(),
        (example,),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    properties = {
        "class_names": model.class_names,
        "data_config": model.data_config.as_dict(),
        "image_size": model.image_size,
        "data": (model.metadata["config"].get("data") or {}).get("_target_"),
    }
    for key, value in properties.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(proto, str(output))
    return output


EXPORTERS = {"safetensors": export_safetensors, "onnx": export_onnx}


def export(model: TrainedModel, format: str, output: str | Path) -> Path:
    """Write ``model`` as ``format`` (a key of :data:`EXPORTERS`) to ``output``.

    Raises:
        ValueError: On an unknown ``format``, listing the allowed ones.
    """
    if format not in EXPORTERS:
        raise ValueError(f"format={format!r} is not one of {list(EXPORTERS)}")
    return EXPORTERS[format](model, output)


def predict_to_file(
    ckpt_path: str | Path,
    inputs: str | Path | Sequence[str | Path],
    output: str | Path,
    top_k: int = 5,
    batch_size: int = 32,
    device: str = "auto",
) -> Path:
    """``predict.py``: check the arguments, collect the images, load the model, predict, write ``output``.

    Raises:
        FileNotFoundError, ValueError: As :func:`collect_inputs`, :func:`load_trained`,
            :func:`predict` and :func:`write_predictions`, before any model work where possible.
    """
    _check_output(output)
    resolve_device(device)
    paths = collect_inputs(inputs)
    rows = predict(load_trained(ckpt_path), paths, top_k, batch_size, device)
    return write_predictions(rows, output)


def export_checkpoint(ckpt_path: str | Path, format: str, output: str | Path) -> Path:
    """``export.py``: check ``format``, load the checkpoint, write ``output``.

    Raises:
        ValueError: On an unknown ``format`` (before loading), or as :func:`load_trained`.
    """
    if format not in EXPORTERS:
        raise ValueError(f"format={format!r} is not one of {list(EXPORTERS)}")
    return export(load_trained(ckpt_path), format, output)
