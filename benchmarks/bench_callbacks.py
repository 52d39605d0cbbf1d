"""Training-step overhead of GradualUnfreeze + LayerwiseLR, measured side by side in one run.

Both arms train the same small convnet with everything trainable (GradualUnfreeze's milestone is 0 and
its warm-up lasts the whole run, so its step hooks fire every step); the only difference is the
callbacks. One call is a ``trainer.fit`` of ``--steps`` steps; ``harness.interleave`` alternates the arms
(A B A B ...) after a warm-up round, and the ratio of the paired rounds is printed with its spread, in
process CPU time and wall time. The callbacks' own hook time (CPU of the calling thread) is summed per
call and printed per step. That is ~50 us of Python per step, whose median moved 10-18% from one process
to the next, so the rounds are run in ``--processes`` fresh processes (``harness.interleave_in_processes``)
and pooled.

    python benchmarks/bench_callbacks.py [--steps 60] [--repeats 3] [--processes 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import Any

import harness
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.callbacks import GradualUnfreeze, LayerwiseLR


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
    )


class ConvNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            conv_block(3, 32),
            conv_block(32, 64),
            conv_block(64, 96),
            conv_block(96, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(128, 10)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10_000)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


WARMUP = 1
HOOKS = (
    "on_fit_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_optimizer_step",
    "_warm_up",
    "_restore_lrs",
)


def timed(callbacks: list[pl.Callback], spent: list[float]) -> list[pl.Callback]:
    """Wrap the callbacks' hooks (GradualUnfreeze's step hooks too) to add their CPU time to ``spent``."""

    def wrap(hook: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            result = hook(*args, **kwargs)
            spent[0] += time.thread_time() - start
            return result

        return wrapper

    for callback in callbacks:
        for name in HOOKS:
            if hasattr(callback, name):
                setattr(callback, name, wrap(getattr(callback, name)))
    return callbacks


def fit_arm(
    make_callbacks: Callable[[], list[pl.Callback]], steps: int, loader: DataLoader, hook_seconds: list
):
    """One call = ``trainer.fit`` of a fresh ``ConvNet`` for ``steps`` steps; the callbacks' hook CPU time of
    each call is appended to ``hook_seconds``."""

    def call() -> None:
        spent = [0.0]
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            max_epochs=steps,  # an epoch bound too: GradualUnfreeze fails under max_steps alone (reported)
            callbacks=timed(make_callbacks(), spent),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(ConvNet(), loader)
        hook_seconds.append(spent[0])

    return call


def rounds(steps: int, repeats: int) -> dict[str, harness.Timing]:
    """One process's share (``harness.interleave_in_processes`` target): both arms interleaved, per step,
    and the callbacks' hook CPU per step as the arm ``hooks``."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(512, 3, 32, 32, generator=g), torch.randint(0, 10, (512,), generator=g))
    loader = DataLoader(data, batch_size=32)
    hook_seconds: list[float] = []
    arms = {
        "plain": fit_arm(lambda: [], steps, loader, []),
        "unfreeze+layerwise": fit_arm(
            lambda: [GradualUnfreeze(milestones=[0], warmup_steps=10**6), LayerwiseLR(decay=0.8)],
            steps,
            loader,
            hook_seconds,
        ),
    }
    timings = {
        name: t.per(steps) for name, t in harness.interleave(arms, repeats=repeats, warmup=WARMUP).items()
    }
    per_step = [seconds / steps for seconds in hook_seconds[WARMUP:]]
    return timings | {"hooks": harness.Timing(wall=per_step, cpu=per_step)}  # thread CPU; no wall clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3, help="kept rounds per process")
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    title = (
        f"callbacks: small convnet, 32 px, batch 32, {args.steps} steps per call, "
        f"{args.repeats} rounds + {WARMUP} warm-up in each of {args.processes} processes"
    )
    harness.begin(title, args.threads)
    timings = harness.interleave_in_processes("__main__:rounds", args.processes, args.steps, args.repeats)
    hooks = timings.pop("hooks")
    plain, ours = timings["plain"], timings["unfreeze+layerwise"]
    rows = [(f"{name}: CPU per step", t.describe()) for name, t in timings.items()]
    rows += [
        ("GradualUnfreeze+LayerwiseLR / no callbacks, CPU", harness.ratio(ours, plain)),
        ("GradualUnfreeze+LayerwiseLR / no callbacks, wall", harness.ratio(ours, plain, "wall")),
        ("their hooks' CPU per step", hooks.describe()),
        ("their hooks / a plain step, CPU", harness.ratio(hooks, plain)),
    ]
    harness.report(title, rows)


if __name__ == "__main__":
    main()
