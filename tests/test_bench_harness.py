"""benchmarks/harness.py: interleaving, warm-up, paired ratios, child-process peaks, the JSON summary."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


harness = _load("harness")
MiB = 2**20


class FakeClock:
    """A clock that only moves when an arm says so: (wall, cpu) advance by the durations arms add."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __call__(self) -> tuple[float, float]:
        return self.wall, self.cpu

    def spend(self, wall: float, cpu: float) -> None:
        self.wall += wall
        self.cpu += cpu


def test_interleave_runs_arms_in_turn_and_drops_warmup_rounds():
    clock, calls = FakeClock(), []
    durations = {"a": iter([100.0, 1.0, 2.0, 3.0]), "b": iter([200.0, 10.0, 20.0, 30.0])}

    def arm(name: str):
        def call() -> None:
            calls.append(name)
            seconds = next(durations[name])
            clock.spend(seconds, seconds / 2)

        return call

    timings = harness.interleave({"a": arm("a"), "b": arm("b")}, repeats=3, warmup=1, clock=clock)

    assert calls == ["a", "b"] * 4
    assert timings["a"].wall == [1.0, 2.0, 3.0]  # the 100 s warm-up call is not kept
    assert timings["a"].cpu == [0.5, 1.0, 1.5]
    assert timings["b"].wall == [10.0, 20.0, 30.0]
    assert (timings["b"].median("wall"), timings["b"].min("wall"), timings["b"].max("wall")) == (20, 10, 30)
    assert timings["b"].per(10).wall == [1.0, 2.0, 3.0]
    assert timings["b"].minus(timings["a"]).wall == [9.0, 18.0, 27.0]  # paired round by round
    assert timings["b"].describe("wall") == "20.0 s [10.0-30.0]"
    assert harness.Timing(wall=[0.25], cpu=[0.25]).describe() == "250 ms"


def test_interleave_without_warmup_keeps_every_call():
    clock = FakeClock()
    timings = harness.interleave({"a": lambda: clock.spend(1.0, 1.0)}, repeats=2, warmup=0, clock=clock)
    assert timings["a"].cpu == [1.0, 1.0]


def test_interleave_turns_automatic_garbage_collection_off_during_a_call_only():
    seen = []

    def fails_after_a_look() -> None:
        seen.append(gc.isenabled())
        raise RuntimeError("arm failed")

    assert gc.isenabled()
    harness.interleave({"a": lambda: seen.append(gc.isenabled())}, repeats=2, warmup=1)
    with pytest.raises(RuntimeError, match="arm failed"):
        harness.interleave({"b": fails_after_a_look})
    assert seen == [False] * 4 and gc.isenabled()
    gc.disable()  # a caller that had it off keeps it off
    try:
        harness.interleave({"a": lambda: None}, repeats=1, warmup=0)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_ratio_spread_comes_from_paired_rounds():
    a = harness.Timing(wall=[2.0, 4.0, 9.0], cpu=[1.0, 1.0, 1.0])
    b = harness.Timing(wall=[1.0, 4.0, 3.0], cpu=[4.0, 2.0, 1.0])
    wall = harness.ratio(a, b, kind="wall")
    # per-round ratios 2, 1, 3; the ratio of the medians (4 / 3) would be wrong
    assert (wall.median, wall.low, wall.high) == (2.0, 1.0, 3.0)
    assert str(wall) == "2.00x [1.00-3.00]"
    cpu = harness.ratio(a, b)
    assert (cpu.median, cpu.low, cpu.high, cpu.kind) == (0.5, 0.25, 1.0, "cpu")


def test_ratio_and_timing_reject_bad_input():
    with pytest.raises(ValueError, match="paired rounds: 2 vs 1"):
        harness.ratio(harness.Timing([1.0, 1.0], [1.0, 1.0]), harness.Timing([1.0], [1.0]))
    with pytest.raises(ValueError, match=r"kind must be one of \('cpu', 'wall'\)"):
        harness.Timing([1.0], [1.0]).median("gpu")
    with pytest.raises(ValueError, match="repeats >= 1"):
        harness.interleave({"a": lambda: None}, repeats=0)


def test_fix_threads_sets_torch_and_child_environment(monkeypatch):
    before = torch.get_num_threads()
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(variable, "7")
    try:
        assert harness.fix_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert harness.os.environ["OMP_NUM_THREADS"] == "1"
        assert "1 torch threads, allocator " in harness.machine()
    finally:
        torch.set_num_threads(before)


def allocate(mib: int) -> int:
    """Child target: hold ``mib`` MiB of written (resident) bytes."""
    block = b"\x01" * (mib * MiB)
    return len(block)


def spike_then_arm(spike_mib: int, arm_mib: int):
    """Child target: a set-up that touches ``spike_mib`` MiB and frees it, then an arm holding ``arm_mib``."""
    allocate(spike_mib)
    return lambda: allocate(arm_mib)


def test_peak_rss_in_child_sees_what_the_child_allocated():
    target = f"{__file__}:"
    idle = harness.peak_rss_in_child(target + "spike_then_arm", 0, 0)
    busy = harness.peak_rss_in_child(target + "spike_then_arm", 0, 200)
    # two fresh interpreters' resident baselines differ by ~100 KiB, hence the 1 MiB allowance
    assert 199 * MiB <= busy - idle < 220 * MiB
    # the high-water mark is reset after the set-up: its 300 MiB spike is left out
    arm_only = harness.peak_rss_in_child(target + "spike_then_arm", 300, 0)
    assert arm_only < idle + 100 * MiB
    # without an arm callable, the peak counts from the child's start (the spike is in)
    whole = harness.peak_rss_in_child(target + "allocate", 300)
    assert whole - idle >= 250 * MiB


def test_peak_rss_in_child_names_a_failing_target():
    with pytest.raises(RuntimeError, match="'no_such_module_xyz:f'.*exited with 1"):
        harness.peak_rss_in_child("no_such_module_xyz:f")


ROUNDS_OF_THIS_PROCESS = """
import os, sys
import harness

def rounds(n):  # the process id as wall time: shows which process measured which round
    pid = float(os.getpid())
    purge = float(os.environ["MIMALLOC_PURGE_DELAY"])
    kept = "keeps freed memory" in sys.modules["__main__"].machine()  # the child's own harness
    rounds = harness.Timing(wall=[pid] * n, cpu=[float(i) for i in range(n)])
    return {"a": rounds, "env": harness.Timing(wall=[purge], cpu=[float(kept)])}
"""


def test_interleave_in_processes_joins_the_rounds_of_fresh_processes(tmp_path, monkeypatch):
    target = tmp_path / "rounds_target.py"
    target.write_text(ROUNDS_OF_THIS_PROCESS)
    monkeypatch.setenv("MIMALLOC_PURGE_DELAY", "-1")  # timing children keep the caller's allocator settings
    joined = harness.interleave_in_processes(f"{target}:rounds", 3, 2)
    pids = joined["a"].wall
    assert len(pids) == 6 and pids[0::2] == pids[1::2] and len(set(pids)) == 3
    assert os.getpid() not in pids and joined["a"].cpu == [0.0, 1.0] * 3
    assert joined["env"].wall == [-1.0] * 3
    if sys.platform.startswith("linux"):  # every child keeps freed memory: mimalloc or glibc's thresholds
        assert joined["env"].cpu == [1.0] * 3
    with pytest.raises(ValueError, match="processes >= 1"):
        harness.interleave_in_processes(f"{target}:rounds", 0, 2)
    with pytest.raises(RuntimeError, match="interleave_in_processes.*exited with 1"):
        harness.interleave_in_processes(f"{target}:no_such_function", 1, 2)


FAULTS_PER_ROUND = """
import importlib.util, resource, sys, time
spec = importlib.util.spec_from_file_location("harness", sys.argv[1])
harness = sys.modules["harness"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)
if sys.argv[2] == "begin":
    harness.begin("test", threads=1)  # restarts this script under mimalloc
elif sys.argv[2] == "fixed":
    assert harness.fix_allocator()
print(harness.machine())
sizes = [int(size) for size in sys.argv[3].split(",")]

def one_round():  # blocks of the given MiB, every page written, then freed
    blocks = [bytearray(size * 2**20) for size in sizes]
    for block in blocks:
        block[::4096] = bytes(len(range(0, len(block), 4096)))
    del blocks
    time.sleep(0.1)  # longer than mimalloc's default delay before it hands freed memory back (10 ms)

for _ in range(2):  # warm-up: glibc raises its mmap threshold after the first frees
    one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_per_three_rounds(mode: str, sizes_mib: list[int]) -> tuple[str, int]:
    """Run ``FAULTS_PER_ROUND`` in a fresh interpreter (mode ``default``, ``fixed`` or ``begin``); return its
    machine line and the minor page faults of three rounds after warm-up."""
    sizes = ",".join(map(str, sizes_mib))
    command = [sys.executable, "-c", FAULTS_PER_ROUND, str(ROOT / "benchmarks" / "harness.py"), mode, sizes]
    *_, machine, faults = subprocess.run(
        command, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return machine, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_fix_allocator_stops_page_faults_of_memory_freed_by_the_last_call():
    # four 30 MiB blocks: 3 rounds x 120 MiB = 92,160 pages of 4 KiB; by default the trimmed heap faults
    # every page in again
    assert faults_per_three_rounds("default", [30] * 4)[1] > 45_000
    machine, faults = faults_per_three_rounds("fixed", [30] * 4)
    assert "keeps freed memory" in machine and faults < 1_000


@pytest.mark.skipif(harness.mimalloc_library() is None, reason="cmeel-mimalloc (the bench-allocator extra)")
def test_begin_restarts_the_script_under_mimalloc_that_keeps_blocks_glibc_maps_anew():
    # two blocks above glibc's largest mmap threshold (96 MiB) and 32 that mimalloc purges by default
    # (1 MiB): 3 rounds x 224 MiB = 172,032 pages of 4 KiB; glibc unmaps the large blocks on free, even fixed
    blocks = [96, 96] + [1] * 32
    machine, faults = faults_per_three_rounds("fixed", blocks)
    assert "glibc malloc keeps freed memory" in machine and faults > 100_000
    # mimalloc at its default purge delay faults ~4,600 pages of the small blocks in again; never purging: ~3
    machine, faults = faults_per_three_rounds("begin", blocks)
    assert "mimalloc keeps freed memory" in machine and faults < 500


def test_children_get_the_default_allocator_back(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/opt/libfoo.so /x/cmeel.prefix/lib/libmimalloc.so")
    monkeypatch.setenv("MIMALLOC_PURGE_DELAY", "-1")
    monkeypatch.setenv("TL_BENCH_RESTARTED_UNDER_MIMALLOC", "1")
    environment = harness.default_allocator_environment()
    assert environment["LD_PRELOAD"] == "/opt/libfoo.so"
    assert (
        "MIMALLOC_PURGE_DELAY" not in environment and "TL_BENCH_RESTARTED_UNDER_MIMALLOC" not in environment
    )
    monkeypatch.setenv("LD_PRELOAD", "/x/cmeel.prefix/lib/libmimalloc.so")
    assert "LD_PRELOAD" not in harness.default_allocator_environment()


def test_report_appends_rows_to_the_summary(tmp_path, monkeypatch, capsys):
    summary = tmp_path / "rows.jsonl"
    monkeypatch.setenv(harness.SUMMARY_ENV, str(summary))
    rows = [("ours / plain", harness.Ratio(1.5, 1.25, 2.0)), ("step", "12 ms [11-13]")]
    harness.report("loop", rows)
    harness.skip("peers", "opacus is not installed")
    lines = [json.loads(line) for line in summary.read_text().splitlines()]
    assert [(r["title"], r["label"], r["value"]) for r in lines] == [
        ("loop", "ours / plain", "1.50x [1.25-2.00]"),
        ("loop", "step", "12 ms [11-13]"),
        ("peers", "skipped", "opacus is not installed"),
    ]
    assert (lines[0]["median"], lines[0]["low"], lines[0]["high"], lines[0]["kind"]) == (
        1.5,
        1.25,
        2.0,
        "cpu",
    )
    assert "median" not in lines[1]
    out = capsys.readouterr().out
    assert "1.50x [1.25-2.00]" in out and "load average" in out


def test_summary_reports_failed_and_skipped_scripts_and_compares_with_the_previous_run(tmp_path):
    scripts = {
        "bench_ok.py": 'import harness\nharness.report("loop", [("a / b", harness.Ratio(2.0, 1.5, 2.5))])\n',
        "bench_fail.py": "import sys\nsys.exit(3)\n",
        "bench_skip.py": 'import harness\nharness.skip("peers", "opacus is not installed")\n',
    }
    for name, text in scripts.items():
        (tmp_path / name).write_text(text)
    command = [sys.executable, str(ROOT / "benchmarks" / "summary.py"), "--out", str(tmp_path / "out")]
    command += [str(tmp_path / name) for name in scripts]
    first = subprocess.run(command, capture_output=True, text=True)
    second = subprocess.run(command, capture_output=True, text=True)
    assert first.returncode == second.returncode == 1, first.stderr  # a failed script fails make bench
    for out in (first.stdout, second.stdout):
        assert "exit 3" in out and "skipped: opacus is not installed" in out and "failed: bench_fail" in out
    table = second.stdout.split("make bench: ratios")[1]
    assert re.search(
        r"2\.00x \[1\.50-2\.50\] +│ 2\.00x \[1\.50-2\.50\] +│ +\+0\.0%", table
    )  # now, before, change
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert [(r["script"], r["label"]) for r in rows] == [("bench_ok", "a / b"), ("bench_skip", "skipped")]


class TinyClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_default_job_phases_add_up_and_count_every_checkpoint(tmp_path, monkeypatch):
    bench = _load("bench_default_job")
    monkeypatch.setenv(bench.PHASES_ENV, str(tmp_path / "phases.json"))
    launched = time.time()
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=4)
    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path, monitor="val/loss", save_top_k=1),
            ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None, enable_version_counter=False),
            bench.PhaseTimer(),
        ],
    )
    trainer.fit(TinyClassifier(), data, data)
    trainer.test(ckpt_path=trainer.checkpoint_callback.best_model_path, dataloaders=data, weights_only=False)
    ended = time.time()
    run = bench.phases(json.loads((tmp_path / "phases.json").read_text()), launched, ended, cpu=1.0)

    assert run["epochs"] == 3
    best_saves = len(list(tmp_path.glob("epoch=*.ckpt")))  # at least the first epoch's
    assert 3 + best_saves <= run["checkpoints"] <= 6  # "last" every epoch, "best" when it improved
    assert all(seconds >= 0 for seconds in run["phases"].values()), run["phases"]
    assert sum(run["phases"].values()) == pytest.approx(ended - launched, abs=1e-6)
    for name in ("sanity check", "training", "validation", "checkpoint", "test loop"):
        assert run["phases"][name] > 0, name
