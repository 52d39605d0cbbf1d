"""Linear-probe epoch with cached backbone features vs recomputing them, side by side in one run.

Both variants train the same linear head on the default data (digits, 64 px) on top of frozen
ImageNet EfficientNet-Lite0 under ``pl.Trainer`` with the ``Freeze`` callback; the cached one wraps
the data in ``CachedFeatureDataModule``. Reported: median train-epoch time after the first epoch
(goal: cached >= 20x faster), the one-off feature extraction, and the test accuracy of both.

Usage::

    python benchmarks/bench_feature_cache.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning.pytorch as pl
import torch

from tl_lightning.backbones import efficientnet_lite0
from tl_lightning.callbacks import Freeze
from tl_lightning.data import DigitsDataModule
from tl_lightning.feature_cache import CachedFeatureDataModule
from tl_lightning.heads import LinearHead
from tl_lightning.module import TransferModule


class _EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def run(cached: bool, epochs: int) -> dict[str, float]:
    pl.seed_everything(0)
    backbone = efficientnet_lite0()
    data = DigitsDataModule(backbone.data_config, image_size=64)
    module = TransferModule(backbone, LinearHead(1280, 10), 10, partial(torch.optim.AdamW, lr=1e-2))
    setup_time = 0.0
    if cached:
        data = CachedFeatureDataModule(data, backbone)
        module.use_cached_features()
        start = time.perf_counter()
        data.setup("fit")
        setup_time = time.perf_counter() - start
    timer = _EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Freeze("backbone"), timer],
    )
    trainer.fit(module, datamodule=data)
    accuracy = trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"]
    return {"epoch": statistics.median(timer.times[1:]), "setup": setup_time, "acc": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    uncached, cached = run(False, args.epochs), run(True, args.epochs)
    print(f"linear probe on digits (1078 train images, 64 px), {torch.get_num_threads()} threads")
    print(f"{'variant':<10}{'epoch s':>10}{'extraction s':>14}{'test acc':>10}")
    for name, result in (("uncached", uncached), ("cached", cached)):
        print(f"{name:<10}{result['epoch']:>10.3f}{result['setup']:>14.2f}{result['acc']:>10.3f}")
    print(f"cached epoch speed-up: {uncached['epoch'] / cached['epoch']:.0f}x (goal >= 20x)")


if __name__ == "__main__":
    main()
