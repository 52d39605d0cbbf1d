"""Our Lightning training loop vs a plain PyTorch loop, full fine-tuning vs a frozen backbone.

Every variant trains EfficientNet-Lite0 (the default backbone, ImageNet weights) with a linear head
on the same in-memory digits batches, same optimizer (AdamW), same batch size and resolution. Each
variant runs in its own process, so the peak resident memory printed beside it is its own.

Printed ratios (measured side by side in this one run):

* ``ours / plain`` throughput for full fine-tuning and for the linear probe (goal >= 0.90x);
* frozen step / full step, ours (goal <= 0.25x) and plain PyTorch's for reference.

Usage::

    python benchmarks/bench_training_loop.py [--steps 30] [--batch-size 32] [--image-size 64]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from functools import partial

import lightning.pytorch as pl
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.backbones import efficientnet_lite0
from tl_lightning.callbacks import Freeze
from tl_lightning.heads import LinearHead
from tl_lightning.module import TransferModule


def _batches(steps: int, batch_size: int, image_size: int) -> DataLoader:
    """The same fixed batches for every variant (random images: speed does not depend on content)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(steps * batch_size, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, 10, (steps * batch_size,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


class _StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def run_ours(frozen: bool, steps: int, batch_size: int, image_size: int) -> list[float]:
    """Step times of ``TransferModule`` under ``pl.Trainer`` (our loop, our callbacks)."""
    module = TransferModule(
        efficientnet_lite0(), LinearHead(1280, 10), 10, partial(torch.optim.AdamW, lr=1e-4)
    )
    timer = _StepTimer()
    callbacks = [timer, Freeze("backbone")] if frozen else [timer]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=_batches(steps, batch_size, image_size))
    return timer.times


def run_plain(frozen: bool, steps: int, batch_size: int, image_size: int) -> list[float]:
    """Step times of a hand-written PyTorch loop doing the same work."""
    backbone = efficientnet_lite0()
    backbone.pop_source_head()
    head = LinearHead(1280, 10)
    if frozen:
        backbone.eval().requires_grad_(False)
        params = list(head.parameters())
    else:
        backbone.train()
        params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for x, y in _batches(steps, batch_size, image_size):
        start = time.perf_counter()
        if frozen:
            with torch.no_grad():
                features = backbone(x)
        else:
            features = backbone(x)
        loss = F.cross_entropy(head(features), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def _measure(name: str, frozen: bool, steps: int, batch_size: int, image_size: int, queue) -> None:
    torch.manual_seed(0)
    fn = run_ours if name == "ours" else run_plain
    times = fn(frozen, steps, batch_size, image_size)[3:]  # drop warm-up steps
    queue.put((statistics.median(times), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    results = {}
    for frozen in (False, True):
        for name in ("plain", "ours"):
            queue = context.Queue()
            process = context.Process(
                target=_measure, args=(name, frozen, args.steps, args.batch_size, args.image_size, queue)
            )
            process.start()
            process.join()
            if process.exitcode != 0:
                raise RuntimeError(f"the {name} {'frozen' if frozen else 'full'} variant failed")
            results[(name, frozen)] = queue.get()
    print(
        f"EfficientNet-Lite0, batch {args.batch_size}, {args.image_size}px, "
        f"{torch.get_num_threads()} threads, "
        f"median of {args.steps - 3} steps"
    )
    print(f"{'variant':<26}{'step ms':>10}{'img/s':>10}{'peak RSS MiB':>15}")
    for (name, frozen), (step, rss) in results.items():
        label = f"{name} {'frozen backbone' if frozen else 'full fine-tune'}"
        print(f"{label:<26}{step * 1e3:>10.1f}{args.batch_size / step:>10.1f}{rss:>15.0f}")
    full_ratio = results[("plain", False)][0] / results[("ours", False)][0]
    frozen_ratio = results[("plain", True)][0] / results[("ours", True)][0]
    print(f"throughput ours/plain, full fine-tune: {full_ratio:.2f}x (goal >= 0.90x)")
    print(f"throughput ours/plain, frozen backbone: {frozen_ratio:.2f}x (goal >= 0.90x)")
    ours = results[("ours", True)][0] / results[("ours", False)][0]
    plain = results[("plain", True)][0] / results[("plain", False)][0]
    print(f"frozen step / full step: ours {ours:.2f}x (goal <= 0.25x), plain PyTorch {plain:.2f}x")


if __name__ == "__main__":
    main()
