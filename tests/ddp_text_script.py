"""``data.group_by_length=true`` under ``trainer=ddp_cpu`` through the pipeline, in two forked gloo processes.

Usage: ``python tests/ddp_text_script.py OUT_DIR MODEL_DIR TRAIN_FILE`` trains a text model from
``MODEL_DIR`` (a Hugging Face encoder directory) on ``TRAIN_FILE`` for ``EPOCHS`` epochs; every rank
writes the dataset indices of each training batch it ran, per epoch, to ``OUT_DIR/rank<r>.json``
(:class:`BatchOrder`). Both processes are forked from this one and set ``LOCAL_RANK`` themselves,
so Lightning does not launch processes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
from gloo_launch import run_two_workers
from hydra import compose, initialize_config_dir
from lightning.pytorch.utilities import rank_zero_only

from tl_lightning.run.pipeline import train

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EPOCHS = 3
BATCH_SIZE = 4


class BatchOrder(pl.Callback):
    """Records which training samples each batch ``training_step`` receives holds, per epoch.

    Samples are told apart by their token ids (the texts must be distinct); the record is written to
    ``out/rank<global_rank>.json`` as ``{epoch: [[index, ...], ...]}`` after every epoch.
    """

    def __init__(self, out: str) -> None:
        self.out, self.epochs, self.index = Path(out), {}, None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        if self.index is None:
            encodings = trainer.datamodule.train_set.encodings
            self.index = {tuple(e["input_ids"].tolist()): i for i, e in enumerate(encodings)}
        tokens, _ = batch
        rows = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(tokens["input_ids"], tokens["attention_mask"], strict=True)
        ]
        self.epochs.setdefault(str(trainer.current_epoch), []).append([self.index[tuple(r)] for r in rows])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.epochs))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0", "LOCAL_RANK": str(rank)}
    )
    rank_zero_only.rank = rank  # read from the environment at import, before the fork set LOCAL_RANK
    model_dir, train_file = sys.argv[2], sys.argv[3]
    overrides = [
        "backbone=hf_encoder",
        f"backbone.model_name={model_dir}",
        "data=text_files",
        f"data.train_file={train_file}",
        f"data.batch_size={BATCH_SIZE}",
        "data.group_by_length=true",
        "strategy=full_finetune",
        "trainer=ddp_cpu",
        f"trainer.max_epochs={EPOCHS}",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "+trainer.enable_progress_bar=false",
        "callbacks.rich_progress_bar=null",
        "logger=none",
        "allow_short_schedule=true",
        f"paths.output_dir={Path(out_dir) / 'run'}",
        "+callbacks.order._target_=ddp_text_script.BatchOrder",
        f"+callbacks.order.out={out_dir}",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    train(cfg)


if __name__ == "__main__":
    run_two_workers(_worker, sys.argv[1])
