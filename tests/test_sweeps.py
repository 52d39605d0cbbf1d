"""Hydra multirun, the Optuna sweeper and the report, through the real CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf.errors import InterpolationResolutionError

import tl_lightning.run.config_checks  # noqa: F401  registers the resolvers the configs use, as train.py does

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")
OPTIMUM = {"minimize": min, "maximize": max}
TINY = [
    "backbone=small_cnn",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "callbacks.rich_progress_bar=null",
    "+trainer.enable_progress_bar=false",
    "data.image_size=16",
]


def _multirun(tmp_path, *overrides):
    """The ``metrics.json`` files of the runs and the sweep's log."""
    cmd = [sys.executable, "train.py", "-m", *TINY, f"hydra.sweep.dir={tmp_path}", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return sorted(tmp_path.rglob("metrics.json")), result.stdout + result.stderr


@pytest.mark.slow
def test_multirun_writes_one_metrics_file_per_run_and_report_aggregates(tmp_path):
    sweep = tmp_path / "sweep"
    runs, _ = _multirun(sweep, "strategy=scratch,full_finetune", "seed=0,1", "data.train_per_class=5,all")
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
@pytest.mark.parametrize(("monitor", "direction"), [("val/acc", "maximize"), ("val/loss", "minimize")])
def test_optuna_sweeper_optimises_the_returned_metric(tmp_path, monitor, direction):
    runs, log = _multirun(
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "strategy=scratch",
        f"monitor={monitor}",
    )
    assert len(runs) == 2
    assert f"Directions: ['{direction}']" in log
    values = [json.loads(r.read_text())["best"][monitor] for r in runs]
    if monitor == "val/loss":  # continuous: two trials differ, so the study's pick tells the direction
        assert len(set(values)) == 2
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert "module.optimizer.lr" in results["best_params"]
    assert results["best_value"] == pytest.approx(OPTIMUM[direction](values))


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


# --- the Optuna study's direction (hparams_search=optuna) ----------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "direction"),
    [
        ([], "maximize"),  # val/acc
        (["monitor=val/f1"], "maximize"),
        (["monitor=val/loss"], "minimize"),
        (["monitor=train/loss"], "minimize"),
        (["strategy=dann"], "maximize"),  # val/source_acc
        (["strategy=dann", "monitor=val/source_loss"], "minimize"),
        (["strategy=multitask", "monitor=val/mnist5k/loss"], "minimize"),
        (["monitor=val/loss", "monitor_mode=min"], "minimize"),
        (["monitor=val/auroc", "monitor_mode=max"], "maximize"),  # a metric auto cannot judge: as given
        (["monitor=val/auroc", "monitor_mode=min"], "minimize"),
    ],
)
def test_optuna_direction_follows_monitor_and_monitor_mode(overrides, direction):
    cfg = _compose("hparams_search=optuna", *overrides, hydra=True)
    assert cfg.hydra.sweeper.direction == direction


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["monitor=val/auroc"],
            r"monitor=val/auroc is better high or low.*set monitor_mode=min or monitor_mode=max",
        ),
        (["monitor_mode=largest"], r"monitor_mode='largest' is not one of \['auto', 'min', 'max'\]"),
    ],
)
def test_optuna_direction_that_cannot_be_told_names_the_keys(overrides, match):
    cfg = _compose("hparams_search=optuna", *overrides, hydra=True)
    with pytest.raises(InterpolationResolutionError, match=match):
        cfg.hydra.sweeper.direction  # noqa: B018  resolved when read, as the sweeper reads it


def _logged_metric_modes() -> dict[str, str]:
    """Every metric the modules log, with the checkpoint mode they declare (``monitor_modes()``)."""
    import torch
    from torch import nn

    from tl_lightning.backbones import Backbone, DataConfig
    from tl_lightning.modules import DomainAdaptationModule, MultiTaskModule, TransferModule

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    backbone = Backbone(model, 6, DataConfig((0.5,) * 3, (0.5,) * 3, (3, 2, 2)), {}, name="tiny")
    tasks = {"mnist5k": 10, "fashion": 10}
    heads = {task: nn.Linear(6, n) for task, n in tasks.items()}
    multitask = MultiTaskModule(backbone, heads, tasks, torch.optim.SGD)
    return TransferModule.monitor_modes() | DomainAdaptationModule.monitor_modes() | multitask.monitor_modes()


def test_optuna_direction_agrees_with_every_module_and_strategy():
    """The name rule the sweep resolves agrees with what the modules declare, for every metric they log,
    and every strategy's default monitor gets the direction its best checkpoint is chosen by."""
    from tl_lightning.run.config_checks import SWEEP_DIRECTIONS, sweep_direction

    modes = _logged_metric_modes()
    assert {sweep_direction(metric, "auto") for metric in modes} == {"minimize", "maximize"}
    assert {metric: sweep_direction(metric, "auto") for metric in modes} == {
        metric: SWEEP_DIRECTIONS[mode] for metric, mode in modes.items()
    }
    for strategy in sorted(p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml")):
        cfg = _compose("hparams_search=optuna", f"strategy={strategy}", hydra=True)
        assert cfg.monitor in modes and cfg.monitor_mode == "auto", strategy
        assert cfg.hydra.sweeper.direction == SWEEP_DIRECTIONS[modes[cfg.monitor]], strategy


# --- equal step budgets (experiment=sample_efficiency, sample_efficiency_fashion) ---------------------

SAMPLE_EFFICIENCY = ["sample_efficiency", "sample_efficiency_fashion"]
# staged unfreezing at fixed shares of the step budget: lp_ft's head-only phase, gradual_unfreeze's stages
SHARES = {"lp_ft": [0.2], "gradual_unfreeze": [0.1, 0.2, 0.3]}


def _compose(*overrides, hydra=False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize("experiment", SAMPLE_EFFICIENCY)
def test_sample_efficiency_sweeps_every_strategy_under_one_step_budget(experiment):
    from tl_lightning.run.config_checks import check_config

    swept = _compose(f"experiment={experiment}", hydra=True).hydra.sweeper.params
    strategies = swept.strategy.split(",")
    transfer = {
        "linear_probe_lbfgs",
        "lp_ft",
        "gradual_unfreeze",
        "full_finetune",
        "discriminative_lr",
        "l2sp",
    }
    assert set(strategies) == {"scratch", *transfer}
    sizes = swept["data.train_per_class"].split(",")
    assert list(swept)[0] == "seed"  # seed-major: an interrupted sweep leaves whole seeds of every cell
    if experiment == "sample_efficiency_fashion":
        data = _compose(f"experiment={experiment}").data
        assert data._target_.endswith("FashionMNISTDataModule") and sizes == ["5", "20", "100", "500"]
        assert (data.val_per_class, data.test_per_class) == (50, 100)
    for strategy in strategies:
        for size in (sizes[0], sizes[-1]):
            cfg = _compose(f"experiment={experiment}", f"strategy={strategy}", f"data.train_per_class={size}")
            check_config(cfg)  # passes: step milestones within the budget, max_epochs=-1 allowed
            trainer = cfg.trainer
            # the step budget alone ends the run, whatever the data size
            assert (trainer.max_epochs, trainer.max_steps) == (-1, 100), strategy
            # validation every N training batches across epoch boundaries (an epoch may be 2 batches)
            assert trainer.check_val_every_n_epoch is None and isinstance(trainer.val_check_interval, int)
            assert trainer.val_check_interval < trainer.max_steps
            # the best checkpoint by validation accuracy is the one tested
            assert cfg.callbacks.model_checkpoint.monitor == "val/acc" and cfg.monitor_mode in ("auto", "max")
            assert cfg.module.scheduler._target_ == "tl_lightning.modules.warmup_cosine"
            staged = cfg.callbacks.get("gradual_unfreeze")
            if strategy in SHARES:
                assert staged.unit == "step"
                assert [m / trainer.max_steps for m in staged.milestones] == SHARES[strategy]
            else:
                assert staged is None


def test_strategies_keep_epoch_milestones_outside_a_step_budget():
    assert _compose("strategy=lp_ft").callbacks.gradual_unfreeze.milestones == [2]
    staged = _compose("strategy=gradual_unfreeze").callbacks.gradual_unfreeze
    assert (staged.unit, list(staged.milestones)) == ("epoch", [1, 2, 3])


@pytest.mark.parametrize("strategy", ["lp_ft", "gradual_unfreeze"])
def test_epoch_milestones_under_a_step_only_budget_are_refused(strategy):
    from tl_lightning.run.config_checks import check_config

    cfg = _compose(f"strategy={strategy}", "trainer.max_epochs=-1", "+trainer.max_steps=200")
    with pytest.raises(
        ValueError, match=r"callbacks\.gradual_unfreeze\.milestones=\[.*\] are epochs.*unit=step"
    ):
        check_config(cfg)
    check_config(_compose(f"strategy={strategy}", "trainer.max_epochs=10", "+trainer.max_steps=200"))


def test_max_epochs_minus_one_needs_max_steps():
    from tl_lightning.run.config_checks import check_config

    with pytest.raises(ValueError, match=r"trainer\.max_epochs must be an integer >= 1, got -1.*max_steps"):
        check_config(_compose("strategy=full_finetune", "trainer.max_epochs=-1"))


@pytest.mark.parametrize("experiment", SAMPLE_EFFICIENCY)
def test_step_milestones_past_the_budget_are_refused(experiment):
    from tl_lightning.run.config_checks import check_config

    cfg = _compose(f"experiment={experiment}", "strategy=lp_ft", "trainer.max_steps=20")
    with pytest.raises(ValueError, match=r"milestones=\[20\] \(steps\).*trainer\.max_steps=20"):
        check_config(cfg)


def test_step_budget_run_unfreezes_validates_and_tests_at_the_planned_steps(tmp_path):
    """5 digits per class = 2 batches per epoch: the run spans 5 epochs, yet lp_ft unfreezes at step 4
    (40% of 10), validation runs every 3 steps across epoch ends, and the best checkpoint is tested."""
    import csv

    from tl_lightning.run.pipeline import train

    cfg = _compose(
        "experiment=sample_efficiency",
        "strategy=lp_ft",
        "backbone=small_cnn",
        "data.image_size=16",
        "data.train_per_class=5",
        "trainer.max_steps=10",
        "trainer.val_check_interval=3",
        "trainer.log_every_n_steps=1",
        "schedule.lp_ft=[4]",
        "+trainer.enable_progress_bar=false",
        f"paths.output_dir={tmp_path}",
    )
    train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["global_step"], metrics["epochs"]) == (10, 5)
    with (tmp_path / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    val_steps = [int(r["step"]) for r in rows if r.get("val/acc")]
    assert val_steps == [2, 5, 8]  # logged at global_step - 1 after steps 3, 6 and 9
    trainable = [(int(r["step"]), float(r["trainable_params"])) for r in rows if r.get("trainable_params")]
    head_only = [count for step, count in trainable if step < 4]
    after = [count for step, count in trainable if step >= 4]
    assert head_only and after and max(head_only) < min(after)  # the backbone joins at step 4, not before
    best = metrics["best_checkpoint"]
    assert Path(best).name in {"step0003.ckpt", "step0006.ckpt", "step0009.ckpt"}
