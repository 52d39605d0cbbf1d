"""Visibility into fine-tuning: how much is trainable, and how far each layer group moved."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from tl_lightning.callbacks._select import (
    ModuleSelector,
    as_layer_groups_arg,
    as_selector_list,
    layer_groups,
    parameters_by_name,
)


class TrainableParamsMonitor(Callback):
    r"""Log ``trainable_params``, the number of parameter elements that require grad.

    Logged after the first training batch of every epoch and after any batch where the count
    changed (e.g. a :class:`~tl_lightning.callbacks.GradualUnfreeze` milestone), so each stage shows,
    whatever the order of the callbacks.

    Example::

        trainer = Trainer(callbacks=[GradualUnfreeze(milestones=[1, 2]), TrainableParamsMonitor()])
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: int | None = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        count = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        if batch_idx == 0 or count != self._last:
            pl_module.log("trainable_params", float(count), on_step=True, on_epoch=False, batch_size=1)
        self._last = count


class LayerDriftMonitor(Callback):
    r"""Log each layer group's relative drift from where fine-tuning started, at every training epoch end.

    ``drift/<group> = ||θ - θ₀|| / ||θ₀||`` over the group's parameters, with ``θ₀`` captured at the
    start of the first fit and kept in the checkpoint, so a resumed run measures from the same
    origin. A group whose initial norm is zero logs the absolute distance. ``θ₀`` lives on the CPU;
    the cost is one device-to-host copy of the selected parameters per epoch.

    Args:
        modules: Attribute path, regex or list of them selecting the modules to watch.
        layer_groups: ``{group name: [parameter/module paths or regexes]}`` ordered input -> output,
            overriding the modules' own ``layer_groups()`` / children order.

    Raises:
        AttributeError: In ``setup()``, if a selector matches no module.

    Example::

        trainer = Trainer(callbacks=[LayerDriftMonitor(modules="backbone")])
    """

    def __init__(
        self, modules: ModuleSelector = "backbone", layer_groups: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        super().__init__()
        self.modules = as_selector_list(modules)
        self.layer_groups = as_layer_groups_arg(layer_groups)
        self._groups: dict[str, list[str]] = {}
        self._initial: dict[str, torch.Tensor] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._groups = layer_groups(pl_module, self.modules, self.layer_groups)
        self._initial = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"initial": self._initial}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._initial = dict(state_dict["initial"])

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._initial:
            names = [name for names in self._groups.values() for name in names]
            params = parameters_by_name(pl_module, names)
            self._initial = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        drift = {}
        for group, names in self._groups.items():
            moved = initial = 0.0
            for name in names:
                start = self._initial[name]
                moved += (params[name].detach().cpu().float() - start.float()).square().sum().item()
                initial += start.float().square().sum().item()
            drift[f"drift/{group}"] = (moved / initial) ** 0.5 if initial > 0 else moved**0.5
        pl_module.log_dict(drift, on_step=False, on_epoch=True, batch_size=1)
