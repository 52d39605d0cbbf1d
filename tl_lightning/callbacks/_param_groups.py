"""Named optimizer parameter groups aligned with layer groups, and the scheduler lists that follow them.

Callbacks that act per layer group (staged unfreezing, layer-wise learning rates) need each layer
group in parameter groups of its own. :func:`partition_optimizers` gives them that once, at
``on_fit_start``, before any step and before the optimizer/scheduler state of a checkpoint is restored:

* existing groups are split by layer group (by parameter identity), keeping their hyperparameters,
  so a weight-decay / no-decay split stays split;
* selected parameters missing from every optimizer (a module that optimises only what is trainable)
  are appended, frozen and therefore untouched, copying the hyperparameters of the first group;
* every scheduler's per-group lists are remapped by source group: those of torch's schedulers and of
  timm's ``Scheduler`` (``base_values``, ``warmup_steps``); a scheduler of another kind holding a list
  with one entry per group is refused with an error naming it, rather than left misaligned;
* the result is deterministic, and a second call on an already partitioned optimizer changes nothing.

Groups are never added mid-run: that breaks schedulers sized at construction and resuming
(Lightning #12141, #6891).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn
from torch.optim import Optimizer

# Per-group lists a torch scheduler keeps on itself (LRScheduler, LambdaLR/MultiplicativeLR,
# ReduceLROnPlateau, CyclicLR) and timm's Scheduler (base_values, warmup_steps). Keys OneCycleLR keeps
# in the group dict travel with the group.
SCHEDULER_GROUP_LISTS = (
    "base_lrs",
    "_last_lr",
    "lr_lambdas",
    "min_lrs",
    "max_lrs",
    "base_momentums",
    "max_momentums",
    "base_values",
    "warmup_steps",
)
# The learning-rate valued ones among them (timm's base_values when it schedules "lr"), and the
# learning-rate valued keys of a group dict.
SCHEDULER_LR_LISTS = ("base_lrs", "_last_lr", "min_lrs", "max_lrs")
GROUP_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# Where the schedulers whose per-group state is fully known live; others are checked for unknown lists.
KNOWN_SCHEDULER_MODULES = ("torch.optim.lr_scheduler", "timm.scheduler")

LayerParams = Mapping[str, Mapping[str, nn.Parameter]]
"""Layer groups in order (input -> output): ``{group name: {parameter name: parameter}}``."""


def iter_schedulers(scheduler: Any) -> Iterator[Any]:
    """Yield ``scheduler`` and, recursively, the schedulers it wraps (SequentialLR, ChainedScheduler,
    the ReduceLROnPlateau inside timm's PlateauLRScheduler)."""
    yield scheduler
    for inner in getattr(scheduler, "_schedulers", ()):
        yield from iter_schedulers(inner)
    inner = getattr(scheduler, "lr_scheduler", None)
    if inner is not None and hasattr(inner, "optimizer"):
        yield from iter_schedulers(inner)


def optimizer_schedulers(trainer: pl.Trainer, optimizer: Optimizer) -> list[Any]:
    """The schedulers configured on ``trainer`` that drive ``optimizer``."""
    return [
        config.scheduler for config in trainer.lr_scheduler_configs if config.scheduler.optimizer is optimizer
    ]


def partition_optimizers(trainer: pl.Trainer, layers: LayerParams) -> None:
    """Give every layer group named parameter groups of its own in each of the trainer's optimizers.

    Args:
        trainer: A trainer whose optimizers and schedulers are configured (``on_fit_start`` or later).
        layers: Layer groups in order (input -> output), see :data:`LayerParams`.

    Raises:
        ValueError: If some selected parameters are in no optimizer and there is not exactly one
            optimizer to add them to.
    """
    optimized = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
    missing = [name for params in layers.values() for name, p in params.items() if id(p) not in optimized]
    if missing and len(trainer.optimizers) != 1:
        raise ValueError(
            f"{len(missing)} selected parameters (e.g. {missing[0]!r}) are in no optimizer and the module "
            f"has "
            f"{len(trainer.optimizers)} optimizers; pass them to one optimizer in `configure_optimizers`"
        )
    for optimizer in trainer.optimizers:
        partition_optimizer(
            optimizer, layers, optimizer_schedulers(trainer, optimizer), add_missing=bool(missing)
        )


def partition_optimizer(
    optimizer: Optimizer, layers: LayerParams, schedulers: Sequence[Any] = (), add_missing: bool = False
) -> bool:
    """Split ``optimizer``'s parameter groups so that no group mixes layer groups, and name every group.

    Output order: groups without selected parameters first (in their order), then each layer group's
    pieces in layer order (source order within a layer, the appended piece last). Pieces keep the
    hyperparameters of the group they come from and are named after their layer group
    (``"<layer>/<source name>"`` when the source group was named for something else); groups that
    needed no split keep their names; unnamed groups without selected parameters are ``"other"``.

    Args:
        optimizer: The optimizer to repartition in place.
        layers: Layer groups in order (input -> output), see :data:`LayerParams`.
        schedulers: Schedulers driving ``optimizer``; their per-group lists are remapped.
        add_missing: Append the selected parameters ``optimizer`` lacks, copying its first group's
            hyperparameters.

    Returns:
        Whether the groups changed (names given to unnamed groups do not count).
    """
    layer_of = {id(p): layer for layer, params in layers.items() for p in params.values()}
    order = {layer: i for i, layer in enumerate(layers)}
    groups = list(optimizer.param_groups)
    present = {id(p) for group in groups for p in group["params"]}
    appended: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for layer, params in layers.items() if add_missing else ():
        named = [(n, p) for n, p in params.items() if id(p) not in present]
        if named:
            appended[layer] = named

    split = [_split_by_layer(group, layer_of) for group in groups]
    if not appended and all(len(pieces) == 1 for pieces in split):
        for group, pieces in zip(groups, split, strict=True):
            group.setdefault("name", next(iter(pieces)) or "other")
        _dedupe_names(groups)
        return False

    # (sort key, source index, new group)
    built: list[tuple[tuple[int, int], int, dict[str, Any]]] = []
    for src, (group, pieces) in enumerate(zip(groups, split, strict=True)):
        whole = len(pieces) == 1 and "name" in group
        for layer, indices in pieces.items():
            name = group["name"] if whole else _piece_name(layer, group.get("name"))
            key = (-1, src) if layer is None else (order[layer], src)
            built.append((key, src, _copy_group(group, indices, name)))
    for layer, named in appended.items():
        new = {k: v for k, v in groups[0].items() if k not in ("params", "param_names")}
        new["params"] = [p for _, p in named]
        if "param_names" in groups[0]:
            new["param_names"] = [n for n, _ in named]
        new["name"] = layer
        built.append(((order[layer], len(groups)), 0, new))
    built.sort(key=lambda item: item[0])

    _dedupe_names([group for _, _, group in built])
    optimizer.param_groups.clear()
    for _, _, group in built:
        optimizer.add_param_group(group)
    sources = [src for _, src, _ in built]
    for scheduler in schedulers:
        for inner in iter_schedulers(scheduler):
            remap_scheduler_lists(inner, sources, n_before=len(groups))
    return True


def remap_scheduler_lists(scheduler: Any, sources: Sequence[int], n_before: int) -> None:
    """Rebuild ``scheduler``'s per-group lists so entry ``i`` comes from old group ``sources[i]``.

    Raises:
        RuntimeError: If a whitelisted list does not have one entry per old group, or a scheduler of
            an unknown kind holds a list with one entry per group (state that cannot be remapped).
    """
    _check_no_unknown_group_state(scheduler, n_before)
    for attr in SCHEDULER_GROUP_LISTS:
        values = getattr(scheduler, attr, None)
        if not isinstance(values, list):
            continue
        if len(values) != n_before:
            raise RuntimeError(
                f"{type(scheduler).__name__}.{attr} has {len(values)} entries for {n_before} parameter groups"
            )
        setattr(scheduler, attr, [values[src] for src in sources])


def _check_no_unknown_group_state(scheduler: Any, n_groups: int) -> None:
    if type(scheduler).__module__.startswith(KNOWN_SCHEDULER_MODULES):
        return
    unknown = [
        attr
        for attr, value in vars(scheduler).items()
        if isinstance(value, (list, tuple)) and len(value) == n_groups and attr not in SCHEDULER_GROUP_LISTS
    ]
    if unknown:
        raise RuntimeError(
            f"{type(scheduler).__name__}.{unknown[0]} has one entry per parameter group ({n_groups}); the "
            f"fine-tuning callbacks split the groups by layer and cannot remap a scheduler's per-group state "
            f"they do not know (known: {list(SCHEDULER_GROUP_LISTS)}). Use a torch.optim.lr_scheduler or "
            f"timm scheduler, or give each layer group its own parameter groups in configure_optimizers"
        )


def scale_lrs(optimizer: Optimizer, factors: Sequence[float], schedulers: Sequence[Any] = ()) -> None:
    """Multiply every learning-rate valued entry of group ``i`` by ``factors[i]``, schedulers included.

    Scales the group keys :data:`GROUP_LR_KEYS` and the scheduler lists :data:`SCHEDULER_LR_LISTS`, so
    any torch scheduler then produces the scaled schedule; for a timm ``Scheduler`` of ``"lr"``, its
    ``base_values`` and the end point of its warm-up (which starts from the unscaled scalar
    ``warmup_lr_init``, a floor like CosineAnnealingLR's ``eta_min``). Lists are replaced, never mutated,
    so lists shared between a wrapper and its inner schedulers are scaled once each.
    """
    for group, factor in zip(optimizer.param_groups, factors, strict=True):
        for key in GROUP_LR_KEYS:
            if key in group:
                group[key] = group[key] * factor
    for scheduler in schedulers:
        for inner in iter_schedulers(scheduler):
            for attr in SCHEDULER_LR_LISTS:
                values = getattr(inner, attr, None)
                if isinstance(values, list):
                    setattr(inner, attr, [v * f for v, f in zip(values, factors, strict=True)])
            if getattr(inner, "param_group_field", None) == "lr" and isinstance(inner.base_values, list):
                _scale_timm(inner, factors)


def _scale_timm(scheduler: Any, factors: Sequence[float]) -> None:
    """Scale a timm scheduler's ``base_values``; its warm-up ``init + t * s`` then ends at the scaled one."""
    scheduler.base_values = [v * f for v, f in zip(scheduler.base_values, factors, strict=True)]
    steps, length = getattr(scheduler, "warmup_steps", None), getattr(scheduler, "warmup_t", 0)
    if isinstance(steps, list) and length:
        init = scheduler.warmup_lr_init
        scheduler.warmup_steps = [
            f * s + (f - 1) * init / length for s, f in zip(steps, factors, strict=True)
        ]


def groups_of_layers(optimizer: Optimizer, layers: LayerParams) -> dict[str, list[dict[str, Any]]]:
    """The parameter groups of ``optimizer`` holding each layer group's parameters (by identity)."""
    layer_of = {id(p): layer for layer, params in layers.items() for p in params.values()}
    found: dict[str, list[dict[str, Any]]] = {layer: [] for layer in layers}
    for group in optimizer.param_groups:
        for layer in {layer_of[id(p)] for p in group["params"] if id(p) in layer_of}:
            found[layer].append(group)
    return found


def _split_by_layer(group: dict[str, Any], layer_of: Mapping[int, str]) -> dict[str | None, list[int]]:
    pieces: dict[str | None, list[int]] = {}
    for i, p in enumerate(group["params"]):
        pieces.setdefault(layer_of.get(id(p)), []).append(i)
    return pieces or {None: []}


def _copy_group(group: dict[str, Any], indices: list[int], name: str) -> dict[str, Any]:
    new = {k: v for k, v in group.items() if k not in ("params", "param_names")}
    new["params"] = [group["params"][i] for i in indices]
    if "param_names" in group:
        new["param_names"] = [group["param_names"][i] for i in indices]
    new["name"] = name
    return new


def _piece_name(layer: str | None, source: str | None) -> str:
    if layer is None:
        return source or "other"
    if source is None or layer == source or layer.startswith(source + "."):
        return layer
    return f"{layer}/{source}"


def _dedupe_names(groups: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for group in groups:
        name, k = group["name"], 2
        while name in seen:
            name, k = f"{group['name']}/{k}", k + 1
        group["name"] = name
        seen.add(name)
