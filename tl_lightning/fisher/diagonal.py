"""Diagonal Fisher information from per-sample gradients (pure torch, no Lightning).

The diagonal of the Fisher information of a classifier ``p(y | x; θ)`` is

    F_i = E_x E_{y ~ q(y|x)} [ (∂ log p(y | x; θ) / ∂θ_i)² ]

estimated by the mean over samples of the **per-sample** squared gradient. Squaring the gradient of
a mini-batch *mean* loss (what Avalanche and several popular EWC repositories do) computes
``(mean_n g_n)²`` instead of ``mean_n g_n²``; the cross terms between samples cancel and the result
shrinks roughly by the batch size, so it is wrong, not an approximation.

Per-sample squared gradients come from one batched backward pass per chunk of samples: module hooks on
``Linear``, ``Conv1d/2d`` (grouped and depthwise included), BatchNorm, LayerNorm, GroupNorm and
``Embedding`` layers turn each layer's input and output gradient into per-sample parameter gradients in
closed form and square them a few samples at a time (:mod:`tl_lightning.fisher.layer_hooks`), so the
per-sample gradients of the whole model never exist together. Subclasses that override ``forward`` keep a
closed form where the probe pass confirms what it assumes (a convolution padding TF-style "same", like
timm's ``Conv2dSame``; BatchNorm followed by ``drop``/``act`` submodules, like timm's ``BatchNormAct2d``),
else their own forward is differentiated per sample, layer by layer. Parameters no hook covers exactly
(other layer types, tied weights, layers called twice) use ``torch.func.vmap`` per-sample gradients, and
a batch-size-1 loop where vmap cannot trace the model (Hugging Face attention-mask code). The chunk size
follows a memory budget.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn import functional as F

from tl_lightning._modes import eval_mode
from tl_lightning.fisher.layer_hooks import LayerHooks, Rule, layer_rule, vjp_rule
from tl_lightning.fisher.sharded import is_sharded_model, sharded_fisher

log = logging.getLogger(__name__)

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
    chunk_size: int | None = None,
    *,
    params: Iterable[str] | None = None,
    method: str = "forward",
    seed: int = 0,
    shard: bool = True,
    memory_budget: int = 2**30,
) -> dict[str, Tensor]:
    """Diagonal Fisher information: the mean over samples of per-sample squared log-likelihood gradients.

    Computed with the model in eval mode (BatchNorm uses its running statistics, dropout is off);
    every sub-module's ``training`` flag and every parameter's ``requires_grad`` are restored
    afterwards. This is **not** the square of a mini-batch mean gradient, which underestimates the
    Fisher by about the batch size. Layers with a closed-form rule are computed from one batched
    backward pass per chunk, which assumes the model treats samples independently in eval mode; the
    other parameters use per-sample ``vmap`` gradients, or a batch-size-1 loop where ``vmap`` cannot
    trace the model. One log line (logger ``tl_lightning.fisher``) says which parameters use which path.
    Parameters sharded by FSDP2 (``DTensor``) take :func:`tl_lightning.fisher.sharded.sharded_fisher`
    instead: one sample per backward pass, squared before FSDP reduce-scatters it, and the result sharded
    like the parameters (no rank gathers the model).

    Args:
        model: Maps a batch of inputs to logits ``[N, C]`` (through ``method``).
        batches: Iterable of ``(x, y)`` pairs (or bare ``x`` in ``"sampled"``/``"exact"`` mode,
            where labels are unused). ``x`` is a tensor or a mapping of tensors with the samples along
            the first dimension (e.g. ``{"input_ids": ..., "attention_mask": ...}``), passed to the
            model as one argument. Tensors are moved to the model's device.
        mode: ``"empirical"`` uses the given labels; ``"sampled"`` draws ``y ~ p(y|x)`` from the
            model's own predictions (see :func:`sample_labels`); ``"exact"`` sums over classes
            ``Σ_c p(c|x) (∂ log p(c|x))²`` (``C - 1`` backward passes over one forward).
        max_samples: Stop after this many samples (all ranks together when ``shard=True``).
        chunk_size: Samples per batched gradient computation; ``None`` derives it from
            ``memory_budget`` and the activation memory of a probe forward pass.
        params: Names of the parameters to compute (default: all that require grad). The others
            are held constant.
        method: Name of the model method that returns logits, e.g. ``"source_logits"``.
        seed: Base seed of the labels drawn in ``"sampled"`` mode.
        shard: Under an initialised ``torch.distributed`` group with more than one process, rank
            ``r`` processes batches ``i`` with ``i % world_size == r``; every rank must iterate the
            same batches in the same order. Pass ``False`` when each rank already iterates its own
            shard (a ``DistributedSampler``). Sums and counts are all-reduced either way, so every
            rank returns the same result, equal to the single-process one.
        memory_budget: Approximate bytes of activations and per-sample gradients one chunk may use.

    Returns:
        ``{parameter name: Fisher diagonal}`` in float32 (float64 for float64 parameters).

    Raises:
        ValueError: If ``mode`` is unknown, ``max_samples``/``chunk_size``/``memory_budget`` are not
            positive, a name in ``params`` does not exist, no parameter is selected, or ``batches``
            yields no samples.
        TypeError: If an ``"empirical"`` batch has no labels.

    Example::

        fisher = fisher_diagonal(model, loader, mode="sampled", max_samples=1024)
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"`mode` must be one of {FISHER_MODES}, got {mode!r}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"`max_samples` must be a positive integer or None, got {max_samples}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size}")
    if memory_budget < 1:
        raise ValueError(f"`memory_budget` must be a positive number of bytes, got {memory_budget}")

    names = _parameter_names(model, params)
    if is_sharded_model(p for name, p in model.named_parameters() if name in set(names)):
        return sharded_fisher(
            model, batches, names, mode=mode, max_samples=max_samples, method=method, seed=seed,
            shard=shard, unpack=_unpack, sample_labels=sample_labels,
        )  # fmt: skip
    net = model if method == "forward" else _BoundMethod(model, method)
    prefix = "" if net is model else "module."
    named = dict(net.named_parameters())
    selected = {prefix + name: named[prefix + name] for name in names}
    settings = _Settings(mode, max_samples, chunk_size, seed, shard, memory_budget)
    with eval_mode(model), _requiring_grad(selected.values()), torch.no_grad():
        sums, count = _accumulate(net, selected, batches, settings)
    if count == 0:
        raise ValueError("`batches` yielded no samples; the Fisher needs at least one")
    return {name[len(prefix) :]: total / count for name, total in sums.items()}


class _Settings:
    def __init__(
        self, mode: str, max_samples: int | None, chunk: int | None, seed: int, shard: bool, budget: int
    ) -> None:
        self.mode, self.max_samples, self.chunk, self.seed = mode, max_samples, chunk, seed
        self.shard, self.budget = shard, budget


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


@contextmanager
def _requiring_grad(params: Iterable[Tensor]) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in params]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _accumulate(
    net: nn.Module, selected: dict[str, Tensor], batches: Iterable[Any], settings: _Settings
) -> tuple[dict[str, Tensor], int]:
    mode, max_samples = settings.mode, settings.max_samples
    device = next(iter(selected.values())).device
    sums = {name: torch.zeros_like(p, dtype=_acc_dtype(p)) for name, p in selected.items()}
    world, rank = _world()
    plan: _Plan | None = None
    seen = local = 0

    # 1. per-sample squared gradients, chunk by chunk, on this rank's share of the batches
    for index, batch in enumerate(batches):
        x, y = _unpack(batch, mode)
        if max_samples is not None:
            if seen >= max_samples:
                break
            x, y = _take(x, slice(0, max_samples - seen)), None if y is None else y[: max_samples - seen]
        n = _batch_len(x)
        seen += n
        if n == 0 or (settings.shard and world > 1 and index % world != rank):
            continue
        x = _to(x, device)
        if plan is None:
            plan = _Plan(net, selected, sums, x, settings)
        if mode == "sampled":
            y = sample_labels(net(x), settings.seed + index)
        elif y is not None:
            y = y.to(device)
        for start in range(0, n, plan.chunk):
            part = slice(start, start + plan.chunk)
            plan.run(_take(x, part), None if y is None else y[part])
        local += n

    # 2. every rank holds partial sums: add them up so all ranks return the same mean
    count = torch.tensor(local, dtype=torch.float64, device=device)
    if world > 1:
        for total in sums.values():
            dist.all_reduce(total)
        dist.all_reduce(count)
    return sums, int(count.item())


class _Plan:
    """Which parameters come from layer hooks and which from the per-sample fallback, and the chunk size.

    Decided on a probe forward pass over (up to) two samples of the first batch: a layer is hooked when
    it has a closed-form rule, is called once per forward with the batch leading its input and output,
    and each of its parameters reaches the graph only through it (no tied weights, no direct use).
    """

    def __init__(
        self,
        net: nn.Module,
        selected: dict[str, Tensor],
        sums: dict[str, Tensor],
        x: Any,
        settings: _Settings,
    ) -> None:
        self.net, self.mode, self.use_loop = net, settings.mode, False
        candidates, reasons = _candidates(net, selected)
        first = next(iter(selected.values()))
        probe_sums = {
            m: {local: torch.zeros_like(p) for local, (_, p) in locs.items()}
            for m, (_, locs) in candidates.items()
        }
        probe = LayerHooks(
            {m: rule for m, (rule, _) in candidates.items()},
            probe_sums,
            settings.budget,
            first.dtype,
            first.device,
        )
        activation_bytes = _probe(net, probe, x, candidates, reasons)

        hooked = {m: c for m, c in candidates.items() if m not in reasons}
        self.fallback = {name: p for name, p in selected.items() if name in _unhooked(hooked, selected)}
        for name in self.fallback:
            reasons.setdefault(name, "no per-layer rule")
        self.hooks = (
            LayerHooks(
                {m: rule for m, (rule, _) in hooked.items()},
                {
                    m: {local: sums[name] for local, (name, _) in locs.items()}
                    for m, (_, locs) in hooked.items()
                },
                settings.budget // 4,
                first.dtype,
                first.device,
            )
            if hooked
            else None
        )
        self.fallback_sums = {name: sums[name] for name in self.fallback}
        self.constants = {
            name: t.detach()
            for name, t in [*net.named_parameters(), *net.named_buffers()]
            if name not in self.fallback
        }
        self.per_sample = _per_sample_fn(net, self.constants, self.mode)
        per_sample_bytes = activation_bytes + sum(p.nbytes for p in self.fallback.values()) * (
            _num_classes(net, x) if self.mode == "exact" else 1
        )
        self.chunk = settings.chunk or max(1, settings.budget // max(1, per_sample_bytes))
        log.info(_notice(hooked, self.fallback, reasons, self.chunk, settings))

    def run(self, x: Any, y: Tensor | None) -> None:
        """Add ``Σ_n g_n²`` of the samples in ``x`` to the accumulators."""
        if self.hooks is not None:
            with self.hooks:
                _hooked_pass(self.net, self.hooks, x, y, self.mode)
        if not self.fallback:
            return
        if not self.use_loop:
            try:
                squares = self.per_sample({n: p.detach() for n, p in self.fallback.items()}, x, y)
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:
                self.use_loop = True
                first_line = (
                    str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                )
                log.info(
                    f"Fisher: vmap cannot trace the model ({first_line[:120]}); {len(self.fallback)} "
                    "parameter tensors use an exact batch-size-1 loop instead"
                )
            else:
                for name, square_sum in squares.items():
                    self.fallback_sums[name] += square_sum
                return
        _loop(self.net, self.fallback, self.fallback_sums, x, y, self.mode)


def _candidates(
    net: nn.Module, selected: dict[str, Tensor]
) -> tuple[dict[nn.Module, tuple[Rule, dict[str, tuple[str, Tensor]]]], dict[Any, str]]:
    """``{module: (rule, {local name: (full name, parameter)})}`` of hookable layers, and reasons against."""
    owners: dict[int, int] = {}
    for module in net.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    by_id = {id(p): name for name, p in selected.items()}
    reasons: dict[Any, str] = {}
    candidates = {}
    interacting = [
        type(m).__name__
        for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
    ]
    for module in net.modules():
        locs = {
            local: (by_id[id(p)], p)
            for local, p in module._parameters.items()
            if p is not None and id(p) in by_id
        }
        if not locs:
            continue
        rule, why = layer_rule(module)
        if interacting:
            rule, why = None, f"{interacting[0]} without running statistics mixes samples in a batch"
        tied = [name for name, p in locs.values() if owners[id(p)] > 1]
        for name in tied:
            reasons[name] = "tied to another module"
        locs = {local: v for local, v in locs.items() if v[0] not in tied}
        if rule is None:
            for name, _ in locs.values():
                reasons[name] = why
        elif locs:
            candidates[module] = (rule, locs)
    return candidates, reasons


def _probe(net: nn.Module, hooks: LayerHooks, x: Any, candidates: dict, reasons: dict) -> int:
    """Forward two samples with the hooks on; mark unsuitable layers in ``reasons``; bytes saved/sample."""
    n = _batch_len(x)
    probe_x = _take(x, slice(0, 2)) if n >= 2 else _cat(x, x)
    reference = net(probe_x)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    hooks.verify = True
    with hooks, torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = hooks.forward(lambda: net(probe_x), 2)
    for module in hooks.mismatched:  # the closed form does not describe this subclass's forward
        candidates[module] = (vjp_rule, candidates[module][1])
    same = torch.allclose(out.detach(), reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()))
    uses = _graph_uses(out)
    for module, (_, locs) in candidates.items():
        calls = hooks.calls[module]
        why = None
        if len(calls) > 1:
            why = f"{type(module).__name__} called {len(calls)} times per forward"
        elif calls and calls[0] not in ((2, 2), (1, 1)):
            why = f"{type(module).__name__} input/output do not lead with the batch"
        elif calls and calls[0] == (1, 1) and not same:
            why = f"{type(module).__name__} output is broadcast over the batch"
        for name, p in locs.values():
            if why is None and uses.get(id(p), 0) > len(calls):
                why = "also used outside its module"
            if why is not None:
                reasons[name] = why
        if why is not None:
            reasons[module] = why
    return sum(storages.values()) // 2


def _graph_uses(out: Tensor) -> dict[int, int]:
    """How many autograd edges lead to each leaf parameter in the graph of ``out``."""
    uses: dict[int, int] = {}
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            if hasattr(child, "variable"):
                uses[id(child.variable)] = uses.get(id(child.variable), 0) + 1
            else:
                stack.append(child)
    return uses


def _unhooked(hooked: dict, selected: dict[str, Tensor]) -> set[str]:
    covered = {name for _, locs in hooked.values() for name, _ in locs.values()}
    return set(selected) - covered


def _hooked_pass(net: nn.Module, hooks: LayerHooks, x: Any, y: Tensor | None, mode: str) -> None:
    with torch.enable_grad():
        logits = hooks.forward(lambda: net(x), _batch_len(x))
        if mode != "exact":
            loss = F.cross_entropy(logits.to(_acc_dtype(logits)), y, reduction="sum")
            torch.autograd.grad(loss, [hooks.anchor], allow_unused=True)
            return
        # Σ_c p_c (∂ log p_c)² = diag(Jᵀ M J) with J = ∂logits/∂θ and M = diag(p) - p pᵀ per sample. M has
        # rank C - 1 (M·1 = 0), so C - 1 backward passes of M's square-root columns cover it: one fewer
        # than one per class
        out = logits.to(_acc_dtype(logits))
        probs = out.detach().double().softmax(dim=-1)
        covariance = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
        values, vectors = torch.linalg.eigh(covariance)  # ascending: the null direction comes first
        roots = (vectors * values.clamp_min(0).sqrt().unsqueeze(-2))[..., 1:].to(out.dtype)
        passes = roots.shape[-1]
        for k in range(passes):
            torch.autograd.grad(
                out, [hooks.anchor], roots[..., k], retain_graph=k < passes - 1, allow_unused=True
            )


def _loop(
    net: nn.Module, params: dict[str, Tensor], sums: dict[str, Tensor], x: Any, y: Tensor | None, mode: str
) -> None:
    """The last resort: plain autograd, one sample at a time."""
    names, tensors = list(params), list(params.values())
    for j in range(_batch_len(x)):
        with torch.enable_grad():
            logits = net(_take(x, slice(j, j + 1))).to(_acc_dtype(tensors[0]))
            if mode == "exact":
                logp = logits.log_softmax(dim=-1)[0]
                terms = [(logp[c], float(logp[c].detach().exp())) for c in range(len(logp))]
            else:
                terms = [(F.cross_entropy(logits, y[j : j + 1]), 1.0)]
            for k, (value, weight) in enumerate(terms):
                grads = torch.autograd.grad(
                    value, tensors, retain_graph=k < len(terms) - 1, allow_unused=True
                )
                for name, g in zip(names, grads, strict=True):
                    if g is not None:
                        sums[name].add_(g.to(sums[name].dtype).square(), alpha=weight)


def _per_sample_fn(net: nn.Module, constants: dict[str, Tensor], mode: str):
    """``f(trainable, x, y) -> {name: Σ_n weight · grad_n²}`` for one chunk of samples, with ``vmap``."""

    def nll(p: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        logits = functional_call(net, (p, constants), (_unsqueeze(x),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    def log_probs(p: dict[str, Tensor], x: Any) -> tuple[Tensor, Tensor]:
        out = functional_call(net, (p, constants), (_unsqueeze(x),))[0].log_softmax(dim=-1)
        return out, out

    def labelled(trainable: dict[str, Tensor], x: Any, y: Tensor) -> dict[str, Tensor]:
        grads = vmap(grad(nll), in_dims=(None, 0, 0))(trainable, x, y)
        return {name: g.to(_acc_dtype(g)).square().sum(0) for name, g in grads.items()}

    def exact(trainable: dict[str, Tensor], x: Any, _: Tensor | None) -> dict[str, Tensor]:
        jac, logp = vmap(jacrev(log_probs, has_aux=True), in_dims=(None, 0))(trainable, x)
        probs = logp.to(_acc_dtype(logp)).exp()  # [n, C]
        return {
            name: torch.einsum("nc,nc...->...", probs, j.to(probs.dtype).square()) for name, j in jac.items()
        }

    return exact if mode == "exact" else labelled


def _notice(hooked: dict, fallback: dict[str, Tensor], reasons: dict, chunk: int, settings: _Settings) -> str:
    rules: dict[str, int] = {}
    for module, (rule, locs) in hooked.items():
        key = f"{type(module).__name__} (per-layer vjp)" if rule is vjp_rule else layer_rule(module)[1]
        rules[key] = rules.get(key, 0) + len(locs)
    by_rule = ", ".join(f"{k} {v}" for k, v in sorted(rules.items()))
    why: dict[str, list[str]] = {}
    for name in fallback:
        why.setdefault(reasons[name], []).append(name)
    fell = "; ".join(
        f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}: {r}" for r, names in why.items()
    )
    source = "given" if settings.chunk else f"from a {settings.budget / 2**30:.2g} GiB budget"
    return (
        f"Fisher ({settings.mode}): {sum(rules.values())} parameter tensors by layer hooks "
        f"({by_rule or 'none'}), "
        f"{len(fallback)} by per-sample vmap/loop ({fell or 'none'}); chunk {chunk} samples ({source})"
    )


def _num_classes(net: nn.Module, x: Any) -> int:
    return int(net(_take(x, slice(0, 1))).shape[-1])


def _unpack(batch: Any, mode: str) -> tuple[Any, Tensor | None]:
    if isinstance(batch, (Tensor, Mapping)):
        x, y = batch, None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (Tensor, Mapping)):
        x, y = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        raise TypeError(
            f"Fisher batches must be (x, y) pairs or inputs x (a tensor or a mapping of tensors), "
            f"got {type(batch).__name__}"
        )
    if mode == "empirical" and not isinstance(y, Tensor):
        raise TypeError("`mode='empirical'` needs (x, y) batches with labels; use 'sampled' without labels")
    return x, (y if mode == "empirical" else None)


def _batch_len(x: Any) -> int:
    return len(x) if isinstance(x, Tensor) else len(next(iter(x.values())))


def _take(x: Any, part: slice) -> Any:
    return x[part] if isinstance(x, Tensor) else {k: v[part] for k, v in x.items()}


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, Tensor) else {k: v.to(device) for k, v in x.items()}


def _cat(a: Any, b: Any) -> Any:
    return torch.cat([a, b]) if isinstance(a, Tensor) else {k: torch.cat([v, b[k]]) for k, v in a.items()}


def _unsqueeze(x: Any) -> Any:
    return x.unsqueeze(0) if isinstance(x, Tensor) else {k: v.unsqueeze(0) for k, v in x.items()}


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0
