"""Fine-tuning techniques as Lightning callbacks; they import only torch and lightning."""

from tl_lightning.callbacks.freeze import Freeze
from tl_lightning.callbacks.layerwise import LayerwiseLR
from tl_lightning.callbacks.monitor import LayerDriftMonitor, TrainableParamsMonitor
from tl_lightning.callbacks.unfreeze import GradualUnfreeze

__all__ = [
    "Freeze",
    "GradualUnfreeze",
    "LayerDriftMonitor",
    "LayerwiseLR",
    "TrainableParamsMonitor",
]
