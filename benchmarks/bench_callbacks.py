"""Training-step overhead of GradualUnfreeze + LayerwiseLR, measured side by side in one run.

Both arms train the same small convnet with everything trainable (GradualUnfreeze's milestone is 0 and
its warm-up lasts the whole run, so its step hooks fire every step); the only difference is the
callbacks. Arms alternate (A B A B ...) so machine load drifts hit both alike; the median step time of
each arm is compared, as CPU time of the training thread (robust on a shared machine; with
``--threads 1`` all compute runs on that thread) and as wall time.

    python benchmarks/bench_callbacks.py [--steps 60] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

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


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.stamps.append((time.thread_time(), time.perf_counter()))


def median_step(callbacks: list[pl.Callback], steps: int, loader: DataLoader) -> tuple[float, float]:
    """Median (thread CPU, wall) seconds per training step, warm-up steps skipped."""
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[*callbacks, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ConvNet(), loader)
    pairs = list(zip(timer.stamps[5:], timer.stamps[6:], strict=False))
    return (
        statistics.median(b[0] - a[0] for a, b in pairs),
        statistics.median(b[1] - a[1] for a, b in pairs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(512, 3, 32, 32, generator=g), torch.randint(0, 10, (512,), generator=g))
    loader = DataLoader(data, batch_size=32)

    arms = {
        "plain": lambda: [],
        "unfreeze+layerwise": lambda: [
            GradualUnfreeze(milestones=[0], warmup_steps=10**6),
            LayerwiseLR(decay=0.8),
        ],
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    spent = [0.0]
    for _ in range(args.rounds):
        for name, make in arms.items():
            times[name].append(median_step(timed(make(), spent), args.steps, loader))
    for i, clock in enumerate(("cpu", "wall")):
        base = statistics.median(t[i] for t in times["plain"])
        for name, values in times.items():
            t = statistics.median(v[i] for v in values)
            rounds = [round(v[i] * 1e3, 2) for v in values]
            print(f"{clock:>4} {name:>20}: {t * 1e3:7.2f} ms/step  ratio {t / base:.3f}  rounds {rounds}")
    hook_ms = spent[0] / (args.rounds * args.steps) * 1e3
    plain_ms = statistics.median(t[0] for t in times["plain"]) * 1e3
    print(
        f"hooks of GradualUnfreeze+LayerwiseLR: {hook_ms:.3f} ms/step = {hook_ms / plain_ms:.2%} "
        "of a plain step"
    )


if __name__ == "__main__":
    main()
