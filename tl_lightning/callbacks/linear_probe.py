"""A linear probe fit to convergence on frozen features: the standard linear-evaluation protocol.

The objective is multinomial logistic regression on the features the head receives::

    mean_i cross_entropy(W x_i + b, y_i) + l2 / 2 * ||W||^2        (the bias is not penalised)

i.e. scikit-learn's ``LogisticRegression(C=1 / (l2 * n_train))`` on the same features. It is convex, so
full-batch L-BFGS reaches its unique minimum in seconds; ``l2`` is chosen on the validation split from
a small grid. Label smoothing is 0 (plain cross-entropy); ``l2`` plays the role of weight decay and is
the only regulariser: the module's own ``weight_decay`` and optimizer never touch the fitted head.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from typing_extensions import override

from tl_lightning._modes import eval_mode
from tl_lightning.callbacks._select import canonical_names, unwrap

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class ProbeFit:
    """One converged fit: the solution and how well it converged.

    Attributes:
        weight: ``(num_classes, num_features)``.
        bias: ``(num_classes,)``, zeros when fit without a bias.
        objective: Final value of the penalised mean cross-entropy.
        grad_max: Largest absolute entry of the objective's gradient at the solution.
        iterations: L-BFGS iterations used.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    objective: float
    grad_max: float
    iterations: int


def probe_objective(
    features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, l2: float
) -> torch.Tensor:
    """Mean cross-entropy of ``features @ weight.T + bias`` plus ``l2 / 2 * ||weight||^2``."""
    logits = features @ weight.T + bias
    return F.cross_entropy(logits, labels) + 0.5 * l2 * weight.pow(2).sum()


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    fit_bias: bool = True,
    max_iter: int = 1000,
    tolerance: float = 1e-8,
    init: ProbeFit | None = None,
) -> ProbeFit:
    """Minimise :func:`probe_objective` with full-batch L-BFGS (strong Wolfe line search).

    Features are centred internally (the bias absorbs the mean), which leaves the objective unchanged
    because the bias is not penalised, and makes the problem far better conditioned.

    Args:
        features: ``(n, d)``, in the dtype the fit runs in.
        labels: ``(n,)`` class indices.
        num_classes: Number of classes (rows of the weight).
        l2: Penalty strength, > 0 (the problem has no minimum on separable data without it).
        fit_bias: Fit a bias; without one the features are not centred.
        max_iter: Most L-BFGS iterations.
        tolerance: Stop when every gradient entry is at most this in absolute value.
        init: Warm start (a previous solution on the same features).

    Returns:
        The solution in the coordinates of ``features`` (not centred).
    """
    mean = features.mean(0) if fit_bias else torch.zeros_like(features[0])
    centred = features - mean
    weight = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    bias = torch.zeros(num_classes, dtype=features.dtype, device=features.device)
    if init is not None:
        weight.copy_(init.weight)
        bias.copy_(init.bias + init.weight @ mean)
    params = [weight.requires_grad_(), *([bias.requires_grad_()] if fit_bias else [])]
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=tolerance,
        tolerance_change=10 * torch.finfo(features.dtype).eps,  # loss change per step: float noise
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = probe_objective(centred, labels, weight, bias, l2)
        loss.backward()
        return loss

    optimizer.step(closure)
    loss = closure()
    grad_max = max(float(p.grad.abs().max()) for p in params)
    iterations = optimizer.state[optimizer._params[0]]["n_iter"]
    weight, bias = weight.detach(), bias.detach()
    return ProbeFit(weight, bias - weight @ mean, float(loss.detach()), grad_max, iterations)


def accuracy_and_loss(
    features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy (no penalty) of the linear classifier ``(weight, bias)``."""
    logits = features @ weight.T + bias
    accuracy = float((logits.argmax(1) == labels).double().mean())
    return accuracy, float(F.cross_entropy(logits, labels))


def select_l2(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    l2_grid: Sequence[float],
    **fit_kwargs: Any,
) -> tuple[float, ProbeFit, list[dict[str, float]]]:
    """Fit every ``l2`` of the grid on ``train`` and keep the best on ``val``.

    The grid is walked from the strongest penalty down, each fit warm-started from the previous one.
    Best means the highest validation accuracy, ties broken by the lower validation cross-entropy,
    then by the stronger penalty.

    Returns:
        ``(chosen l2, its fit, one row per l2: l2, val_acc, val_loss, objective, grad_max, iterations)``.
    """
    rows: list[dict[str, float]] = []
    best: tuple[tuple[float, float], float, ProbeFit] | None = None
    fit = None
    for l2 in sorted(l2_grid, reverse=True):
        fit = fit_logistic(*train, num_classes, l2, init=fit, **fit_kwargs)
        acc, loss = accuracy_and_loss(*val, fit.weight, fit.bias)
        row = {"l2": l2, "val_acc": acc, "val_loss": loss, "objective": fit.objective}
        rows.append(row | {"grad_max": fit.grad_max, "iterations": fit.iterations})
        if best is None or (acc, -loss) > best[0]:
            best = ((acc, -loss), l2, fit)
    return best[1], best[2], rows


@torch.no_grad()
def head_inputs(
    pl_module: nn.Module, head: nn.Module, dataloader: DataLoader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``head`` receives when ``pl_module(inputs)`` runs on every ``(inputs, targets)`` batch, in order.

    The module runs in eval mode (its flags restored afterwards); the data is read in dataset order,
    without shuffling, so the global random state is untouched.

    Raises:
        TypeError: If a batch is not an ``(inputs, targets)`` pair.
        RuntimeError: If ``pl_module(inputs)`` does not call ``head``.
    """
    captured: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
    ordered = DataLoader(
        dataloader.dataset,
        batch_size=dataloader.batch_size or 256,
        shuffle=False,
        collate_fn=dataloader.collate_fn,
    )
    try:
        with eval_mode(pl_module):
            for batch in ordered:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise TypeError(
                        f"ConvergedLinearProbe needs (inputs, targets) batches, got {type(batch).__name__}"
                    )
                inputs, targets = move_data_to_device(batch, device)
                seen = len(captured)
                pl_module(inputs)
                if len(captured) != seen + 1:
                    raise RuntimeError(
                        f"{type(pl_module).__name__}(inputs) called the probe's head {len(captured) - seen} "
                        "times per batch; ConvergedLinearProbe needs forward() to call it exactly once"
                    )
                labels.append(targets)
    finally:
        handle.remove()
    return torch.cat(captured).flatten(1), torch.cat(labels)


class ConvergedLinearProbe(Callback):
    r"""Fit a linear head to convergence on frozen features before training starts.

    At ``on_train_start`` the callback runs the module over the training and validation sets (as the
    trainer's dataloaders hold them, read in order), records what the head receives, fits
    multinomial logistic regression with full-batch L-BFGS for every ``l2`` of ``l2_grid`` (objective:
    mean cross-entropy + ``l2 / 2 * ||W||^2``, bias unpenalised, no label smoothing; scikit-learn's
    ``C = 1 / (l2 * n_train)``), keeps the ``l2`` with the best validation accuracy and writes that
    solution into the head. The fit is deterministic: data in dataset order, a fixed grid walked from
    the strongest penalty down (each fit warm-started from the previous one; the objective is convex,
    so the start changes the iterations, not the minimum).

    Training afterwards leaves the head as fitted: its gradients are dropped before every optimizer
    step, so an optimizer (with any weight decay) skips it. Since everything else must be frozen, a
    training epoch only scores the probe (train metrics), and the usual validation, checkpointing and
    test evaluate it: run one epoch (``max_epochs=1``).

    Args:
        head: Attribute path of the ``nn.Linear`` head in the module (``"heads.target"``, ``"fc"``).
        l2_grid: Penalty strengths to choose from, each > 0.
        dtype: ``"float64"`` (default) or ``"float32"``: the precision of the fit. A float32 fit stops
            where the loss stops changing in single precision (~1e-4 of the objective on digits).
        max_iter: Most L-BFGS iterations per ``l2``.
        tolerance: Converged when every entry of the objective's gradient is at most this.

    Raises:
        ValueError: On an empty grid, a non-positive ``l2``, an unknown ``dtype``, a non-positive
            ``max_iter`` or ``tolerance``; at ``on_train_start``, when a parameter outside the head
            is trainable (the features would not be fixed).
        AttributeError: In ``setup()``, if ``head`` names no module; lists the top-level children.
        TypeError: In ``setup()``, if ``head`` is not an ``nn.Linear``.

    Example::

        trainer = Trainer(max_epochs=1, callbacks=[Freeze("backbone"), ConvergedLinearProbe("head")])
    """

    def __init__(
        self,
        head: str = "heads.target",
        l2_grid: Sequence[float] = DEFAULT_L2_GRID,
        dtype: Literal["float32", "float64"] = "float64",
        max_iter: int = 1000,
        tolerance: float = 1e-8,
    ) -> None:
        super().__init__()
        grid = [float(v) for v in l2_grid]
        if not grid or not all(math.isfinite(v) and v > 0 for v in grid):
            raise ValueError(f"`l2_grid` must be a non-empty list of finite values > 0, got {list(l2_grid)}")
        if dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {dtype!r}")
        if max_iter < 1 or not tolerance > 0:
            raise ValueError(f"`max_iter` must be >= 1 and `tolerance` > 0, got {max_iter} and {tolerance}")
        self.head_path = head
        self.l2_grid = grid
        self.dtype = dtype
        self.max_iter = max_iter
        self.tolerance = tolerance
        self.results: dict[str, Any] = {}
        self._head: nn.Linear | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        root = unwrap(pl_module)
        try:
            head = root.get_submodule(self.head_path)
        except AttributeError:
            children = ", ".join(repr(n) for n, _ in root.named_children()) or "none"
            raise AttributeError(
                f"ConvergedLinearProbe(head={self.head_path!r}): {type(root).__name__} has no such module; "
                f"its top-level children are: {children}"
            ) from None
        if not isinstance(head, nn.Linear):
            raise TypeError(
                f"ConvergedLinearProbe(head={self.head_path!r}) needs an nn.Linear, got {type(head).__name__}"
            )
        self._head = head

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_frozen(pl_module)
        started = time.perf_counter()
        train = self._features(pl_module, _single(trainer.train_dataloader, "train"))
        val = self._features(pl_module, _single(trainer.val_dataloaders, "val"))
        l2, fit, rows = select_l2(
            train,
            val,
            self._head.out_features,
            self.l2_grid,
            fit_bias=self._head.bias is not None,
            max_iter=self.max_iter,
            tolerance=self.tolerance,
        )
        with torch.no_grad():
            self._head.weight.copy_(fit.weight)
            if self._head.bias is not None:
                self._head.bias.copy_(fit.bias)
        self.results = {
            "l2": l2,
            "sklearn_C": 1.0 / (l2 * len(train[1])),
            "fit_s": round(time.perf_counter() - started, 3),
            "grid": rows,
        }
        log.info("converged linear probe: l2=%g, %s", l2, next(r for r in rows if r["l2"] == l2))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for param in self._head.parameters():
            param.grad = None  # optimizers skip parameters without a gradient (weight decay included)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = state_dict["results"]

    def _features(self, pl_module: pl.LightningModule, dataloader: DataLoader) -> tuple[torch.Tensor, ...]:
        features, labels = head_inputs(pl_module, self._head, dataloader, pl_module.device)
        return features.to(DTYPES[self.dtype]), labels

    def _check_frozen(self, pl_module: nn.Module) -> None:
        own = {id(p) for p in self._head.parameters()}
        names = canonical_names(pl_module)
        trainable = [names[id(p)] for p in pl_module.parameters() if p.requires_grad and id(p) not in own]
        if trainable:
            raise ValueError(
                f"ConvergedLinearProbe(head={self.head_path!r}) fits on fixed features, but {len(trainable)} "
                f"parameters outside the head are trainable ({', '.join(trainable[:5])}, ...); "
                "freeze them first, e.g. with Freeze(modules='backbone')"
            )


def _single(dataloaders: object, split: str) -> DataLoader:
    """The one ``DataLoader`` of a split (Lightning may hold a list of them)."""
    if isinstance(dataloaders, (list, tuple)) and len(dataloaders) == 1:
        dataloaders = dataloaders[0]
    if not isinstance(dataloaders, DataLoader):
        raise TypeError(
            f"ConvergedLinearProbe needs exactly one {split} DataLoader, got {type(dataloaders).__name__}"
        )
    return dataloaders
