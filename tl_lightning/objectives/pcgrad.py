"""PCGrad gradient surgery (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"), pure torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pcgrad(grads: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """Sum of per-task gradients, each first projected off the other tasks' gradients it conflicts with.

    For every task ``i`` the other tasks ``j`` are visited in a random order (one permutation per
    task, drawn from ``generator``); whenever the running ``g_i`` has a negative dot product with the
    *original* ``g_j``, its component along ``g_j`` is removed:
    ``g_i <- g_i - (g_i . g_j) / |g_j|^2 g_j``. The projected gradients are summed.

    The result is positively homogeneous: ``pcgrad(c * grads) == c * pcgrad(grads)`` for ``c > 0``,
    so projecting loss-scaled (``GradScaler``) or accumulation-normalised gradients is the same as
    projecting the true ones and rescaling.

    Args:
        grads: One flat gradient vector per task, all of the same shape.
        generator: Source of the visiting orders (seed it for reproducible runs); ``None`` uses
            torch's global generator.

    Returns:
        The combined gradient, shaped like ``grads[0]``.

    Raises:
        ValueError: If ``grads`` is empty or the vectors are not flat vectors of one shape.

    Example::

        g = pcgrad([g_task_a, g_task_b], torch.Generator().manual_seed(0))
    """
    if len(grads) == 0:
        raise ValueError("pcgrad needs at least one task gradient, got none")
    shapes = {tuple(g.shape) for g in grads}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"pcgrad needs flat gradient vectors of one shape, got shapes {sorted(shapes)}")
    squared_norms = [g.dot(g) for g in grads]
    total = torch.zeros_like(grads[0])
    for i, g_i in enumerate(grads):
        projected = g_i.clone()
        for j in torch.randperm(len(grads), generator=generator).tolist():
            if j == i:
                continue
            dot = projected.dot(grads[j])
            if dot < 0:
                projected -= dot / squared_norms[j] * grads[j]
        total += projected
    return total
