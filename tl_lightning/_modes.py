"""Run a module in eval mode and put every sub-module's ``training`` flag back afterwards (pure torch)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Switch ``module`` to eval mode for the ``with`` block, then restore each sub-module's own flag.

    ``module.train(was_training)`` would not do: it sets every sub-module to the same flag, so a
    frozen BatchNorm a callback keeps in eval mode inside a training model would come back training.

    Args:
        module: The module to evaluate.

    Example::

        with eval_mode(backbone):
            features = backbone(x)
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
