"""Discriminative (layer-wise) learning rates that any torch scheduler respects."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from tl_lightning.callbacks._param_groups import optimizer_schedulers, partition_optimizers, scale_lrs
from tl_lightning.callbacks._select import (
    ModuleSelector,
    as_layer_groups_arg,
    as_selector_list,
    layer_groups,
    layer_parameters,
)


class LayerwiseLR(Callback):
    r"""Scale the learning rate of each layer group of the selected modules (discriminative fine-tuning).

    Parameters outside ``modules`` keep their learning rate. The selected layer groups get
    ``decay ** k``, with ``k = 1`` for the group closest to the output, ``2`` for the next, and so on;
    ``lrs`` overrides the factor of the groups it matches.

    At ``on_fit_start`` the optimizers are repartitioned so every layer group has named parameter
    groups of its own (parameters the module did not pass to its optimizer are added, see
    :class:`~tl_lightning.callbacks.GradualUnfreeze`), then every learning-rate valued entry is scaled:
    the groups' ``lr``, ``initial_lr``, ``max_lr``, ``min_lr`` (OneCycleLR) and the schedulers'
    ``base_lrs``, ``_last_lr``, ``min_lrs`` (ReduceLROnPlateau), ``max_lrs`` (CyclicLR). Any torch
    scheduler then yields the base schedule times the factor; floors given as one scalar (e.g.
    CosineAnnealingLR's ``eta_min``) stay unscaled. On resume the checkpoint's optimizer and scheduler
    state, already scaled, replace the freshly scaled one, so nothing is scaled twice.

    The learning rate of every parameter group is sent to the trainer's loggers as ``lr/<group name>``
    every ``log_every_n_steps`` optimizer steps, like ``LearningRateMonitor`` (the scheduled rate; a
    transient :class:`GradualUnfreeze` warm-up factor is not included). Going to the loggers directly
    costs microseconds; ``LightningModule.log`` costs about half a millisecond per group and step.

    Args:
        modules: Attribute path, regex or list of them selecting the modules whose layer groups are scaled.
        decay: Factor per layer group away from the output, in ``(0, 1]``.
        lrs: ``{layer group name or regex: factor >= 0}``; the first matching entry sets a group's factor.
        layer_groups: ``{group name: [parameter/module paths or regexes]}`` ordered input -> output,
            overriding the modules' own ``layer_groups()`` / children order.

    The factors are checkpointed by layer-group name; resuming with other factors is an error, since the
    saved optimizer state was scaled with the old ones.

    Raises:
        ValueError: If ``decay`` or an ``lrs`` factor is out of range or an ``lrs`` key is not a valid
            regex; in ``setup()``, if an ``lrs`` key matches no layer group (the message lists them); on
            resume, if the checkpoint's factors differ from this run's.
        AttributeError: In ``setup()``, if a selector matches no module.

    Example::

        trainer = Trainer(callbacks=[LayerwiseLR(modules="backbone", decay=0.7)])
    """

    def __init__(
        self,
        modules: ModuleSelector = "backbone",
        decay: float = 0.5,
        lrs: Mapping[str, float] | None = None,
        layer_groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        self.modules = as_selector_list(modules)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ValueError(f"`decay` must be a number in (0, 1], got {decay!r}")
        self.decay = float(decay)
        self.lrs = dict(lrs or {})
        for pattern, factor in self.lrs.items():
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 0:
                raise ValueError(f"`lrs[{pattern!r}]` must be a number >= 0, got {factor!r}")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"`lrs` key {pattern!r} is not a valid regex: {err}") from err
        self.layer_groups = as_layer_groups_arg(layer_groups)
        self._layer_names: dict[str, list[str]] = {}
        self._layers: dict[str, dict[str, nn.Parameter]] = {}
        self.factors: dict[str, float] = {}
        self._logged_step = -1

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        names = layer_groups(pl_module, self.modules, self.layer_groups)
        self._layer_names = names
        self._layers = layer_parameters(pl_module, names)
        self.factors = self._factors(list(names))
        self._logged_step = -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"factors": dict(self.factors)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["factors"] != self.factors:
            raise ValueError(
                f"the checkpoint's {type(self).__name__} factors {state_dict['factors']} differ from this "
                f"run's {self.factors}: the saved optimizer state was scaled with the former"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # looked up again: FSDP2's configure_model replaced the parameters setup() saw
        self._layers = layer_parameters(pl_module, self._layer_names)
        partition_optimizers(trainer, self._layers)
        factor_of = {
            id(p): self.factors[layer] for layer, group in self._layers.items() for p in group.values()
        }
        for optimizer in trainer.optimizers:
            factors = [
                factor_of.get(id(group["params"][0]), 1.0) if group["params"] else 1.0
                for group in optimizer.param_groups
            ]
            scale_lrs(optimizer, factors, optimizer_schedulers(trainer, optimizer))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not trainer.loggers or step % trainer.log_every_n_steps or step == self._logged_step:
            return
        lrs = {f"lr/{g['name']}": float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups}
        for logger in trainer.loggers:
            logger.log_metrics(lrs, step=step)
        self._logged_step = step

    def _factors(self, groups: list[str]) -> dict[str, float]:
        factors = {name: self.decay ** (len(groups) - i) for i, name in enumerate(groups)}
        claimed: set[str] = set()
        for pattern, factor in self.lrs.items():
            matched = [name for name in groups if name == pattern or re.fullmatch(pattern, name)]
            if not matched:
                raise ValueError(f"`lrs` key {pattern!r} matches no layer group of {self.modules}: {groups}")
            for name in set(matched) - claimed:
                factors[name] = float(factor)
            claimed.update(matched)
        return factors
