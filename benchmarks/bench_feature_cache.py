"""Linear-probe training with cached backbone features vs recomputing them, side by side in one run.

Both arms train a linear head on the default data (digits, 64 px) on top of frozen ImageNet
EfficientNet-Lite0 under ``pl.Trainer`` with the ``Freeze`` callback; the cached one wraps the data in
``CachedFeatureDataModule``. One call is a ``trainer.fit`` of ``--epochs`` epochs (validation off), so the
per-epoch time includes a share of ``fit``'s start-up; a third arm times the one-off feature extraction
(train, validation and test splits). Arms are interleaved by ``harness.interleave`` after a warm-up round.
Printed: CPU per epoch of both arms, the speed-up with its spread (goal: cached >= 20x faster), the
extraction in uncached epochs, and the test accuracy of both heads (same data, same number of epochs).

Usage::

    python benchmarks/bench_feature_cache.py [--epochs 1] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from functools import partial

import harness
import lightning.pytorch as pl
import torch

from tl_lightning.backbones import efficientnet_lite0
from tl_lightning.callbacks import Freeze
from tl_lightning.data import DigitsDataModule
from tl_lightning.modules.heads import LinearHead
from tl_lightning.modules.transfer import TransferModule
from tl_lightning.run.feature_cache import CachedFeatureDataModule

SPLITS = ("train", "val", "test")


def trainer(epochs: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Freeze("backbone")],
    )


def probe(cached: bool, epochs: int) -> tuple[TransferModule, pl.LightningDataModule, Callable[[], None]]:
    """A linear probe on digits and a call that trains it for ``epochs`` epochs."""
    pl.seed_everything(0, verbose=False)
    backbone = efficientnet_lite0()
    data = DigitsDataModule(backbone.data_config, image_size=64)
    module = TransferModule(backbone, LinearHead(1280, 10), 10, partial(torch.optim.AdamW, lr=1e-2))
    if cached:
        data = CachedFeatureDataModule(data, backbone)
        module.use_cached_features()
    data.setup("fit")
    if cached:
        data.features("train")  # extracted once here; the timed fits reuse it (the "extraction" arm times it)
    return module, data, lambda: trainer(epochs).fit(module, datamodule=data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs per call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    title = (
        f"feature cache: linear probe on digits (1,078 train images, 64 px), {args.epochs} epochs per call, "
        f"{args.repeats} rounds + 1 warm-up"
    )
    harness.begin(title, args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    uncached_module, images, uncached = probe(False, args.epochs)
    cached_module, features, cached = probe(True, args.epochs)
    backbone = cached_module.backbone
    arms = {
        "uncached": uncached,
        "cached": cached,
        "extraction": lambda: [CachedFeatureDataModule(images, backbone).features(s) for s in SPLITS],
    }
    timings = harness.interleave(arms, repeats=args.repeats)
    uncached_epoch, cached_epoch = (timings[name].per(args.epochs) for name in ("uncached", "cached"))
    accuracy = {
        name: trainer(1).test(module, datamodule=data, verbose=False)[0]["test/acc"]
        for name, module, data in (("uncached", uncached_module, images), ("cached", cached_module, features))
    }
    harness.report(
        title,
        [
            ("uncached: CPU per epoch", uncached_epoch.describe()),
            ("cached: CPU per epoch", cached_epoch.describe()),
            (
                "speed-up uncached / cached epoch, CPU (goal >= 20x)",
                harness.ratio(uncached_epoch, cached_epoch),
            ),
            ("speed-up uncached / cached epoch, wall", harness.ratio(uncached_epoch, cached_epoch, "wall")),
            ("extraction (train+val+test): CPU", timings["extraction"].describe()),
            ("extraction / uncached epoch, CPU", harness.ratio(timings["extraction"], uncached_epoch)),
            ("test accuracy uncached / cached", f"{accuracy['uncached']:.3f} / {accuracy['cached']:.3f}"),
        ],
    )


if __name__ == "__main__":
    main()
