"""Pretrained feature extractors that carry their own metadata.

Every factory returns a :class:`Backbone`: an ``nn.Module`` mapping images to pooled features,
which also knows its preprocessing (``data_config``: mean, std, input size, interpolation, crop),
its layer groups ordered input -> output, and, when the weights bring one, the pretrained
classifier (the *source head*). The data pipeline reads ``data_config`` from here, so
normalisation can never mismatch the weights. One module per family: ``timm_models``
(EfficientNet-Lite0/1/2 and any timm name), ``torchvision_models``, ``small_cnn``,
``hf`` (Hugging Face text encoders, whose ``data_config`` is a :class:`TextConfig`), ``hf_decoder``
(decoder language models: ``load_causal_lm``, and ``hf_decoder`` for classification), and ``cut``
(``cut_backbone``: keep the layers up to one layer group). A backbone read back from an earlier
run's checkpoint is :func:`tl_lightning.run.source_checkpoint.from_checkpoint`.
"""

from tl_lightning.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, DataConfig
from tl_lightning.backbones.cut import cut_backbone
from tl_lightning.backbones.hf import TextBackbone, TextConfig, hf_encoder
from tl_lightning.backbones.hf_decoder import DecoderBackbone, hf_decoder, load_causal_lm
from tl_lightning.backbones.small_cnn import small_cnn
from tl_lightning.backbones.timm_models import (
    efficientnet_lite0,
    efficientnet_lite1,
    efficientnet_lite2,
    timm_backbone,
)
from tl_lightning.backbones.torchvision_models import torchvision_backbone

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "DataConfig",
    "DecoderBackbone",
    "TextBackbone",
    "TextConfig",
    "cut_backbone",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "hf_decoder",
    "hf_encoder",
    "load_causal_lm",
    "small_cnn",
    "timm_backbone",
    "torchvision_backbone",
]
