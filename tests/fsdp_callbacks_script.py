"""Every callback under FSDP2 on two gloo processes, and the same run in one process (same global batch).

Usage: ``python tests/fsdp_callbacks_script.py OUT_DIR [CASE ...]``. For each case (default: all of
:data:`CASES`) two forked ranks train a model that shards itself in ``configure_model`` under
``ShardedDataParallel`` (Lightning's ``ModelParallelStrategy``, FSDP2), each on its half of every global
batch; then this process trains the same model on the whole batches without sharding. ``OUT_DIR/<case>.pt``
holds both: the weights (gathered) and the metrics the callbacks logged. Two models per callback: a
foreign ``LightningModule`` (:class:`Blocks`) and our ``TransferModule``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from gloo_launch import run_two_workers
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.backbones.base import Backbone, DataConfig
from tl_lightning.callbacks import (
    EWC,
    L2SP,
    Freeze,
    GradualUnfreeze,
    LayerDriftMonitor,
    LayerwiseLR,
    SourceRetention,
)
from tl_lightning.callbacks._sharded import full
from tl_lightning.modules.heads import LinearHead
from tl_lightning.modules.transfer import TransferModule
from tl_lightning.run.sharding import ShardedDataParallel

N, GLOBAL_BATCH, EPOCHS = 32, 8, 3  # 4 optimizer steps per epoch
# cases whose reference is DDP on the same two ranks rather than one process: BatchNorm normalises each
# rank's half batch and keeps rank 0's running statistics (DDP's broadcast_buffers)
DDP_REFERENCE = ("foreign-batchnorm",)
FROM_FILE = "foreign-drift_from_file"


def _blocks(seed: int = 0, norm: type[nn.Module] = nn.LayerNorm) -> nn.Sequential:
    torch.manual_seed(seed)  # LayerNorm by default: BatchNorm's batch statistics differ per rank
    return nn.Sequential(*[nn.Sequential(nn.Linear(n, 8), norm(8), nn.ReLU()) for n in (4, 8, 8)])


class Blocks(pl.LightningModule):
    """A foreign module: ``backbone`` (3 blocks), ``head``, a frozen ``source_head``; shards itself
    (blocks 1 and 2 as units of their own, the rest with the root)."""

    def __init__(self, norm: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.backbone = _blocks(norm=norm)
        self.head = nn.Linear(8, 3)
        self.source_head = nn.Linear(8, 5).requires_grad_(False)

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.backbone[1:]:  # block 0 stays with the root unit, which stays gathered after
            fully_shard(block, mesh=mesh)  # a forward without backward (validation, probes)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def source_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.source_head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.02)


def transfer_module(adapter: Callable[[Backbone], Backbone] | None = None) -> TransferModule:
    """Our ``TransferModule`` on the same blocks, with a source head (layer groups: the three blocks)."""
    blocks = _blocks()
    group_of = {name: name.split(".")[0] for name, _ in blocks.named_parameters()}
    backbone = Backbone(
        blocks, 8, DataConfig((0.5,), (0.5,), (1, 1, 4)), group_of, source_head=nn.Linear(8, 5)
    )
    if adapter is not None:
        backbone = adapter(backbone)
    torch.manual_seed(1)
    return TransferModule(
        backbone, LinearHead(8, 3), 3, partial(torch.optim.AdamW, lr=0.02, weight_decay=0.0)
    )


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)


def loader(rank: int | None) -> DataLoader:
    """All batches (``rank=None``), or rank ``r``'s half of every global batch."""
    x, y = _data(1)
    if rank is not None:
        half = GLOBAL_BATCH // 2
        index = torch.arange(N).view(-1, GLOBAL_BATCH)[:, rank * half : (rank + 1) * half].reshape(-1)
        x, y = x[index], y[index]
    return DataLoader(TensorDataset(x, y), batch_size=len(x) * GLOBAL_BATCH // N)


def probe() -> DataLoader:
    return DataLoader(TensorDataset(_data(2)[0]), batch_size=8)  # same on every rank, fixed order


def _lora(backbone: Backbone) -> Backbone:
    from tl_lightning.adapters.peft import lora

    return lora(backbone, r=2, alpha=4.0, target_modules=r"\d+\.0")


def _ia3(backbone: Backbone) -> Backbone:
    from tl_lightning.adapters.peft import ia3

    return ia3(backbone, target_modules=r"\d+\.0")


# case -> (model factory, callbacks factory(model is ours?)); the selectors differ between the two models
CASES: dict[str, tuple[Callable[[], pl.LightningModule], Callable[[], list[pl.Callback]]]] = {}
for kind, factory, first, head in (
    ("foreign", Blocks, "backbone.0", "head"),
    ("transfer", transfer_module, "backbone.model.0", "heads.target"),
):
    CASES[f"{kind}-freeze"] = (factory, lambda f=first: [Freeze(modules=f)])
    CASES[f"{kind}-gradual_unfreeze"] = (factory, lambda: [GradualUnfreeze(milestones=[1, 2])])
    CASES[f"{kind}-layerwise_lr"] = (factory, lambda: [LayerwiseLR(decay=0.5)])
    CASES[f"{kind}-l2sp"] = (factory, lambda h=head: [L2SP(alpha=0.5, beta=0.1, new=h)])
    CASES[f"{kind}-ewc"] = (
        factory,
        lambda: [
            EWC(lambda_=5.0, source_data=probe(), fisher_mode="exact", fisher_samples=24, fisher_chunk_size=8)
        ],
    )
    CASES[f"{kind}-drift_retention"] = (  # a progress bar first: it synced on rank 0 alone (a hang)
        factory,
        lambda: [RankZeroBar(), LayerDriftMonitor(), SourceRetention(probe())],
    )
# resumed under sharding from a single-file checkpoint of one process (LayerDriftMonitor stopped on it)
CASES[FROM_FILE] = (Blocks, lambda: [LayerDriftMonitor()])
CASES["foreign-batchnorm"] = (lambda: Blocks(norm=nn.BatchNorm1d), lambda: [])
CASES["transfer-lora"] = (partial(transfer_module, _lora), lambda: [])
CASES["transfer-ia3"] = (partial(transfer_module, _ia3), lambda: [])


class RankZeroBar(pl.Callback):
    """What a progress bar does: a metric logged with ``sync_dist`` that rank 0 alone reads (so syncs)
    at the training epoch end, before the callbacks listed after it run."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        pl_module.log("bar/steps", 1.0, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            trainer.progress_bar_metrics  # noqa: B018 (read for its side effect: the rank-0 sync)


class Capture(pl.Callback):
    """Keep the gathered weights at fit end and every metric logged at an epoch end."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.initial: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial = {n: full(p.detach()).clone() for n, p in pl_module.named_parameters()}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = {n: full(p.detach()).clone() for n, p in pl_module.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}


def run_case(
    name: str, rank: int | None, root: Path, ddp: bool = False, ckpt_path: Path | None = None
) -> dict[str, Any]:
    """Train ``name`` sharded on this rank (``rank`` given; under DDP with ``ddp``) or alone (``None``);
    weights, buffers and metrics."""
    make_model, make_callbacks = CASES[name]
    capture = Capture()
    sharded = rank is not None
    strategy = ShardedDataParallel(process_group_backend="gloo") if sharded else "auto"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2 if sharded else 1,
        strategy=DDPStrategy(process_group_backend="gloo") if ddp else strategy,
        max_epochs=EPOCHS,
        callbacks=[*make_callbacks(), capture],
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        log_every_n_steps=1,
        limit_val_batches=1,
    )
    trainer.fit(make_model(), loader(rank), val_dataloaders=probe_val(), ckpt_path=ckpt_path)
    return {
        "initial": capture.initial,
        "weights": capture.weights,
        "buffers": capture.buffers,
        "metrics": capture.metrics,
    }


def file_checkpoint(path: Path) -> None:
    """One epoch of :class:`Blocks` in one process, saved as one file (a ``trainer=cpu`` checkpoint)."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        callbacks=[LayerDriftMonitor()],
        default_root_dir=path.parent,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(Blocks(), loader(None))
    trainer.save_checkpoint(path)


def probe_val() -> DataLoader:
    x, y = _data(3)
    return DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8)


def _worker(rank: int, port: int, out_dir: str, names: list[str]) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0", "LOCAL_RANK": str(rank)}
    )
    rank_zero_only.rank = rank
    for name in names:
        ckpt_path = Path(out_dir) / f"epoch0.rank{rank}.ckpt" if name == FROM_FILE else None
        if ckpt_path is not None:  # each rank its own (the same) file: no process group before the fit
            file_checkpoint(ckpt_path)
        result = run_case(name, rank, Path(out_dir) / "sharded", ckpt_path=ckpt_path)
        if rank == 0:
            torch.save(result, Path(out_dir) / f"{name}.sharded.pt")
        if name in DDP_REFERENCE:  # every rank's buffers, beside DDP's (rank 0's broadcast each forward)
            ddp = run_case(name, rank, Path(out_dir) / "ddp", ddp=True)
            torch.save({"sharded": result, "ddp": ddp}, Path(out_dir) / f"{name}.rank{rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(CASES)
    run_two_workers(partial(_worker, names=names), str(out))
    for name in (name for name in names if name not in DDP_REFERENCE):
        ckpt_path = out / "epoch0.rank0.ckpt" if name == FROM_FILE else None
        result = run_case(name, None, out / "single", ckpt_path=ckpt_path)
        torch.save({"single": result, "sharded": torch.load(out / f"{name}.sharded.pt")}, out / f"{name}.pt")


if __name__ == "__main__":
    main()
