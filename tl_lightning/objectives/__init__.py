"""Losses and gradient surgery the modules train with (pure torch).

``domain``: gradient reversal and its DANN schedule, the multi-kernel Gaussian MMD; ``pcgrad``:
projecting conflicting task gradients (``tl_lightning.objectives.pcgrad.pcgrad``; the function is not
re-exported here, where it would hide its module of the same name).
"""

from tl_lightning.objectives.domain import DEFAULT_SCALES, dann_coefficient, gaussian_mmd, grad_reverse

__all__ = ["DEFAULT_SCALES", "dann_coefficient", "gaussian_mmd", "grad_reverse"]
