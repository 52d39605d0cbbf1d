"""``trainer=fsdp_cpu`` through the real pipeline in two forked gloo processes: straight, stopped, resumed.

Usage: ``python tests/fsdp_checkpoint_script.py OUT_DIR``. Three ``train(cfg)`` runs of
``strategy=gradual_unfreeze`` (GradualUnfreeze + LayerwiseLR) on ``backbone=small_cnn``, one after the
other in the same two processes: ``OUT_DIR/straight`` trains 3 epochs; ``OUT_DIR/cut`` is the same run
stopped after epoch 0 (mid-schedule: milestones 1, 2); ``OUT_DIR/resumed`` resumes from its sharded
``last.ckpt`` directory. Each writes ``metrics.json`` and sharded checkpoints; ``OUT_DIR/rank<r>.txt``
marks a rank that finished.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from gloo_launch import run_two_workers
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities import rank_zero_only

from tl_lightning.run.pipeline import train

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
STEPS_PER_EPOCH = 2


def _cfg(run: Path, *extra: str):
    overrides = [
        "backbone=small_cnn",
        "backbone.channels=[8,16,16]",
        "strategy=gradual_unfreeze",
        "callbacks.gradual_unfreeze.milestones=[1,2]",
        "callbacks.gradual_unfreeze.groups_per_milestone=1",
        "callbacks.gradual_unfreeze.warmup_steps=3",
        "trainer=fsdp_cpu",
        "trainer.max_epochs=3",
        f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "+trainer.enable_progress_bar=false",
        "callbacks.rich_progress_bar=null",
        "logger=none",
        "data.batch_size=8",
        f"paths.output_dir={run}",
        *extra,
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0", "LOCAL_RANK": str(rank)}
    )
    rank_zero_only.rank = rank  # read from the environment at import, before the fork set LOCAL_RANK
    out = Path(out_dir)
    train(_cfg(out / "straight"))
    stop = ["+callbacks.stop._target_=resume_helpers.StopAfterEpoch", "+callbacks.stop.epoch=0"]
    train(_cfg(out / "cut", *stop))  # interrupted after epoch 0, mid-schedule (milestones 1, 2)
    last = out / "cut" / "checkpoints" / "last.ckpt"
    train(_cfg(out / "resumed", f"ckpt_path={last}"))
    (out / f"rank{rank}.txt").write_text("done")


if __name__ == "__main__":
    run_two_workers(_worker, sys.argv[1])
