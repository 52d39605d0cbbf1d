"""Diagonal Fisher of a model sharded with FSDP2, computed in place: no rank ever holds more than FSDP does.

FSDP2 gathers one unit (a block) at a time for its forward and backward, and reduce-scatters each unit's
gradient into the ranks' shards as soon as the unit's backward is done. The Fisher rides on that: one
sample per backward pass, and a hook on every selected (unsharded) parameter replaces its gradient
``g`` by ``g²`` *before* FSDP reduces it. FSDP's reduce-scatter then averages the per-sample squares of
all ranks into each rank's shard of ``.grad``, and accumulates them over passes: ``Σ_n g_n² / world``
per shard. Nothing the size of the model is ever gathered, and every parameter's Fisher comes out
sharded exactly like the parameter (a ``DTensor``).

Exact for any architecture (one sample per pass: no closed-form layer rules, no ``vmap``), at the cost of
one forward and backward per sample (per class in ``"exact"`` mode), in lockstep on all ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

from tl_lightning._modes import eval_mode


def is_sharded_model(params: Iterable[Tensor]) -> bool:
    """Whether the parameters are FSDP2-sharded (``DTensor``)."""
    return any(isinstance(p, DTensor) for p in params)


def sharded_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    names: list[str],
    *,
    mode: str,
    max_samples: int | None,
    method: str,
    seed: int,
    shard: bool,
    unpack: Any,
    sample_labels: Any,
) -> dict[str, Tensor]:
    """``{name: Fisher diagonal}`` as DTensors sharded like the parameters (see the module docstring).

    Called by :func:`tl_lightning.fisher.fisher_diagonal` when the parameters are DTensors; arguments as
    there (``unpack`` and ``sample_labels`` are its helpers). Every rank must call it, with the same
    ``batches`` when ``shard=True``.

    Raises:
        ValueError: If this rank gets no batch, or no rank gets a sample.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    forward = getattr(model, method)
    params = dict(model.named_parameters())
    selected = {name: params[name] for name in names}
    device = next(iter(selected.values())).to_local().device
    # 1. this rank's samples (batch i goes to rank i % world when sharding), capped by max_samples overall
    mine, seen = [], 0
    for index, batch in enumerate(batches):
        if max_samples is not None and seen >= max_samples:
            break
        x, y = unpack(batch, mode)
        n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
        keep = n if max_samples is None else min(n, max_samples - seen)
        seen += n
        if not shard or index % world == rank:
            mine.append((index, _take(x, keep), None if y is None else y[:keep]))
    if not mine:
        raise ValueError(
            f"rank {rank} got no Fisher batch: give at least {world} batches (one per rank) to the Fisher"
        )
    flags = {name: p.requires_grad for name, p in params.items()}
    saved = {name: p.grad for name, p in params.items()}
    try:
        for name, p in params.items():
            p.requires_grad_(name in selected)
            p.grad = None
        with eval_mode(model):
            passes = _passes(forward, mine, mode, seed, device, sample_labels)
            count = _all_sum(sum(_len(x) for _, x, _ in mine), device)
            _squared_backward(model, forward, passes, selected, device)
        return {name: p.grad.detach() * (world / count) for name, p in selected.items()}
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
            p.grad = saved[name]


def _len(x: Any) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _take(x: Any, n: int) -> Any:
    return {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]


def _to(x: Any, device: torch.device) -> Any:
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def _all_sum(value: int, device: torch.device) -> int:
    total = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def _passes(forward, mine, mode, seed, device, sample_labels) -> list[tuple[Any, int, float]]:
    """``(one sample, class, weight)`` per backward pass; one forward per batch (lockstep) for the labels."""
    rounds = _all_max(len(mine), device)
    passes = []
    for i in range(rounds):
        index, x, y = mine[min(i, len(mine) - 1)]
        x = _to(x, device)
        with torch.no_grad():
            logits = forward(x).float()  # a collective under FSDP: every rank runs every round
        if i >= len(mine):
            continue
        if mode == "sampled":
            y = sample_labels(logits, seed + index)
        probs = logits.softmax(-1)
        for j in range(_len(x)):
            sample = _take({k: v[j:] for k, v in x.items()} if isinstance(x, dict) else x[j:], 1)
            if mode == "exact":
                passes += [(sample, c, float(probs[j, c])) for c in range(probs.shape[-1])]
            else:
                passes.append((sample, int(y[j]), 1.0))
    return passes


def _all_max(value: int, device: torch.device) -> int:
    total = torch.tensor(value, dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())


def _squared_backward(model, forward, passes, selected, device) -> None:
    """One backward per pass, gradients squared before FSDP reduce-scatters them; padded to lockstep."""
    owners = _owners(model, selected)
    rounds = _all_max(len(passes), device)
    for i in range(rounds):
        sample, target, weight = passes[min(i, len(passes) - 1)]
        if i >= len(passes):
            weight = (
                0.0  # a rank with fewer samples: a pass that adds nothing, to keep the collectives paired
            )
        handles: dict[int, Any] = {}
        pre = [m.register_forward_pre_hook(_square_grads(names, handles)) for m, names in owners.items()]
        try:
            with torch.enable_grad():
                logits = forward(_to(sample, device)).float()
                loss = -F.log_softmax(logits, -1)[0, target] * weight**0.5
                loss.backward()
        finally:
            for handle in [*pre, *handles.values()]:
                handle.remove()


def _owners(model: nn.Module, selected: dict[str, Tensor]) -> dict[nn.Module, list[str]]:
    """``{module: [local names of its selected parameters]}``."""
    owners: dict[nn.Module, list[str]] = {}
    for path, module in model.named_modules():
        for local in module._parameters:
            if (f"{path}.{local}" if path else local) in selected:
                owners.setdefault(module, []).append(local)
    return owners


def _square_grads(names: list[str], handles: dict[int, Any]):
    """A forward pre-hook: the parameters the module now holds (FSDP's unsharded ones) get ``g -> g²``,
    once per pass (``handles``, by parameter identity), however often the module runs."""

    def hook(module: nn.Module, args: Any) -> None:
        for name in names:
            param = module._parameters[name]
            if param is not None and param.requires_grad and id(param) not in handles:
                handles[id(param)] = param.register_hook(torch.square)

    return hook
