"""The LightningModule method returning the *source* task's logits, shared by EWC and SourceRetention."""

from __future__ import annotations

from collections.abc import Callable

from lightning.pytorch import LightningModule
from torch import Tensor
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method


def source_method(pl_module: LightningModule, name: str, owner: str) -> Callable[[Tensor], Tensor]:
    """Return ``getattr(pl_module, name)``, checked to be callable.

    Args:
        pl_module: The module being fitted.
        name: The ``source_forward`` argument of the calling callback.
        owner: The callback's class name, for the message.

    Under FSDP2 (a module ``fully_shard``-ed as a whole) the method is registered as a forward method
    (``register_fsdp_forward_method``), so that calling it gathers the parameters the root holds, as
    ``forward`` does.

    Raises:
        AttributeError: If the module has no such method; the message lists the module's public
            methods that end in ``logits``, the usual spelling of a source head.
    """
    method = getattr(pl_module, name, None)
    if callable(method):
        if isinstance(pl_module, FSDPModule) and name != "forward" and name not in vars(pl_module):
            register_fsdp_forward_method(pl_module, name)  # patches the instance: once
            method = getattr(pl_module, name)
        return method
    candidates = sorted(
        n
        for n in dir(type(pl_module))
        if n.endswith("logits") and not n.startswith("_") and callable(getattr(pl_module, n, None))
    )
    raise AttributeError(
        f"{owner}(source_forward={name!r}): {type(pl_module).__name__} has no method {name!r}; "
        f"methods that look like source heads: {candidates or 'none'}"
    )
