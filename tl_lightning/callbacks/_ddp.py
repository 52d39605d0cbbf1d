"""Reduce the gradients DDP does not: parameters that started requiring grad after DDP wrapped the model.

DDP's reducer only covers parameters that required grad when it was built (Lightning #20340). For the
others the callbacks call :func:`all_reduce_grads_mean` from ``on_after_backward`` whenever
:func:`ddp_syncs_this_backward` says DDP itself just reduced, so they sit at the same point of
Lightning's optimizer-step pipeline as DDP's own reduction::

    backward -> DDP reduce + all_reduce_grads_mean -> accumulate -> unscale/inf check
    -> on_before_optimizer_step -> clip -> step

Under 16-bit mixed precision the gradients are still scaled there; averaging is linear, so averaging
scaled gradients is exact, and every rank's ``GradScaler`` then sees the same gradients and makes the
same skip/step decision. Averaging later (in ``on_before_optimizer_step``) is too late: each rank has
already unscaled and looked for infs in its local gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn


def ddp_syncs_this_backward(trainer: pl.Trainer) -> bool:
    """Whether DDP reduced the gradients in the backward pass that just ran.

    Lightning runs all but the last backward of a gradient-accumulation window inside DDP's
    ``no_sync()``, which clears the wrapper's public ``require_backward_grad_sync`` flag; manual
    optimization under ``trainer.strategy.block_backward_sync()`` does the same. A strategy that does
    not wrap the model in DDP has no such flag: then every backward counts, which is still exact
    (averaging an already averaged sum again changes nothing but rounding).

    Args:
        trainer: The running trainer.
    """
    return bool(getattr(trainer.strategy.model, "require_backward_grad_sync", True))


def all_reduce_grads_mean(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the default process group, as DDP would.

    A gradient that is ``None`` on every rank stays ``None`` (DDP leaves globally unused parameters
    alone, so weight decay and momentum do not move them); one that exists on some ranks only counts
    as zeros on the others. Each gradient is divided by the world size before the sum, like DDP's
    reducer, in one flat buffer per dtype. Every rank must pass the same parameters in the same order.

    Args:
        params: The parameters whose gradients to average.
    """
    if not params:
        return
    world = dist.get_world_size()
    # 1. which parameters have a gradient on at least one rank
    device = params[0].device
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(present)
    used = [p for p, count in zip(params, present.tolist(), strict=True) if count > 0]
    # 2. average those, one buffer per dtype, zeros where a rank has none
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in used:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(world)
        dist.all_reduce(flat)
        for grad, chunk in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(chunk.view_as(grad))
