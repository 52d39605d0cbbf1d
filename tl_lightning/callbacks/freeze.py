"""Feature extraction: freeze the selected modules for the whole run."""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from typing_extensions import override

from tl_lightning.callbacks._select import (
    ModuleSelector,
    as_selector_list,
    module_paths,
    select_modules,
    selected_parameters,
    walk_modules,
)


def changes_trainability(callback: pl.Callback) -> bool:
    """Whether ``callback`` declares that it may make frozen parameters trainable during the run.

    A callback declares it with a ``changes_trainability = True`` attribute; Lightning's
    ``BaseFinetuning`` subclasses exist to unfreeze, so they count as declaring it.
    """
    return bool(getattr(callback, "changes_trainability", False)) or isinstance(callback, BaseFinetuning)


def norm_layers(root: nn.Module, modules: ModuleSelector) -> dict[str, nn.Module]:
    """Normalisation layers with running statistics (BatchNorm, SyncBatchNorm, InstanceNorm) in the selection.

    Returns:
        ``{path in root: module}`` in model order (compiled modules seen through).
    """
    inside = selected_submodules(root, modules)
    return {path: sub for path, sub in inside.items() if isinstance(sub, _NormBase)}


def selected_submodules(root: nn.Module, modules: ModuleSelector) -> dict[str, nn.Module]:
    """Every module inside the selection, the selected ones included: ``{path in root: module}``."""
    found: dict[str, nn.Module] = {}
    for prefix, module in select_modules(root, modules).items():
        for path, sub in walk_modules(module, prefix):
            found.setdefault(path, sub)
    return found


def norm_parameter_ids(norms: dict[str, nn.Module]) -> set[int]:
    """Identities of the affine parameters of ``norms`` (as returned by :func:`norm_layers`)."""
    return {id(p) for module in norms.values() for p in module.parameters()}


def modules_by_name(root: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """Look modules up again by path, e.g. after a strategy swapped BatchNorm for SyncBatchNorm."""
    paths = module_paths(root)
    return [paths[name] for name in names]


def keep_eval(modules: Iterable[nn.Module]) -> None:
    """Put back in eval mode any of ``modules`` that something switched to train mode.

    Only each module's own flag is set (``module.training = False``), not its children's: the list
    names every module to keep in eval, so a norm layer left out of it (``train_bn``) keeps training.
    """
    for module in modules:
        if module.training:
            module.training = False


class Freeze(Callback):
    r"""Freeze the selected modules for the whole run (feature extraction / linear probing).

    Freezing happens in ``setup()``, before ``configure_optimizers`` and before a strategy wraps the
    model, so a module that hands only trainable parameters to its optimizer sees it. The frozen
    modules are **entirely** in eval mode at every training batch, even when something calls
    ``model.train()``: normalisation layers keep their running statistics, and dropout and drop-path
    are off, so a frozen module computes a fixed function of its input (what makes caching its
    features safe).

    Args:
        modules: Attribute path, regex or list of them selecting what to freeze.
        train_bn: Keep the affine parameters of normalisation layers trainable and those layers (only
            those) in train mode from the first step (fastai semantics).

    Raises:
        ValueError: If ``modules`` is empty or ``train_bn`` is not a bool.
        AttributeError: In ``setup()``, if a selector matches no module; the message lists the
            module's top-level children.

    Example::

        trainer = Trainer(callbacks=[Freeze(modules="backbone")])
    """

    def __init__(self, modules: ModuleSelector = "backbone", train_bn: bool = False) -> None:
        super().__init__()
        if not isinstance(train_bn, bool):
            raise ValueError(f"`train_bn` must be True or False, got {train_bn!r}")
        self.modules = as_selector_list(modules)
        self.train_bn = train_bn
        self._eval_names: list[str] = []
        self._eval_modules: list[nn.Module] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        inside = selected_submodules(pl_module, self.modules)
        norms = norm_layers(pl_module, self.modules)
        keep = norm_parameter_ids(norms) if self.train_bn else set()
        for param in selected_parameters(pl_module, self.modules).values():
            param.requires_grad_(id(param) in keep)
        self._eval_names = [path for path in inside if not (self.train_bn and path in norms)]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_modules = modules_by_name(pl_module, self._eval_names)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        keep_eval(self._eval_modules)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        keep_eval(self._eval_modules)
