"""Feature extraction: freeze the selected modules for the whole run."""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from typing_extensions import override

from tl_lightning.callbacks._select import (
    ModuleSelector,
    as_selector_list,
    select_modules,
    selected_parameters,
)


def norm_layers(root: nn.Module, modules: ModuleSelector) -> dict[str, nn.Module]:
    """Normalisation layers with running statistics (BatchNorm, SyncBatchNorm, InstanceNorm) in the selection.

    Returns:
        ``{name in root: module}`` in ``named_modules()`` order.
    """
    found: dict[str, nn.Module] = {}
    for prefix, module in select_modules(root, modules).items():
        for name, sub in module.named_modules(prefix=prefix):
            if isinstance(sub, _NormBase):
                found[name] = sub
    return found


def norm_parameter_names(norms: dict[str, nn.Module]) -> set[str]:
    """Names in root of the affine parameters of ``norms`` (as returned by :func:`norm_layers`)."""
    return {f"{name}.{p_name}" for name, module in norms.items() for p_name, _ in module.named_parameters()}


def modules_by_name(root: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """Look modules up again by name, e.g. after a strategy swapped BatchNorm for SyncBatchNorm."""
    named = dict(root.named_modules())
    return [named[name] for name in names]


def keep_eval(modules: Iterable[nn.Module]) -> None:
    """Put back in eval mode any of ``modules`` that something switched to train mode."""
    for module in modules:
        if module.training:
            module.eval()


class Freeze(Callback):
    r"""Freeze the selected modules for the whole run (feature extraction / linear probing).

    Freezing happens in ``setup()``, before ``configure_optimizers`` and before a strategy wraps the
    model, so a module that hands only trainable parameters to its optimizer sees it. Frozen
    normalisation layers are kept in eval mode at every training batch, so their running statistics
    never change even when something calls ``model.train()``.

    Args:
        modules: Attribute path, regex or list of them selecting what to freeze.
        train_bn: Keep the affine parameters of normalisation layers trainable and those layers in
            train mode from the first step (fastai semantics).

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
        norms = norm_layers(pl_module, self.modules)
        keep = norm_parameter_names(norms) if self.train_bn else set()
        for name, param in selected_parameters(pl_module, self.modules).items():
            param.requires_grad_(name in keep)
        self._eval_names = [] if self.train_bn else list(norms)

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
