"""Does LoRA learn less and forget less? SmolLM2-135M on the Rotten Tomatoes instruction set, offline.

Runs ``train.py task=causal_lm`` once per (method, seed) with the same small step budget - full
fine-tuning, LoRA r=8 and r=64, IA3, L2-SP, EWC - plus the zero-shot instruct model (no training
step), then writes ``runs.csv`` (one row per run), ``summary.csv`` and ``README.md`` tables (mean and
spread over seeds) and ``gain_vs_loss.png`` (target gain against general-text loss) to ``--out``.

Target: accuracy of the greedy generated answer on the first ``--test`` test reviews, and the
cross-entropy of the answer tokens (the plot's target gain: its drop from the zero-shot model's; at a
small budget the accuracy mostly measures the answer format). Forgetting:
the relative change in perplexity of two general texts held out from fine-tuning (Python standard
library source; Python's reference manual), measured by ``LMRetention`` before the first step and on
the final weights.

    python scripts/llm_forgetting.py                      # 3 seeds, 16 steps of 8 pairs, 3 runs at a time
    python scripts/llm_forgetting.py --seeds 0 1 2 --steps 60 --jobs 1
    python scripts/llm_forgetting.py --summarise-only     # tables and plot from the runs finished so far

Runs go to ``--runs`` (one Hydra run folder each, with ``metrics.json``); a run whose ``metrics.json``
exists is not repeated, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# method -> overrides; learning rates are each method's usual order for LMs, alpha = 2 r for LoRA
# (Biderman et al. 2024), L2-SP and EWC strengths large enough to act within a short budget
METHODS = {
    "full_finetune": ["strategy=full_finetune", "module.optimizer.lr=3e-5"],
    "lora_r8": ["strategy=lora", "adapter.r=8", "adapter.alpha=16", "module.optimizer.lr=5e-4"],
    "lora_r64": ["strategy=lora", "adapter.r=64", "adapter.alpha=128", "module.optimizer.lr=5e-4"],
    "ia3": ["strategy=ia3", "module.optimizer.lr=3e-3"],
    "l2sp": ["strategy=l2sp", "callbacks.l2sp.alpha=1.0", "module.optimizer.lr=3e-5"],
    "ewc": [
        "strategy=ewc",
        "callbacks.ewc.lambda_=100.0",
        "callbacks.ewc.fisher_samples=32",
        "module.optimizer.lr=3e-5",
    ],
}
ZERO_SHOT = "zero_shot"
GENERAL = ("python_stdlib", "python_docs")


def common(args: argparse.Namespace, seed: int) -> list[str]:
    """Overrides every run shares: the data, the budget, evaluation sizes; no checkpoint files."""
    return [
        "task=causal_lm",
        f"seed={seed}",
        "data.system_prompt=Answer in one word.",
        f"data.batch_size={args.batch_size}",
        f"data.max_length={args.max_length}",
        f"data.eval_limit={args.test}",
        f"data.train_per_class={args.steps * args.batch_size // 2}",  # one epoch of --steps batches
        f"data.retention_tokens={args.general_tokens}",
        "trainer.max_epochs=1",
        f"trainer.limit_val_batches={args.val_batches}",
        "callbacks.model_checkpoint=null",
        "callbacks.last_checkpoint=null",
        "+trainer.enable_checkpointing=false",  # else Lightning adds its own (a 2 GB file per full run)
        "callbacks.layer_drift=null",
        "callbacks.rich_progress_bar=null",
        "+trainer.enable_progress_bar=false",
        "logger=csv",
    ]


def run(name: str, overrides: list[str], runs: Path) -> dict:
    """One ``train.py`` run (single-threaded) in ``runs/name``; its ``metrics.json``."""
    folder = runs / name
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        command = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={folder}"]
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "train.log").open("w") as log:
            subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return json.loads(metrics.read_text())


def row(name: str, method: str, seed: int, metrics: dict) -> dict:
    test = metrics["test"]
    out = {
        "run": name,
        "method": method,
        "seed": seed,
        "steps": metrics["global_step"],
        "trainable_params": metrics["params"]["trainable"],
        "test_acc": test.get("test/acc"),
        "test_loss": test.get("test/loss"),
        "wall_time_s": metrics["wall_time_s"],
    }
    for text in GENERAL:
        out[f"{text}_ppl"] = test.get(f"source/{text}_ppl")
        out[f"{text}_ppl_change"] = test.get(f"source/{text}_ppl_change")
    out["general_ppl_change"] = statistics.mean(out[f"{t}_ppl_change"] for t in GENERAL)
    return out


def summarise(rows: list[dict], out: Path, args: argparse.Namespace, wall: float) -> None:
    zero = next(r for r in rows if r["method"] == ZERO_SHOT)
    methods = [ZERO_SHOT, *METHODS]
    summary = []
    for method in methods:
        group = [r for r in rows if r["method"] == method]
        if not group:
            continue
        entry = {"method": method, "seeds": len(group), "trainable_params": group[0]["trainable_params"]}
        for key in (
            "test_acc",
            "test_loss",
            "python_stdlib_ppl_change",
            "python_docs_ppl_change",
            "general_ppl_change",
            "wall_time_s",
        ):
            values = [r[key] for r in group]
            entry[key] = statistics.mean(values)
            entry[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        entry["target_gain"] = entry["test_acc"] - zero["test_acc"]
        summary.append(entry)
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[-1]))
        writer.writeheader()
        writer.writerows(summary)
    _plot(summary, rows, zero, out / "gain_vs_loss.png")
    lines = [
        "| method | seeds | trainable params | test acc (generated answer) | gain over zero-shot | "
        "test loss (answer tokens) | Python source ppl change | Python manual ppl change | wall time / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        sd = {k: f" ± {e[f'{k}_sd']:.3f}" if e["seeds"] > 1 else "" for k in ("test_acc",)}
        pct = {
            k: f" ± {100 * e[f'{k}_sd']:.1f}" if e["seeds"] > 1 else ""
            for k in ("python_stdlib_ppl_change", "python_docs_ppl_change")
        }
        lines.append(
            f"| {e['method']} | {e['seeds']} | {e['trainable_params']:,} | "
            f"{e['test_acc']:.3f}{sd['test_acc']} | {e['target_gain']:+.3f} | {e['test_loss']:.3f} | "
            f"{100 * e['python_stdlib_ppl_change']:+.2f}%{pct['python_stdlib_ppl_change']} | "
            f"{100 * e['python_docs_ppl_change']:+.2f}%{pct['python_docs_ppl_change']} | "
            f"{e['wall_time_s']:.0f} s |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "settings.json").write_text(
        json.dumps(
            {
                **vars(args),
                "out": str(args.out.relative_to(ROOT)) if args.out.is_relative_to(ROOT) else str(args.out),
                "runs": None,
                "sweep_wall_time_s": None if args.summarise_only else round(wall, 1),
                "runs_wall_time_s_sum": round(sum(r["wall_time_s"] for r in rows), 1),
                "methods": METHODS,
            },
            indent=2,
        )
    )


def _plot(summary: list[dict], rows: list[dict], zero: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for e in summary:
        if e["method"] == ZERO_SHOT:
            continue
        runs = [r for r in rows if r["method"] == e["method"]]
        xs = [100 * r["general_ppl_change"] for r in runs]
        ys = [zero["test_loss"] - r["test_loss"] for r in runs]
        points = ax.scatter(xs, ys, alpha=0.35, s=18)
        ax.errorbar(
            100 * e["general_ppl_change"],
            zero["test_loss"] - e["test_loss"],
            xerr=100 * e["general_ppl_change_sd"],
            yerr=e["test_loss_sd"],
            fmt="o",
            color=points.get_facecolor()[0][:3],
            capsize=3,
            label=e["method"],
        )
    ax.axhline(0, color="grey", lw=0.6)
    ax.axvline(0, color="grey", lw=0.6)
    ax.set_xlabel("source loss: general-text perplexity change (%, mean of 2 texts)")
    ax.set_ylabel("target gain: zero-shot - fine-tuned answer-token loss (nats)")
    ax.set_title("SmolLM2-135M, Rotten Tomatoes instructions (mean ± sd)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--test", type=int, default=60, help="test (and validation) pairs kept")
    parser.add_argument("--val-batches", type=int, default=1)
    parser.add_argument("--general-tokens", type=int, default=512, help="tokens of each general text")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--jobs", type=int, default=3, help="runs at a time (each single-threaded)")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "llm_forgetting")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "llm_forgetting")
    parser.add_argument("--summarise-only", action="store_true", help="tables from the finished runs only")
    args = parser.parse_args()
    started = time.perf_counter()
    zero_shot = [
        *common(args, args.seeds[0]),
        "strategy=full_finetune",
        "trainer.limit_train_batches=0",
        "module.scheduler=null",
    ]
    jobs = [(ZERO_SHOT, ZERO_SHOT, args.seeds[0], zero_shot)]
    for seed in args.seeds:
        for method in args.methods:
            overrides = [*common(args, seed), *METHODS[method]]
            jobs.append((f"{method}_seed{seed}", method, seed, overrides))
    if args.summarise_only:
        done = [job for job in jobs if (args.runs / job[0] / "metrics.json").is_file()]
        results = [(job, json.loads((args.runs / job[0] / "metrics.json").read_text())) for job in done]
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda job: (job, run(job[0], job[3], args.runs)), jobs))
    rows = [row(name, method, seed, metrics) for (name, method, seed, _), metrics in results]
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "runs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
        writer.writeheader()
        writer.writerows(rows)
    summarise(rows, args.out, args, time.perf_counter() - started)
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
