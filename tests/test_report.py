"""``scripts/report.py`` on a hand-written multirun: table numbers, negative transfer, drift, plots."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("tl_report_script", ROOT / "scripts" / "report.py")
report = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = report  # dataclasses look their module up by name
_spec.loader.exec_module(report)

# Lightning's CSVLogger sorts columns, so the stem comes after the blocks here.
GROUPS_CSV_ORDER = [
    "backbone.blocks.0",
    "backbone.blocks.1",
    "backbone.blocks.6+conv_head+bn2",
    "backbone.conv_stem+bn1",
]
GROUPS_INPUT_TO_OUTPUT = [GROUPS_CSV_ORDER[3], *GROUPS_CSV_ORDER[:3]]
# final drift at train_per_class=all for seed 0, input -> output; seed s adds 0.01 * s
DRIFT_BASE = {
    "scratch": [0.50, 0.60, 0.70, 0.80],
    "full_finetune": [0.01, 0.02, 0.04, 0.10],
    "linear_probe": [0.0, 0.0, 0.0, 0.0],
    "gradual_unfreeze": [0.0, 0.0, 0.01, 0.05],
}

# (strategy, train_per_class, seed, test/acc) in Hydra job order
RUNS = [
    ("scratch", 5, 0, 0.50),
    ("scratch", 5, 1, 0.52),
    ("scratch", 5, 2, 0.54),
    ("scratch", 10, 0, 0.60),
    ("scratch", None, 0, 0.90),
    ("scratch", None, 1, 0.92),
    ("scratch", None, 2, 0.94),
    ("linear_probe", 5, 0, 0.80),
    ("linear_probe", 5, 1, 0.82),
    ("linear_probe", 5, 2, 0.84),
    ("linear_probe", 10, 0, 0.595),  # n=1 both sides, 0.005 below: within the fixed 0.01
    ("linear_probe", None, 0, 0.915),  # n=1, 0.005 below: within the fixed 0.01
    ("full_finetune", 5, 0, 0.40),
    ("full_finetune", 5, 1, 0.42),
    ("full_finetune", 5, 2, 0.44),  # 0.10 below
    # 0.012 below: more than 0.01 but within the combined standard error sqrt(.02²/3 + .01²/3) = 0.0129
    ("full_finetune", None, 0, 0.898),
    ("full_finetune", None, 1, 0.908),
    ("full_finetune", None, 2, 0.918),
    ("gradual_unfreeze", None, 0, 0.905),  # n=1, 0.015 below: beyond the fixed 0.01
]


def _write_run(
    sweep: Path, num: int, strategy: str, per_class, seed: int, acc: float, drift=True, wall=12.3
) -> Path:
    value = "null" if per_class is None else str(per_class)
    overrides = [f"strategy={strategy}", f"data.train_per_class={value}", f"seed={seed}"]
    overrides.append("trainer.max_epochs=3")
    run = sweep / f"{num}_{','.join(overrides)}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / ".hydra" / "config.yaml").write_text(
        "backbone:\n  _target_: tl_lightning.backbones.efficientnet_lite0\n  pretrained: true\n"
        "data:\n  _target_: tl_lightning.data.digits.DigitsDataModule\n"
        f"  train_per_class: {value}\n  split_seed: 0\n"
        "paths:\n  output_dir: ${hydra:runtime.output_dir}\n"
        f"strategy_name: {strategy}\ntask_name: train\nseed: {seed}\nmonitor: val/acc\n"
    )
    metrics = {
        "strategy": strategy,
        "monitor": "val/acc",
        "best": {"val/acc": acc + 0.01},
        "final": {"val/loss": 0.3, "val/acc": acc, "val/f1": acc - 0.01},
        "test": {"test/loss": 0.3, "test/acc": acc, "test/f1": acc - 0.01},
        "best_checkpoint": str(run / "checkpoints" / "epoch02.ckpt"),
        "wall_time_s": wall,
        "params": {"trainable": 12810, "total": 4664818},
        "epochs": 3,
        "global_step": 30,
    }
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if not drift:
        return run
    # final drift in CSV column order; other train_per_class values get a distinct level (5.0) that
    # must not leak into the "all" profile, and epoch 0 logs 9.0 that must not be the "final" one
    final = [b + 0.01 * seed for b in DRIFT_BASE[strategy]] if per_class is None else [5.0] * 4
    final_csv = [final[GROUPS_INPUT_TO_OUTPUT.index(g)] for g in GROUPS_CSV_ORDER]
    header = ["epoch", *(f"drift/{g}" for g in GROUPS_CSV_ORDER), "step", "test/acc", "val/acc"]
    rows = [
        ["0", "", "", "", "", "9", "", "0.5"],  # validation row: drift cells empty
        ["0", "9.0", "9.0", "9.0", "9.0", "9", "", ""],  # train epoch end
        ["1", "", "", "", "", "19", "", str(acc)],
        ["1", *map(str, final_csv), "19", "", ""],
        ["2", "", "", "", "", "20", str(acc), ""],  # test row
    ]
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    return run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A multirun written by hand, and its report (written once into a separate ``--out``)."""
    root = tmp_path_factory.mktemp("multirun") / "train" / "2026-01-01_12-00-00"
    for num, (strategy, per_class, seed, acc) in enumerate(RUNS):
        _write_run(root, num, strategy, per_class, seed, acc)
    out = root.parent / "report_out"
    assert report.main([str(root), "--out", str(out)]) == 0
    return root, out, (out / "report.md").read_text(encoding="utf-8")


def _section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _table(section: str) -> dict[str, dict[str, str]]:
    lines = [line for line in section.splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, body = rows[0], rows[2:]
    return {r[0]: dict(zip(header[1:], r[1:], strict=True)) for r in body}


def test_table_has_mean_std_n_over_seeds(sweep):
    *_, markdown = sweep
    section = _section(markdown, "Results")
    assert "| strategy | 5 | 10 | all |" in section  # numeric order, "all" last
    table = _table(section)
    assert list(table) == ["scratch", "full_finetune", "gradual_unfreeze", "linear_probe"]
    # sample std (ddof=1): [0.50, 0.52, 0.54] -> 0.020 (ddof=0 would give 0.016)
    assert table["scratch"] == {
        "5": "0.520 ± 0.020 (3)",
        "10": "0.600 ± 0.000 (1)",
        "all": "0.920 ± 0.020 (3)",
    }
    assert table["linear_probe"] == {
        "5": "0.820 ± 0.020 (3)",
        "10": "0.595 ± 0.000 (1)",
        "all": "0.915 ± 0.000 (1)",
    }
    assert table["full_finetune"] == {"5": "0.420 ± 0.020 (3) ⚠", "10": "—", "all": "0.908 ± 0.010 (3)"}
    assert table["gradual_unfreeze"] == {"5": "—", "10": "—", "all": "0.905 ± 0.000 (1) ⚠"}


def test_aggregate_and_negative_transfer_numbers(sweep):
    root, *_ = sweep
    runs = report.collect_runs(root)
    assert len(runs) == len(RUNS)
    cells = report.aggregate(runs)
    assert cells["full_finetune", "all"].mean == pytest.approx(0.908)
    assert cells["full_finetune", "all"].std == pytest.approx(0.01)
    assert cells["scratch", "5"].std == pytest.approx(0.02)
    flags = report.negative_transfer(cells)
    assert {(f.strategy, f.label) for f in flags} == {("full_finetune", "5"), ("gradual_unfreeze", "all")}
    tolerance = {(f.strategy, f.label): f.tolerance for f in flags}
    assert tolerance["full_finetune", "5"] == pytest.approx((0.02**2 / 3 + 0.02**2 / 3) ** 0.5)
    assert tolerance["gradual_unfreeze", "all"] == report.FIXED_TOLERANCE
    # for a loss, lower is better: the same numbers flag the strategies *above* scratch instead
    loss_flags = report.negative_transfer(cells, metric="test/loss")
    assert ("linear_probe", "5") in {(f.strategy, f.label) for f in loss_flags}


def test_negative_transfer_section_and_command(sweep):
    *_, markdown = sweep
    section = _section(markdown, "Negative transfer")
    flagged = [line for line in section.splitlines() if line.startswith("- ")]
    assert len(flagged) == 2
    assert "`full_finetune` at train_per_class=5" in section
    assert "`gradual_unfreeze` at train_per_class=all" in section
    assert (
        "python train.py -m strategy=scratch,linear_probe,full_finetune,gradual_unfreeze "
        "data.train_per_class=5,10,null seed=0,1,2 trainer.max_epochs=3"
    ) in markdown


def test_drift_is_final_epoch_at_all_ordered_input_to_output(sweep):
    root, _, markdown = sweep
    label, groups, profile = report.drift_profile(report.collect_runs(root))
    assert label == "all"
    assert groups == GROUPS_INPUT_TO_OUTPUT
    # mean over seeds 0, 1, 2 of base + 0.01 * seed
    assert profile["full_finetune"] == pytest.approx([b + 0.01 for b in DRIFT_BASE["full_finetune"]])
    assert profile["gradual_unfreeze"] == pytest.approx(DRIFT_BASE["gradual_unfreeze"])
    table = _table(_section(markdown, "Layer drift"))
    assert list(table["scratch"]) == GROUPS_INPUT_TO_OUTPUT
    assert table["scratch"]["backbone.conv_stem+bn1"] == "0.5100"
    assert table["full_finetune"]["backbone.blocks.6+conv_head+bn2"] == "0.1100"


def test_plots_are_valid_pngs(sweep):
    root, out, _ = sweep
    assert not (root / "report.md").exists()  # --out respected
    for name in ("sample_efficiency.png", "drift.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
            image.verify()


def test_without_drift_columns_the_drift_plot_is_skipped(tmp_path):
    _write_run(tmp_path, 0, "scratch", 5, 0, 0.5, drift=False)
    _write_run(tmp_path, 1, "linear_probe", 5, 0, 0.8, drift=False)
    assert report.main([str(tmp_path)]) == 0
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "drift plot skipped" in markdown and "None found" in markdown
    assert (tmp_path / "sample_efficiency.png").is_file() and not (tmp_path / "drift.png").exists()


def test_missing_or_empty_directory_exits_2_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "no_such_sweep"
    with pytest.raises(SystemExit) as exc:
        report.main([str(missing)])
    assert exc.value.code == 2 and str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "no metrics.json" in err and str(tmp_path) in err


def test_wall_time_sums_the_runs_and_spans_first_start_to_last_end(tmp_path):
    # (strategy, wall_time_s, metrics.json written at): scratch runs 0-100 s and 150-250 s, the probe
    # 90-100 s; a run without wall_time_s is left out of every number
    timed = [
        ("scratch", 100.0, 1_000_100.0),
        ("linear_probe", 10.0, 1_000_100.0),
        ("scratch", 100.0, 1_000_250.0),
    ]
    for num, (strategy, wall, written) in enumerate(timed):
        run = _write_run(tmp_path, num, strategy, 5, num, 0.5, drift=False, wall=wall)
        os.utime(run / "metrics.json", (written, written))
    untimed = _write_run(tmp_path, 3, "scratch", 5, 3, 0.5, drift=False, wall=None)
    os.utime(untimed / "metrics.json", (2_000_000.0, 2_000_000.0))  # would stretch the span if counted

    timing = report.wall_time(report.collect_runs(tmp_path))
    assert timing.total_s == pytest.approx(210.0)
    assert timing.span_s == pytest.approx(250.0)
    assert timing.per_strategy == {"scratch": (2, 200.0), "linear_probe": (1, 10.0)}
    assert timing.missing == 1

    assert report.main([str(tmp_path)]) == 0
    section = _section((tmp_path / "report.md").read_text(encoding="utf-8"), "Wall time").lstrip()
    assert (
        section.startswith("3 min 30 s summed over 3 runs")
        and "4 min 10 s from the first run's start" in section
    )
    assert "1 run(s) without `wall_time_s`" in section
    assert _table(section) == {
        "scratch": {"runs": "2", "mean per run": "1 min 40 s", "total": "3 min 20 s"},
        "linear_probe": {"runs": "1", "mean per run": "10.0 s", "total": "10.0 s"},
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(42.04, "42.0 s"), (185.0, "3 min 05 s"), (3725.0, "1 h 02 min"), (7199.0, "2 h 00 min")],
)
def test_durations_are_formatted_for_reading(seconds, text):
    assert report.format_duration(seconds) == text


def test_sweeps_written_into_one_directory_get_one_command_each(tmp_path):
    # two `train.py -m` calls told apart by hydra.sweep.subdir, as the sample-efficiency runs were made
    calls = {
        "a": [("scratch", 5, 0), ("scratch", 5, 1)],
        "b": [("linear_probe", 5, 0), ("linear_probe", 10, 0)],
    }
    written = {0: 1_000_100.0, 1: 1_000_200.0, 2: 1_000_500.0, 3: 1_000_520.0}  # metrics.json times
    num = 0
    for suffix, runs in calls.items():
        for strategy, per_class, seed in runs:
            run = _write_run(tmp_path, num, strategy, per_class, seed, 0.5, drift=False)
            os.utime(run / "metrics.json", (written[num], written[num]))
            hydra_overrides = [f"hydra.sweep.subdir=${{hydra.job.num}}_{suffix}", "hydra.mode=MULTIRUN"]
            (run / ".hydra" / "hydra.yaml").write_text(
                "hydra:\n  overrides:\n    hydra:\n" + "".join(f"    - {o}\n" for o in hydra_overrides)
            )
            num += 1
    runs = report.collect_runs(tmp_path)
    assert runs[0].hydra_overrides == ("hydra.sweep.subdir=${hydra.job.num}_a",)  # hydra.mode left out
    assert report.sweep_commands(runs) == [
        "python train.py -m 'hydra.sweep.subdir=${hydra.job.num}_a' strategy=scratch "
        "data.train_per_class=5 seed=0,1 trainer.max_epochs=3",
        "python train.py -m 'hydra.sweep.subdir=${hydra.job.num}_b' strategy=linear_probe "
        "data.train_per_class=5,10 seed=0 trainer.max_epochs=3",
    ]
    assert report.main([str(tmp_path)]) == 0
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert _section(markdown, "Commands").count("python train.py -m") == 2
    # each call gets its own wall time: 2 runs of 12.3 s each; call a spans 1_000_100 - 12.3 to 1_000_200
    per_sweep = _section(markdown, "Wall time").split("Per sweep", 1)[1]
    rows = [line for line in per_sweep.splitlines() if line.startswith(("| 1 ", "| 2 "))]
    assert rows == ["| 1 | 2 | 24.6 s | 1 min 52 s |", "| 2 | 2 | 24.6 s | 32.3 s |"]


def test_transfer_that_beats_scratch_beyond_the_seed_noise_is_listed_per_size(sweep):
    root, _, markdown = sweep
    better = report.positive_transfer(report.aggregate(report.collect_runs(root)))
    assert [(f.strategy, f.label) for f in better] == [("linear_probe", "5")]
    assert better[0].tolerance == pytest.approx((0.02**2 / 3 + 0.02**2 / 3) ** 0.5)
    lines = [
        line
        for line in _section(markdown, "Transfer that beats scratch").splitlines()
        if line.startswith("- ")
    ]
    # 10: 0.595 vs 0.600 (n=1 both); all: every strategy at or below scratch
    assert lines == [
        "- train_per_class=5: `linear_probe` +0.300",
        "- train_per_class=10: none",
        "- train_per_class=all: none",
    ]
