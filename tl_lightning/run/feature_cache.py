"""Train a head on backbone features computed once, when the backbone never changes.

Valid only when the backbone is frozen and in eval mode for the whole run and the training inputs
are deterministic (no random augmentation): then every epoch would recompute the same features.
The pipeline checks this positively (:func:`cache_applies`) before wrapping the data: a ``Freeze``
callback covers every backbone parameter, and no callback declares that it changes trainability
(``changes_trainability = True``, as ``GradualUnfreeze`` and Lightning's ``BaseFinetuning`` do).

On disk, features are stored as safetensors under a key hashing the backbone's architecture
(module tree, every module's plain settings such as ``pool_type`` or ``drop_rate``, and the config it
was built from), its weights and buffers by name, the preprocessing, *and* the exact input tensors,
so the data and its transform are covered too. Inputs are hashed and embedded batch by batch: only
one batch of images is ever held in memory. Text inputs (a dict of unpadded token tensors per sample)
are batched by the data module's ``collate_fn`` (dynamic padding) and hashed per sample, unpadded.

Features are extracted when a loader is built, from the weights the backbone holds then, and again
whenever those weights changed (:class:`CachedFeatureDataModule`): a run that loads ``ckpt_path`` is
served the checkpoint's features, not those of the weights it was built with.

When the backbone is frozen but the training inputs are random (augmentation), only validation and
test run on cached features (:func:`evaluation_cache_applies`): their inputs are deterministic, so each
epoch's validation would recompute the same features. Training keeps its images; the
:class:`EvaluateOnCachedFeatures` callback switches the module to features for validation and test only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

import lightning.pytorch as pl
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tl_lightning._modes import eval_mode
from tl_lightning.callbacks import Freeze
from tl_lightning.callbacks._select import selected_parameters
from tl_lightning.callbacks.freeze import changes_trainability
from tl_lightning.data.base import ClassificationDataModule

log = logging.getLogger(__name__)
MODES = ("auto", "off", "memory", "disk")
SPLITS = ("train", "val", "test")
_PLAIN = (bool, int, float, str, type(None))


def backbone_stays_frozen(callbacks: Sequence[pl.Callback], module: nn.Module) -> bool:
    """Whether ``module.backbone`` is frozen and in eval mode for the whole run.

    Decided positively: every backbone parameter is selected by a ``Freeze`` callback with
    ``train_bn=False`` and no callback declares
    :func:`~tl_lightning.callbacks.freeze.changes_trainability`.

    Args:
        callbacks: The run's callbacks.
        module: The ``LightningModule`` whose ``backbone`` attribute would be cached.
    """
    if any(changes_trainability(c) for c in callbacks):
        return False
    backbone = getattr(module, "backbone", None)
    if backbone is None:
        return False
    frozen: set[int] = set()
    for callback in callbacks:
        if isinstance(callback, Freeze) and not callback.train_bn:
            frozen.update(id(p) for p in selected_parameters(module, callback.modules).values())
    return all(id(p) in frozen for p in backbone.parameters())


def evaluation_cache_applies(
    callbacks: Sequence[pl.Callback], datamodule: pl.LightningDataModule, module: nn.Module
) -> bool:
    """Whether validation and test can run on cached features: the backbone stays frozen (random training
    inputs allowed: evaluation inputs are never augmented), the module takes features
    (``use_cached_features``, as ``TransferModule`` does) and the data module is a plain
    :class:`~tl_lightning.data.base.ClassificationDataModule` with one validation and one test split
    (not domain adaptation's or multi-task's lists of loaders).

    Args:
        callbacks: The run's callbacks.
        datamodule: The run's data module.
        module: The ``LightningModule``.
    """
    single_split = isinstance(datamodule, ClassificationDataModule) and all(
        getattr(type(datamodule), name) is getattr(ClassificationDataModule, name)
        for name in ("val_dataloader", "test_dataloader")
    )
    return single_split and hasattr(module, "cached_features") and backbone_stays_frozen(callbacks, module)


def cache_applies(
    callbacks: Sequence[pl.Callback], datamodule: ClassificationDataModule, module: nn.Module
) -> bool:
    """Whether the run keeps ``module.backbone`` frozen and in eval mode on deterministic inputs.

    Decided positively: every backbone parameter is selected by a ``Freeze`` callback with
    ``train_bn=False`` (which freezes it and keeps the module in eval mode for the whole run), no
    callback declares :func:`~tl_lightning.callbacks.freeze.changes_trainability`, and the training
    inputs are deterministic.

    Args:
        callbacks: The run's callbacks.
        datamodule: The image data module.
        module: The ``LightningModule`` whose ``backbone`` attribute would be cached.
    """
    return datamodule.deterministic_train and backbone_stays_frozen(callbacks, module)


def _plain(value: object) -> object:
    """``value`` if it is plain data (recursively), else ``None``: never an object's address."""
    if isinstance(value, _PLAIN):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))  # e.g. a Backbone's DataConfig
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return None


def architecture(backbone: nn.Module) -> str:
    """A deterministic description of the module tree and every module's plain settings.

    Covers what the weights do not: ``global_pool="max"`` vs ``"avg"``, dropout rates, activation
    choices, flags held as attributes. The train/eval flag is left out (features are always
    computed in eval mode).
    """
    modules = []
    for name, sub in backbone.named_modules():
        settings = {k: _plain(v) for k, v in vars(sub).items() if not k.startswith("_") and k != "training"}
        modules.append([name, f"{type(sub).__module__}.{type(sub).__qualname__}", sub.extra_repr(), settings])
    return json.dumps(modules, sort_keys=True, default=str)


def _update(digest: hashlib.sha256, tensor: torch.Tensor) -> None:
    digest.update(str((tensor.dtype, tuple(tensor.shape))).encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


Collate = Callable[[list], tuple]


def _batches(
    dataset: Dataset, batch_size: int, collate: Collate | None = None
) -> Iterator[tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]]:
    """``(inputs, labels)`` batches in order, stacked into one reused buffer (valid until the next batch).

    With ``collate`` (samples of unequal size, e.g. token sequences), each batch is ``collate`` of its
    samples instead.

    One buffer instead of a new batch per step: the allocator then has nothing to fragment, so the
    peak memory stays at one batch (a fresh batch per step let glibc's heap grow by up to the whole
    split). The run's global RNG stream is left untouched.

    Raises:
        ValueError: If a sample's shape or dtype differs from the first sample's, naming its index.
    """
    buffer: torch.Tensor | None = None
    with torch.random.fork_rng(devices=[]):
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            if collate is not None:
                yield collate([dataset[index] for index in indices])
                continue
            labels = []
            for row, index in enumerate(indices):
                image, label = dataset[index]
                if buffer is None:
                    buffer = torch.empty((batch_size, *image.shape), dtype=image.dtype)
                if image.shape != buffer.shape[1:] or image.dtype != buffer.dtype:
                    raise ValueError(
                        f"sample {index} is {image.dtype} {tuple(image.shape)}, sample 0 was "
                        f"{buffer.dtype} {tuple(buffer.shape[1:])}: features need equal-size inputs"
                    )
                buffer[row].copy_(image)
                labels.append(torch.as_tensor(label))
            yield buffer[: len(indices)], torch.stack(labels)


def _update_samples(
    digest: hashlib.sha256, dataset: Dataset, batch_size: int, collate: Collate | None
) -> None:
    """Hash every input and label, per sample, so neither the batch size nor the padding changes the key."""
    if collate is None:
        for inputs, labels in _batches(dataset, batch_size):
            for i in range(len(labels)):
                _update(digest, inputs[i])
                _update(digest, labels[i])
        return
    for index in range(len(dataset)):
        inputs, label = dataset[index]
        for key in sorted(inputs):
            digest.update(key.encode())
            _update(digest, inputs[key])
        _update(digest, torch.as_tensor(label))


def cache_key(
    backbone: nn.Module,
    dataset: Dataset,
    batch_size: int,
    config: Mapping | None = None,
    collate: Collate | None = None,
) -> str:
    """Hash of the backbone (architecture, ``config``, named weights and buffers) and every input and label.

    Args:
        backbone: The feature extractor.
        dataset: Yields ``(input, label)`` deterministically; read batch by batch.
        batch_size: Samples per batch while hashing (does not change the key).
        config: What the backbone was built from and the preprocessing, as plain data.
        collate: Batches samples whose inputs are dicts of token tensors (see :func:`_batches`).
    """
    digest = hashlib.sha256()
    digest.update(architecture(backbone).encode())
    digest.update(json.dumps(_plain(config or {}), sort_keys=True).encode())
    digest.update(weights_fingerprint(backbone).encode())
    _update_samples(digest, dataset, batch_size, collate)
    return digest.hexdigest()[:32]


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _floating_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's floating-point weights (``bfloat16`` under ``precision=bf16-true``)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.get_default_dtype())


def _to(inputs: torch.Tensor | Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    """Inputs on ``device``; floating-point ones (images, not token ids or masks) in ``dtype``."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)

    if isinstance(inputs, Mapping):
        return {key: move(value) for key, value in inputs.items()}
    return move(inputs)


@torch.no_grad()
def _embed(
    backbone: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    collate: Collate | None = None,
) -> TensorDataset:
    """Features (on the CPU) and labels of ``dataset``, computed batch by batch on ``device`` in eval mode."""
    home, dtype = _device_of(backbone), _floating_dtype(backbone)
    features, labels = [], []
    with eval_mode(backbone):
        try:
            backbone.to(device)
            for inputs, targets in _batches(dataset, batch_size, collate):
                # copy: never a view of the reused buffer
                features.append(backbone(_to(inputs, device, dtype)).to("cpu", copy=True))
                labels.append(targets)
        finally:
            backbone.to(home)
    return TensorDataset(torch.cat(features), torch.cat(labels))


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write under a name unique to this process, then rename: concurrent ranks never share a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    batch_size: int,
    cache_dir: str | Path | None = None,
    *,
    config: Mapping | None = None,
    device: torch.device | str | None = None,
    collate: Collate | None = None,
) -> TensorDataset:
    """Features and labels of every sample of ``dataset``, in order, from ``backbone`` in eval mode.

    Args:
        backbone: Maps inputs to feature vectors; put in eval mode (and on ``device``) for the call,
            then restored.
        dataset: Yields ``(input, label)`` deterministically; read batch by batch, never all at once.
        batch_size: Samples per forward pass.
        cache_dir: When given, reuse or write ``<key>.safetensors`` there (see :func:`cache_key`).
        config: Plain-data description of how the backbone was built and of the preprocessing; part
            of the key.
        device: Where the forward passes run (the training device); default: the backbone's.
        collate: Turns a list of samples into a batch, for inputs of unequal size (text data modules'
            ``collate_fn``: dynamic padding); ``None`` stacks equal-size tensors.

    Returns:
        A ``TensorDataset(features, labels)`` on the CPU.

    Example::

        train = extract_features(backbone, data.train_set, 256, ".cache/features", device="cuda")
    """
    device = torch.device(device) if device is not None else _device_of(backbone)
    if cache_dir is None:
        return _embed(backbone, dataset, batch_size, device, collate)
    path = Path(cache_dir) / f"{cache_key(backbone, dataset, batch_size, config, collate)}.safetensors"
    if path.is_file():
        log.info("feature cache hit: %s", path)
        stored = load_file(path)
        return TensorDataset(stored["features"], stored["labels"])
    embedded = _embed(backbone, dataset, batch_size, device, collate)
    _save_atomically({"features": embedded.tensors[0], "labels": embedded.tensors[1]}, path)
    return embedded


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 of ``module``'s state dict (names, dtypes, shapes and bytes): which weights would run now.

    Example::

        before = weights_fingerprint(backbone)
        backbone.load_state_dict(other)
        assert weights_fingerprint(backbone) != before
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        _update(digest, tensor)
    return digest.hexdigest()


class CachedFeatureDataModule(ClassificationDataModule):
    """Wraps a data module so that every split yields backbone features instead of images.

    Features are extracted when a split's loader is asked for, not in ``setup()``: Lightning calls
    ``setup()`` *before* it loads ``ckpt_path``, so features extracted there would come from the weights
    the run was built with, not the checkpoint's (a merged checkpoint tested with the pretrained
    backbone). Each split remembers the :func:`weights_fingerprint` it was extracted from and is
    extracted again when the backbone's weights differ (the content is hashed only when a tensor was
    modified or replaced since the last request, so unchanged weights cost no hashing; a write through
    ``parameter.data``, which bypasses the version counter, is not seen: write the tensor itself, under
    ``torch.no_grad()``, or use ``load_state_dict``). Extraction runs
    on the trainer's device when a trainer is attached, in batches of the wrapped data module's
    ``batch_size`` (collated by its ``collate_fn`` when it has one, as text data modules do), under
    the trainer's precision (``bf16-mixed``: autocast, as in a training or validation step; the
    precision is then part of the on-disk key).

    Args:
        datamodule: The image or text data module (deterministic training inputs, unless ``splits``
            leaves ``train`` out).
        backbone: The frozen backbone whose features are cached.
        cache_dir: Directory for the on-disk cache; ``None`` keeps features in memory only.
        config: Plain-data description of how the backbone was built (e.g. the ``backbone`` config
            node); part of the on-disk key together with the preprocessing.
        splits: The splits served as features; the others are the wrapped data module's own loaders
            (``("val", "test")``: training on augmented images, evaluation on features, with
            :class:`EvaluateOnCachedFeatures`).

    Raises:
        ValueError: If ``splits`` names another split, or holds ``train`` while ``datamodule``
            applies random training augmentation.

    Example::

        data = CachedFeatureDataModule(DigitsDataModule(backbone.data_config), backbone)
    """

    def __init__(
        self,
        datamodule: ClassificationDataModule,
        backbone: nn.Module,
        cache_dir: str | Path | None = None,
        config: Mapping | None = None,
        *,
        splits: Sequence[str] = SPLITS,
    ) -> None:
        if not set(splits) <= set(SPLITS):
            raise ValueError(f"splits must be among {list(SPLITS)}, got {list(splits)}")
        if "train" in splits and not datamodule.deterministic_train:
            raise ValueError("feature caching needs deterministic training inputs; set data.augment=false")
        super().__init__(datamodule.data_config, datamodule.batch_size, 0, False, datamodule.shuffle_seed)
        self.source = datamodule
        self.splits = tuple(splits)
        self.backbone = backbone
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.config = {"backbone": dict(config or {}), "data_config": datamodule.data_config.as_dict()}
        self._extracted_from: dict[str, str] = {}  # split -> weights_fingerprint it was extracted from
        self._seen: tuple = ()  # identity and version of every backbone tensor when last fingerprinted
        self._fingerprint = ""

    def setup(self, stage: str | None = None) -> None:
        """Set up the wrapped data module; features wait for each split's loader (see the class docstring)."""
        if self.class_names:
            return
        self.source.setup(stage)
        self.class_names = list(self.source.class_names)
        for split in set(SPLITS) - set(self.splits):  # served by the wrapped data module
            setattr(self, f"{split}_set", getattr(self.source, f"{split}_set"))
        self.probe_set = self.source.probe_set  # images: SourceRetention runs the backbone itself

    def features(self, split: str) -> TensorDataset:
        """``split``'s (``train``, ``val`` or ``test``) features from the backbone's current weights.

        Raises:
            ValueError: On another split name.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.setup()
        seen = tuple(
            (id(t), t.data_ptr(), t._version) for t in self.backbone.state_dict(keep_vars=True).values()
        )
        if seen != self._seen:  # a tensor was written or replaced: hash what the weights hold now
            self._seen, self._fingerprint = seen, weights_fingerprint(self.backbone)
        if self._extracted_from.get(split) != self._fingerprint:
            trainer = self.trainer
            config = self.config
            if trainer is not None and str(trainer.precision) != "32-true":  # e.g. bf16-mixed: other features
                config = {**config, "precision": str(trainer.precision)}
            # under the trainer's precision (autocast for *-mixed), as the backbone runs in a step
            with trainer.precision_plugin.forward_context() if trainer is not None else nullcontext():
                extracted = extract_features(
                    self.backbone,
                    getattr(self.source, f"{split}_set"),
                    self.source.batch_size,  # what training fits in memory; activations dominate the peak
                    self.cache_dir,
                    config=config,
                    device=trainer.strategy.root_device if trainer is not None else None,
                    collate=getattr(self.source, "collate_fn", None),
                )
            setattr(self, f"{split}_set", extracted)
            self._extracted_from[split] = self._fingerprint
        return getattr(self, f"{split}_set")

    def _loader_of(self, split: str) -> DataLoader:
        if split not in self.splits:
            self.setup()
            self.source.trainer = self.trainer  # e.g. DDP sharding of a length-grouped text sampler
            return getattr(self.source, f"{split}_dataloader")()
        self.features(split)
        return getattr(super(), f"{split}_dataloader")()

    def train_dataloader(self) -> DataLoader:
        return self._loader_of("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader_of("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader_of("test")


class EvaluateOnCachedFeatures(pl.Callback):
    """Validation and test on cached backbone features, training on the data module's own inputs.

    For a :class:`CachedFeatureDataModule` with ``splits=("val", "test")``: sets the module's
    ``cached_features`` flag (``TransferModule.forward`` then skips the backbone) while validation (the
    sanity check included) and test run, and clears it for training. The frozen backbone in eval mode
    computes the same features for those deterministic inputs on every epoch, so the metrics are those
    of running it each time.

    Example::

        data = CachedFeatureDataModule(augmented, backbone, splits=("val", "test"))
        trainer = pl.Trainer(callbacks=[Freeze("backbone"), EvaluateOnCachedFeatures()])
    """

    @staticmethod
    def _set(pl_module: pl.LightningModule, on: bool) -> None:
        pl_module.cached_features = on

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(pl_module, False)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(pl_module, True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(pl_module, False)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(pl_module, True)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set(pl_module, False)
