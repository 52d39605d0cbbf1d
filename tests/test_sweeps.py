"""Hydra multirun, the Optuna sweeper and the report, through the real CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")
TINY = [
    "backbone=small_cnn",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "callbacks.rich_progress_bar=null",
    "+trainer.enable_progress_bar=false",
    "data.image_size=16",
]


def _multirun(tmp_path, *overrides):
    cmd = [sys.executable, "train.py", "-m", *TINY, f"hydra.sweep.dir={tmp_path}", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return sorted(tmp_path.rglob("metrics.json"))


@pytest.mark.slow
def test_multirun_writes_one_metrics_file_per_run_and_report_aggregates(tmp_path):
    sweep = tmp_path / "sweep"
    runs = _multirun(sweep, "strategy=scratch,full_finetune", "seed=0,1", "data.train_per_class=5,all")
    assert len(runs) == 8
    assert {json.loads(r.read_text())["strategy"] for r in runs} == {"scratch", "full_finetune"}
    report = subprocess.run(
        [sys.executable, "scripts/report.py", str(sweep)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    text = (sweep / "report.md").read_text()
    assert "| full_finetune |" in text and "(2)" in text
    assert (sweep / "sample_efficiency.png").stat().st_size > 0


@pytest.mark.slow
def test_optuna_sweeper_optimises_the_returned_metric(tmp_path):
    runs = _multirun(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "strategy=scratch")
    assert len(runs) == 2
    lrs = {json.loads(r.read_text())["best"]["val/acc"] is not None for r in runs}
    assert lrs == {True}
    results = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_params" in results and "module.optimizer.lr" in results


def test_slurm_launcher_and_ddp_trainer_compose():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_.lower() and "slurm" in launcher._target_.lower()
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert cfg.trainer.strategy == "ddp"
