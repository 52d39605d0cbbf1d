"""Catastrophic forgetting on real data: digits 0-4 (source) then digits 5-9 (target).

1. Stage 1 (``experiment=digits_source``, cached): ImageNet EfficientNet-Lite0 fine-tuned on digits
   0-4; its last checkpoint is reused while it exists.
2. Stage 2 (``experiment=digits_sequential``): for every strategy and seed, the source model learns
   digits 5-9 with a new head; ``SourceRetention`` scores the untouched source head on held-out
   0-4 test images after every epoch.
3. A markdown table of target test accuracy vs final source accuracy, mean ± std over seeds.

Usage::

    python scripts/digits_sequential.py [--strategies full_finetune,ewc,l2sp,linear_probe,gradual_unfreeze]
        [--seeds 0,1,2] [--out docs/results/digits_sequential] [overrides ...]

Extra arguments are Hydra overrides applied to every stage-2 run (e.g. ``trainer.max_epochs=3``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tl_lightning.run.pipeline import train

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")
QUIET = ["callbacks.rich_progress_bar=null", "+trainer.enable_progress_bar=false"]


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def ensure_source_model(cache_dir: Path) -> tuple[Path, float]:
    """Train stage 1 unless its checkpoint exists; return the checkpoint and its 0-4 test accuracy."""
    run_dir = cache_dir / "digits_source"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        train(_compose(["experiment=digits_source", f"paths.output_dir={run_dir}", *QUIET]))
    return checkpoint, json.loads((run_dir / "metrics.json").read_text())["test"]["test/acc"]


def run_target(strategy: str, seed: int, checkpoint: Path, out: Path, overrides: list[str]) -> dict:
    """One stage-2 run; returns its ``metrics.json``."""
    run_dir = out / "runs" / f"{strategy}_seed{seed}"
    cfg = _compose(
        [
            "experiment=digits_sequential",
            f"strategy={strategy}",
            f"seed={seed}",
            f"backbone.path={checkpoint}",
            f"paths.output_dir={run_dir}",
            *QUIET,
            *overrides,
        ]
    )
    train(cfg)
    return json.loads((run_dir / "metrics.json").read_text())


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def render_table(results: dict[str, list[dict]], source_acc: float, command: str) -> str:
    """Markdown: one row per strategy, target accuracy and source retention, mean ± std over seeds."""
    lines = [
        "# digits_sequential: target accuracy vs source retention",
        "",
        "Source task: digits 0-4 (ImageNet EfficientNet-Lite0 fine-tuned, `experiment=digits_source`).",
        "Target task: digits 5-9 with a new head. Source accuracy: the untouched source head on held-out",
        f"0-4 test images after the last epoch; before stage 2 the source model scores {source_acc:.3f}.",
        "",
        f"Command: `{command}`",
        "",
        "| strategy | target test acc | source acc (retention) | runs |",
        "|---|---|---|---|",
    ]
    for strategy, runs in results.items():
        target = [r["test"]["test/acc"] for r in runs]
        source = [r["final"]["source/acc"] for r in runs]
        lines.append(f"| {strategy} | {_mean_std(target)} | {_mean_std(source)} | {len(runs)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default="full_finetune,ewc,l2sp,linear_probe,gradual_unfreeze")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "digits_sequential")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage-2 run")
    args = parser.parse_args(argv)
    checkpoint, source_acc = ensure_source_model(args.cache_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {
        strategy: [run_target(strategy, seed, checkpoint, args.out, args.overrides) for seed in seeds]
        for strategy in args.strategies.split(",")
    }
    command = "python scripts/digits_sequential.py " + " ".join(
        [f"--strategies {args.strategies}", f"--seeds {args.seeds}", *args.overrides]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    table = render_table(results, source_acc, command)
    (args.out / "README.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
