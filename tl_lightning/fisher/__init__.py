"""The diagonal Fisher information from per-sample squared gradients (pure torch).

:func:`fisher_diagonal` is the public entry point (``diagonal``); ``layer_hooks`` gives it exact
per-sample squared gradients of common layers from one batched backward pass. Like
:mod:`tl_lightning.callbacks`, this package imports only torch and Lightning (safetensors only when
a Fisher file is read or written).
"""

from tl_lightning.fisher.diagonal import FISHER_MODES, FisherMode, fisher_diagonal, sample_labels

__all__ = ["FISHER_MODES", "FisherMode", "fisher_diagonal", "sample_labels"]
