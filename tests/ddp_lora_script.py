"""``strategy=lora`` under ``trainer=ddp_cpu`` through the real pipeline, in two forked gloo processes.

Usage: ``python tests/ddp_lora_script.py OUT_DIR`` writes ``rank0.pt`` and ``rank1.pt``: every
parameter and buffer of the module after training (``StateDump``), and the run's ``metrics.json``
lands in ``OUT_DIR/run``. Both processes are forked from this one and set ``LOCAL_RANK`` themselves,
so Lightning does not launch processes. DDP is built without ``find_unused_parameters``: a trainable
parameter left without a gradient (an unused adapter) would stop the second step.
"""

from __future__ import annotations

import os
import sys
from itertools import chain
from pathlib import Path

import lightning.pytorch as pl
import torch
from gloo_launch import run_two_workers
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities import rank_zero_only

from tl_lightning.run.pipeline import train

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
STEPS = 3


class StateDump(pl.Callback):
    """At fit end, save every parameter and buffer (``state_dict`` leaves the frozen base out)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial = _tensors(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        final = _tensors(pl_module)
        state = {"initial": self.initial, "final": final, "world_size": trainer.world_size}
        torch.save(state, Path(self.out) / f"rank{trainer.global_rank}.pt")


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in chain(module.named_parameters(), module.named_buffers())}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0", "LOCAL_RANK": str(rank)}
    )
    rank_zero_only.rank = rank  # read from the environment at import, before the fork set LOCAL_RANK
    overrides = [
        "strategy=lora",
        "adapter.r=4",
        "adapter.dropout=0.1",  # adapter dropout draws random numbers: replicas must still agree
        "trainer=ddp_cpu",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={STEPS}",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "+trainer.enable_progress_bar=false",
        "callbacks.rich_progress_bar=null",
        "logger=none",
        "data.image_size=32",
        "data.batch_size=8",
        f"paths.output_dir={Path(out_dir) / 'run'}",
        "+callbacks.dump._target_=ddp_lora_script.StateDump",
        f"+callbacks.dump.out={out_dir}",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    train(cfg)


if __name__ == "__main__":
    run_two_workers(_worker, sys.argv[1])
