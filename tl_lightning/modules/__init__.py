"""LightningModules and their parts: a pretrained backbone, named heads, named parameter groups.

``transfer`` (:class:`TransferModule`, the one every strategy trains), ``multitask``
(:class:`MultiTaskModule`: a head per task), ``domain_adaptation`` (:class:`DomainAdaptationModule`:
DANN and MMD), ``heads`` (:class:`LinearHead`, :class:`MLPHead`) and ``optim`` (named parameter groups,
warm-up schedules). The losses they train with live in :mod:`tl_lightning.objectives`.
"""

from tl_lightning.modules.causal_lm import CausalLMModule
from tl_lightning.modules.domain_adaptation import DomainAdaptationModule
from tl_lightning.modules.heads import LinearHead, MLPHead
from tl_lightning.modules.multitask import MultiTaskModule
from tl_lightning.modules.optim import named_param_groups, warmup_cosine, warmup_linear
from tl_lightning.modules.transfer import TransferModule

__all__ = [
    "CausalLMModule",
    "DomainAdaptationModule",
    "LinearHead",
    "MLPHead",
    "MultiTaskModule",
    "TransferModule",
    "named_param_groups",
    "warmup_cosine",
    "warmup_linear",
]
