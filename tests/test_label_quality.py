"""Label issues from frozen features (tl_lightning.analysis.label_quality, scripts/label_issues.py).

The fold test needs no cleanlab; the detection tests and the script run skip with a message when the
``quality`` extra is absent.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_lightning.analysis.label_quality import (
    LabelIssues,
    detection_scores,
    out_of_fold_probabilities,
    write_label_issues,
)
from tl_lightning.callbacks.linear_probe import fit_logistic
from tl_lightning.data.curation import TrainingRows, flip_labels

ROOT = Path(__file__).resolve().parent.parent
NEEDS_CLEANLAB = "label issues need cleanlab: pip install 'tl-lightning[quality]'"


def _blobs(per_class: int = 60, classes: int = 5, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=generator, dtype=torch.float64), labels


def _probe(features, labels):
    fit = fit_logistic(features, labels, 5, l2=1e-2, tolerance=1e-7)
    return lambda x: torch.softmax(x @ fit.weight.T + fit.bias, dim=1)


def test_out_of_fold_probabilities_never_see_the_examples_own_label():
    features, labels = _blobs()
    base = out_of_fold_probabilities(features, labels, 5, _probe, folds=5, seed=0)
    assert np.allclose(base.sum(1), 1)
    changed = labels.clone()
    changed[7] = (labels[7] + 1) % 5  # change one label: its own row must not move
    moved = out_of_fold_probabilities(features, changed, 5, _probe, folds=5, seed=0)
    assert np.array_equal(moved[7], base[7])
    assert not np.allclose(moved, base)  # ...while the other folds' rows, fit with it, do

    seen: list[set[int]] = []  # and directly: no fit is handed a row it then scores

    def recording(train_features, train_labels):
        seen.append({int(i) for i in train_features[:, 0]})
        return lambda x: torch.full((len(x), 5), 0.2, dtype=torch.float64) + 0 * x[:, :1]

    ids = torch.arange(len(labels), dtype=torch.float64)[:, None]
    out_of_fold_probabilities(ids, labels, 5, recording, folds=4, seed=1)
    assert len(seen) == 4 and sum(len(s) for s in seen) == 3 * len(labels)
    with pytest.raises(ValueError, match="class 0 has 3 training examples, fewer than label_issues.folds=5"):
        out_of_fold_probabilities(features[57:], labels[57:], 5, _probe, folds=5)


def test_planted_flips_are_recovered_on_separable_data():
    pytest.importorskip("cleanlab", reason=NEEDS_CLEANLAB)
    from tl_lightning.analysis.label_quality import find_label_issues

    features, true = _blobs(per_class=80)
    given = flip_labels(true.numpy(), 5, 0.15, "symmetric", seed=0)
    probabilities = out_of_fold_probabilities(features, torch.as_tensor(given), 5, _probe, folds=5)
    issues = find_label_issues(given, probabilities, list("abcde"))
    scores = detection_scores(issues.flagged, given, true.numpy())
    assert scores["wrong"] == 60 and scores["precision"] >= 0.95 and scores["recall"] >= 0.9, scores
    assert np.array_equal(issues.suggested[issues.flagged], true.numpy()[issues.flagged])
    assert issues.joint.sum() == pytest.approx(len(given))
    assert issues.summary().startswith(f"{int(issues.flagged.sum())} of 400 training labels flagged")


def test_the_table_is_sorted_by_score_with_one_row_per_example(tmp_path):
    given = np.array([0, 1, 1, 0])
    issues = LabelIssues(given, np.array([0, 0, 1, 1]), np.array([0.1, 0.9, 0.2, 0.5]),
                         np.array([False, True, False, True]), np.zeros((2, 2)), ["cat", "dog"])  # fmt: skip
    path = write_label_issues(tmp_path / "t.csv", issues, TrainingRows("text", ["a", "b", "c", "d"]), given)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["index"] for r in rows] == ["1", "3", "2", "0"]
    assert rows[0] == {"index": "1", "text": "b", "given": "dog", "suggested": "cat", "score": "0.9",
                       "flagged": "true", "true": "dog"}  # fmt: skip
    close = np.array([0.1, 0.9999996, 0.2, 0.9999999])  # equal once rounded to 6 decimals
    issues = LabelIssues(given, given, close, np.zeros(4, bool), np.zeros((2, 2)), ["cat", "dog"])
    with write_label_issues(tmp_path / "c.csv", issues, TrainingRows("text", list("abcd"))).open() as handle:
        assert [float(r["score"]) for r in csv.DictReader(handle)] == sorted(close, reverse=True)  # exact


@pytest.mark.slow
def test_label_issues_script_then_training_without_the_flagged_rows(tmp_path, make_cfg):
    """The real script (composed like train.py) on digits with planted noise; training drops its flags."""
    pytest.importorskip("cleanlab", reason=NEEDS_CLEANLAB)
    pytest.importorskip("matplotlib", reason=NEEDS_CLEANLAB)
    from tl_lightning.run.pipeline import train

    scan = tmp_path / "scan"
    data = ["data=digits", "data.image_size=32", "data.train_per_class=20", "data.label_noise.rate=0.2"]
    # data.augment=true as a training run may have it: the scan reads unaugmented features regardless
    command = [sys.executable, str(ROOT / "scripts" / "label_issues.py"), *data, "data.augment=true",
               "label_issues.folds=3", f"paths.cache_dir={tmp_path / 'cache'}",
               f"hydra.run.dir={scan}"]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    result = json.loads((scan / "label_issues.json").read_text())
    for name in ("label_issues.csv", "top_flagged.png", "noise_matrix.png", "feature_map.png"):
        assert (scan / name).stat().st_size > 0, name
    with (scan / "label_issues.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 200 and result["label_noise"]["flipped"] == 40
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    flagged = sum(r["flagged"] == "true" for r in rows)
    assert flagged == result["flagged"] > 0
    assert sum(r["given"] != r["true"] for r in rows) == 40
    assert result["detection"]["recall"] > 0.5, result["detection"]

    csv_path = scan / "label_issues.csv"
    cfg = make_cfg(*data, "strategy=linear_probe", f"data.exclude={csv_path}", "logger=none", run="cleaned")
    train(cfg)
    metrics = json.loads((tmp_path / "cleaned" / "metrics.json").read_text())
    assert metrics["curation"]["excluded"] == flagged and metrics["curation"]["exclude_file"] == str(csv_path)
    assert metrics["curation"]["exclude_sha256"] == hashlib.sha256(csv_path.read_bytes()).hexdigest()
    assert metrics["curation"]["label_noise"]["flipped"] == 40
    assert metrics["train_examples_per_class"] == round((200 - flagged) / 10, 1)
