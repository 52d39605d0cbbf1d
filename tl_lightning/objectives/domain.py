"""Unsupervised domain adaptation pieces in pure torch: gradient reversal, multi-kernel MMD, DANN schedule.

A labelled source domain and an unlabelled target domain share one backbone. DANN (Ganin et al., 2016)
trains a domain classifier on the features through a gradient-reversal layer, so the backbone learns
features the classifier cannot tell apart; MMD (Long et al., 2015) penalises the distance between
the source and target feature distributions in a Gaussian-kernel feature space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Bandwidth multipliers of the default kernel family (times the mean pairwise squared distance).
DEFAULT_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-coeff``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.neg() * ctx.coeff, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """The gradient-reversal layer: ``x`` unchanged forward, ``-coeff * grad`` backward.

    Args:
        x: Features (any shape).
        coeff: Scale of the reversed gradient, ``>= 0`` (DANN's ``lambda``).

    Raises:
        ValueError: If ``coeff`` is negative or not finite.

    Example::

        domain_logits = domain_head(grad_reverse(features, dann_coefficient(progress)))
    """
    if not (math.isfinite(coeff) and coeff >= 0):
        raise ValueError(f"the gradient-reversal coefficient must be finite and >= 0, got {coeff}")
    return _GradientReversal.apply(x, float(coeff))


def dann_coefficient(progress: float, gamma: float = 10.0) -> float:
    """DANN's reversal schedule ``lambda_p = 2 / (1 + exp(-gamma p)) - 1``: 0 at the start, -> 1 at the end.

    Ramping the coefficient up keeps the noisy domain gradient of the first steps out of the backbone.

    Args:
        progress: Training progress ``p`` in ``[0, 1]`` (step / total steps).
        gamma: Steepness (10 in the paper).

    Raises:
        ValueError: If ``progress`` is outside ``[0, 1]``.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"training progress must be in [0, 1], got {progress}")
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


def gaussian_mmd(
    source: torch.Tensor,
    target: torch.Tensor,
    bandwidths: Sequence[float] | None = None,
    scales: Sequence[float] = DEFAULT_SCALES,
) -> torch.Tensor:
    """Squared multi-kernel Gaussian MMD between two samples, biased (V-statistic) estimator.

    With ``k(a, b) = sum_i exp(-||a - b||^2 / bandwidth_i)`` and ``Z = [source; target]``::

        MMD^2 = mean k(source, source) + mean k(target, target) - 2 mean k(source, target)

    The means include the diagonal (the biased estimator): it is never negative and is exactly 0 when
    the two samples are the same points, which the unbiased estimator is not.

    Args:
        source: ``(n, d)`` features.
        target: ``(m, d)`` features.
        bandwidths: The kernels' ``bandwidth_i`` (``2 sigma_i^2``); ``None`` uses ``scales`` times the
            mean pairwise squared distance of ``Z`` (computed without gradient).
        scales: Multipliers of the data-driven bandwidth when ``bandwidths`` is ``None``.

    Raises:
        ValueError: On samples that are not 2-D, differ in width, are empty, or a bandwidth <= 0.

    Example::

        loss = loss + weight * gaussian_mmd(backbone(x_source), backbone(x_target))
    """
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(
            f"MMD needs (n, d) and (m, d) features, got {tuple(source.shape)} and {tuple(target.shape)}"
        )
    if len(source) == 0 or len(target) == 0:
        raise ValueError("MMD needs at least one source and one target sample")
    joint = torch.cat([source, target])
    sq_dist = (joint[:, None, :] - joint[None, :, :]).square().sum(-1)  # exact; finite gradient at 0
    widths = _bandwidths(sq_dist.detach(), bandwidths, scales)
    kernel = sum(torch.exp(-sq_dist / w) for w in widths)
    n = len(source)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


def _bandwidths(
    sq_dist: torch.Tensor, bandwidths: Sequence[float] | None, scales: Sequence[float]
) -> list[float]:
    if bandwidths is None:
        count = len(sq_dist)
        mean = float(sq_dist.sum() / max(count * count - count, 1))
        bandwidths = [s * (mean if mean > 0 else 1.0) for s in scales]
    if not bandwidths or min(bandwidths) <= 0:
        raise ValueError(f"MMD bandwidths must be > 0, got {list(bandwidths)}")
    return list(bandwidths)
