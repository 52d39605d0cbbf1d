"""Diagonal Fisher information from per-sample gradients (pure torch, no Lightning).

The diagonal of the Fisher information of a classifier ``p(y | x; θ)`` is

    F_i = E_x E_{y ~ q(y|x)} [ (∂ log p(y | x; θ) / ∂θ_i)² ]

estimated by the mean over samples of the **per-sample** squared gradient. Squaring the gradient of
a mini-batch *mean* loss (what Avalanche and several popular EWC repositories do) computes
``(mean_n g_n)²`` instead of ``mean_n g_n²``; the cross terms between samples cancel and the result
shrinks roughly by the batch size, so it is wrong, not an approximation.

Per-sample gradients are vectorised with ``torch.func`` (``vmap`` over ``grad`` of
``functional_call``), ``chunk_size`` samples at a time to cap memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn import functional as F

from tl_lightning._modes import eval_mode

FisherMode = Literal["empirical", "sampled", "exact"]
FISHER_MODES: tuple[str, ...] = ("empirical", "sampled", "exact")


class _BoundMethod(nn.Module):
    """Expose ``getattr(module, method)`` as ``forward`` so ``functional_call`` can swap its weights."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.module, self.method)(x)


def sample_labels(logits: Tensor, seed: int) -> Tensor:
    """Draw one label per row from ``Categorical(softmax(logits))``, reproducibly from ``seed``.

    :func:`fisher_diagonal` in ``"sampled"`` mode labels batch ``i`` with
    ``sample_labels(logits_i, seed + i)``, so the draw does not depend on how batches are sharded.

    Example::

        y = sample_labels(model(x), seed=0)
    """
    generator = torch.Generator(device=logits.device).manual_seed(seed)
    probs = logits.detach().float().softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    mode: FisherMode = "empirical",
    max_samples: int | None = None,
    chunk_size: int = 64,
    *,
    params: Iterable[str] | None = None,
    method: str = "forward",
    seed: int = 0,
    shard: bool = True,
) -> dict[str, Tensor]:
    """Diagonal Fisher information: the mean over samples of per-sample squared log-likelihood gradients.

    Computed with the model in eval mode (BatchNorm uses its running statistics, dropout is off);
    every sub-module's ``training`` flag is restored afterwards. This is **not** the square of a
    mini-batch mean gradient, which underestimates the Fisher by about the batch size.

    Args:
        model: Maps a batch of inputs to logits ``[N, C]`` (through ``method``).
        batches: Iterable of ``(x, y)`` pairs (or bare ``x`` in ``"sampled"``/``"exact"`` mode,
            where labels are unused). Tensors are moved to the model's device.
        mode: ``"empirical"`` uses the given labels; ``"sampled"`` draws ``y ~ p(y|x)`` from the
            model's own predictions (see :func:`sample_labels`); ``"exact"`` sums over classes
            ``Σ_c p(c|x) (∂ log p(c|x))²`` (memory grows with ``chunk_size × classes × parameters``).
        max_samples: Stop after this many samples (all ranks together when ``shard=True``).
        chunk_size: Samples per vectorised gradient computation; lower it to save memory.
        params: Names of the parameters to compute (default: all that require grad). The others
            are held constant.
        method: Name of the model method that returns logits, e.g. ``"source_logits"``.
        seed: Base seed of the labels drawn in ``"sampled"`` mode.
        shard: Under an initialised ``torch.distributed`` group with more than one process, rank
            ``r`` processes batches ``i`` with ``i % world_size == r``; every rank must iterate the
            same batches in the same order. Pass ``False`` when each rank already iterates its own
            shard (a ``DistributedSampler``). Sums and counts are all-reduced either way, so every
            rank returns the same result, equal to the single-process one.

    Returns:
        ``{parameter name: Fisher diagonal}`` in float32 (float64 for float64 parameters).

    Raises:
        ValueError: If ``mode`` is unknown, ``max_samples``/``chunk_size`` are not positive, a name in
            ``params`` does not exist, no parameter is selected, or ``batches`` yields no samples.
        TypeError: If an ``"empirical"`` batch has no labels.

    Example::

        fisher = fisher_diagonal(model, loader, mode="sampled", max_samples=1024)
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"`mode` must be one of {FISHER_MODES}, got {mode!r}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"`max_samples` must be a positive integer or None, got {max_samples}")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}")

    net = model if method == "forward" else _BoundMethod(model, method)
    prefix = "" if net is model else "module."
    names = _parameter_names(model, params)
    with eval_mode(model), torch.no_grad():
        sums, count = _accumulate(net, prefix, names, batches, mode, max_samples, chunk_size, seed, shard)
    if count == 0:
        raise ValueError("`batches` yielded no samples; the Fisher needs at least one")
    return {name: total / count for name, total in sums.items()}


def _parameter_names(model: nn.Module, params: Iterable[str] | None) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        names = [name for name, p in named.items() if p.requires_grad]
    else:
        names = list(dict.fromkeys(params))
        unknown = [name for name in names if name not in named]
        if unknown:
            raise ValueError(f"`params` names missing from {type(model).__name__}: {unknown[:5]}")
    if not names:
        raise ValueError("no parameters selected for the Fisher: none requires grad or `params` is empty")
    return names


def _accumulate(
    net: nn.Module,
    prefix: str,
    names: list[str],
    batches: Iterable[Any],
    mode: str,
    max_samples: int | None,
    chunk_size: int,
    seed: int,
    shard: bool,
) -> tuple[dict[str, Tensor], int]:
    # 1. split the state into the differentiated tensors and the constants (other params, buffers)
    state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    trainable = {prefix + name: state.pop(prefix + name).detach() for name in names}
    constants = {name: t.detach() for name, t in state.items()}
    device = next(iter(trainable.values())).device
    sums = {name: torch.zeros_like(p, dtype=_acc_dtype(p)) for name, p in trainable.items()}
    per_sample = _per_sample_fn(net, constants, mode)
    world, rank = _world()
    seen = local = 0

    # 2. per-sample squared gradients, chunk by chunk, on this rank's share of the batches
    for index, batch in enumerate(batches):
        x, y = _unpack(batch, mode)
        if max_samples is not None:
            if seen >= max_samples:
                break
            x, y = x[: max_samples - seen], None if y is None else y[: max_samples - seen]
        seen += len(x)
        if shard and world > 1 and index % world != rank:
            continue
        x = x.to(device)
        if mode == "sampled":
            y = sample_labels(net(x), seed + index)
        elif y is not None:
            y = y.to(device)
        for start in range(0, len(x), chunk_size):
            xs = x[start : start + chunk_size]
            ys = None if y is None else y[start : start + chunk_size]
            for name, square_sum in per_sample(trainable, xs, ys).items():
                sums[name] += square_sum
        local += len(x)

    # 3. every rank holds partial sums: add them up so all ranks return the same mean
    count = torch.tensor(local, dtype=torch.float64, device=device)
    if world > 1:
        for total in sums.values():
            dist.all_reduce(total)
        dist.all_reduce(count)
    return {name[len(prefix) :]: total for name, total in sums.items()}, int(count.item())


def _per_sample_fn(net: nn.Module, constants: dict[str, Tensor], mode: str):
    """``f(trainable, x, y) -> {name: Σ_n weight · grad_n²}`` for one chunk of samples."""

    def nll(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(net, (p, constants), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    def log_probs(p: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(net, (p, constants), (x.unsqueeze(0),))[0].log_softmax(dim=-1)
        return out, out

    def labelled(trainable: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        grads = vmap(grad(nll), in_dims=(None, 0, 0))(trainable, x, y)
        return {name: g.to(_acc_dtype(g)).square().sum(0) for name, g in grads.items()}

    def exact(trainable: dict[str, Tensor], x: Tensor, _: Tensor | None) -> dict[str, Tensor]:
        jac, logp = vmap(jacrev(log_probs, has_aux=True), in_dims=(None, 0))(trainable, x)
        probs = logp.to(_acc_dtype(logp)).exp()  # [n, C]
        return {
            name: torch.einsum("nc,nc...->...", probs, j.to(probs.dtype).square()) for name, j in jac.items()
        }

    return exact if mode == "exact" else labelled


def _unpack(batch: Any, mode: str) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        x, y = batch, None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        x, y = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        raise TypeError(f"Fisher batches must be (x, y) pairs or tensors x, got {type(batch).__name__}")
    if mode == "empirical" and not isinstance(y, Tensor):
        raise TypeError("`mode='empirical'` needs (x, y) batches with labels; use 'sampled' without labels")
    return x, (y if mode == "empirical" else None)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0
