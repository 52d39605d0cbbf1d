"""Our Lightning training loop vs a plain PyTorch loop.

Two arms per setting (full fine-tuning; frozen backbone), all on one ``TransferModule`` (EfficientNet-Lite0,
ImageNet weights, linear head) and the same in-memory batches, run interleaved by ``harness.interleave``.
One call is one "epoch" of ``--steps`` training steps, timed whole (data iteration, forward, loss,
``zero_grad``, backward, optimizer step):

* ``plain``: a hand-written loop over the module's backbone and head; frozen = backbone in eval mode
  with ``requires_grad`` off, as ``Freeze`` leaves it;
* ``lightning``: ``trainer.fit`` of the module with logger, progress bar, checkpointing and validation off
  (``Freeze("backbone")`` in the frozen setting); its ``training_step`` also updates the accuracy/F1
  metrics and logs, and every call pays ``fit``'s start-up.

What the default job's extras (checkpoints, monitors, progress bar, logger, validation) add on top is
measured by ``bench_job_extras`` over one epoch of the default job (with one frozen arm validating on
cached features, as ``train`` does); here a ``lightning + job extras`` arm appears only in the peak-memory
rows.

Both loops use the optimizer ``configure_optimizers`` builds (AdamW, lr 1e-3, weight decay 0.01 in the
layer groups, 0 in their ``/no_decay`` twins for norms and biases, the same groups), no LR scheduler.
Printed: time per step of each arm (median, min-max), paired-round ratios with their spread, and the peak
resident memory of one full fine-tuning epoch of each arm, each in a fresh child process (high-water mark
reset after building the model and data; ``--no-memory`` skips it).

Usage::

    python benchmarks/bench_training_loop.py [--steps 8] [--repeats 5] [--threads 1] [--no-memory]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import harness
import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.backbones import efficientnet_lite0
from tl_lightning.callbacks import Freeze
from tl_lightning.modules.heads import LinearHead
from tl_lightning.modules.optim import named_param_groups
from tl_lightning.modules.transfer import TransferModule
from tl_lightning.run.checkpointing import AsyncAtomicCheckpointIO

CONF = Path(__file__).resolve().parents[1] / "conf"
CLASSES = 10
LR, WEIGHT_DECAY = 1e-3, 0.01
VAL_IMAGES = 360  # the default job's digits validation split (20% of 1,797)
TRAIN_IMAGES = 1078  # and its training split (the remaining 60%): one epoch


def loader(images: int, batch_size: int, image_size: int, seed: int) -> DataLoader:
    """Fixed random batches (speed does not depend on content), the same for every arm."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 3, image_size, image_size, generator=generator)
    y = torch.randint(0, CLASSES, (images,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def new_module() -> TransferModule:
    torch.manual_seed(0)
    optimizer = partial(torch.optim.AdamW, lr=LR)
    return TransferModule(
        efficientnet_lite0(), LinearHead(1280, CLASSES), CLASSES, optimizer, weight_decay=WEIGHT_DECAY
    )


def plain_arm(frozen: bool, train: DataLoader) -> Callable[[], None]:
    """One epoch of a hand-written loop with ``configure_optimizers``' optimizer and groups."""
    module = new_module()
    groups = named_param_groups(module, module.layer_groups(), WEIGHT_DECAY)
    optimizer = torch.optim.AdamW(groups, lr=LR)
    backbone, head = module.backbone, module.heads["target"]
    if frozen:
        backbone.requires_grad_(False)

    def epoch() -> None:
        module.train()
        if frozen:
            backbone.eval()
        for x, y in train:
            loss = F.cross_entropy(head(backbone(x)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return epoch


def job_extras(folder: str) -> Callable[[], tuple[list[pl.Callback], list]]:
    """A factory of the default job's callbacks and logger, composed from ``conf/`` like ``make train``'s
    (strategy callbacks left out: they are not extras)."""
    overrides = ["strategy=full_finetune", f"paths.output_dir={folder}", "monitor_mode=max"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)

    def build() -> tuple[list[pl.Callback], list]:
        callbacks = [instantiate(node) for node in cfg.callbacks.values() if node is not None]
        return callbacks, [instantiate(node) for node in cfg.logger.values() if node is not None]

    return build


def lightning_arm(
    frozen: bool, extras: bool, train: DataLoader, val: DataLoader, folder: str
) -> Callable[[], None]:
    """One ``trainer.fit`` of ``len(train)`` steps, with or without the default job's extras."""
    module = new_module()
    build_extras = job_extras(folder) if extras else lambda: ([], [])

    def epoch() -> None:
        callbacks, loggers = build_extras()
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            callbacks=[*callbacks, *([Freeze("backbone")] if frozen else [])],
            logger=loggers or False,
            enable_checkpointing=extras,
            enable_progress_bar=extras,
            enable_model_summary=extras,
            num_sanity_val_steps=0,
            limit_val_batches=1.0 if extras else 0,
            plugins=[AsyncAtomicCheckpointIO()],
        )
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val if extras else None)

    return epoch


def memory_arm(arm: str, steps: int, batch_size: int, image_size: int) -> Callable[[], None]:
    """``harness.peak_rss_in_child`` target: build one full fine-tuning arm, return one epoch of it (the
    part whose peak is read; the high-water mark is reset after this set-up)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    train = loader(steps * batch_size, batch_size, image_size, seed=0)
    if arm == "plain":
        return plain_arm(False, train)
    folder = tempfile.TemporaryDirectory()
    epoch = lightning_arm(
        False, arm == "lightning+extras", train, loader(VAL_IMAGES, batch_size, image_size, 1), folder.name
    )

    def run() -> None:
        try:
            epoch()
        finally:
            folder.cleanup()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps per call (one epoch)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--no-memory", action="store_true", help="skip the child-process peak memory rows")
    args = parser.parse_args()
    title = (
        f"training loop: EfficientNet-Lite0, batch {args.batch_size}, {args.image_size} px, "
        f"{args.steps} steps per call, {args.repeats} rounds + 1 warm-up"
    )
    harness.begin(title, args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners and tips
    pl.seed_everything(0, verbose=False)
    train = loader(args.steps * args.batch_size, args.batch_size, args.image_size, seed=0)
    val = loader(VAL_IMAGES, args.batch_size, args.image_size, seed=1)
    with tempfile.TemporaryDirectory() as folder:
        arms = {}
        for setting, frozen in (("full", False), ("frozen", True)):
            arms[f"plain {setting}"] = plain_arm(frozen, train)
            arms[f"lightning {setting}"] = lightning_arm(frozen, False, train, val, folder)
        timings = harness.interleave(arms, repeats=args.repeats)
    steps = {name: timing.per(args.steps) for name, timing in timings.items()}
    rows = [(f"{name}: CPU per step", timing.describe()) for name, timing in steps.items()]
    for setting in ("full", "frozen"):
        plain, ours = steps[f"plain {setting}"], steps[f"lightning {setting}"]
        rows += [
            (f"{setting}: Lightning / plain, CPU", harness.ratio(ours, plain)),
            (f"{setting}: Lightning / plain, wall", harness.ratio(ours, plain, "wall")),
        ]
    for arm in ("plain", "lightning"):
        rows.append(
            (f"{arm}: frozen / full step, CPU", harness.ratio(steps[f"{arm} frozen"], steps[f"{arm} full"]))
        )
    if not args.no_memory:
        for arm in ("plain", "lightning", "lightning+extras"):
            peak = harness.peak_rss_in_child(
                "__main__:memory_arm", arm, args.steps, args.batch_size, args.image_size
            )
            rows.append((f"{arm} full: peak RSS of one epoch (fresh child)", f"{peak / 2**20:.0f} MiB"))
    harness.report(title, rows)


if __name__ == "__main__":
    main()
