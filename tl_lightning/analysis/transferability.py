"""Transferability scores: rank pretrained feature extractors for a target task before fine-tuning.

All three need one forward pass over the target's training split and no training:

* :func:`logme` (You et al., 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning"): the maximum evidence of a Bayesian linear regression from the features to each class's
  one-hot target, averaged over classes and divided by the number of samples.
* :func:`leep` (Nguyen et al., 2020, "LEEP: A New Measure to Evaluate Transferability of Learned
  Representations"): how well the source classifier's soft predictions, passed through the empirical
  conditional ``P(y | z)``, predict the target labels (a mean log-likelihood, so ``<= 0``).
* :func:`nce` (Tran et al., 2019, "Transferability and Hardness of Supervised Classification Tasks"):
  the negative conditional entropy ``-H(Y | Z)`` of the target label given the source's hard label
  (``<= 0``; ``0`` when the source label determines the target label).

Higher is better for all three. LEEP and NCE need a source classifier (its softmax outputs), so they
are undefined for a backbone cut below its head; LogME needs only features.

:func:`rank_agreement` checks a score against what it predicts: Kendall's tau and the weighted tau
between the candidates' scores and their accuracy after fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from scipy import stats

__all__ = ["RankAgreement", "leep", "logme", "nce", "rank_agreement"]

RESIDUAL_FLOOR = 1e-24


def _check_labels(labels: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """``labels`` as int64, checked to be ``n`` non-negative integers."""
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(
            f"labels must be a 1-D tensor of {n} entries (one per row of {what}), got shape "
            f"{tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if n == 0:
        raise ValueError(f"{what} is empty: transferability needs at least one sample")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(labels.min())}")
    return labels.long()


def _evidence(
    s2: torch.Tensor, z2: torch.Tensor, outside: float, n: int, d: int, alpha: float, beta: float
) -> float:
    """Log evidence per sample of ``y`` under prior precision ``alpha`` and noise precision ``beta``.

    ``s2`` are the squared singular values of the features, ``z2`` the squared projections of ``y`` on
    the left singular vectors, ``outside`` the squared norm of the rest of ``y`` (what no weights can
    fit); directions of the weights with ``s = 0`` contribute ``log alpha``.
    """
    shrink = alpha + beta * s2
    residual = float((alpha**2 * z2 / shrink**2).sum()) + outside  # ||F m - y||^2
    weight_norm = float((beta**2 * s2 * z2 / shrink**2).sum())  # ||m||^2
    log_det = float(torch.log(shrink).sum()) + (d - len(s2)) * math.log(alpha)
    evidence = (
        n / 2 * math.log(beta)
        + d / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * residual
        - alpha / 2 * weight_norm
        - log_det / 2
    )
    return evidence / n


def _max_evidence(
    s2: torch.Tensor, z: torch.Tensor, outside: float, n: int, d: int, max_iter: int, tol: float
) -> float:
    """Maximise the evidence over ``alpha, beta`` with MacKay's fixed-point updates (from 1, 1).

    When the features fit ``y`` exactly (``n <= D``), the maximum lies at ``beta -> inf``; the residual
    is floored at ``RESIDUAL_FLOOR`` times ``||y||^2`` so ``beta`` stops there, where the evidence is
    its limit to within about the floor.
    """
    z2 = z**2
    floor = RESIDUAL_FLOOR * (float(z2.sum()) + outside)
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        shrink = alpha + beta * s2
        gamma = float((beta * s2 / shrink).sum())  # effective number of well-determined weights
        weight_norm = float((beta**2 * s2 * z2 / shrink**2).sum())
        residual = float((alpha**2 * z2 / shrink**2).sum()) + outside
        new_alpha = gamma / max(weight_norm, floor)
        new_beta = (n - gamma) / max(residual, floor)
        converged = abs(new_alpha - alpha) <= tol * alpha and abs(new_beta - beta) <= tol * beta
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    return _evidence(s2, z2, outside, n, d, alpha, beta)


def logme(features: torch.Tensor, labels: torch.Tensor, max_iter: int = 1000, tol: float = 1e-8) -> float:
    """LogME: mean over classes of the maximum log evidence per sample of a Bayesian linear model.

    For each class ``k`` present in ``labels``, the target ``y = [labels == k]`` (``n`` values) is
    modelled as ``y = F w + noise`` with prior ``w ~ N(0, I / alpha)`` and noise ``N(0, 1 / beta)``.
    With ``A = alpha I + beta F^T F`` and ``m = beta A^{-1} F^T y``, the log evidence is::

        n/2 log beta + D/2 log alpha - n/2 log 2 pi - beta/2 ||F m - y||^2 - alpha/2 ||m||^2 - 1/2 log|A|

    ``alpha`` and ``beta`` are set to its maximum by the fixed-point iteration ``gamma = sum_i beta s_i^2 /
    (alpha + beta s_i^2)``, ``alpha = gamma / ||m||^2``, ``beta = (n - gamma) / ||F m - y||^2``, all in
    the SVD of ``F`` (computed once in float64 and shared by every class).

    Args:
        features: ``(n, D)`` features of the target's training samples (flattened beyond dim 1).
        labels: ``(n,)`` integer class indices.
        max_iter: Most fixed-point updates per class.
        tol: Stop when ``alpha`` and ``beta`` both change by at most this fraction.

    Returns:
        The score (higher: the features explain the labels linearly with less complexity).

    Raises:
        ValueError: If the shapes disagree, ``labels`` are not non-negative integers, or there are no
            samples.

    Example::

        score = logme(extract_features(backbone, data.train_set, 64).tensors[0], labels)
    """
    features = features.detach().to("cpu", torch.float64).flatten(1)
    n, d = features.shape
    labels = _check_labels(labels.detach().cpu(), n, "features")
    left, singular, _ = torch.linalg.svd(features, full_matrices=False)
    s2 = singular**2
    scores = []
    for k in torch.unique(labels):
        target = (labels == k).to(torch.float64)
        z = left.T @ target
        outside = float(((target - left @ z) ** 2).sum())  # accurate even when ~0, unlike ||y||^2 - ||z||^2
        scores.append(_max_evidence(s2, z, outside, n, d, max_iter, tol))
    return sum(scores) / len(scores)


def leep(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """LEEP: mean log-likelihood of the target labels under the source head's "expected empirical predictor".

    With ``theta_i`` the source classifier's softmax output for sample ``i`` (``Z`` source classes)::

        P(y, z) = 1/n sum_{i: y_i = y} theta_i(z)      P(y | z) = P(y, z) / sum_y' P(y', z)
        LEEP    = 1/n sum_i log sum_z P(y_i | z) theta_i(z)

    Args:
        probabilities: ``(n, Z)`` source-class probabilities (rows sum to 1).
        labels: ``(n,)`` integer target class indices.

    Returns:
        The score, ``<= 0`` (higher: the source predictions carry more of the target labels).

    Raises:
        ValueError: If ``probabilities`` is not ``(n, Z)`` with rows of non-negative entries summing to 1,
            or ``labels`` are not ``n`` non-negative integers.
    """
    theta = probabilities.detach().to("cpu", torch.float64)
    if theta.ndim != 2:
        raise ValueError(f"probabilities must be (n, Z) softmax outputs, got shape {tuple(theta.shape)}")
    labels = _check_labels(labels.detach().cpu(), len(theta), "probabilities")
    if bool((theta < 0).any()) or not torch.allclose(
        theta.sum(1), torch.ones(len(theta), dtype=theta.dtype), atol=1e-4
    ):
        raise ValueError(
            "probabilities must be non-negative with rows summing to 1 (apply softmax to the logits)"
        )
    joint = torch.zeros(int(labels.max()) + 1, theta.shape[1], dtype=torch.float64)
    joint.index_add_(0, labels, theta / len(theta))
    conditional = joint / joint.sum(0, keepdim=True).clamp_min(1e-300)  # P(y | z)
    likelihood = (theta * conditional[labels]).sum(1)
    return float(torch.log(likelihood).mean())


def nce(source_labels: torch.Tensor, labels: torch.Tensor) -> float:
    """NCE: ``-H(Y | Z)``, the negative conditional entropy of target labels given source labels.

    ``Z`` is the source classifier's hard prediction (the argmax of its output) and ``P(y, z)`` the
    empirical joint of the pairs ``(y_i, z_i)``::

        NCE = sum_{y, z} P(y, z) log P(y | z)

    Args:
        source_labels: ``(n,)`` integer source-class predictions.
        labels: ``(n,)`` integer target class indices.

    Returns:
        The score, ``<= 0``; ``0`` exactly when each source label determines the target label.

    Raises:
        ValueError: If either is not ``n`` non-negative integers.
    """
    if source_labels.ndim != 1:
        raise ValueError(
            f"source_labels must be 1-D hard predictions, got shape {tuple(source_labels.shape)}"
        )
    source = _check_labels(source_labels.detach().cpu(), len(source_labels), "source_labels")
    labels = _check_labels(labels.detach().cpu(), len(source), "source_labels")
    pairs = source * (int(labels.max()) + 1) + labels
    _, counts = torch.unique(pairs, return_counts=True)
    _, source_counts = torch.unique(source, return_counts=True)
    n = len(source)
    joint, marginal = counts.double() / n, source_counts.double() / n
    # H(Y | Z) = H(Y, Z) - H(Z)
    return float((joint * joint.log()).sum() - (marginal * marginal.log()).sum())


@dataclass(frozen=True)
class RankAgreement:
    """How well one score ranks candidates by their fine-tuned accuracy.

    Args:
        n: Candidates with both a score and an accuracy (the others are left out).
        kendall_tau: Kendall's tau-b between score and accuracy, in ``[-1, 1]``.
        p_value: Two-sided p-value of ``kendall_tau`` against no association (exact for small ``n``
            without ties): with a handful of candidates even ``tau = 1`` is weak evidence.
        weighted_tau: Weighted tau with hyperbolic weights (the top of both rankings counts most),
            averaged over ranking by score and by accuracy; the measure of TLlib's model-selection
            benchmark.
    """

    n: int
    kendall_tau: float
    p_value: float
    weighted_tau: float


def rank_agreement(scores: Mapping[str, float | None], accuracy: Mapping[str, float]) -> RankAgreement:
    """Kendall's tau and weighted tau between a transferability score and fine-tuned accuracy.

    A candidate counts only when it has both a score and an accuracy: a missing score (``None``, NaN
    or an absent key, e.g. LEEP for a backbone cut below its source head) leaves the candidate out,
    it is never read as 0.

    Args:
        scores: Score per candidate name (higher: predicted to transfer better).
        accuracy: Fine-tuned accuracy (or any metric where higher is better) per candidate name.

    Returns:
        The :class:`RankAgreement` over the candidates present in both.

    Raises:
        ValueError: If fewer than 2 candidates have both values, naming the ones that have.

    Example::

        rank_agreement({"a": 0.4, "b": 0.3, "c": None}, {"a": 0.91, "b": 0.88, "c": 0.95})  # n=2, tau=1
    """
    names = [
        name
        for name, value in scores.items()
        if value is not None and not math.isnan(value) and accuracy.get(name) is not None
    ]
    if len(names) < 2:
        raise ValueError(
            f"rank agreement needs at least 2 candidates with both a score and an accuracy, got {names}"
        )
    x = [float(scores[name]) for name in names]
    y = [float(accuracy[name]) for name in names]
    kendall = stats.kendalltau(x, y)
    return RankAgreement(
        n=len(names),
        kendall_tau=float(kendall.statistic),
        p_value=float(kendall.pvalue),
        weighted_tau=float(stats.weightedtau(x, y).statistic),
    )
