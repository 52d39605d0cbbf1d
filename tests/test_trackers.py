"""Trackers see the run: the resolved config reaches every logger, read back with each tracker's reader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tl_lightning.run.pipeline import train

TINY = ["backbone=small_cnn", "backbone.channels=[8,16]"]


def _metrics(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_csv_and_tensorboard_together_record_the_resolved_config(make_cfg):
    cfg = make_cfg(*TINY, "strategy=full_finetune", "seed=3", "logger=[csv,tensorboard]")
    train(cfg)
    run = Path(cfg.paths.output_dir)

    hparams = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())
    assert hparams["strategy_name"] == "full_finetune"
    assert hparams["backbone._target_"] == "tl_lightning.backbones.small_cnn"
    assert hparams["backbone.channels"] == "[8, 16]"
    assert hparams["seed"] == 3
    assert hparams["module.optimizer.lr"] == cfg.module.optimizer.lr
    assert hparams["data.image_size"] == 32
    assert hparams["trainer.max_epochs"] == 1
    assert hparams["callbacks.model_checkpoint.mode"] == "max"  # monitor_mode auto, resolved
    assert hparams["num_classes"] == 10  # the module's own save_hyperparameters, kept beside the config
    assert not any(key.startswith("logger.") for key in hparams)

    # TensorBoard's hparams dashboard: the run's session-start summary holds the whole config
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    metadata = events.summary_metadata["_hparams_/session_start_info"]
    assert metadata.plugin_data.plugin_name == "hparams"
    session = plugin_data_pb2.HParamsPluginData.FromString(metadata.plugin_data.content).session_start_info
    assert session.hparams["strategy_name"].string_value == "full_finetune"
    assert session.hparams["module.optimizer.lr"].number_value == pytest.approx(cfg.module.optimizer.lr)
    assert session.hparams["num_classes"].number_value == 10
    assert "val/acc" in events.Tags()["scalars"]


def test_mlflow_sweep_lands_in_one_sqlite_experiment(make_cfg, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="pip install 'tl-lightning[mlflow]'")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "root"
    root.mkdir()
    # the default tracking store: <paths.root_dir>/mlruns.db, shared by every run of a sweep
    runs = {
        strategy: make_cfg(
            *TINY, f"strategy={strategy}", "logger=mlflow", f"paths.root_dir={root}", run=strategy
        )
        for strategy in ("full_finetune", "scratch")
    }
    assert runs["scratch"].logger.mlflow.tracking_uri == f"sqlite:///{root}/mlruns.db"
    runs["scratch"].module.optimizer.lr = 1e-3
    for cfg in runs.values():
        train(cfg)

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{root}/mlruns.db")
    experiment = client.get_experiment_by_name("train")  # task_name
    found = {r.data.params["strategy_name"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(found) == set(runs)
    for strategy, cfg in runs.items():
        run, metrics = found[strategy], _metrics(cfg)
        assert run.info.status == "FINISHED"
        assert run.info.run_name == f"{strategy}@{cfg.paths.output_dir}"
        assert run.data.tags["strategy"] == strategy
        assert float(run.data.params["module.optimizer.lr"]) == cfg.module.optimizer.lr
        assert run.data.params["backbone._target_"] == "tl_lightning.backbones.small_cnn"
        assert run.data.params["seed"] == "0"
        assert run.data.metrics["val/acc"] == pytest.approx(metrics["final"]["val/acc"])
        assert run.data.metrics["test/acc"] == pytest.approx(metrics["test"]["test/acc"])
        assert run.data.metrics["test/loss"] == pytest.approx(metrics["test"]["test/loss"])
    assert found["scratch"].data.params["module.optimizer.lr"] == "0.001"
    # grouping by strategy in the tracker itself
    only = client.search_runs([experiment.experiment_id], filter_string="params.strategy_name = 'scratch'")
    assert [r.info.run_id for r in only] == [found["scratch"].info.run_id]


def test_mlflow_tracking_uri_follows_the_environment(make_cfg, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    cfg = make_cfg("logger=mlflow")
    assert OmegaConf.to_container(cfg.logger, resolve=True)["mlflow"]["tracking_uri"] == (
        "http://tracking.example:5000"
    )


@pytest.mark.parametrize(("logger", "package"), [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_missing_tracker_package_names_its_extra(make_cfg, monkeypatch, logger, package):
    monkeypatch.setitem(sys.modules, package, None)  # what the import system sees when it is not installed
    cfg = make_cfg(*TINY, "strategy=scratch", f"logger={logger}")
    with pytest.raises(Exception, match=rf'logger={logger} needs .*pip install "tl-lightning\[{logger}\]"'):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()  # stopped before training


def test_wandb_offline_runs_of_one_process_get_their_own_run(make_cfg, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="pip install 'tl-lightning[wandb]'")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")  # Lightning sets it for offline loggers; restored after
    ids = {}
    try:
        for strategy in ("full_finetune", "scratch"):  # a sequential sweep in one process
            cfg = make_cfg(*TINY, f"strategy={strategy}", "logger=[csv,wandb]", run=strategy)
            train(cfg)
            run = wandb.run
            assert run.config["strategy_name"] == strategy
            assert run.config["module.optimizer.lr"] == cfg.module.optimizer.lr
            assert run.config["backbone.channels"] == "[8, 16]"
            assert run.name == f"{strategy}@{cfg.paths.output_dir}"
            assert run.group == strategy
            assert Path(run.dir).is_relative_to(Path(cfg.paths.output_dir) / "wandb")
            ids[strategy] = run.id
            assert list(
                (Path(cfg.paths.output_dir) / "wandb").glob(f"offline-run-*-{run.id}/run-{run.id}.wandb")
            )
    finally:
        wandb.finish()
    assert len(set(ids.values())) == 2
