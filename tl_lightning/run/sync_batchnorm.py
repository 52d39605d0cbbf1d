"""``trainer.sync_batchnorm=true`` that keeps timm's fused BatchNorm + activation layers.

Lightning's ``TorchSyncBatchNorm`` converts every BatchNorm subclass into a plain ``SyncBatchNorm``
and reverts it to a plain BatchNorm at teardown. timm's ``BatchNormAct2d`` (EfficientNet-Lite's
BatchNorm + ReLU6) is such a subclass: converted that way, the network loses its activations for the
whole run, while a checkpoint of it rebuilds them. :class:`NormActSyncBatchNorm` converts with timm's
own rule (``BatchNormAct2d`` -> ``SyncBatchNormAct``, activation and dropout kept) and reverts each
layer to the class it had.
"""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from timm.layers import BatchNormAct2d, SyncBatchNormAct
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

_ORIGINAL_CLASS = "_class_before_sync"  # attribute of a converted layer: the class it reverts to


class NormActSyncBatchNorm(TorchSyncBatchNorm):
    """Synchronise BatchNorm statistics across processes without dropping timm's fused activations.

    A ``TorchSyncBatchNorm`` as far as Lightning is concerned (so ``Trainer(sync_batchnorm=True)``
    accepts it as the plugin doing the conversion); ``apply`` is idempotent, so a trainer that runs
    several stages (fit, then test) never converts a converted layer again.

    Example::

        trainer = pl.Trainer(strategy="ddp", sync_batchnorm=True, plugins=[NormActSyncBatchNorm()])
    """

    @override
    def apply(self, model: nn.Module) -> nn.Module:
        return to_sync_batchnorm(model)

    @override
    def revert(self, model: nn.Module) -> nn.Module:
        return from_sync_batchnorm(model)


def to_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer synchronised (timm's rule); layers already synchronised stay.

    The converted layers share their parameters and buffers with the originals and remember their
    original class, which :func:`from_sync_batchnorm` restores.
    """
    if isinstance(module, nn.SyncBatchNorm):
        return module
    if isinstance(module, _BatchNorm):
        converted = timm_convert_sync_batchnorm(module)
        setattr(converted, _ORIGINAL_CLASS, type(module))
        return converted
    for name, child in module.named_children():
        module.add_module(name, to_sync_batchnorm(child))
    return module


def from_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`to_sync_batchnorm`: every synchronised layer becomes its original class again.

    A ``SyncBatchNorm`` that did not come from :func:`to_sync_batchnorm` is left as it is.
    """
    original = getattr(module, _ORIGINAL_CLASS, None)
    if isinstance(module, nn.SyncBatchNorm) and original is not None:
        return _rebuild(module, original)
    for name, child in module.named_children():
        module.add_module(name, from_sync_batchnorm(child))
    return module


def _rebuild(synced: nn.SyncBatchNorm, original: type[_BatchNorm]) -> _BatchNorm:
    """A layer of class ``original`` holding ``synced``'s parameters, buffers, mode and sub-modules."""
    settings = (synced.num_features, synced.eps, synced.momentum, synced.affine, synced.track_running_stats)
    if issubclass(original, BatchNormAct2d) and isinstance(synced, SyncBatchNormAct):
        layer = original(*settings, apply_act=False)  # act and drop come from the synced layer below
    else:
        layer = original(*settings)
    with torch.no_grad():
        if synced.affine:
            layer.weight, layer.bias = synced.weight, synced.bias
    layer.running_mean, layer.running_var = synced.running_mean, synced.running_var
    layer.num_batches_tracked = synced.num_batches_tracked
    for name, child in synced.named_children():  # BatchNormAct2d: act, drop
        layer.add_module(name, child)
    layer.training = synced.training  # the layer's own flag; act and drop keep theirs
    return layer
