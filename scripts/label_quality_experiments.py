"""The label-quality evidence of docs/results/label_quality/: detection of planted noise, and what noise and
cleaning do to transfer.

Every arm goes through the project's own pieces: the data modules plant the noise
(``data.label_noise``) and drop rows (``data.exclude``); features come from the feature cache; the
out-of-fold probabilities, cleanlab and the probe are ``scripts/label_issues.py``'s. Steps:

1. ``probe``: for each data set and noise setting (rate x kind x seed), the detection precision and
   recall of ``flagged`` against the planted truth, and the test accuracy of a converged linear probe
   (the ``linear_probe_lbfgs`` fit) trained on the clean, the noisy and the cleaned training split;
2. ``small_clean``: Fashion-MNIST, 50 clean images per class vs 500 per class at 40 % noise (noisy
   and cleaned), linear probe;
3. ``text``: Rotten Tomatoes with MiniLM at one noise setting, linear probe;
4. ``finetune``: ``train.py``'s pipeline with ``strategy=gradual_unfreeze`` on clean, noisy and cleaned
   training sets at the same step budget (the cleaned run reads a ``label_issues.csv`` written for its
   noisy split through ``data.exclude``).

Rows are appended to ``<out>/raw.csv`` as they finish; ``--summary`` rewrites ``<out>/README.md``'s
tables from it. Example::

    OMP_NUM_THREADS=1 python scripts/label_quality_experiments.py --out docs/results/label_quality
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from label_issues import frozen_features, probe_fit

from tl_lightning.analysis.label_quality import (
    LabelIssues,
    detection_scores,
    find_label_issues,
    out_of_fold_probabilities,
    write_label_issues,
)
from tl_lightning.callbacks.linear_probe import accuracy_and_loss, select_l2
from tl_lightning.run.pipeline import train

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
COLUMNS = (
    "step",
    "data",
    "train_per_class",
    "rate",
    "kind",
    "seed",
    "arm",
    "strategy",
    "train_examples",
    "flagged",
    "wrong",
    "precision",
    "recall",
    "test_acc",
    "global_step",
    "seconds",
)
DATA = {
    "digits": ["data=digits"],
    "fashion_mnist": ["data=fashion_mnist", "data.train_per_class=200", "data.test_per_class=100"],
    "rotten_tomatoes": [
        "backbone=hf_encoder",
        "data=rotten_tomatoes",
        "data.train_per_class=1000",
        "data.batch_size=64",
    ],
}
GRID = [1e-3, 1e-2, 1e-1, 1.0]
# max |gradient entry| of the probe fits: looser than label_issues.py's 1e-5 (CPU budget; README)
TOLERANCE = 1e-3


def compose_cfg(overrides: list[str], out: Path) -> object:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("label_issues", overrides=[*overrides, f"paths.output_dir={out}"])


def noise_overrides(rate: float, kind: str, seed: int) -> list[str]:
    return [f"data.label_noise.rate={rate}", f"data.label_noise.kind={kind}", f"data.label_noise.seed={seed}"]


def probe_accuracy(train: tuple, val: tuple, test: tuple, num_classes: int) -> float:
    """Test accuracy of the converged probe fit on ``train`` with L2 chosen on ``val``."""
    _, fit, _ = select_l2(train, val, num_classes, GRID, tolerance=TOLERANCE)
    return accuracy_and_loss(*test, fit.weight, fit.bias)[0]


def scan(cfg, seed: int) -> tuple[object, dict, LabelIssues, float]:
    """Data module, features (train/val/test), cleanlab's findings and the scan's seconds."""
    started = time.perf_counter()
    data, splits = frozen_features(cfg, ("train", "val", "test"))
    names = data.class_names
    features, given = splits["train"]
    fit = probe_fit(splits["val"], len(names), GRID, TOLERANCE, [])
    probabilities = out_of_fold_probabilities(features, given, len(names), fit, 5, seed)
    issues = find_label_issues(given.numpy(), probabilities, names)
    return data, splits, issues, time.perf_counter() - started


class Rows:
    """Appends result rows to ``raw.csv`` (header once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            with path.open("w", newline="") as handle:
                csv.writer(handle).writerow(COLUMNS)

    def add(self, **row) -> None:
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, COLUMNS).writerow({k: _cell(row.get(k)) for k in COLUMNS})
        print(json.dumps({k: row.get(k) for k in COLUMNS if row.get(k) is not None}, default=str), flush=True)


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else value


def probe_arms(rows: Rows, name: str, overrides: list[str], rate: float, kind: str, seed: int, work: Path):
    """Detection and linear-probe test accuracy on clean / noisy / cleaned training labels."""
    cfg = compose_cfg([*overrides, *noise_overrides(rate, kind, seed)], work)
    data, splits, issues, seconds = scan(cfg, seed)
    (features, given), val, test = splits["train"], splits["val"], splits["test"]
    true = torch.as_tensor(data.curated.true_labels)
    k = len(data.class_names)
    scores = detection_scores(issues.flagged, issues.given, true.numpy())
    keep = torch.as_tensor(~issues.flagged)
    base = dict(step="probe", data=name, rate=rate, kind=kind, seed=seed, strategy="linear_probe")
    per_class = round(len(given) / k)
    rows.add(
        **base,
        arm="detection",
        train_per_class=per_class,
        train_examples=len(given),
        seconds=seconds,
        **scores,
    )
    for arm, x, y in (
        ("clean", features, true),
        ("noisy", features, given),
        ("cleaned", features[keep], given[keep]),
    ):
        started = time.perf_counter()
        acc = probe_accuracy((x, y), val, test, k)
        rows.add(
            **base,
            arm=arm,
            train_per_class=per_class,
            train_examples=len(y),
            test_acc=acc,
            seconds=time.perf_counter() - started,
        )
    return data, issues


def small_clean(rows: Rows, work: Path, seeds: list[int]) -> None:
    """Fashion-MNIST: 50 clean per class vs 500 per class at 40 % noise (noisy, cleaned)."""
    base = ["data=fashion_mnist", "data.test_per_class=100"]
    for seed in seeds:
        for kind in ("symmetric", "pairs"):
            probe_arms(
                rows,
                "fashion_mnist_500",
                [*base, "data.train_per_class=500", f"data.subset_seed={seed}"],
                0.4,
                kind,
                seed,
                work,
            )
        cfg = compose_cfg([*base, "data.train_per_class=50", f"data.subset_seed={seed}"], work)
        _, splits = frozen_features(cfg, ("train", "val", "test"))
        started = time.perf_counter()
        acc = probe_accuracy(splits["train"], splits["val"], splits["test"], 10)
        rows.add(
            step="small_clean",
            data="fashion_mnist_50",
            train_per_class=50,
            rate=0.0,
            kind="",
            seed=seed,
            arm="clean",
            strategy="linear_probe",
            train_examples=len(splits["train"][1]),
            test_acc=acc,
            seconds=time.perf_counter() - started,
        )


def finetune(rows: Rows, name: str, rate: float, kind: str, seed: int, work: Path, steps: int) -> None:
    """``strategy=gradual_unfreeze`` through ``train()`` on clean / noisy / cleaned, ``steps`` steps each."""
    schedule = [
        "strategy=gradual_unfreeze",
        "+schedule.unit=step",
        f"+schedule.gradual_unfreeze=[{steps // 5},{2 * steps // 5},{3 * steps // 5}]",
        f"+trainer.max_steps={steps}",
        "trainer.max_epochs=1000",
        "logger=none",
        "callbacks.rich_progress_bar=null",
        "+trainer.enable_progress_bar=false",
        f"seed={seed}",
    ]
    noisy = noise_overrides(rate, kind, seed)
    cfg = compose_cfg([*DATA[name], *noisy], work / "scan")
    data, _, issues, _ = scan(cfg, seed)
    exclude = write_label_issues(work / f"{name}_{kind}_{rate}_{seed}.csv", issues, data.curated.rows)
    for arm, extra in (("clean", []), ("noisy", noisy), ("cleaned", [*noisy, f"data.exclude={exclude}"])):
        out = work / f"ft_{name}_{kind}_{rate}_{seed}_{arm}"
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            run_cfg = compose("train", overrides=[*DATA[name], *schedule, *extra, f"paths.output_dir={out}"])
        started = time.perf_counter()
        train(run_cfg)
        metrics = json.loads((out / "metrics.json").read_text())
        rows.add(
            step="finetune",
            data=name,
            rate=rate,
            kind=kind,
            seed=seed,
            arm=arm,
            strategy="gradual_unfreeze",
            train_examples=len(data.curated.labels) - metrics.get("curation", {}).get("excluded", 0),
            test_acc=metrics["test"]["test/acc"],
            global_step=metrics["global_step"],
            seconds=time.perf_counter() - started,
        )


def _mean_sd(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def summary(raw: Path) -> str:
    """Markdown tables (mean ± sample standard deviation over seeds) of every step found in ``raw``."""
    with raw.open(newline="") as handle:
        table = list(csv.DictReader(handle))

    def value(row, key):
        return float(row[key]) if row[key] != "" else math.nan

    def groups(step, data=None):
        found: dict[tuple, list[dict]] = {}
        for row in table:
            if row["step"] == step and (data is None or row["data"] == data):
                found.setdefault((row["data"], row["kind"], row["rate"]), []).append(row)
        return found

    lines = [
        "### Detection of planted noise (cleanlab on out-of-fold linear-probe probabilities)",
        "",
        "| data | kind | rate | seeds | train | flagged | wrong | precision | recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (data, kind, rate), rows in groups("probe").items():
        det = [r for r in rows if r["arm"] == "detection"]
        cells = [_mean_sd([value(r, key) for r in det], 0) for key in ("flagged", "wrong")]
        cells += [_mean_sd([value(r, key) for r in det]) for key in ("precision", "recall")]
        head = f"| {data} | {kind} | {float(rate):g} | {len(det)} | {det[0]['train_examples']} | "
        lines.append(head + " | ".join(cells) + " |")
    lines += [
        "",
        "### Test accuracy of the converged linear probe: clean, noisy and cleaned training labels",
        "",
        "| data | kind | rate | seeds | clean | noisy | cleaned | cleaned - noisy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (data, kind, rate), rows in groups("probe").items():
        acc = {
            arm: [value(r, "test_acc") for r in rows if r["arm"] == arm]
            for arm in ("clean", "noisy", "cleaned")
        }
        gain = [c - n for c, n in zip(acc["cleaned"], acc["noisy"], strict=False)]
        lines.append(
            f"| {data} | {kind} | {float(rate):g} | {len(acc['noisy'])} | {_mean_sd(acc['clean'])} | "
            f"{_mean_sd(acc['noisy'])} | {_mean_sd(acc['cleaned'])} | {_mean_sd(gain)} |"
        )
    clean50 = [value(r, "test_acc") for r in table if r["data"] == "fashion_mnist_50"]
    if clean50:
        lines += [
            "",
            "### Fashion-MNIST: 50 clean images per class vs 500 per class at 40 % noise (linear probe)",
            "",
            "| training set | seeds | examples | test accuracy |",
            "|---|---|---|---|",
            f"| 50 per class, clean | {len(clean50)} | 500 | {_mean_sd(clean50)} |",
        ]
        for (_, kind, rate), rows in groups("probe", "fashion_mnist_500").items():
            for arm in ("noisy", "cleaned"):
                acc = [value(r, "test_acc") for r in rows if r["arm"] == arm]
                size = _mean_sd([value(r, "train_examples") for r in rows if r["arm"] == arm], 0)
                label = f"500 per class, {float(rate):g} {kind}, {arm}"
                lines.append(f"| {label} | {len(acc)} | {size} | {_mean_sd(acc)} |")
    fine = groups("finetune")
    if fine:
        lines += [
            "",
            "### Test accuracy after gradual_unfreeze at the same step budget",
            "",
            "| data | kind | rate | arm | train examples | optimizer steps | test accuracy | seconds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (data, kind, rate), rows in fine.items():
            for r in rows:
                lines.append(
                    f"| {data} | {kind} | {float(rate):g} | {r['arm']} | {r['train_examples']} | "
                    f"{r['global_step']} | "
                    f"{value(r, 'test_acc'):.3f} | {value(r, 'seconds'):.0f} |"
                )
    seconds: dict[str, float] = {}
    for row in table:
        seconds[row["step"]] = seconds.get(row["step"], 0.0) + value(row, "seconds")
    lines += ["", "Compute (sum of the rows' seconds, one CPU thread on a shared 2-core machine): "]
    lines[-1] += ", ".join(f"{step} {total / 60:.1f} min" for step, total in seconds.items()) + "."
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/label_quality"))
    parser.add_argument("--work", type=Path, default=Path("outputs/label_quality"))
    parser.add_argument("--steps", nargs="+", default=["probe", "text", "small_clean", "finetune"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", nargs="+", default=["digits", "fashion_mnist"], help="`probe` data sets")
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--summary", action="store_true", help="only print the tables of <out>/raw.csv")
    parser.add_argument(
        "--finetune",
        nargs="+",
        default=["digits:0.2:symmetric", "digits:0.4:pairs"],
        help="data:rate:kind settings of the gradual_unfreeze arms (seed 0)",
    )
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.out / "raw.csv"))
        return
    rows = Rows(args.out / "raw.csv")
    started = time.perf_counter()
    if "probe" in args.steps:
        for name in args.data:
            for seed in args.seeds:
                for rate in (0.1, 0.2, 0.4):
                    for kind in ("symmetric", "pairs"):
                        probe_arms(rows, name, DATA[name], rate, kind, seed, args.work)
    if "text" in args.steps:
        for seed in args.seeds:
            probe_arms(rows, "rotten_tomatoes", DATA["rotten_tomatoes"], 0.2, "symmetric", seed, args.work)
    if "small_clean" in args.steps:
        small_clean(rows, args.work, args.seeds)
    if "finetune" in args.steps:
        for setting in args.finetune:
            name, rate, kind = setting.split(":")
            finetune(rows, name, float(rate), kind, 0, args.work, args.finetune_steps)
    print(f"wall time {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
