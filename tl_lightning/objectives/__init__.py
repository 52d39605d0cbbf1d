"""Losses and gradient surgery the modules train with (pure torch).

``domain``: gradient reversal and its DANN schedule, the multi-kernel Gaussian MMD; ``pcgrad``:
projecting conflicting task gradients.
"""

from tl_lightning.objectives.domain import DEFAULT_SCALES, dann_coefficient, gaussian_mmd, grad_reverse
from tl_lightning.objectives.pcgrad import pcgrad

__all__ = ["DEFAULT_SCALES", "dann_coefficient", "gaussian_mmd", "grad_reverse", "pcgrad"]
