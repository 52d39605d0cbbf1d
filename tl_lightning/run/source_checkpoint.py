"""A backbone fine-tuned on an earlier (source) task, read back from a ``train.py`` checkpoint."""

from __future__ import annotations

from pathlib import Path

from tl_lightning.backbones import Backbone
from tl_lightning.modules.heads import LinearHead
from tl_lightning.modules.sharding import is_sharded_checkpoint
from tl_lightning.run.checkpointing import load_checkpoint


def from_checkpoint(path: str, backbone: Backbone) -> Backbone:
    """A backbone fine-tuned on a source task, its trained linear head becoming the source head.

    Loads ``backbone.*`` and ``heads.target.*`` from a ``TransferModule`` checkpoint (with
    ``weights_only=True``) into ``backbone``, an instance of the same architecture. This is how a
    sequential-task experiment starts its target task from the source-task model.

    Args:
        path: A Lightning checkpoint written by ``train.py`` (e.g. ``checkpoints/last.ckpt``; a
            ``trainer=fsdp|fsdp_cpu`` run's directory is consolidated first).
        backbone: A backbone of the checkpoint's architecture (its weights are replaced).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is truncated or not a checkpoint, or its backbone or linear head does not fit.

    Example::

        backbone = from_checkpoint("outputs/source/checkpoints/last.ckpt", efficientnet_lite0())
    """
    if not (Path(path).is_file() or is_sharded_checkpoint(path)):
        raise FileNotFoundError(f"backbone.path={path!r} does not exist; train the source task first")
    state = load_checkpoint(path)["state_dict"]  # names the file when it is truncated or not a checkpoint
    weights = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    head = {k.removeprefix("heads.target."): v for k, v in state.items() if k.startswith("heads.target.")}
    backbone.pop_source_head()
    try:
        backbone.load_state_dict(weights)
        classes, features = head["1.weight"].shape
        source_head = LinearHead(features, classes)
        source_head.load_state_dict(head)
    except (RuntimeError, KeyError) as error:
        raise ValueError(
            f"backbone.path={path!r} does not hold this backbone with a linear head: {error}"
        ) from error
    backbone.set_source_head(source_head)
    return backbone
