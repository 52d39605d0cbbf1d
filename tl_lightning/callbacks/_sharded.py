"""Parameters sharded by FSDP2 (``fully_shard``): DTensor-backed, replaced after the callbacks' ``setup()``.

Lightning calls ``configure_model`` after ``setup()``; ``fully_shard`` there swaps every parameter for a
new ``nn.Parameter`` holding a ``DTensor`` whose local tensor is this rank's shard. Callbacks therefore
keep parameter *names* from ``setup()`` and look the objects up again at ``on_fit_start`` or later, and do
their elementwise arithmetic on local shards (``torch._foreach_*`` has no DTensor sharding rule):

* :func:`local` is the rank's shard of a DTensor (the tensor itself otherwise);
* :func:`shard_like` cuts a full tensor (an anchor restored from a checkpoint) into the shard a parameter
  holds, locally, without communication;
* :func:`full` gathers one tensor (a collective: every rank must call it, in the same order);
* :func:`sum_over_shards` adds up per-rank partial sums of sharded tensors.

Everything here is the identity for plain tensors, so the callbacks run unchanged without sharding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` (a parameter, a gradient) is a ``DTensor``."""
    return isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor``, or ``tensor`` itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: Tensor) -> Tensor:
    """The whole tensor of a ``DTensor`` (all-gathered: a collective), or ``tensor`` itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value: Tensor, param: Tensor) -> Tensor:
    """``value`` (a full tensor) on ``param``'s device and dtype, sharded like ``param`` if it is a DTensor.

    Every rank holds ``value`` whole (e.g. read from a checkpoint); each keeps its own shard, computed
    locally (``src_data_rank=None``: no broadcast).
    """
    if isinstance(param, DTensor):
        moved = value.to(device=param.to_local().device, dtype=param.dtype)
        return distribute_tensor(moved, param.device_mesh, param.placements, src_data_rank=None)
    return value.to(device=param.device, dtype=param.dtype)


def sum_over_shards(partial: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Complete a sum computed over the local shards of ``params``: all-reduced over their shard groups.

    Args:
        partial: This rank's sum over its shards (a scalar).
        params: The tensors the sum ran over; the first DTensor among them gives the mesh. All sharded
            ones must share it (``fully_shard`` uses one mesh for a model).
    """
    sharded = next((p for p in params if isinstance(p, DTensor)), None)
    if sharded is None:
        return partial
    for dim, placement in enumerate(sharded.placements):
        if isinstance(placement, Shard):
            dist.all_reduce(partial, group=sharded.device_mesh.get_group(dim))
    return partial


def unsharded_copy(tensor: Tensor) -> Tensor:
    """A detached CPU copy of the whole tensor (gathered when sharded), for checkpoints and fingerprints."""
    with torch.no_grad():
        return full(tensor.detach()).to("cpu", copy=True)


def full_from_local(shard: Tensor, like: Tensor) -> Tensor:
    """The whole tensor whose rank-local shard is ``shard``, sharded as ``like`` is (gathered: a collective).

    ``shard`` may live on the CPU; it is moved to ``like``'s device for the gather. Plain ``like``:
    ``shard`` is returned as it is.
    """
    if not isinstance(like, DTensor):
        return shard
    device = like.to_local().device
    spread = DTensor.from_local(
        shard.to(device), like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )
    return spread.full_tensor()


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 unit of ``module`` back in its sharded state.

    A unit FSDP left gathered (the root after a forward without backward: a validation or probe pass)
    exposes its plain, whole parameters under the usual names; looking parameters up by name after this
    call always finds the sharded ones. A no-op without FSDP2.
    """
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
