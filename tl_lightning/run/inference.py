"""Use a trained model: load a checkpoint (or a safetensors export), predict images or texts, export.

A checkpoint written by ``train.py`` describes itself (``checkpoint["tl_lightning"]``: the resolved
config, class names and the backbone's preprocessing), so :func:`load_trained` rebuilds the module
from it, loads the weights (``weights_only=True``) and knows how the run prepared its evaluation
inputs: the image transform, or the text data module's tokenisation. The safetensors export written
by :func:`export_safetensors` carries the same description in its metadata and loads the same way.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from hydra.utils import get_class, instantiate
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from tl_lightning.backbones import DataConfig, TextConfig
from tl_lightning.data.base import ClassificationDataModule, as_data_config
from tl_lightning.data.grayscale import GrayscaleDataModule
from tl_lightning.data.images import IMAGE_EXTENSIONS, load_rgb, to_rgb8
from tl_lightning.data.text import TextDataModule
from tl_lightning.modules import DomainAdaptationModule, MultiTaskModule
from tl_lightning.modules.rebuild import load_run_weights
from tl_lightning.run.checkpointing import METADATA_KEY, load_checkpoint, upgrade_metadata
from tl_lightning.run.formats import export_hf, export_text_onnx, export_timm
from tl_lightning.run.generation import generate, is_language_model, write_generations
from tl_lightning.run.pipeline import rebuild_module, rebuild_transform

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (*IMAGE_EXTENSIONS, ".gif")  # image folders' files, and GIFs (their first frame)
LIST_SUFFIXES = (".txt",)
TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")  # .txt: one text per line; the others: text_column
OUTPUT_SUFFIXES = (".csv", ".json")
_METADATA_FIELDS = ("config", "class_names", "data_config")


@dataclass
class TrainedModel:
    """A fine-tuned module in eval mode with what it needs to classify images or texts.

    Args:
        module: The rebuilt ``TransferModule`` holding the trained weights (eval mode, CPU).
        class_names: Target class names, in logit order.
        data_config: The backbone's preprocessing: a ``DataConfig`` (mean, std, interpolation, crop)
            or, for a text backbone, a ``TextConfig`` (tokenizer, maximum length, pooling).
        image_size: Side length the model was trained at (``data.image_size``, else the backbone's);
            ``None`` for a text model.
        metadata: ``checkpoint["tl_lightning"]`` as stored.
    """

    module: nn.Module
    class_names: list[str]
    data_config: DataConfig | TextConfig
    image_size: int | None
    metadata: dict

    @property
    def modality(self) -> str:
        """``"text"`` (the backbone takes token ids) or ``"image"``."""
        return "text" if isinstance(self.data_config, TextConfig) else "image"

    def transform(self) -> Callable:
        """PIL image (any mode) -> normalised tensor, as the run's data module prepared its evaluation images.

        The image is first brought to 8-bit RGB by :func:`~tl_lightning.data.images.to_rgb8`, the
        conversion training applies to every file it reads (a palette image's colours, not its
        indices; alpha dropped; 16-bit levels scaled), then handed to the data module's
        ``eval_transform``. The grayscale data modules (digits, MNIST-5k, Fashion-MNIST) learn from
        grey levels, so for them it is reduced to its luma first (ITU-R 601-2, Pillow's ``"L"``),
        which keeps a grey picture's levels exactly.

        Raises:
            ValueError: For a text model (see :func:`prepare_texts`).
        """
        if self.modality == "text":
            raise ValueError(
                f"this is a text model (backbone {self.data_config.tokenizer}): it takes texts, not images; "
                "prepare them with prepare_texts"
            )
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
            The adapters of a ``strategy=lora|ia3`` checkpoint are merged into plain weights; a
            ``strategy=prefix_tuning|prompt_tuning`` model keeps its learned virtual tokens (PEFT).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is corrupt, lacks the ``tl_lightning`` metadata (or one of its
            fields), holds weights of another model, or is a multi-task or domain-adaptation run
            (only single-task checkpoints classify; load those with ``<Module>.load_from_checkpoint``);
            the message names the file.

    Example::

        model = load_trained("outputs/train/<run>/checkpoints/last.ckpt")
        probabilities = model.module(model.transform()(image)[None]).softmax(-1)  # an image model
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
    load_run_weights(module, state_dict, str(path))
    if metadata["config"].get("adapter") is not None:  # strategy=lora|ia3|prefix_tuning|prompt_tuning
        from tl_lightning.adapters.peft import merge_adapter

        # lora|ia3: plain weights again (no adapter modules, no extra inference cost); prompt learning
        # keeps its virtual tokens, and its adapter config with them (an export must rebuild them too)
        if merge_adapter(module):
            metadata = {**metadata, "config": {**metadata["config"], "adapter": None}}
    data_config = as_data_config(metadata["data_config"])
    image_size = None
    if isinstance(data_config, DataConfig):
        image_size = int(
            (metadata["config"].get("data") or {}).get("image_size") or data_config.input_size[-1]
        )
    return TrainedModel(module.eval(), list(metadata["class_names"]), data_config, image_size, metadata)


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
        "or text data module (data=digits|mnist5k|fashion_mnist|image_folder|torchvision|text_files|"
        "rotten_tomatoes|hf_dataset); load this one with its module's load_from_checkpoint. "
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


def collect_texts(
    inputs: str | Path | Sequence[str | Path] | None = None,
    texts: Sequence[str] | None = None,
    text_column: str = "text",
) -> list[str]:
    """The texts to classify: those of ``inputs`` files (in order), then ``texts``.

    A ``.txt`` file holds one text per line (blank lines skipped); a ``.csv``, ``.tsv`` or ``.jsonl``
    file holds one per row, in its ``text_column``.

    Args:
        inputs: Text files (``.txt``, ``.csv``, ``.tsv``, ``.jsonl``).
        texts: Texts given directly (``predict.py texts=[...]``).
        text_column: The column of ``.csv``/``.tsv``/``.jsonl`` files that holds the texts.

    Raises:
        FileNotFoundError: If an input file does not exist, naming it.
        ValueError: On another suffix (an image, a folder; listing the allowed ones), a file without
            ``text_column`` (listing its columns), an empty text (naming the file and row), or no text.
    """
    entries = [] if inputs is None else [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    collected: list[str] = []
    for entry in entries:
        collected.extend(_read_texts(Path(entry), text_column))
    if isinstance(texts, str):  # texts=superb on the command line: one text, not its characters
        texts = [texts]
    for i, text in enumerate(texts or []):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}]={text!r} is not a text; quote it: 'texts=[\"...\"]'")
        if not text.strip():
            raise ValueError(f"texts[{i}]={text!r} is empty; give non-empty texts")
        collected.append(text)
    if not collected:
        raise ValueError(
            "no text to classify: give inputs=<file> (one of " + ", ".join(TEXT_SUFFIXES) + ") or texts=[...]"
        )
    return collected


def _read_texts(path: Path, text_column: str) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"inputs: {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix not in TEXT_SUFFIXES:
        raise ValueError(
            f"inputs: {str(path)!r} is not a text file: a text model takes {', '.join(TEXT_SUFFIXES)} files "
            "(.txt: one text per line; the others: the text_column) or texts=[...]"
        )
    with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: a BOM (Excel's) is not text
        if suffix == ".txt":  # lines end at \n (or \r\n) only, not at the other breaks splitlines knows
            return [line.rstrip("\r") for line in handle.read().split("\n") if line.strip()]
        rows = (
            [json.loads(line) for line in handle if line.strip()]
            if suffix == ".jsonl"
            else list(csv.DictReader(handle, delimiter="," if suffix == ".csv" else "\t"))
        )
    columns = list(rows[0]) if rows else []
    if text_column not in columns:
        raise ValueError(
            f"text_column={text_column!r} is not a column of {str(path)!r}; its columns: {columns}"
        )
    texts = [row.get(text_column) for row in rows]
    empty = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
    if empty:
        raise ValueError(
            f"{str(path)!r}: {len(empty)} row(s) have no text in {text_column!r} (rows {empty[:5]})"
        )
    return texts


def text_datamodule(model: TrainedModel) -> TextDataModule:
    """The run's text data module, built from the stored config, ready to tokenise new texts as the run did.

    Its tokenizer is the backbone's (from the stored ``TextConfig``: packaged or local files, nothing
    downloaded for the offline jobs). Its token limit is the run's: ``data.max_length`` as stored, or,
    for ``data.max_length=data`` (a percentile of the training texts' lengths, which the config does
    not record), the one the data module computes again from the run's training data.

    Raises:
        ValueError: For an image model, or when ``data.max_length=data`` and the run's training data
            cannot be read, naming the key.
    """
    if model.modality != "text":
        raise ValueError("this is an image model: it takes images, not texts")
    node = dict(model.metadata["config"]["data"])
    datamodule = instantiate(node, data_config=model.data_config)
    if node.get("max_length") == "data":
        try:
            datamodule.setup()
        except (OSError, ValueError) as error:
            raise ValueError(
                "the run chose its token limit from its training texts (data.max_length=data), which cannot "
                f"be read here ({error}); the limit is logged by the run ('data.max_length=data: N tokens')"
            ) from error
    else:
        datamodule.tokenizer = model.data_config.load_tokenizer()
        datamodule._max_length = datamodule._choose_max_length([])
    return datamodule


def prepare_texts(model: TrainedModel, texts: Sequence[str], batch_size: int = 32) -> DataLoader:
    """Batches of token tensors for ``texts``, in order, as the run's evaluation loaders gave them.

    The run's text data module (:func:`text_datamodule`) tokenises them with its own code (its
    tokenizer and token limit; longer texts are truncated and counted in the log) and pads each batch
    with its own ``collate_fn``.

    Args:
        model: A text model from :func:`load_trained`.
        texts: The texts (see :func:`collect_texts`).
        batch_size: Texts per batch.

    Raises:
        ValueError: For an image model.

    Example::

        for tokens, _ in prepare_texts(model, ["a joy from start to finish"]):
            probabilities = model.module(tokens).softmax(-1)
    """
    datamodule = text_datamodule(model)
    texts = list(texts)
    dataset = datamodule._dataset("predict", texts, datamodule._token_ids(texts), np.zeros(len(texts)))
    return DataLoader(dataset, batch_size=batch_size, collate_fn=datamodule.collate_fn)


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
    model: TrainedModel,
    inputs: Sequence[Path] | Sequence[str],
    top_k: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
) -> list[dict]:
    """Top-``k`` classes with probabilities for every image (image model) or text (text model), in order.

    Args:
        model: From :func:`load_trained`.
        inputs: Image files (see :func:`collect_inputs`), or texts for a text model
            (see :func:`collect_texts`).
        top_k: Classes reported per input, ``1..len(class_names)``; ``None``: 5, or every class when
            there are fewer.
        batch_size: Inputs per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...

    Returns:
        ``[{"path": str, "predictions": [{"class": name, "probability": p}, ...]}, ...]``; the first
        key is ``"text"`` (the text) for a text model.

    Raises:
        ValueError: On an out-of-range ``top_k`` or ``batch_size``, or an unreadable image.
    """
    if top_k is None:
        top_k = min(5, len(model.class_names))
    if not 1 <= top_k <= len(model.class_names):
        raise ValueError(f"top_k={top_k} must be in 1..{len(model.class_names)} (the number of classes)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    target = resolve_device(device)
    module = model.module.to(target)
    if model.modality == "text":
        batches = (
            {k: v.to(target) for k, v in tokens.items()}
            for tokens, _ in prepare_texts(model, inputs, batch_size)
        )
    else:
        batches = (
            prepare_images(model, inputs[start : start + batch_size]).to(target)
            for start in range(0, len(inputs), batch_size)
        )
    key = "text" if model.modality == "text" else "path"
    rows = []
    for batch in batches:
        top = module(batch).float().softmax(dim=-1).topk(top_k, dim=-1)
        for probs, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            ranked = [
                {"class": model.class_names[i], "probability": p} for i, p in zip(indices, probs, strict=True)
            ]
            rows.append({key: str(inputs[len(rows)]), "predictions": ranked})
    return rows


def _check_output(output: str | Path) -> Path:
    output = Path(output)
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"output={str(output)!r} must end in one of {list(OUTPUT_SUFFIXES)}")
    return output


def write_predictions(rows: list[dict], output: str | Path) -> Path:
    """Write :func:`predict` rows as CSV (``path, class_1, probability_1, ...``; ``text, ...`` for texts)
    or JSON, by suffix. The file is readable by all that the umask lets read it.

    Raises:
        ValueError: If ``output`` ends in neither ``.csv`` nor ``.json``.
    """
    output = _check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".json":
        output.write_text(json.dumps(rows, indent=2))
        return _shareable(output)
    key = next(iter(rows[0])) if rows else "path"
    k = len(rows[0]["predictions"]) if rows else 0
    with output.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [key, *[f"{field}_{r}" for r in range(1, k + 1) for field in ("class", "probability")]]
        )
        for row in rows:
            ranked = [v for p in row["predictions"] for v in (p["class"], f"{p['probability']:.6f}")]
            writer.writerow([row[key], *ranked])
    return _shareable(output)


def _shareable(path: Path) -> Path:
    """Give ``path`` the mode a newly created file gets (``0o666`` less the umask, e.g. ``0o644``), and
    a folder (``format=hf|timm``) and everything in it the modes new folders and files get (``0o755``).

    Writers that go through a private temporary file and rename it (safetensors does) leave ``0o600``.
    """
    mask = os.umask(0)
    os.umask(mask)
    if path.is_dir():
        for inner in [path, *path.rglob("*")]:
            os.chmod(inner, (0o777 if inner.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)
    return path


def export_safetensors(model: TrainedModel, output: str | Path) -> Path:
    """Write the weights with the run's description (``tl_lightning`` metadata, JSON) as safetensors.

    :func:`load_trained` (and so ``predict.py``) reads the file back. A prefix- or prompt-tuning model,
    which no plain weights can hold, is written as its checkpoint holds it: the virtual tokens and the
    target head, with the ``adapter`` config; loading rebuilds the base from its pretrained weights.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.serving_state_dict(), str(output), metadata={METADATA_KEY: json.dumps(model.metadata)})
    return _shareable(output)  # safetensors writes a 0o600 temporary file and renames it


def export_onnx(model: TrainedModel, output: str | Path) -> Path:
    """Write an ONNX graph: ``images`` (normalised, ``(batch, 3, S, S)``) -> ``logits``.

    The batch dimension is dynamic. The graph's metadata properties (JSON) hold what a server needs
    around it: ``class_names``, ``data_config`` (mean, std, interpolation, crop), ``image_size`` and
    ``data`` (the data module whose ``eval_transform`` prepared the training run's images).
    """
    import onnx

    if model.modality != "image":
        raise ValueError("export_onnx exports image models (images -> logits); see export_any_onnx")
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


def export_any_onnx(model: TrainedModel, output: str | Path) -> Path:
    """``format=onnx``: images -> logits for an image model (:func:`export_onnx`); the tokenizer's
    tensors -> logits for a text model (:func:`tl_lightning.run.formats.export_text_onnx`)."""
    if model.modality == "text":
        return export_text_onnx(model.module, model.metadata, output)
    return export_onnx(model, output)


EXPORTERS = {
    "safetensors": export_safetensors,
    "onnx": export_any_onnx,
    "hf": lambda model, output: export_hf(model.module, model.metadata, output),
    "timm": lambda model, output: export_timm(model.module, model.metadata, output),
}


def export(model: TrainedModel, format: str, output: str | Path) -> Path:
    """Write ``model`` as ``format`` (a key of :data:`EXPORTERS`) to ``output``.

    Nothing of someone else's is overwritten or left half-written: a non-empty folder at ``output`` is
    refused (a folder format would mix its files with what is there, and a loader could read a stale
    one), and an export that fails (a refusal, or a self-check whose logits differ) removes what it
    wrote.

    Raises:
        ValueError: On an unknown ``format``, listing the allowed ones, or a non-empty folder at ``output``.
    """
    if format not in EXPORTERS:
        raise ValueError(f"format={format!r} is not one of {list(EXPORTERS)}")
    output = Path(output)
    if output.is_dir() and any(output.iterdir()):
        raise ValueError(f"output={str(output)!r} is a folder that is not empty: choose a new output path")
    existed = output.exists()
    try:
        return _shareable(EXPORTERS[format](model, output))
    except BaseException:
        if not existed and output.is_dir():
            shutil.rmtree(output, ignore_errors=True)
        elif not existed:
            output.unlink(missing_ok=True)
        raise


def predict_to_file(
    ckpt_path: str | Path,
    inputs: str | Path | Sequence[str | Path] | None,
    output: str | Path,
    top_k: int | None = None,
    batch_size: int = 32,
    device: str = "auto",
    texts: Sequence[str] | None = None,
    text_column: str = "text",
    generation: dict | None = None,
) -> Path:
    """``predict.py``: check the arguments, load the model, collect its inputs, predict, write ``output``.

    What ``inputs`` holds follows the checkpoint: images (:func:`collect_inputs`) for an image model,
    text files (:func:`collect_texts`, with ``texts`` and ``text_column``) for a text model. A language
    model (``task=causal_lm``) continues each text instead: ``generation`` holds
    :func:`tl_lightning.run.generation.generate`'s options (``max_new_tokens``, ``do_sample``,
    ``temperature``, ``top_p``, ``seed``) and ``output`` gets ``prompt, generation`` rows.

    Raises:
        FileNotFoundError, ValueError: As :func:`collect_inputs` or :func:`collect_texts`,
            :func:`load_trained`, :func:`predict` and :func:`write_predictions`; a ValueError when
            ``texts`` are given to an image model.
    """
    _check_output(output)
    resolve_device(device)
    model = load_trained(ckpt_path)
    if is_language_model(model.module):  # a task=causal_lm run: generate from the prompts
        datamodule = text_datamodule(model)
        datamodule.load_tokenizer()
        prompts = collect_texts(inputs, texts, text_column)
        rows = generate(
            model.module,
            datamodule,
            prompts,
            batch_size=batch_size,
            device=resolve_device(device),
            **(generation or {}),
        )
        return _shareable(write_generations(rows, output))
    if model.modality == "text":
        collected = collect_texts(inputs, texts, text_column)
    elif texts:
        raise ValueError(
            f"{str(ckpt_path)!r} is an image model: it takes images (inputs=<files, folders or .txt lists>), "
            "not texts=[...]"
        )
    else:
        collected = collect_inputs(inputs if inputs is not None else [])
    return write_predictions(predict(model, collected, top_k, batch_size, device), output)


def export_checkpoint(ckpt_path: str | Path, format: str, output: str | Path) -> Path:
    """``export.py``: check ``format``, load the checkpoint, write ``output``.

    Raises:
        ValueError: On an unknown ``format`` (before loading), or as :func:`load_trained`.
    """
    if format not in EXPORTERS:
        raise ValueError(f"format={format!r} is not one of {list(EXPORTERS)}")
    return export(load_trained(ckpt_path), format, output)
