"""The real Hydra config, composed and shrunk, run end to end through ``train(cfg)``."""

import json
import logging
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from callback_helpers import tensors_in
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.backbones import efficientnet_lite0, small_cnn
from tl_lightning.modules.heads import LinearHead
from tl_lightning.modules.transfer import TransferModule
from tl_lightning.run.hydra_callbacks import remove_unused_run_dir
from tl_lightning.run.pipeline import train

ROOT = Path(__file__).resolve().parent.parent


def _not_json(constant: str):
    raise ValueError(f"metrics.json holds {constant}, which is not JSON")


def _metrics(cfg):
    """``metrics.json``, parsed strictly (a bare NaN or Infinity fails)."""
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text(), parse_constant=_not_json)


def test_default_config_trains_and_writes_metrics(make_cfg):
    cfg = make_cfg()
    best = train(cfg)
    metrics = _metrics(cfg)
    assert metrics["strategy"] == cfg.strategy_name
    assert set(metrics["test"]) >= {"test/acc", "test/f1", "test/loss"}
    assert 0.0 <= metrics["test"]["test/acc"] <= 1.0
    assert best == metrics["best"]["val/acc"]
    assert metrics["params"]["total"] > metrics["params"]["trainable"] > 0
    assert Path(metrics["best_checkpoint"]).is_file()
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "overrides",
    [["strategy=scratch"], ["backbone=small_cnn", "strategy=scratch"], ["head=mlp", "logger=tensorboard"]],
    ids=["scratch", "small_cnn", "mlp_tensorboard"],
)
def test_config_combinations_run(make_cfg, overrides):
    cfg = make_cfg(*overrides)
    train(cfg)
    assert _metrics(cfg)["test"]["test/acc"] >= 0.0


def test_linear_probe_leaves_backbone_weights_and_bn_buffers_bitwise_unchanged(make_cfg):
    cfg = make_cfg("strategy=linear_probe", "++trainer.limit_train_batches=6", "feature_cache=off")
    train(cfg)
    trained = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)[
        "state_dict"
    ]
    pretrained = efficientnet_lite0().state_dict()
    backbone = {k.removeprefix("backbone."): v for k, v in trained.items() if k.startswith("backbone.")}
    assert backbone.keys() == pretrained.keys()
    assert any("running_mean" in k for k in backbone)
    changed = [k for k in pretrained if not torch.equal(backbone[k], pretrained[k])]
    assert changed == []
    head_before = _metrics(cfg)["params"]
    assert head_before["trainable"] == 1280 * 10 + 10


@pytest.mark.slow
def test_ddp_cpu_two_processes_one_output_dir(tmp_path):
    """``trainer=ddp_cpu`` through the real CLI: two gloo processes, one run directory."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "trainer=ddp_cpu",
        "backbone=small_cnn",
        "strategy=scratch",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "callbacks.rich_progress_bar=null",
        "data.image_size=32",
        f"hydra.run.dir={run_dir}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "one output directory, not one per rank"
    assert not (run_dir / ".run.lock").exists(), "rank 0 took and released the lock; rank 1 did not fight"


def test_train_accuracy_and_f1_are_logged_over_the_whole_epoch(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(40, 3, 32, 32), torch.arange(40) % 4
    module = TransferModule(
        small_cnn(channels=(4, 8)), LinearHead(8, 4), 4, partial(torch.optim.SGD, lr=0.0), weight_decay=0.0
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=20, shuffle=False))
    module.train()  # lr=0: the same weights, and BatchNorm normalises each batch as during fit
    with torch.no_grad():
        preds = torch.cat([module(x[i : i + 20]).argmax(1) for i in (0, 20)]).numpy()
    expected_acc = float(np.mean(preds == y.numpy()))
    expected_f1 = f1_score(y.numpy(), preds, average="macro", labels=range(4), zero_division=0)
    assert trainer.callback_metrics["train/acc"].item() == pytest.approx(expected_acc, abs=1e-6)
    assert trainer.callback_metrics["train/f1"].item() == pytest.approx(expected_f1, abs=1e-6)


def test_monitor_val_loss_keeps_the_lowest_checkpoint(make_cfg):
    cfg = make_cfg(
        "backbone=small_cnn",
        "strategy=scratch",
        "monitor=val/loss",
        "trainer.max_epochs=3",
        "module.optimizer.lr=0.05",
    )
    best = train(cfg)
    rows = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("val/loss")
    val_losses = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert len(val_losses) == 3 and len(set(val_losses)) == 3, val_losses
    assert best == pytest.approx(min(val_losses))
    assert _metrics(cfg)["best"] == {"val/loss": best}
    assert torch.load(_metrics(cfg)["best_checkpoint"], weights_only=True)["epoch"] == val_losses.index(best)


def test_diverging_run_stops_and_reports_no_success(make_cfg):
    cfg = make_cfg("strategy=full_finetune", "module.optimizer.lr=1e30", "++trainer.limit_train_batches=6")
    with pytest.raises(FloatingPointError, match=r"loss is not finite.*module\.optimizer\.lr \(now 1e\+30\)"):
        train(cfg)
    out = Path(cfg.paths.output_dir)
    assert not (out / "metrics.json").exists()
    assert list(out.rglob("*.ckpt")) == [], "no checkpoint of a diverged model"


def test_logger_none_works_with_the_default_callbacks(make_cfg):
    cfg = make_cfg("logger=none")
    assert cfg.callbacks.lr_monitor is not None
    train(cfg)
    assert _metrics(cfg)["test"]["test/acc"] >= 0.0


def test_linear_probe_logs_the_parameters_it_trains(make_cfg, caplog):
    """The count is taken after ``Freeze`` froze the backbone in ``setup()``, like Lightning's summary."""
    cfg = make_cfg(
        "strategy=linear_probe", "backbone=small_cnn", "backbone.channels=[8,16]", "feature_cache=off"
    )
    with caplog.at_level(logging.INFO, logger="tl_lightning.run.pipeline"):
        train(cfg)
    head = 16 * 10 + 10
    total = head + sum(p.numel() for p in small_cnn(channels=(8, 16)).parameters())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trainable parameters")]
    assert lines == [f"trainable parameters: {head} of {total} ({100 * head / total:.3g}%)"]
    assert _metrics(cfg)["params"] == {
        "trainable": head,
        "total": total,
        "trainable_fraction": round(head / total, 6),
    }


def _cli(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_failed_config_check_leaves_no_run_directory(tmp_path):
    """The timestamped directory Hydra made for a run whose config check failed is removed."""
    cmd = [sys.executable, str(ROOT / "train.py"), "module.optimizer.lr=abc"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "module.optimizer.lr must be a number > 0, got 'abc'" in result.stderr
    runs = tmp_path / "outputs" / "train"
    assert runs.is_dir() and list(runs.iterdir()) == [], "Hydra's .hydra/ and train.log are gone"


def test_a_directory_the_user_chose_is_never_removed(tmp_path):
    """``hydra.run.dir=<dir>``: it may hold other runs' logs, or be a folder the user made: it stays."""
    chosen = tmp_path / "mine"
    chosen.mkdir()
    assert _cli(chosen, "module.optimizer.lr=abc").returncode != 0
    assert sorted(p.name for p in chosen.iterdir()) == [".hydra", "train.log"]


def test_a_run_that_fails_after_training_started_keeps_its_directory(tmp_path):
    """Only a failed config check removes anything: a run that diverges keeps its log and config."""
    cmd = [sys.executable, str(ROOT / "train.py"), "backbone=small_cnn", "backbone.channels=[8,16]",
           "data.image_size=32", "strategy=full_finetune", "module.optimizer.lr=1e12", "logger=none",
           "trainer.limit_train_batches=4", "callbacks.rich_progress_bar=null"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "NaN/inf" in result.stderr
    (run,) = (tmp_path / "outputs" / "train").iterdir()
    assert {".hydra", "train.log"} <= {p.name for p in run.iterdir()}


def test_failed_run_keeps_a_directory_that_holds_anything_else(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
    result = _cli(run_dir, "seed=-1")
    assert result.returncode != 0 and "seed" in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "checkpoints", "train.log"]
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run's checkpoint"


def test_unused_run_dir_is_removed_only_when_it_holds_hydra_files_alone(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run_dir / "train.log").write_text("")
    (run_dir / "metrics.json").write_text("{}")
    assert not remove_unused_run_dir(run_dir, "train") and (run_dir / ".hydra" / "config.yaml").is_file()
    (run_dir / "metrics.json").unlink()
    monkeypatch.chdir(run_dir)
    assert not remove_unused_run_dir(run_dir, "train"), "never the working directory"
    monkeypatch.chdir(tmp_path)
    assert remove_unused_run_dir(run_dir, "train") and not run_dir.exists()


def _drift(cfg) -> list[dict[str, float]]:
    """``drift/*`` of every epoch, from ``csv/metrics.csv``."""
    rows = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    columns = [i for i, name in enumerate(header) if name.startswith("drift/")]
    epochs = [r.split(",") for r in rows[1:]]
    return [{header[i]: float(row[i]) for i in columns} for row in epochs if row[columns[0]]]


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resumed_run_logs_the_drift_of_an_uninterrupted_one_without_storing_its_origin(make_cfg):
    small = [
        "backbone=small_cnn",
        "backbone.channels=[8,16]",
        "strategy=full_finetune",
        "module.scheduler=null",
    ]
    first = make_cfg(*small, run="first")
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    callbacks = torch.load(last, weights_only=True)["callbacks"]
    drift_state = next(state for key, state in callbacks.items() if key.startswith("LayerDriftMonitor"))
    assert set(drift_state) == {"fingerprint"}
    backbone_size = sum(p.numel() for p in small_cnn(channels=(8, 16)).parameters())
    sizes = [t.numel() for t in tensors_in(callbacks)]
    assert max(sizes, default=0) < 10 < backbone_size  # ModelCheckpoint's scores; no copy of the backbone

    resumed = make_cfg(*small, "trainer.max_epochs=2", f"ckpt_path={last}", run="resumed")
    train(resumed)
    whole = make_cfg(*small, "trainer.max_epochs=2", run="whole")
    train(whole)
    assert len(_drift(whole)) == 2 and _drift(resumed)[-1] == _drift(whole)[-1]
    assert all(v > 0 for v in _drift(whole)[-1].values())
