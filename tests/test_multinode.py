"""Two torchrun "nodes" on 127.0.0.1 (one process each, c10d rendezvous) train one run together.

The README's multi-node command, for real: ``torchrun --nnodes=2 --node-rank=<i> ... train.py
trainer=ddp_cpu trainer.devices=1 trainer.num_nodes=2`` started twice. Both nodes must share one run
directory with one ``metrics.json`` (rank 0 writes it), and the replicas must end bitwise equal.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


class StateDump(pl.Callback):
    """At fit end, save this rank's parameters as ``<out>/rank<global rank>.pt``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save(
            {"state": state, "world_size": trainer.world_size},
            Path(self.out) / f"rank{trainer.global_rank}.pt",
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_share_one_run(tmp_path):
    run_dir, port = tmp_path / "run", _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "train.py",
                "backbone=small_cnn",
                "backbone.channels=[8,16,16]",
                "strategy=full_finetune",
                "trainer=ddp_cpu",
                "trainer.devices=1",
                "trainer.num_nodes=2",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=3",
                "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1",
                "+trainer.enable_progress_bar=false",
                "callbacks.rich_progress_bar=null",
                "logger=none",
                f"hydra.run.dir={run_dir}",
                "+callbacks.dump._target_=test_multinode.StateDump",
                f"+callbacks.dump.out={tmp_path}",
            ],  # fmt: skip
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["run"]  # one run directory for both
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    replicas = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in replicas] == [2, 2]
    unequal = [
        n for n in replicas[0]["state"] if not torch.equal(replicas[0]["state"][n], replicas[1]["state"][n])
    ]
    assert unequal == []
