"""benchmarks/bench_text.py: both arms train the same network on the same batches, and the script runs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_text():
    if "harness" not in sys.modules:  # the script imports `harness` as make bench runs it
        _load("harness")
    return _load("bench_text")


def test_the_like_for_like_check_catches_another_network_or_other_batches(bench_text, tmp_path):
    """Same first batch and logits pass; a changed head or another batch order fails, naming it."""
    module, datamodule = bench_text.build_ours(bench_text.compose_text(), texts=64)
    peer = bench_text.build_peer(module)
    bench_text.check_like_for_like(module, peer, datamodule, str(tmp_path))
    with torch.no_grad():
        peer.head.bias.add_(0.1)
    with pytest.raises(AssertionError, match="logits differ"):
        bench_text.check_like_for_like(module, peer, datamodule, str(tmp_path))
    datamodule.group_by_length = False  # our loader shuffles plainly; the peer keeps the length-grouped order
    with pytest.raises(AssertionError, match="first batch differs"):
        bench_text.check_like_for_like(module, peer, datamodule, str(tmp_path))


@pytest.mark.slow
def test_bench_text_runs_both_arms_and_reports_the_ratio_and_the_accuracies(tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    env = os.environ | {"TL_BENCH_SUMMARY": str(rows_file), "PYTHONPATH": str(ROOT / "benchmarks")}
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_text.py"), "--steps", "1", "--repeats", "1"]
    command += ["--texts", "64", "--accuracy-steps", "2", "--eval-every", "1", "--no-memory"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["label"]: row for row in map(json.loads, rows_file.read_text().splitlines())}
    ratio = rows["ours / Trainer step, CPU (goal <= 1.05x)"]
    assert ratio["median"] > 0 and ratio["low"] <= ratio["median"] <= ratio["high"]
    ours, theirs = map(float, rows["test accuracy after 2 steps: ours / Trainer"]["value"].split(" / "))
    assert 0 <= ours <= 1 and 0 <= theirs <= 1
    assert "64 test texts" in rows["difference vs 2 standard errors of it"]["value"]
    assert {
        "ours: training time to test accuracy >= 0.80",
        "trainer: training time to test accuracy >= 0.80",
    } <= set(rows)
