"""FSDP2 runs: the strategy ``trainer=fsdp|fsdp_cpu`` use, atomic sharded checkpoints, and consolidation.

* :class:`ShardedDataParallel` is Lightning's ``ModelParallelStrategy`` with every process in one
  data-parallel (sharding) dimension and no tensor parallelism, whatever the number of nodes and
  devices; the module shards itself in ``configure_model``
  (:func:`tl_lightning.modules.sharding.shard_layer_groups`). Its checkpoints are Lightning's distributed
  checkpoints (a directory: one shard file per rank plus ``meta.pt``), written to a temporary directory
  next to the destination and renamed over it once every rank has finished, so a kill mid-write keeps the
  previous checkpoint.
* :func:`~tl_lightning.modules.sharding.consolidate` turns such a directory into one ordinary checkpoint
  file, which ``predict.py``, ``export.py`` and ``load_from_checkpoint`` read (they call
  :func:`~tl_lightning.modules.sharding.readable_checkpoint`, which caches it inside the directory, or
  in the user cache where the directory is read-only).
* Module buffers (BatchNorm running statistics) follow DDP: rank 0's are broadcast before each step that
  follows a step with gradients, and checkpoints hold rank 0's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import OmegaConf
from typing_extensions import override

from tl_lightning.modules.sharding import (
    METADATA_FILENAME,
    consolidate,
    is_sharded_checkpoint,
    readable_checkpoint,
)
from tl_lightning.run.checkpointing import AsyncAtomicCheckpointIO

__all__ = [
    "ShardedDataParallel",
    "check_sharding",
    "consolidate",
    "is_sharded_checkpoint",
    "is_sharded_trainer",
    "readable_checkpoint",
]


class ShardedDataParallel(ModelParallelStrategy):
    """FSDP2 data parallelism over all processes (``ModelParallelStrategy(data_parallel_size=world size,
    tensor_parallel_size=1)``), with atomic distributed checkpoints.

    Args:
        process_group_backend: ``"gloo"`` (CPU) or ``"nccl"`` (GPU); ``None`` picks the device's default.
        **kwargs: Further ``ModelParallelStrategy`` arguments (``timeout``, ``save_distributed_checkpoint``).

    Example::

        strategy = ShardedDataParallel(process_group_backend="gloo")
        trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy)
    """

    def __init__(self, process_group_backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            process_group_backend=process_group_backend,
            **kwargs,
        )

    @override
    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every process shards data
        self._sync_buffers = True  # DDP's require_forward_param_sync: first forward broadcasts
        super().setup_environment()

    def _broadcast_buffers(self) -> None:
        """Rank 0's module buffers (BatchNorm running statistics) to every rank, as DDP does before a
        forward that follows a forward with gradients (FSDP2 shards parameters and leaves buffers alone,
        so each rank's would drift apart on its own data). Called before each step."""
        if getattr(self, "_sync_buffers", True) and self.world_size > 1:
            for buffer in self.lightning_module.buffers():
                torch.distributed.broadcast(buffer.data, src=0)
        self._sync_buffers = torch.is_grad_enabled()

    def _rank_zero_buffers(self, state_dict: dict[str, Any]) -> None:
        """Put rank 0's buffers into ``state_dict`` (copies): the checkpoint holds what DDP's would, not
        whichever rank's replica the distributed checkpoint happens to keep."""
        if self.world_size < 2:
            return
        for name, _ in self.lightning_module.named_buffers():
            if isinstance(state_dict.get(name), torch.Tensor):
                state_dict[name] = state_dict[name].detach().clone()
                torch.distributed.broadcast(state_dict[name], src=0)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._broadcast_buffers()
        return super().training_step(*args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        self._broadcast_buffers()
        return super().validation_step(*args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        self._broadcast_buffers()
        return super().test_step(*args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        self._broadcast_buffers()
        return super().predict_step(*args, **kwargs)

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Write the checkpoint into ``.<name>.shards-partial`` beside ``filepath``, then rename it over."""
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.shards-partial")
        if self.global_rank == 0 and partial.exists():
            shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
        self.barrier()
        self._rank_zero_buffers(checkpoint.get("state_dict", {}))
        super().save_checkpoint(checkpoint, partial, storage_options)
        if isinstance(self.checkpoint_io, AsyncAtomicCheckpointIO):  # a consolidated file: in the background
            self.checkpoint_io.wait()  # it must be complete before it is renamed
        self.barrier()
        if self.global_rank == 0:
            _replace(partial, path)
        self.barrier()

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a distributed checkpoint: the weights always, the optimizer states only when fitting.

        Lightning's own loader builds the optimizer states to read from the optimizers as they are when it
        runs: before the callbacks' states are restored, so with a staged unfreezing mid-schedule it asks
        for states the checkpoint never had (of the parameters frozen when it was written) and stops, and
        it also loads them into ``trainer.test``. Here the checkpoint's own keys decide which parameters
        get a state; the others stay without one, as in the run that wrote it.
        """
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_optimizer_state_dict

        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded_checkpoint(path):
            return self._load_file(path, weights_only)
        # copies (of this rank's shards): DCP loads in place, and load_state_dict's pre-hooks must see the
        # weights from before the load (LayerDriftMonitor checks a resumed run's starting point with them)
        copies = {k: v.detach().clone() for k, v in get_model_state_dict(self.model).items()}
        state = {"state_dict": copies}
        load(state, checkpoint_id=path)
        self.model.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        if self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            saved = set(FileSystemReader(path).read_metadata().state_dict_metadata)
            for index, optimizer in enumerate(self.optimizers):
                key = f"optimizer_{index}"
                target = {key: _optimizer_state_like(self.model, optimizer, saved, key)}
                load(target, checkpoint_id=path)
                set_optimizer_state_dict(self.model, optimizer, optim_state_dict=target[key])
        return torch.load(path / METADATA_FILENAME, weights_only=weights_only)

    def _load_file(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        """A single-file checkpoint (``trainer=cpu|gpu|ddp``, or consolidated) through the whole module's
        ``load_state_dict``, so that its pre-hooks run (Lightning's own loader goes module by module and
        skips the root, which holds no parameters: ``LayerDriftMonitor`` then saw no load and stopped)."""
        from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
        strict = self.lightning_module.strict_loading
        options = StateDictOptions(full_state_dict=True, strict=strict)
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=options)
        if self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
            for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
                state = _rekey_optimizer_state_if_needed(state, self.model)
                set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=options)
        return checkpoint

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            path = Path(filepath)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def _optimizer_state_like(model: Any, optimizer: Any, saved: set[str], key: str) -> dict[str, Any]:
    """The state dict of ``optimizer`` to load into: states for exactly the parameters the checkpoint has.

    Every parameter the optimizer holds gets a state first (torch's zero-gradient, zero-lr step, with all
    of them briefly requiring grad); those the checkpoint has none for are dropped again.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    held = [p for group in optimizer.param_groups for p in group["params"]]
    flags = [p.requires_grad for p in held]
    try:
        for param in held:
            param.requires_grad_(True)
        state = get_optimizer_state_dict(model, optimizer)
    finally:
        for param, flag in zip(held, flags, strict=True):
            param.requires_grad_(flag)
    state["state"] = {
        fqn: value
        for fqn, value in state["state"].items()
        if any(name.startswith(f"{key}.state.{fqn}.") for name in saved)
    }
    return state


def _replace(source: Path, destination: Path) -> None:
    """Rename ``source`` over ``destination`` (a directory or a file): the old one is removed only after."""
    old = destination.with_name(f".{destination.name}.old")
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    if destination.exists():
        os.replace(destination, old)
    os.replace(source, destination)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


SHARDED_STRATEGIES = ("ShardedDataParallel", "ModelParallelStrategy")
# strategy_name -> why it cannot run sharded
UNSHARDABLE = {
    "linear_probe_lbfgs": (
        "ConvergedLinearProbe fits the head by full-batch L-BFGS on features cached in one process; "
        "a frozen backbone has nothing to shard: run it with trainer=cpu|gpu|ddp_cpu|ddp"
    ),
    "multitask_pcgrad": (
        "PCGrad projects each task's whole backbone gradient against the others'; a rank holds only a "
        "shard of every gradient, so the dot products would be partial: use strategy=multitask"
    ),
}


def is_sharded_trainer(cfg: Any) -> bool:
    """Whether the composed config's ``trainer.strategy`` is FSDP2 (``trainer=fsdp|fsdp_cpu``)."""
    target = _strategy_target(cfg)
    return target.rsplit(".", 1)[-1] in SHARDED_STRATEGIES


def _strategy_target(cfg: Any) -> str:
    strategy = cfg.trainer.get("strategy") if "trainer" in cfg else None
    if strategy is None:
        return ""
    if isinstance(strategy, str):
        return strategy
    return str(strategy.get("_target_", ""))


def check_sharding(cfg: Any) -> None:
    """Refuse, before anything is built, what cannot train sharded, and DeepSpeed.

    Args:
        cfg: The composed ``conf/train.yaml`` config.

    Raises:
        ValueError: On a DeepSpeed strategy (FSDP2 is the supported sharded path), or under
            ``trainer=fsdp|fsdp_cpu`` on a strategy that cannot run sharded or a forced feature cache,
            naming why and what to use instead.
    """
    target = _strategy_target(cfg)
    if "deepspeed" in target.lower():
        raise ValueError(
            f"trainer.strategy={target!r}: DeepSpeed is not supported (the fine-tuning callbacks freeze, "
            "unfreeze and penalise parameters DeepSpeed partitions and owns). Sharded training runs on "
            "FSDP2: trainer=fsdp (GPUs) or trainer=fsdp_cpu (2 CPU processes)"
        )
    if not is_sharded_trainer(cfg):
        if cfg.get("ckpt_path") and is_sharded_checkpoint(cfg.ckpt_path):
            raise ValueError(
                f"ckpt_path={cfg.ckpt_path!r} is a sharded checkpoint (a trainer=fsdp|fsdp_cpu run's "
                f"directory), which trainer.strategy={_strategy_target(cfg) or 'auto'!r} cannot resume: "
                "resume it with trainer=fsdp|fsdp_cpu; its weights alone load anywhere (predict.py, "
                "backbone=source_checkpoint, tl_lightning.modules.sharding.consolidate)"
            )
        return
    module = get_class(cfg.module._target_) if "module" in cfg else None
    if module is not None and module.configure_model is LightningModule.configure_model:
        raise ValueError(
            f"module._target_={cfg.module._target_} cannot run under trainer=fsdp|fsdp_cpu: it does not "
            "shard itself in configure_model (FSDP2 needs the module to call fully_shard), so every rank "
            "would hold the whole model; use trainer=cpu|gpu|ddp_cpu|ddp"
        )
    name = cfg.get("strategy_name")
    if name in UNSHARDABLE:
        raise ValueError(f"strategy={name} cannot run under trainer=fsdp|fsdp_cpu: {UNSHARDABLE[name]}")
    if cfg.get("feature_cache") not in (None, "auto", "off"):
        raise ValueError(
            f"feature_cache={cfg.feature_cache} cannot run under trainer=fsdp|fsdp_cpu: the cache computes "
            "the frozen backbone's features once, in one process, so nothing is left to shard; set "
            "feature_cache=off (or auto, which is off under sharding), or use trainer=cpu|gpu|ddp"
        )


def slurm_gpus(accelerator: str, devices: int) -> int | None:
    """GPUs per node to ask SLURM for: ``devices`` when the trainer runs on GPUs, else none (``None``).

    Registered as the OmegaConf resolver ``tl.slurm_gpus`` (``conf/hydra/launcher/slurm.yaml``).

    Raises:
        ValueError: On GPUs with ``devices`` not a positive count (``-1``, "all visible", means nothing to
            a scheduler that must reserve them first).
    """
    if str(accelerator) not in ("gpu", "cuda"):
        return None
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(
            f"hydra/launcher=slurm with trainer.accelerator={accelerator} needs trainer.devices=<GPUs per "
            f"node> (a positive count), got {devices!r}"
        )
    return devices


OmegaConf.register_new_resolver("tl.slurm_gpus", slurm_gpus, replace=True)
