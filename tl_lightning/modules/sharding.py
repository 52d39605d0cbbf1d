"""FSDP2 sharding of a module along its own layer groups (``fully_shard`` per block, then the root).

Lightning's ``ModelParallelStrategy`` hands the module a device mesh and calls ``configure_model``;
:func:`shard_layer_groups` is what our modules do there. Each layer group (a transformer layer, a
convolutional stage) becomes one FSDP unit when one sub-module holds exactly its parameters; groups
without such a module (a stem spread over several top-level layers), and those with a parameter tied to
a module outside them (an embedding shared with the LM head), stay with the root unit.

Such runs write Lightning's distributed checkpoints (a directory of shards); :func:`consolidate` and
:func:`readable_checkpoint` turn one into an ordinary checkpoint file, without a process group.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

CONSOLIDATED_NAME = "consolidated.ckpt"
METADATA_FILENAME = "meta.pt"  # what Lightning's ModelParallelStrategy writes beside the shards
# Lightning precision setting -> the parameter dtype FSDP2 computes in (gradients reduced in float32)
_PARAM_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def unit_paths(root: nn.Module, groups: Mapping[str, Sequence[str]]) -> list[str]:
    """The module path of each layer group that one sub-module holds exactly, in group order.

    Args:
        root: The module the parameter names are relative to.
        groups: ``{group name: [parameter names in root]}`` (e.g. ``TransferModule.layer_groups()``).
    """
    params = dict(root.named_parameters())
    modules = dict(root.named_modules())
    paths = []
    for names in groups.values():
        owners = [name.rsplit(".", 1)[0] if "." in name else "" for name in names]
        prefix = _common_prefix(owners)
        if not prefix or prefix not in modules:
            continue
        held = {id(p) for p in modules[prefix].parameters()}
        if held == {id(params[name]) for name in names} and not _shared_outside(root, prefix, held):
            paths.append(prefix)
    return paths


def _shared_outside(root: nn.Module, prefix: str, held: set[int]) -> bool:
    """Whether a module outside ``prefix`` also holds one of the parameters ``held`` (tied weights, e.g. an
    LM head tied to the embedding): such a group stays with the root unit, as FSDP2 cannot shard one
    parameter in two units."""
    return any(
        id(param) in held and not name.startswith(f"{prefix}.")
        for name, param in root.named_parameters(remove_duplicate=False)
    )


def _common_prefix(paths: list[str]) -> str:
    parts = [path.split(".") for path in paths]
    common: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for a Lightning ``precision`` setting: 16-bit compute and float32 reduction for
    ``bf16-mixed``/``16-mixed``, float32 otherwise (the sharded master weights stay float32 either way)."""
    dtype = _PARAM_DTYPES.get(str(precision))
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)


def shard_layer_groups(
    root: nn.Module, groups: Mapping[str, Sequence[str]], mesh: DeviceMesh, precision: str = "32-true"
) -> list[str]:
    """``fully_shard`` each layer group's module, then ``root``; nothing if ``root`` is already sharded.

    Args:
        root: The LightningModule (its ``device_mesh`` sub-mesh is passed as ``mesh``).
        groups: ``{group name: [parameter names in root]}``, ordered input -> output.
        mesh: The data-parallel mesh the parameters are sharded over.
        precision: The trainer's precision setting (see :func:`mixed_precision`).

    Returns:
        The module paths sharded as units of their own (the root not included).

    Example::

        def configure_model(self):
            if self.device_mesh is not None:
                shard_layer_groups(self, self.layer_groups(), self.device_mesh["data_parallel"])
    """
    if isinstance(root, FSDPModule):
        return []
    policy = mixed_precision(precision)
    modules = dict(root.named_modules())
    paths = unit_paths(root, groups)
    for path in paths:
        fully_shard(modules[path], mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    return paths


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed checkpoint directory (``meta.pt`` and DCP's ``.metadata``)."""
    path = Path(path)
    return path.is_dir() and (path / METADATA_FILENAME).is_file() and (path / ".metadata").is_file()


def consolidate(path: str | Path, destination: str | Path) -> Path:
    """Gather a distributed checkpoint directory into one ordinary checkpoint file (no process group needed).

    The result holds what the run's processes held together: ``state_dict`` (whole tensors), the
    ``optimizer_states`` as DCP stored them, and every entry of ``meta.pt`` (the ``tl_lightning`` record,
    callbacks, loops), so it loads with ``torch.load(weights_only=True)`` like any ``train.py``
    checkpoint.

    Args:
        path: The checkpoint directory a ``trainer=fsdp|fsdp_cpu`` run wrote (``checkpoints/last.ckpt``).
        destination: The file to write (replaced atomically).

    Raises:
        FileNotFoundError: If ``path`` is not a distributed checkpoint directory.

    Example::

        consolidate("outputs/train/<run>/checkpoints/last.ckpt", "last-consolidated.ckpt")
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path, destination = Path(path), Path(destination)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(
            f"{str(path)!r} is not a distributed checkpoint directory (meta.pt + .metadata)"
        )
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.tmp-partial")
    dcp_to_torch_save(path, partial)
    state = torch.load(partial, map_location="cpu", weights_only=True)
    state.update(torch.load(path / METADATA_FILENAME, map_location="cpu", weights_only=True))
    optimizers = sorted(key for key in state if key.startswith("optimizer_") and key[10:].isdigit())
    state["optimizer_states"] = [state.pop(key) for key in optimizers]
    torch.save(state, partial)
    os.replace(partial, destination)
    return destination


def readable_checkpoint(path: str | Path) -> Path:
    """``path`` itself for a checkpoint file; for a distributed checkpoint directory, its consolidation.

    The consolidated file is cached as ``<path>/consolidated.ckpt`` and rebuilt when the shards are newer;
    where the directory cannot be written (a read-only copy), in ``$XDG_CACHE_HOME/tl_lightning``
    (``~/.cache/tl_lightning``) under a name derived from the directory's absolute path.

    Raises:
        OSError: If neither place can be written, naming both.
    """
    path = Path(path)
    if not is_sharded_checkpoint(path):
        return path
    shards = [path / METADATA_FILENAME, path / ".metadata", *path.glob("*.distcp")]
    newest = max(p.stat().st_mtime for p in shards)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tl_lightning"
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    places = [path / CONSOLIDATED_NAME, cache / f"consolidated-{key}.ckpt"]
    errors = []
    for cached in places:
        if cached.is_file() and cached.stat().st_mtime >= newest:
            return cached
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=cached.parent):  # writable? (torch.save would raise RuntimeError)
                pass
            return consolidate(path, cached)
        except OSError as error:
            errors.append(f"{cached}: {error}")
    raise OSError(f"cannot write the consolidation of {str(path)!r} to either place: " + "; ".join(errors))
