"""Refuse to resume a checkpoint whose optimizer layout came from a callback the new run lacks.

``GradualUnfreeze`` and ``LayerwiseLR`` give every layer group its own named optimizer parameter
groups at fit start. Resuming such a checkpoint without the callback hands Lightning an optimizer with
fewer groups than the saved state, and PyTorch stops with "loaded state dict has a different number of
parameter groups", which names neither the checkpoint nor the callback. No hook of a missing callback
can run, so the check reads the checkpoint's ``"callbacks"`` entry (keyed by ``state_key``, whose
prefix is the class name) before ``trainer.fit``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback

LAYOUT_CALLBACKS: tuple[str, ...] = ("GradualUnfreeze", "LayerwiseLR")


def check_resume_callbacks(checkpoint: Mapping[str, Any], callbacks: Sequence[Callback], path: str) -> None:
    """Stop before ``trainer.fit(ckpt_path=...)`` if a callback that laid out the optimizer is missing.

    Args:
        checkpoint: The loaded checkpoint (``torch.load`` of ``path``).
        callbacks: The callbacks the resumed run will have.
        path: The checkpoint's path, for the message.

    Raises:
        ValueError: Naming each missing callback with its arguments (its ``state_key``).

    Example::

        check_resume_callbacks(torch.load(ckpt, weights_only=True), trainer.callbacks, ckpt)
        trainer.fit(model, ckpt_path=ckpt)
    """
    present = {callback.state_key for callback in callbacks}
    missing = [
        key
        for key in checkpoint.get("callbacks", {})
        if key.split("{", 1)[0] in LAYOUT_CALLBACKS and key not in present
    ]
    if missing:
        raise ValueError(
            f"ckpt_path={path!r} was written with {', '.join(missing)}, which gave each layer group its own "
            f"optimizer parameter groups; this run lacks it, so the saved optimizer state cannot be "
            f"restored. Add the callback back with the same arguments, or start a new run from the "
            f"checkpoint's weights instead of resuming it."
        )
