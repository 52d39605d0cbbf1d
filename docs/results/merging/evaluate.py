"""Task arithmetic on real data: Lite0 fine-tuned on digits 0-4 (task A) and 5-9 (task B), merged and negated.

For every seed (the runs of ``finetune.sh``):

1. ``tau_A``, ``tau_B``: each fine-tune's backbone minus the pretrained Lite0 its config records
   (``bn_stats="base"``: BatchNorm statistics are not merged, see 3).
2. Merging: ``theta_pre + lam * merge(tau_A, tau_B)`` by task arithmetic (sum), TIES (density 0.2) and
   DARE (``dare_linear``, density 0.3, seed 0); ``lam`` from ``MERGE_GRID`` maximises the mean
   validation accuracy of the two tasks, each read with its own fine-tuned head.
3. BatchNorm statistics of a merged backbone are re-estimated on unlabelled training images of the
   tasks it serves (``REESTIMATE_PER_TASK`` per task, ``torch.optim.swa_utils.update_bn``): merged
   like weights the variances turn negative for ``lam`` above ~0.5, and the pretrained (ImageNet)
   statistics do not fit digit features.
4. Negation: ``theta_pre - lam * tau_B`` read with linear-probe heads (logistic regression on the
   frozen pretrained features, pretrained BatchNorm statistics): the fine-tuned heads only read the
   features of their own fine-tune, so they cannot tell what the pretrained model knew. ``lam`` from
   ``NEGATION_GRID`` is the largest that keeps task A's validation accuracy within 5 points of the base.
   Control: a random direction with the per-tensor norms of ``tau_B``, subtracted with the same ``lam``.
5. Test accuracy of every row per seed in ``RUNS/results_seed<seed>.json``; the table (mean ± std over
   every seed evaluated so far) is printed as markdown.

Usage (from the repository root, after ``finetune.sh`` for every seed)::

    python docs/results/merging/evaluate.py [--seeds 0,1,2] [--runs docs/results/merging/runs]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch.optim.swa_utils import update_bn

from tl_lightning.adapters.merging import TaskVector, apply_task_vector, merge_task_vectors, task_vector
from tl_lightning.data import DigitsDataModule
from tl_lightning.run.checkpointing import load_checkpoint
from tl_lightning.run.inference import load_trained
from tl_lightning.run.merge import CheckpointBases, backbone_state

TASKS = {"A": [0, 1, 2, 3, 4], "B": [5, 6, 7, 8, 9]}
MERGE_GRID = [0.6, 1.0, 1.4, 1.8]
NEGATION_GRID = [0.5, 1.0, 1.5, 2.0, 2.5]
MERGES = {  # name -> merge_task_vectors arguments (weights 1, 1; lam scales the result)
    "task arithmetic": {"method": "task_arithmetic"},
    "TIES (density 0.2)": {"method": "ties", "density": 0.2},
    "DARE (density 0.3)": {"method": "dare_linear", "density": 0.3, "seed": 0},
}
HOLD_POINTS = 0.05
REESTIMATE_PER_TASK = 64  # training images per task that BatchNorm statistics are re-estimated on
BATCH = 128


def _split_tensors(data_config, image_size: int) -> dict:
    """``{task: {split: (images, labels)}}`` of the digits splits the fine-tunes used."""
    tensors = {}
    for task, classes in TASKS.items():
        data = DigitsDataModule(data_config, image_size=image_size, classes=classes)
        data.setup()
        tensors[task] = {}
        for split in ("train", "val", "test"):
            dataset = getattr(data, f"{split}_set")
            images = torch.stack([dataset[i][0] for i in range(len(dataset))])
            tensors[task][split] = (images, dataset.labels)
    return tensors


@torch.no_grad()
def _features(backbone, images: torch.Tensor) -> torch.Tensor:
    backbone.eval()
    return torch.cat([backbone(images[i : i + BATCH]) for i in range(0, len(images), BATCH)])


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


class SeedEvaluation:
    """The two fine-tunes of one seed, their task vectors, heads and data."""

    def __init__(self, runs: Path, seed: int) -> None:
        paths = {t: runs / f"task{t}_seed{seed}" / "checkpoints" / "last.ckpt" for t in TASKS}
        checkpoints = {t: load_checkpoint(p) for t, p in paths.items()}
        bases = CheckpointBases()
        self.pretrained = bases(checkpoints["A"], str(paths["A"]))
        self.vectors = {
            t: task_vector(backbone_state(c), bases(c, str(paths[t])), bn_stats="base")
            for t, c in checkpoints.items()
        }
        self.finetuned = {t: backbone_state(c) for t, c in checkpoints.items()}
        self.models = {t: load_trained(p).module for t, p in paths.items()}  # backbone + that task's head
        self.backbone = self.models["A"].backbone  # the one backbone states are loaded into
        config = checkpoints["A"]["tl_lightning"]["config"]
        self.data = _split_tensors(self.backbone.data_config, config["data"]["image_size"])
        self.probes = self._fit_probes()

    def _fit_probes(self) -> dict:
        self.backbone.load_state_dict(self.pretrained)
        probes = {}
        for task in TASKS:
            images, labels = self.data[task]["train"]
            features = _features(self.backbone, images).numpy()
            probes[task] = LogisticRegression(max_iter=5000).fit(features, labels.numpy())
        return probes

    def load(self, state: dict, reestimate_on: list[str] | None = None) -> None:
        """Load a backbone state; re-estimate BatchNorm statistics on those tasks' training images."""
        self.backbone.load_state_dict(state)
        if reestimate_on:
            images = torch.cat([self.data[t]["train"][0][:REESTIMATE_PER_TASK] for t in reestimate_on])
            update_bn([images[i : i + BATCH] for i in range(0, len(images), BATCH)], self.backbone)

    def head_accuracy(self, split: str) -> dict[str, float]:
        """Accuracy of the loaded backbone with each task's fine-tuned head."""
        scores = {}
        for task, model in self.models.items():
            images, labels = self.data[task][split]
            features = _features(self.backbone, images)
            with torch.no_grad():
                scores[task] = _accuracy(model.heads["target"](features), labels)
        return scores

    def probe_accuracy(self, split: str, tasks: tuple[str, ...] = tuple(TASKS)) -> dict[str, float]:
        """Accuracy of the loaded backbone with each task's linear probe (fit on the pretrained features)."""
        scores = {}
        for task in tasks:
            probe = self.probes[task]
            images, labels = self.data[task][split]
            scores[task] = float(probe.score(_features(self.backbone, images).numpy(), labels.numpy()))
        return scores


def evaluate_seed(runs: Path, seed: int) -> dict[str, dict]:
    """``{row: {"A": test acc, "B": test acc, "lam": chosen coefficient or None}}`` for one seed."""
    ev = SeedEvaluation(runs, seed)
    rows = {}
    ev.load(ev.pretrained)
    rows["base + linear probes"] = ev.probe_accuracy("test")
    ev.load(ev.pretrained, reestimate_on=list(TASKS))
    rows["base + fine-tuned heads"] = ev.head_accuracy("test")
    for task in TASKS:
        ev.load(ev.finetuned[task])
        rows[f"specialist {task}"] = ev.head_accuracy("test")
    for name, kwargs in MERGES.items():
        merged = merge_task_vectors([ev.vectors["A"], ev.vectors["B"]], [1.0, 1.0], **kwargs)
        best = None
        for lam in MERGE_GRID:
            ev.load(apply_task_vector(ev.pretrained, lam * merged), reestimate_on=list(TASKS))
            score = statistics.fmean(ev.head_accuracy("val").values())
            if best is None or score > best[0]:
                best = (score, lam)
        ev.load(apply_task_vector(ev.pretrained, best[1] * merged), reestimate_on=list(TASKS))
        rows[f"merged: {name}"] = ev.head_accuracy("test") | {"lam": best[1]}
    ev.load(ev.pretrained)
    base_val = ev.probe_accuracy("val", tasks=("A",))["A"]
    chosen = NEGATION_GRID[0]
    for lam in NEGATION_GRID:
        ev.load(apply_task_vector(ev.pretrained, -lam * ev.vectors["B"]))
        if ev.probe_accuracy("val", tasks=("A",))["A"] >= base_val - HOLD_POINTS:
            chosen = lam
    ev.load(apply_task_vector(ev.pretrained, -chosen * ev.vectors["B"]))
    rows["negated: base - lam tau_B, linear probes"] = ev.probe_accuracy("test") | {"lam": chosen}
    ev.load(apply_task_vector(ev.pretrained, -chosen * _random_like(ev.vectors["B"], seed)))
    rows["control: base - lam r (random, norms of tau_B), linear probes"] = ev.probe_accuracy("test") | {
        "lam": chosen
    }
    return rows


def _random_like(vector: TaskVector, seed: int) -> TaskVector:
    """A random direction with the per-tensor norms of ``vector``: does any step that long hurt task B?"""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for key in sorted(vector.deltas):
        delta = vector.deltas[key]
        noise = torch.randn(delta.shape, generator=generator, dtype=delta.dtype)
        deltas[key] = noise * (delta.norm() / noise.norm().clamp_min(1e-12))
    return TaskVector(deltas, vector.base_fingerprint)


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def render(results: dict[int, dict[str, dict]]) -> str:
    """Markdown table: test accuracy on each task, their mean, and the chosen coefficients, over seeds."""
    seeds = list(results)
    lines = [
        "| backbone + heads | task A (0-4) | task B (5-9) | mean | lam per seed |",
        "|---|---|---|---|---|",
    ]
    for row in results[seeds[0]]:
        a = [results[s][row]["A"] for s in seeds]
        b = [results[s][row]["B"] for s in seeds]
        mean = [(x + y) / 2 for x, y in zip(a, b, strict=True)]
        lams = [results[s][row].get("lam") for s in seeds]
        lam = ", ".join(f"{v:g}" for v in lams) if lams[0] is not None else ""
        lines.append(f"| {row} | {_mean_std(a)} | {_mean_std(b)} | {_mean_std(mean)} | {lam} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="seeds to evaluate ('' only prints the table)")
    parser.add_argument("--runs", type=Path, default=Path("docs/results/merging/runs"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)
    for seed in (int(s) for s in args.seeds.split(",") if s):
        started = time.perf_counter()
        rows = evaluate_seed(args.runs, seed)
        (args.runs / f"results_seed{seed}.json").write_text(json.dumps(rows, indent=2))
        print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    files = sorted(args.runs.glob("results_seed*.json"))
    results = {int(f.stem.removeprefix("results_seed")): json.loads(f.read_text()) for f in files}
    print(f"seeds {sorted(results)}:\n{render(results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
