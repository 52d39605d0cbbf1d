r"""Quadratic weight penalties added straight to ``.grad``: EWC and L2-SP.

Both are sums of terms ``strength / 2 · Σ_i F_i (θ_i − θ*_i)²`` whose gradient is
``strength · F · (θ − θ*)``. :class:`QuadraticPenalty` adds that gradient to ``.grad`` in
``on_before_optimizer_step``: Lightning calls it once per optimizer step, after gradient accumulation
and AMP unscaling and before gradient clipping and the step
(``lightning/pytorch/plugins/precision/precision.py::_after_closure``; ``amp.py`` unscales first).
So the user's ``training_step`` is untouched, no autograd graph is built, and every DDP rank adds
the same thing (its gradients are already all-reduced; the penalty depends only on ``θ``, which is
identical across ranks).

The penalty gradient is added in the scale of the gradients the optimizer will see. Under 16-bit mixed
precision Lightning unscales before the hook, except for optimizers that unscale inside ``step``
(``AdamW(fused=True)``, ``SGD(fused=True)``: they set ``_step_supports_amp_scaling``, the flag
``GradScaler.step`` reads); their gradients are still multiplied by the loss scale, so the penalty
gradient is multiplied by it too (a power of two: the optimizer's unscaling divides it back exactly).

Which parameters get the penalty gradient: those of the selected modules that require grad, have a
``.grad`` and belong to the optimizer being stepped. A parameter whose ``.grad`` is ``None`` is
skipped rather than given one: it is frozen, or it took no part in this step's loss, and the
optimizer skips it too, so it does not move away from its anchor through this step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from tl_lightning.callbacks._select import (
    ModuleSelector,
    as_selector_list,
    parameters_by_name,
    selected_parameters,
    shared_parameters,
)
from tl_lightning.callbacks._sharded import (
    full,
    is_sharded,
    local,
    shard_like,
    sum_over_shards,
    unsharded_copy,
)
from tl_lightning.callbacks._source import source_method
from tl_lightning.fisher import FISHER_MODES, FisherMode, fisher_diagonal

NORMALIZE_MODES: tuple[str | None, ...] = ("mean", "max", None)


@dataclass
class _Term:
    """``strength / 2 · Σ importance · (param − anchor)²``; ``None`` anchors are 0, ``None`` importances 1.

    ``θ − θ*`` is written into a scratch buffer kept between steps (one copy of the penalised
    parameters), so a step allocates nothing: fresh multi-megabyte temporaries cost page faults on CPU.
    """

    strength: float
    params: list[Tensor]
    anchors: list[Tensor] | None = None
    importances: list[Tensor] | None = None
    _scratch: list[Tensor] = field(default_factory=list, init=False, repr=False)

    def apply(self, stepped: set[int], with_value: bool, grad_scale: float = 1.0) -> Tensor | None:
        """Add ``grad_scale ×`` the gradient to stepped parameters' ``.grad``; return the value if asked."""
        index = [
            i
            for i, p in enumerate(self.params)
            if p.grad is not None and p.requires_grad and id(p) in stepped
        ]
        if not index:
            return None
        # local shards under FSDP2 (anchors and importances are sharded like their parameters)
        params = [local(self.params[i]) for i in index]
        grads = [local(self.params[i].grad) for i in index]
        diffs = params
        if self.anchors is not None:
            if not self._scratch:
                self._scratch = [torch.empty_like(local(a)) for a in self.anchors]
            diffs = [self._scratch[i] for i in index]
            torch._foreach_copy_(diffs, params)
            torch._foreach_sub_(diffs, [local(self.anchors[i]) for i in index])
        if self.importances is None:
            torch._foreach_add_(grads, diffs, alpha=self.strength * grad_scale)
        else:
            importances = [local(self.importances[i]) for i in index]
            torch._foreach_addcmul_(grads, diffs, importances, value=self.strength * grad_scale)
        if not with_value:
            return None
        squares = torch._foreach_mul(diffs, diffs)
        if self.importances is not None:
            torch._foreach_mul_(squares, importances)
        # the squares are non-negative, so their 1-norms are their sums
        total = torch.stack(torch._foreach_norm(squares, 1)).sum()
        return 0.5 * self.strength * sum_over_shards(total, [self.params[i] for i in index])


class QuadraticPenalty(Callback):
    """Base class: add the gradients of quadratic weight penalties to ``.grad`` once per optimizer step.

    Subclasses fill ``self._terms`` (usually in ``on_train_start``) and name the logged value.

    Args:
        log_name: The penalty value is logged as ``penalty/<log_name>`` on the steps Lightning
            writes logs (``log_every_n_steps``).
    """

    def __init__(self, log_name: str) -> None:
        super().__init__()
        self.log_name = log_name
        self._terms: list[_Term] = []

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        if not self._terms:
            return
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        with_value = _logs_this_step(trainer)
        scale = _grad_scale(trainer, optimizer)
        with torch.no_grad():
            values = [v for term in self._terms if (v := term.apply(stepped, with_value, scale)) is not None]
        if with_value and values:
            pl_module.log(f"penalty/{self.log_name}", torch.stack(values).sum(), on_step=True, on_epoch=False)


class EWC(QuadraticPenalty):
    r"""Elastic Weight Consolidation (Kirkpatrick et al. 2017): keep important weights near the source.

    Adds the gradient of ``lambda_ / 2 · Σ_i F_i (θ_i − θ*_i)²`` over the parameters of ``modules``,
    where ``θ*`` are their weights when training starts and ``F`` the diagonal Fisher of the
    source model at ``θ*`` (:func:`tl_lightning.fisher.fisher_diagonal`), computed once at the start
    of the first fit, or loaded from ``fisher_path``. ``θ*`` and ``F`` are saved in checkpoints,
    so resuming neither recomputes nor moves them.

    Under FSDP2 (``trainer=fsdp|fsdp_cpu``) ``θ*`` and ``F`` are sharded like their parameters, the Fisher
    is computed under sharding (:mod:`tl_lightning.fisher.sharded`), and checkpoints hold them whole.

    Calling ``trainer.fit`` again with the same instance keeps ``θ*`` and ``F`` (the source stays
    the source), unless ``online=True``: then each new fit is a new task, ``θ*`` moves to the current
    weights and ``F ← gamma · F + F_new`` (online EWC, Schwarz et al. 2018).

    Args:
        lambda_: Penalty strength ``λ > 0``.
        modules: Modules whose parameters are penalised (attribute paths or regexes; see
            ``tl_lightning.callbacks._select``). Frozen ones get the penalty once they train.
        source_forward: Method of the LightningModule returning the *source* task's logits, e.g.
            ``"source_logits"`` (the default) for an ImageNet head kept next to the new one. The Fisher
            measures what the *source* task needs, so the default is deliberately not ``"forward"``,
            which on a fine-tuning module usually runs the new, randomly initialised target head and
            would make the importances noise; a module without the method fails in ``setup``, naming
            the methods that look like source heads. Pass ``"forward"`` explicitly only when it returns
            source logits. Unused with ``fisher_path``.
        source_data: ``DataLoader`` (or any iterable of ``(x, y)``/``x`` batches, in the same
            order on every rank) or ``LightningDataModule`` (its ``train_dataloader()``) for the
            Fisher. ``None`` uses the trainer's training batches as inputs, with labels sampled
            from the source head, so ``fisher_mode`` must then not be ``"empirical"``.
        fisher_mode: ``"empirical"``, ``"sampled"`` or ``"exact"`` (see ``fisher_diagonal``).
        fisher_samples: Number of samples the Fisher is estimated from (per rank when the trainer's
            batches are used under DDP, since each rank then iterates its own shard).
        fisher_chunk_size: Samples per vectorised gradient computation (memory vs. speed).
        fisher_path: Load the (un-normalised) Fisher from this safetensors file instead of computing it.
        fisher_save_path: Save the computed (un-normalised) Fisher to this safetensors file.
        online: Consolidate over sequential fits instead of keeping the first anchor.
        gamma: Decay of the old importance in online mode, in ``(0, 1]``.
        normalize: Divide each new Fisher by its ``"mean"`` or ``"max"`` over all penalised
            entries (so ``lambda_`` is on the scale of L2-SP's ``alpha``), or ``None`` for raw values.
        seed: Seed of the labels drawn in ``"sampled"`` mode.

    Raises:
        ValueError: If an argument is out of range or not one of the allowed values.
        AttributeError: In ``setup``, if ``modules`` matches no module (the message lists the children).

    Example::

        trainer = Trainer(callbacks=[EWC(lambda_=100.0, modules="backbone", source_forward="source_logits")])
    """

    def __init__(
        self,
        lambda_: float,
        modules: ModuleSelector = "backbone",
        source_forward: str = "source_logits",
        source_data: Iterable[Any] | LightningDataModule | None = None,
        fisher_mode: FisherMode = "sampled",
        fisher_samples: int = 512,
        fisher_chunk_size: int = 64,
        fisher_path: str | Path | None = None,
        fisher_save_path: str | Path | None = None,
        online: bool = False,
        gamma: float = 1.0,
        normalize: Literal["mean", "max"] | None = "mean",
        seed: int = 0,
    ) -> None:
        super().__init__(log_name="ewc")
        if not lambda_ > 0:
            raise ValueError(f"`lambda_` must be > 0, got {lambda_}")
        if fisher_mode not in FISHER_MODES:
            raise ValueError(f"`fisher_mode` must be one of {FISHER_MODES}, got {fisher_mode!r}")
        if fisher_mode == "empirical" and source_data is None and fisher_path is None:
            raise ValueError(
                "`fisher_mode='empirical'` needs `source_data` with source-task labels; the trainer's "
                "batches carry target labels. Use 'sampled' or 'exact', or pass `source_data`."
            )
        if fisher_chunk_size < 1:
            raise ValueError(f"`fisher_chunk_size` must be >= 1, got {fisher_chunk_size}")
        if fisher_samples < 1:
            raise ValueError(f"`fisher_samples` must be >= 1, got {fisher_samples}")
        if fisher_path is not None and fisher_save_path is not None:
            raise ValueError("pass `fisher_path` (load) or `fisher_save_path` (compute and save), not both")
        if fisher_path is not None and online:
            raise ValueError("`fisher_path` fixes the importance; it cannot be combined with `online=True`")
        if not 0 < gamma <= 1:
            raise ValueError(f"`gamma` must be in (0, 1], got {gamma}")
        if gamma != 1 and not online:
            raise ValueError("`gamma` only applies with `online=True`")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"`normalize` must be one of {NORMALIZE_MODES}, got {normalize!r}")
        self.lambda_ = lambda_
        self.modules = as_selector_list(modules)
        self.source_forward = source_forward
        self.source_data = source_data
        self.fisher_mode = fisher_mode
        self.fisher_samples = fisher_samples
        self.fisher_chunk_size = fisher_chunk_size
        self.fisher_path = fisher_path
        self.fisher_save_path = fisher_save_path
        self.online = online
        self.gamma = gamma
        self.normalize = normalize
        self.seed = seed
        self._names: list[str] = []
        self._anchor: dict[str, Tensor] = {}
        self._fisher: dict[str, Tensor] = {}
        self._tasks = 0
        self._restored = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.fisher_path is None:
            source_method(pl_module, self.source_forward, type(self).__name__)
        self._names = list(selected_parameters(pl_module, self.modules))
        if not self._names:
            raise ValueError(f"modules {self.modules} hold no parameters to penalise")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        params = _named(pl_module, self._names)
        if self._restored:
            self._restored = False
            _check_state("checkpoint", self._anchor, params)
        elif not self._fisher or self.online:
            fisher = self._new_fisher(trainer, pl_module)
            if self._fisher:
                fisher = {n: self.gamma * self._fisher[n].to(f) + f for n, f in fisher.items()}
            self._fisher = fisher
            self._anchor = {name: p.detach().clone() for name, p in params.items()}  # sharded like p
            self._tasks += 1
        # where the parameters are: on their device, sharded like them under FSDP2 (a restored state is whole)
        self._anchor = {n: _placed(self._anchor[n], p) for n, p in params.items()}
        self._fisher = {n: _placed(self._fisher[n], p) for n, p in params.items()}
        self._terms = [
            _Term(
                strength=self.lambda_,
                params=list(params.values()),
                anchors=[_like(self._anchor[n], p) for n, p in params.items()],
                importances=[_like(self._fisher[n], p) for n, p in params.items()],
            )
        ]

    def _new_fisher(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        if self.fisher_path is not None:
            fisher = _load_fisher(self.fisher_path, _named(pl_module, self._names))
        else:
            source_method(pl_module, self.source_forward, type(self).__name__)  # registered with FSDP2
            batches, shard = self._batches(trainer)
            fisher = fisher_diagonal(
                pl_module,
                batches,
                mode=self.fisher_mode,
                max_samples=self.fisher_samples,
                chunk_size=self.fisher_chunk_size,
                params=self._names,
                method=self.source_forward,
                seed=self.seed + self._tasks,
                shard=shard,
            )
            if self.fisher_save_path is not None and trainer.is_global_zero:
                _save_fisher(fisher, self.fisher_save_path)
        return _normalized(fisher, self.normalize)

    def _batches(self, trainer: Trainer) -> tuple[Iterable[Any], bool]:
        """The Fisher's batches, and whether ``fisher_diagonal`` should shard them across ranks."""
        if self.source_data is None:
            return trainer.train_dataloader, False  # already one shard per rank under DDP
        if isinstance(self.source_data, LightningDataModule):
            self.source_data.setup("fit")
            return self.source_data.train_dataloader(), True
        return self.source_data, True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {  # whole tensors, gathered one at a time when sharded (plain data, any world size)
            "anchor": {n: unsharded_copy(t) for n, t in self._anchor.items()},
            "fisher": {n: unsharded_copy(t) for n, t in self._fisher.items()},
            "tasks": self._tasks,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict.get("anchor"):
            return
        self._anchor = dict(state_dict["anchor"])
        self._fisher = dict(state_dict["fisher"])
        self._tasks = state_dict["tasks"]
        self._restored = True


class L2SP(QuadraticPenalty):
    r"""L2-SP (Li, Grandvalet & Davoine 2018): pull pretrained weights towards their starting point.

    Adds the gradients of ``alpha / 2 · ||w_s − w_s⁰||²`` over the ``pretrained`` parameters (``w_s⁰``:
    their weights when training first starts; kept in checkpoints) and of ``beta / 2 · ||w_new||²``
    over the ``new`` parameters. The ``beta`` term is plain L2 added to the gradient, not decoupled
    weight decay, so with Adam-type optimizers it is rescaled like any gradient (as in the paper).

    Args:
        alpha: Strength of the pull towards the pretrained weights, ``>= 0``.
        beta: Strength of the L2 penalty on the new parameters, ``>= 0``.
        pretrained: Modules holding the pretrained weights (attribute paths or regexes).
        new: Modules created for the target task, or ``None`` for no ``beta`` term.

    Raises:
        ValueError: If a strength is negative, both are zero, or the two selections share a parameter.
        AttributeError: In ``setup``, if a selector matches no module (the message lists the children).

    Example::

        trainer = Trainer(callbacks=[L2SP(alpha=0.01, beta=0.01, pretrained="backbone", new="heads.target")])
    """

    def __init__(
        self,
        alpha: float = 0.01,
        beta: float = 0.01,
        pretrained: ModuleSelector = "backbone",
        new: ModuleSelector | None = "heads.target",
    ) -> None:
        super().__init__(log_name="l2sp")
        if alpha < 0 or beta < 0 or alpha == beta == 0:
            raise ValueError(f"`alpha` and `beta` must be >= 0 and not both 0, got {alpha=}, {beta=}")
        self.alpha = alpha
        self.beta = beta
        self.pretrained = as_selector_list(pretrained)
        self.new = None if new is None else as_selector_list(new)
        self._pretrained_names: list[str] = []
        self._new_names: list[str] = []
        self._anchor: dict[str, Tensor] = {}
        self._restored = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(pretrained=self.pretrained)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._pretrained_names = list(selected_parameters(pl_module, self.pretrained))
        self._new_names = [] if self.new is None else list(selected_parameters(pl_module, self.new))
        shared = [] if self.new is None else shared_parameters(pl_module, self.pretrained, self.new)
        if shared:
            pairs = ", ".join(f"{a!r} (pretrained) is {b!r} (new)" for a, b in shared[:5])
            raise ValueError(f"`pretrained` and `new` select the same tensors (tied weights count): {pairs}")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pretrained = _named(pl_module, self._pretrained_names)
        if self._restored:
            self._restored = False
            _check_state("checkpoint", self._anchor, pretrained)
        elif not self._anchor:
            self._anchor = {name: p.detach().clone() for name, p in pretrained.items()}
        self._anchor = {n: _placed(self._anchor[n], p) for n, p in pretrained.items()}
        anchors = [_like(self._anchor[n], p) for n, p in pretrained.items()]
        self._terms = [
            _Term(self.alpha, list(pretrained.values()), anchors),
            _Term(self.beta, list(_named(pl_module, self._new_names).values())),
        ]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"anchor": {n: unsharded_copy(t) for n, t in self._anchor.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("anchor"):
            self._anchor = dict(state_dict["anchor"])
            self._restored = True


def _logs_this_step(trainer: Trainer) -> bool:
    """Whether Lightning writes logs after this optimizer step: every ``log_every_n_steps``, and the last."""
    every = trainer.log_every_n_steps
    return every > 0 and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)


def _grad_scale(trainer: Trainer, optimizer: Optimizer) -> float:
    """The loss scale ``optimizer``'s gradients still carry in ``on_before_optimizer_step`` (module doc)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    unscales_in_step = getattr(optimizer, "_step_supports_amp_scaling", False)
    if scaler is None or not scaler.is_enabled() or not unscales_in_step:
        return 1.0
    return scaler.get_scale()


def _named(pl_module: LightningModule, names: list[str]) -> dict[str, Tensor]:
    """Current parameter objects by name (looked up again after the strategy moved or sharded the model)."""
    return parameters_by_name(pl_module, names)


def _placed(value: Tensor, param: Tensor) -> Tensor:
    """``value`` on ``param``'s device, sharded like ``param`` under FSDP2, in its own dtype."""
    return value if is_sharded(value) else shard_like(value, param).to(value.dtype)


def _like(value: Tensor, param: Tensor) -> Tensor:
    return value.to(dtype=param.dtype)


def _check_state(source: str, tensors: dict[str, Tensor], params: dict[str, Tensor]) -> None:
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    reshaped = sorted(n for n, p in params.items() if n in tensors and tensors[n].shape != p.shape)
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{source} does not match the selected parameters: missing={missing[:5]}, "
            f"unexpected={unexpected[:5]}, wrong shape={reshaped[:5]}"
        )


def _load_fisher(path: str | Path, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The Fisher saved at ``path``, checked against ``params`` and in their order (the file's is sorted)."""
    from safetensors.torch import load_file  # only here: Lightning does not depend on safetensors

    loaded = load_file(str(path))
    _check_state(str(path), loaded, params)
    return {name: loaded[name] for name in params}


def _save_fisher(fisher: dict[str, Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file  # only here: Lightning does not depend on safetensors

    save_file({n: f.contiguous().cpu() for n, f in fisher.items()}, str(path))


def _normalized(fisher: dict[str, Tensor], normalize: str | None) -> dict[str, Tensor]:
    """Divide by the mean or max over all entries, taken in name order in float64: dict order is moot."""
    if normalize is None:
        return fisher
    names = sorted(fisher)
    if normalize == "mean":  # full(): a DTensor's sum over its shards, all-reduced (FSDP2)
        total = sum(full(fisher[n].double().sum()) for n in names)
        scale = total / sum(fisher[n].numel() for n in names)
    else:
        scale = torch.stack([full(fisher[n].double().max()) for n in names]).max()
    if not scale > 0:
        raise ValueError(
            "the Fisher is zero everywhere, nothing to normalise; check `source_forward` and the data"
        )
    return {name: f / (float(scale) if is_sharded(f) else scale.to(f.dtype)) for name, f in fisher.items()}
