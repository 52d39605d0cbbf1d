"""Named optimizer parameter groups and the default learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

NO_DECAY_SUFFIX = "/no_decay"


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and normalisation weights (all 0-/1-d tensors) get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias")


def named_param_groups(
    module: nn.Module, layer_groups: dict[str, list[str]], weight_decay: float
) -> list[dict]:
    """One optimizer group per layer group, plus a ``/no_decay`` twin for norms and biases.

    Every parameter of ``module`` is placed, frozen or not, so a later unfreeze never has to add
    a group (which would break schedulers and resume).

    Args:
        module: The module whose parameters are grouped.
        layer_groups: ``{group name: [parameter names in module]}``, e.g. from
            ``TransferModule.layer_groups()``.
        weight_decay: Decay of the regular groups; the ``/no_decay`` twins get ``0.0``.

    Returns:
        A list of ``{"name", "params", "weight_decay"}`` dicts, empty groups omitted.

    Raises:
        ValueError: If ``layer_groups`` misses a parameter or names one twice.
    """
    params = dict(module.named_parameters())
    listed = [n for names in layer_groups.values() for n in names]
    missing = sorted(set(params) - set(listed))
    if missing or len(listed) != len(set(listed)):
        raise ValueError(f"layer groups must cover every parameter exactly once; missing: {missing[:5]}")
    groups = []
    for group_name, names in layer_groups.items():
        decay = [params[n] for n in names if not _is_no_decay(n, params[n])]
        no_decay = [params[n] for n in names if _is_no_decay(n, params[n])]
        if decay:
            groups.append({"name": group_name, "params": decay, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"name": group_name + NO_DECAY_SUFFIX, "params": no_decay, "weight_decay": 0.0})
    return groups


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.1, final_scale: float = 0.0
) -> LambdaLR:
    """Linear warm-up then cosine decay, as one ``LambdaLR`` stepped every optimizer step.

    Args:
        optimizer: The optimizer to schedule.
        total_steps: Optimizer steps in the whole run (the module passes
            ``trainer.estimated_stepping_batches``).
        warmup_fraction: Share of ``total_steps`` spent warming up linearly from zero.
        final_scale: LR at the end, as a fraction of the base LR.

    Raises:
        ValueError: If ``warmup_fraction`` is outside ``[0, 1)`` or ``total_steps`` < 1.

    Example::

        scheduler = warmup_cosine(optimizer, total_steps=1000, warmup_fraction=0.05)
    """
    return _warmup_then(
        optimizer,
        total_steps,
        warmup_fraction,
        lambda progress: final_scale + (1.0 - final_scale) * 0.5 * (1.0 + math.cos(math.pi * progress)),
    )


def warmup_linear(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.1
) -> LambdaLR:
    """Linear warm-up to the base LR, then linear decay to zero (the BERT fine-tuning schedule).

    Args:
        optimizer: The optimizer to schedule.
        total_steps: Optimizer steps in the whole run (``trainer.estimated_stepping_batches``).
        warmup_fraction: Share of ``total_steps`` spent warming up.

    Raises:
        ValueError: If ``warmup_fraction`` is outside ``[0, 1)`` or ``total_steps`` < 1.

    Example::

        scheduler = warmup_linear(optimizer, total_steps=600)  # 60 steps up, 540 down
    """
    return _warmup_then(optimizer, total_steps, warmup_fraction, lambda progress: 1.0 - progress)


def _warmup_then(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float,
    decay: Callable[[float], float],
) -> LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of the steps, then ``decay(progress in [0, 1])``."""
    if total_steps < 1 or not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(
            f"need total_steps >= 1 and 0 <= warmup_fraction < 1, got {total_steps}, {warmup_fraction}"
        )
    warmup = int(total_steps * warmup_fraction)

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return decay(min(1.0, (step - warmup) / max(1, total_steps - warmup)))

    return LambdaLR(optimizer, scale)
