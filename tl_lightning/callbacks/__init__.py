"""Fine-tuning techniques as Lightning callbacks; they import only torch and lightning."""

from tl_lightning.callbacks.freeze import Freeze
from tl_lightning.callbacks.layerwise import LayerwiseLR
from tl_lightning.callbacks.linear_probe import ConvergedLinearProbe
from tl_lightning.callbacks.lm_retention import LMRetention
from tl_lightning.callbacks.monitor import LayerDriftMonitor, TrainableParamsMonitor
from tl_lightning.callbacks.penalty import EWC, L2SP
from tl_lightning.callbacks.retention import SourceRetention
from tl_lightning.callbacks.unfreeze import GradualUnfreeze

__all__ = [
    "ConvergedLinearProbe",
    "EWC",
    "Freeze",
    "GradualUnfreeze",
    "L2SP",
    "LayerDriftMonitor",
    "LayerwiseLR",
    "LMRetention",
    "SourceRetention",
    "TrainableParamsMonitor",
]
