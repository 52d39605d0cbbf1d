"""``task=causal_lm strategy=lora`` under ``trainer=ddp_cpu`` through the pipeline, in two gloo processes.

Usage: ``python tests/causal_lm_ddp_script.py OUT_DIR MODEL_DIR PAIRS_FILE`` trains LoRA adapters of the
decoder in ``MODEL_DIR`` on the prompt/response pairs of ``PAIRS_FILE``; after fitting, every rank writes
its trainable tensors to ``OUT_DIR/rank<r>.pt`` and the validation metrics it logged (synchronised sums:
loss, perplexity, generated-answer accuracy, general-text perplexity) to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from gloo_launch import run_two_workers
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities import rank_zero_only

from tl_lightning.run.pipeline import train

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EVAL_PAIRS = 8  # 2 ranks x 2 batches of 2: no padding repeats from the distributed sampler


class RecordRank(pl.Callback):
    """Writes this rank's trainable tensors and logged validation metrics when fitting ends."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        trained = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save(trained, self.out / f"rank{trainer.global_rank}.pt")
        logged = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "source/"))
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(logged))


def overrides(out_dir: str, model_dir: str, pairs_file: str) -> list[str]:
    return [
        "task=causal_lm",
        f"backbone.model_name={model_dir}",
        "data=instructions",
        f"data.train_file={pairs_file}",
        "data.max_length=64",
        "data.batch_size=2",
        f"data.eval_limit={EVAL_PAIRS}",
        "data.retention_tokens=64",
        "data.retention_block=32",
        "strategy=lora",
        "module.optimizer.lr=0.05",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "+trainer.enable_progress_bar=false",
        "callbacks.rich_progress_bar=null",
        "logger=none",
        f"paths.output_dir={Path(out_dir) / 'run'}",
    ]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0", "LOCAL_RANK": str(rank)}
    )
    rank_zero_only.rank = rank  # read from the environment at import, before the fork set LOCAL_RANK
    extra = [
        "trainer=ddp_cpu",
        "+callbacks.record._target_=causal_lm_ddp_script.RecordRank",
        f"+callbacks.record.out={out_dir}",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides(out_dir, sys.argv[2], sys.argv[3]), *extra])
    train(cfg)


if __name__ == "__main__":
    run_two_workers(_worker, sys.argv[1])
