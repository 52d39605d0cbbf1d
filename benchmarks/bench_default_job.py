"""Where the time of the default job goes: ``make train`` (``python train.py``, all defaults), phase by phase.

The real command runs in a child process with two additions that change nothing it computes: its run
directory goes to a temporary folder, and one more callback, :class:`PhaseTimer`, stamps the time (wall
clock, and the child's CPU time) at Lightning's hooks and times every ``trainer.save_checkpoint`` call.
The phases add up to the child's wall time:

* start-up: interpreter, imports, Hydra compose, config checks, data set-up, model build (until the
  callbacks are built), then the trainer and ``fit``'s own set-up; the imports alone (``import hydra,
  tl_lightning.run.pipeline``, what ``train.py`` imports) are timed in a separate child, interleaved;
* sanity-check validation, training epochs (batches, data loading, step hooks), validation, checkpoint
  saving as the training thread sees it (best and last ``ModelCheckpoint``; with the pipeline's
  ``AsyncAtomicCheckpointIO`` that is the tensors' snapshot, the write runs beside training), the rest
  of ``fit`` (epoch-end callbacks and logging), loading the best checkpoint for the test, the test loop,
  and the exit (``metrics.json``, interpreter shutdown).

The job uses torch's default thread count, as ``make train`` does; the child's threads are printed.

Usage::

    python benchmarks/bench_default_job.py [--repeats 1] [ARGS for train.py ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn

ROOT = Path(__file__).resolve().parents[1]
PHASES_ENV = "TL_BENCH_PHASES"


def _stamp() -> tuple[float, float]:
    """(wall clock comparable across processes, this process's CPU seconds)."""
    return time.time(), time.process_time()


class PhaseTimer(pl.Callback):
    """Stamps Lightning's phase boundaries and times checkpoint writes; writes them as JSON at the end.

    Added to the job as ``+callbacks.phase_timer._target_=bench_default_job.PhaseTimer``; the JSON goes
    to the file named by the ``TL_BENCH_PHASES`` environment variable, after the test.
    """

    def __init__(self) -> None:
        self.stamps: dict[str, Any] = {"built": _stamp(), "threads": torch.get_num_threads()}
        self.spans: dict[str, list[tuple[float, float, float, float]]] = {}
        self._open: dict[str, tuple[float, float]] = {}

    def _start(self, name: str) -> None:
        self._open[name] = _stamp()

    def _end(self, name: str) -> None:
        self.spans.setdefault(name, []).append((*self._open.pop(name), *_stamp()))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.stamps[f"setup_{TrainerFn(stage).value}"] = _stamp()
        if stage != "fit":
            return
        save = trainer.save_checkpoint

        def timed_save(filepath, *args, **kwargs) -> None:
            self._start("checkpoint")
            save(filepath, *args, **kwargs)
            self._end("checkpoint")

        trainer.save_checkpoint = timed_save
        writer = trainer.strategy.checkpoint_io  # the innermost writer: it runs when the file is complete
        while getattr(writer, "checkpoint_io", None) is not None:
            writer = writer.checkpoint_io
        write = writer.save_checkpoint

        def counted_write(checkpoint, path, *args, **kwargs) -> None:
            write(checkpoint, path, *args, **kwargs)
            self.stamps.setdefault("checkpoint_bytes", []).append(os.path.getsize(path))

        writer.save_checkpoint = counted_write

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("sanity check")

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end("sanity check")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("training")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._end("training")
            self._start("validation")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._end("validation")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "training" in self._open:  # an epoch without validation
            self._end("training")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("test loop")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end("test loop")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.stamps[f"teardown_{TrainerFn(stage).value}"] = _stamp()
        if stage == "test":
            Path(os.environ[PHASES_ENV]).write_text(json.dumps({"stamps": self.stamps, "spans": self.spans}))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _clock() -> tuple[float, float]:
    """(wall, CPU of finished child processes): what ``harness.interleave`` times the child runs by."""
    return time.perf_counter(), _children_cpu()


def run_job(train_args: list[str], runs: list[dict]) -> None:
    """Run ``python train.py`` once with :class:`PhaseTimer`; append its phases to ``runs``."""
    with tempfile.TemporaryDirectory() as folder:
        phases_file = Path(folder) / "phases.json"
        path = os.pathsep.join(filter(None, [str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))
        env = os.environ | {"PYTHONPATH": path, PHASES_ENV: str(phases_file)}
        command = [sys.executable, "train.py", f"hydra.run.dir={folder}/run", *train_args]
        command.append("+callbacks.phase_timer._target_=bench_default_job.PhaseTimer")
        log = Path(folder) / "job.log"
        launched, cpu = time.time(), _children_cpu()
        with open(log, "w") as out:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        ended, cpu = time.time(), _children_cpu() - cpu
        if code != 0:
            raise RuntimeError(f"{' '.join(command)} exited with {code}:\n{log.read_text()[-3000:]}")
        runs.append(phases(json.loads(phases_file.read_text()), launched, ended, cpu))


def phases(record: dict, launched: float, ended: float, cpu: float) -> dict[str, Any]:
    """Wall seconds per phase (they add up to the child's wall time), from the timer's stamps."""
    stamps, spans = record["stamps"], record["spans"]

    def total(name: str) -> float:
        return sum(end - start for start, _, end, _ in spans.get(name, []))

    fit = stamps["teardown_fit"][0] - stamps["setup_fit"][0]
    inside_fit = ("sanity check", "training", "validation", "checkpoint")
    test_start = spans["test loop"][0][0]
    out = {
        "start-up until the callbacks are built": stamps["built"][0] - launched,
        "trainer and fit set-up": stamps["setup_fit"][0] - stamps["built"][0],
        **{name: total(name) for name in inside_fit},
        "rest of fit (epoch-end callbacks, logging)": fit - sum(total(name) for name in inside_fit),
        "test: load best checkpoint, set-up": test_start - stamps["teardown_fit"][0],
        "test loop": stamps["teardown_test"][0] - test_start,
        "exit (metrics.json, shutdown)": ended - stamps["teardown_test"][0],
    }
    return {
        "phases": out,
        "wall": ended - launched,
        "cpu": cpu,
        "start-up cpu": stamps["built"][1],
        "threads": stamps["threads"],
        "epochs": len(spans.get("training", [])),
        "checkpoints": len(stamps.get("checkpoint_bytes", [])),
        "checkpoint MiB": sum(stamps.get("checkpoint_bytes", [])) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of the job (each ~75 s on 2 quiet cores)"
    )
    parser.add_argument("train_args", nargs="*", help="overrides passed to train.py (none: the default job)")
    args = parser.parse_args()
    title = f"default job: python train.py {' '.join(args.train_args)}".rstrip()
    print(f"{title}\n{harness.machine()}", flush=True)
    runs: list[dict] = []
    imports = [sys.executable, "-c", "import hydra, tl_lightning.run.pipeline"]
    arms = {
        "imports": lambda: subprocess.run(imports, cwd=ROOT, check=True),
        "job": lambda: run_job(args.train_args, runs),
    }
    timings = harness.interleave(arms, repeats=args.repeats, warmup=0, clock=_clock)
    job = timings["job"]
    last = runs[-1]
    rows = [
        ("whole job, wall", job.describe("wall")),
        ("whole job, CPU (all threads)", job.describe("cpu")),
        (
            "job threads / epochs / checkpoints written",
            f"{last['threads']} / {last['epochs']} / "
            f"{last['checkpoints']} ({last['checkpoint MiB']:.0f} MiB)",
        ),
        ("imports alone (separate child), wall", timings["imports"].describe("wall")),
    ]
    for name in last["phases"]:
        seconds = harness.Timing(wall=[run["phases"][name] for run in runs], cpu=[0.0] * len(runs))
        share = seconds.median("wall") / job.median("wall")
        rows.append((f"{name}, wall", f"{seconds.describe('wall')} ({share:.0%})"))
    harness.report(title, rows)


if __name__ == "__main__":
    main()
