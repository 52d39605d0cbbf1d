"""Staged unfreezing (gradual unfreezing, ULMFiT / LP-FT) that survives schedulers, resuming and DDP."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from tl_lightning.callbacks._ddp import all_reduce_grads_mean, ddp_syncs_this_backward
from tl_lightning.callbacks._param_groups import groups_of_layers, partition_optimizers
from tl_lightning.callbacks._select import (
    ModuleSelector,
    as_layer_groups_arg,
    as_selector_list,
    layer_groups,
    layer_parameters,
    modules_of_groups,
)
from tl_lightning.callbacks._sharded import is_sharded
from tl_lightning.callbacks.freeze import (
    changes_trainability,
    keep_eval,
    modules_by_name,
    norm_layers,
    norm_parameter_ids,
)

UNITS = ("epoch", "step")


class GradualUnfreeze(Callback):
    r"""Unfreeze the selected modules in stages, from the output side, at epoch or step milestones.

    Everything selected is frozen in ``setup()`` (before ``configure_optimizers`` and before DDP wraps
    the model). At each milestone the next ``groups_per_milestone`` layer groups, counted from the
    output side, become trainable; the last milestone unfreezes all that remains. LP-FT (linear probe,
    then fine-tune everything) is ``GradualUnfreeze(milestones=[k])``.

    What makes it safe on any ``LightningModule``:

    * at ``on_fit_start`` (before any step and before a checkpoint's optimizer state is restored) the
      optimizers are repartitioned once so every layer group has named parameter groups of its own;
      selected parameters the module did not pass to its optimizer are added then, frozen, and every
      scheduler's per-group lists follow. No group is ever added mid-run.
    * parameters unfrozen after DDP wrapped the model are not reduced by DDP; their gradients are
      averaged across ranks in ``on_after_backward`` of every backward DDP reduces (the last of an
      accumulation window), before a ``GradScaler`` unscales and looks for infs, so ranks stay
      identical and make the same skip/step decision; a gradient missing on every rank stays ``None``
      (see ``tl_lightning.callbacks._ddp``). Under FSDP2 (``fully_shard`` in ``configure_model``, which
      replaces the parameters after ``setup()``) the layer groups are looked up again by name at
      ``on_fit_start``; FSDP2 reduce-scatters every gradient that exists, so nothing is added.
    * the stage is checkpointed as plain data; on resume it is re-applied at ``on_fit_start``, after
      ``configure_optimizers`` saw the same all-frozen model as the original run did, so the
      optimizer layout, and with it the saved optimizer state, matches exactly (and again at
      ``on_train_start``, for strategies that restore a checkpoint after ``on_fit_start``).
    * frozen normalisation layers stay in eval mode (running statistics untouched) until unfrozen.

    Args:
        modules: Attribute path, regex or list of them selecting what to freeze and unfreeze.
        milestones: Strictly increasing, non-negative epochs or optimizer steps (see ``unit``).
        unit: ``"epoch"`` (``trainer.current_epoch``) or ``"step"`` (``trainer.global_step``; applied at
            the start of a gradient-accumulation window).
        groups_per_milestone: Layer groups unfrozen per milestone (the last one takes all the rest),
            or a list with one count per milestone summing to the number of layer groups.
        train_bn: Keep normalisation layers' affine parameters trainable and those layers in train mode
            from the first step.
        warmup_steps: Linear learning-rate warm-up, in optimizer steps, for each newly unfrozen block:
            its groups' scheduled lr is multiplied by ``(k + 1) / (warmup_steps + 1)`` at the ``k``-th step
            after unfreezing, only for that step, so any scheduler composes with it.
        layer_groups: ``{group name: [parameter/module paths or regexes]}`` ordered input -> output,
            overriding the modules' own ``layer_groups()`` / children order.

    Raises:
        ValueError: If an argument is invalid (the message lists the allowed values), or in
            ``setup()`` if there are more milestones than layer groups to unfreeze, or on resume if the
            checkpoint's layer groups differ, or in ``on_fit_start()`` (before any step) if the first
            phase leaves no parameter of the model trainable.
        AttributeError: In ``setup()``, if a selector matches no module.

    Example::

        # head only for 2 epochs, then one more layer group per epoch
        trainer = Trainer(callbacks=[GradualUnfreeze(milestones=[2, 3, 4], warmup_steps=100)])
    """

    changes_trainability = True  # declares that frozen parameters become trainable during the run

    def __init__(
        self,
        modules: ModuleSelector = "backbone",
        *,
        milestones: Sequence[int],
        unit: Literal["epoch", "step"] = "epoch",
        groups_per_milestone: int | Sequence[int] = 1,
        train_bn: bool = False,
        warmup_steps: int = 0,
        layer_groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        self.modules = as_selector_list(modules)
        self.milestones = _check_milestones(milestones)
        if unit not in UNITS:
            raise ValueError(f"`unit` must be one of {UNITS}, got {unit!r}")
        self.unit = unit
        self.groups_per_milestone = _check_groups_per_milestone(groups_per_milestone, len(self.milestones))
        if not isinstance(train_bn, bool):
            raise ValueError(f"`train_bn` must be True or False, got {train_bn!r}")
        self.train_bn = train_bn
        if not _is_int(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an integer >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.layer_groups = as_layer_groups_arg(layer_groups)

        self._layer_names: dict[str, list[str]] = {}
        self._layers: dict[str, dict[str, nn.Parameter]] = {}
        self._blocks: list[list[str]] = []
        self._module_groups: dict[str, set[str]] = {}
        self._norm_paths: set[str] = set()
        self._stage = 0
        self._unfrozen_at: list[int] = []
        self._ddp_managed: set[int] = set()
        self._sync: list[nn.Parameter] = []
        self._distributed = False
        self._eval_modules: list[nn.Module] = []
        self._trainer: pl.Trainer | None = None
        self._hooks: list[RemovableHandle] = []
        self._saved_lrs: list[tuple[dict[str, Any], Any]] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules)

    @property
    def stage(self) -> int:
        """How many milestones have been applied."""
        return self._stage

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        names = layer_groups(pl_module, self.modules, self.layer_groups)
        self._blocks = self._plan(list(names))
        self._layer_names = names
        self._layers = layer_parameters(pl_module, names)
        self._module_groups = modules_of_groups(pl_module, self.modules, names)
        norms = norm_layers(pl_module, self.modules)
        self._norm_paths = set(norms)
        trainable = norm_parameter_ids(norms) if self.train_bn else set()
        for group in self._layers.values():
            for param in group.values():
                param.requires_grad_(id(param) in trainable)
        self._stage = 0
        self._unfrozen_at = []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"blocks": self._blocks, "stage": self._stage, "unfrozen_at": list(self._unfrozen_at)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["blocks"] != self._blocks:
            raise ValueError(
                f"the checkpoint's {type(self).__name__} layer groups {state_dict['blocks']} differ from "
                f"this model's {self._blocks}"
            )
        self._stage = state_dict["stage"]
        self._unfrozen_at = list(state_dict["unfrozen_at"])

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # 0. the parameter objects now: FSDP2's configure_model replaced those setup() saw
        self._layers = layer_parameters(pl_module, self._layer_names)
        # a first phase with nothing to train would fail in autograd at the first step
        self._check_first_phase_trains(trainer, pl_module)
        # 1. one named group per layer group, frozen parameters added, schedulers remapped
        partition_optimizers(trainer, self._layers)
        # 2. what the strategy reduces: under DDP what required grad when it wrapped the model (everything
        # selected is frozen); under FSDP2 (DTensor parameters) every gradient, frozen at the start or not
        self._ddp_managed = {
            id(p)
            for group in self._layers.values()
            for p in group.values()
            if p.requires_grad or is_sharded(p)
        }
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        # 3. milestones the run is too short to reach
        for milestone in self._unreachable(trainer):
            rank_zero_warn(
                f"{type(self).__name__}({self.modules}) milestone {milestone} ({self.unit}) is never "
                f"reached: the run ends after max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps} "
                f"({trainer.estimated_stepping_batches} optimizer steps), so layer groups "
                f"{self._blocks[self.milestones.index(milestone)]} are never unfrozen"
            )
        # 4. the stage restored from a checkpoint, if any (see on_train_start for sharded strategies)
        self._apply(trainer, pl_module)
        self._trainer = trainer
        if self.warmup_steps:
            for optimizer in trainer.optimizers:
                self._hooks.append(optimizer.register_step_pre_hook(self._warm_up))
                self._hooks.append(optimizer.register_step_post_hook(self._restore_lrs))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # strategies that restore after on_fit_start (FSDP2's ModelParallelStrategy) load the stage only now
        self._apply(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._advance(
            trainer, pl_module, trainer.current_epoch if self.unit == "epoch" else trainer.global_step
        )
        keep_eval(self._eval_modules)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.unit == "step" and batch_idx % trainer.accumulate_grad_batches == 0:
            self._advance(trainer, pl_module, trainer.global_step)
        keep_eval(self._eval_modules)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._distributed and self._sync and ddp_syncs_this_backward(trainer):
            all_reduce_grads_mean(self._sync)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._trainer = None

    def _plan(self, groups: list[str]) -> list[list[str]]:
        """Split the layer groups, output side first, into one block per milestone."""
        output_first = groups[::-1]
        if isinstance(self.groups_per_milestone, int):
            counts = [self.groups_per_milestone] * (len(self.milestones) - 1)
            if sum(counts) >= len(groups):
                raise ValueError(
                    f"{len(self.milestones)} milestones unfreezing {self.groups_per_milestone} layer "
                    f"group(s) each need more than {sum(counts)} layer groups, but {self.modules} has "
                    f"{len(groups)}: {groups}"
                )
            counts.append(len(groups) - sum(counts))
        else:
            counts = list(self.groups_per_milestone)
            if sum(counts) != len(groups):
                raise ValueError(
                    f"`groups_per_milestone` {counts} must sum to the number of layer groups of "
                    f"{self.modules}, {len(groups)}: {groups}"
                )
        ends = [sum(counts[: i + 1]) for i in range(len(counts))]
        return [output_first[end - count : end] for count, end in zip(counts, ends, strict=True)]

    def _first_phase(self) -> tuple[int, set[int]]:
        """The stage at the first step (restored, or reached by milestones at 0) and what it unfroze."""
        stage = max(self._stage, bisect_right(self.milestones, 0))
        unfrozen = {
            id(p) for block in self._blocks[:stage] for layer in block for p in self._layers[layer].values()
        }
        return stage, unfrozen

    def _check_first_phase_trains(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a first phase in which no parameter of the model is trainable.

        What trains at the first step: parameters that require grad now, and those this callback and any
        other ``GradualUnfreeze`` unfreeze before it (the restored stage, milestones at 0). Only
        ``requires_grad`` is looked at, so any ``LightningModule`` is judged alike. Next to another
        callback that changes trainability, which may unfreeze before the first step, nothing is judged.

        Raises:
            ValueError: Naming the modules, the milestones and the phase that has nothing to train.
        """
        others = [c for c in trainer.callbacks if c is not self and changes_trainability(c)]
        if not all(isinstance(c, GradualUnfreeze) for c in others):
            return
        stage, unfrozen = self._first_phase()
        unfrozen = unfrozen.union(*(c._first_phase()[1] for c in others))
        if any(p.requires_grad or id(p) in unfrozen for p in pl_module.parameters()):
            return
        until = f" (until {self.unit} {self.milestones[stage]})" if stage < len(self.milestones) else ""
        raise ValueError(
            f"{type(self).__name__}(modules={self.modules}, milestones={self.milestones}, "
            f"unit={self.unit!r}) leaves nothing to train in phase {stage}{until}: it freezes every "
            f"parameter of {self.modules} and {type(pl_module).__name__} has no other trainable parameter, "
            f"so the first training step would fail in autograd; give the model a trainable part outside "
            f"{self.modules} (a head) or unfreeze from the start (a first milestone of 0)"
        )

    def _unreachable(self, trainer: pl.Trainer) -> list[int]:
        """The milestones the run ends before (by ``max_epochs`` or ``max_steps``)."""
        total_steps = trainer.estimated_stepping_batches  # min(max_steps, max_epochs * steps per epoch)
        if self.unit == "step":
            return [m for m in self.milestones if m >= total_steps]
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else float("inf")
        if math.isinf(trainer.num_training_batches):
            # epoch length unknown here (a step-only budget loads no data before fit; iterable datasets)
            return [m for m in self.milestones if m >= max_epochs]
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        return [m for m in self.milestones if m >= max_epochs or m * per_epoch >= total_steps]

    def _advance(self, trainer: pl.Trainer, pl_module: pl.LightningModule, position: int) -> None:
        target = bisect_right(self.milestones, position)
        if target <= self._stage:
            return
        while self._stage < target:
            self._unfrozen_at.append(trainer.global_step)
            self._stage += 1
        self._apply(trainer, pl_module)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the first ``stage`` blocks trainable and refresh what depends on it."""
        unfrozen = [layer for block in self._blocks[: self._stage] for layer in block]
        for layer in unfrozen:
            for param in self._layers[layer].values():
                param.requires_grad_(True)
        # a module is frozen while all its layer groups are: wholly in eval mode (train_bn: norms excepted)
        thawed = [path for path, groups in self._module_groups.items() if not groups.isdisjoint(unfrozen)]
        for module in modules_by_name(pl_module, thawed):
            module.training = pl_module.training
        frozen = [
            path
            for path, groups in self._module_groups.items()
            if groups.isdisjoint(unfrozen) and not (self.train_bn and path in self._norm_paths)
        ]
        self._eval_modules = modules_by_name(pl_module, frozen)
        late = [
            p for layer in unfrozen for p in self._layers[layer].values() if id(p) not in self._ddp_managed
        ]
        held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        self._sync = [p for p in late if id(p) in held]

    def _warm_up(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        assert self._trainer is not None
        step = self._trainer.global_step
        warming = [
            (block, (step - start + 1) / (self.warmup_steps + 1))
            for block, start in zip(self._blocks, self._unfrozen_at, strict=False)
            if step - start < self.warmup_steps
        ]
        if not warming:
            return
        groups = groups_of_layers(optimizer, self._layers)
        for block, factor in warming:
            for group in (g for layer in block for g in groups[layer]):
                self._saved_lrs.append((group, group["lr"]))
                group["lr"] = group["lr"] * factor

    def _restore_lrs(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        for group, lr in self._saved_lrs:
            group["lr"] = lr
        self._saved_lrs.clear()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_milestones(milestones: Sequence[int]) -> list[int]:
    values = (
        list(milestones) if isinstance(milestones, Sequence) and not isinstance(milestones, str) else None
    )
    if (
        not values
        or not all(_is_int(m) and m >= 0 for m in values)
        or any(a >= b for a, b in zip(values, values[1:], strict=False))
    ):
        raise ValueError(
            f"`milestones` must be a non-empty, strictly increasing list of integers >= 0, got {milestones!r}"
        )
    return values


def _check_groups_per_milestone(value: int | Sequence[int], n_milestones: int) -> int | list[int]:
    if _is_int(value) and value >= 1:
        return value
    if (
        isinstance(value, Sequence)
        and len(value) == n_milestones
        and all(_is_int(v) and v >= 1 for v in value)
    ):
        return list(value)
    raise ValueError(
        f"`groups_per_milestone` must be an integer >= 1 or a list of {n_milestones} integers >= 1 "
        f"(one per milestone), got {value!r}"
    )
