"""Where the default job's extras go: each one left out in turn, for full fine-tuning and a frozen backbone.

``bench_training_loop`` measures (Lightning + the job's extras) / bare Lightning as one ratio. Here the
same arms (``bench_training_loop.lightning_arm``'s ``TransferModule``, data and trainer) run with every
extra, with none, and with all but one, interleaved by ``harness.interleave``; what one extra costs is the
round-by-round difference (all) - (all but that one), shown over bare Lightning's time of the same round.
The extras, as ``conf/`` composes them for ``make train``:

* ``validation``: the validation loop over 360 images (the digits validation split) with its metrics;
  left out, the best-checkpoint callback monitors ``train/acc`` instead (one improvement per call either
  way, so the same checkpoint writes);
* ``checkpoints``: best and last ``ModelCheckpoint`` written through the pipeline's
  ``AsyncAtomicCheckpointIO`` (one more arm writes them synchronously, with ``AtomicCheckpointIO``, as the
  pipeline did before: the ratio of both over bare Lightning is the before/after of that change);
* ``logger``: the CSV logger and ``LearningRateMonitor`` (which needs a logger; ``train`` drops it without);
* ``progress bar``: ``RichProgressBar``;
* ``model summary``: Lightning's parameter table at the start of ``fit``;
* ``monitors``: ``TrainableParamsMonitor`` and ``LayerDriftMonitor`` (per-step and per-epoch hooks).

One call is one epoch of the default job: its 1,078 digits training images in 34 steps of 32 and the 360
images of its validation split, so every extra weighs what it weighs per epoch of ``make train``. Costs
paid once per ``fit`` (model summary, the progress bar's set-up, the drift monitor's copy of the backbone)
are paid once per call here but once per run of 10 epochs in the job, so the ratios overstate those. With
``--steps 8`` (the window of earlier runs) validation's 360 images weigh four times what they weigh in the
job.

Costs do not add up exactly to the whole (the pieces interact: validation feeds the checkpoint's monitor).
One more frozen arm validates on cached features (``EvaluateOnCachedFeatures``), as ``train`` does for a
frozen backbone since issue 25 (``feature_cache=auto``: all splits cached for deterministic inputs,
validation and test only for augmented ones); its features are extracted once, outside the timed calls,
as a run extracts them once (one pass over the validation and test images, ~0.1 validation per epoch of
a 10-epoch run). The per-extra frozen rows validate through the backbone, as a run without the cache.

Usage::

    python benchmarks/bench_job_extras.py [--steps 34] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
from collections.abc import Callable

import harness
import lightning.pytorch as pl
from bench_training_loop import CONF, TRAIN_IMAGES, VAL_IMAGES, loader, new_module
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from tl_lightning.callbacks import Freeze
from tl_lightning.run.checkpointing import AsyncAtomicCheckpointIO, AtomicCheckpointIO
from tl_lightning.run.feature_cache import EvaluateOnCachedFeatures, extract_features

EXTRAS = {
    "validation": ["monitor=train/acc"],
    "checkpoints": ["callbacks.model_checkpoint=null", "callbacks.last_checkpoint=null"],
    "logger": ["logger=none", "callbacks.lr_monitor=null"],
    "progress bar": ["callbacks.rich_progress_bar=null"],
    "model summary": [],
    "monitors": ["callbacks.trainable_params=null", "callbacks.layer_drift=null"],
}
"""Extra -> the ``conf/`` overrides that leave it out (validation and the summary are trainer flags)."""


def arm(
    frozen: bool,
    left_out: str | None,
    bare: bool,
    train,
    val,
    folder: str,
    writes: str = "async",
    cached_validation: bool = False,
) -> Callable[[], None]:
    """One ``trainer.fit`` of ``len(train)`` steps with every extra but ``left_out`` (none if ``bare``).

    ``cached_validation``: validation on the frozen backbone's features, extracted here, once (as
    ``train`` does once per run, ``feature_cache=auto`` with a frozen backbone on augmented images).
    """
    module = new_module()
    if cached_validation:
        features = extract_features(module.backbone, val.dataset, val.batch_size)
        val = DataLoader(features, batch_size=val.batch_size)
    overrides = ["strategy=full_finetune", f"paths.output_dir={folder}", "monitor_mode=max"]
    overrides += EXTRAS.get(left_out, [])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    validate = not bare and left_out != "validation"

    def epoch() -> None:
        callbacks = [] if bare else [instantiate(n) for n in cfg.callbacks.values() if n is not None]
        loggers = [] if bare else [instantiate(n) for n in (cfg.logger or {}).values() if n is not None]
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            callbacks=[
                *callbacks,
                *([Freeze("backbone")] if frozen else []),
                *([EvaluateOnCachedFeatures()] if cached_validation else []),
            ],
            logger=loggers or False,
            enable_checkpointing=not bare and left_out != "checkpoints",
            enable_progress_bar=not bare and left_out != "progress bar",
            enable_model_summary=not bare and left_out != "model summary",
            num_sanity_val_steps=0,
            limit_val_batches=1.0 if validate else 0,
            plugins=[AsyncAtomicCheckpointIO() if writes == "async" else AtomicCheckpointIO()],
        )
        trainer.fit(module, train_dataloaders=train, val_dataloaders=val if validate else None)

    return epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per call (default: the job's epoch)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--val-images", type=int, default=VAL_IMAGES)
    args = parser.parse_args()
    images = args.steps * args.batch_size if args.steps else TRAIN_IMAGES
    args.steps = math.ceil(images / args.batch_size)
    title = (
        f"job extras, each left out: EfficientNet-Lite0, batch {args.batch_size}, {args.image_size} px, "
        f"{args.steps} steps + {args.val_images} validation images per call, "
        f"{args.repeats} rounds + 1 warm-up"
    )
    harness.begin(title, args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    pl.seed_everything(0, verbose=False)
    train = loader(images, args.batch_size, args.image_size, seed=0)
    val = loader(args.val_images, args.batch_size, args.image_size, seed=1)
    with tempfile.TemporaryDirectory() as folder:
        arms = {}
        for setting, frozen in (("full", False), ("frozen", True)):
            arms[f"bare {setting}"] = arm(frozen, None, True, train, val, folder)
            arms[f"all {setting}"] = arm(frozen, None, False, train, val, folder)
            arms[f"all, synchronous writes {setting}"] = arm(frozen, None, False, train, val, folder, "sync")
            if frozen:
                arms["all, validation on cached features frozen"] = arm(
                    True, None, False, train, val, folder, cached_validation=True
                )
            for extra in EXTRAS:
                arms[f"without {extra} {setting}"] = arm(frozen, extra, False, train, val, folder)
        timings = harness.interleave(arms, repeats=args.repeats)
    rows: list[tuple[str, str | harness.Ratio]] = []
    for setting in ("full", "frozen"):
        bare, every = timings[f"bare {setting}"], timings[f"all {setting}"]
        rows.append((f"{setting}: (Lightning + job extras) / Lightning, CPU", harness.ratio(every, bare)))
        rows.append((f"{setting}: same, wall", harness.ratio(every, bare, "wall")))
        synchronous = timings[f"all, synchronous writes {setting}"]
        rows.append(
            (
                f"{setting}: same with synchronous checkpoint writes, wall",
                harness.ratio(synchronous, bare, "wall"),
            )
        )
        for extra in EXTRAS:
            cost = every.minus(timings[f"without {extra} {setting}"])
            rows.append((f"{setting}: {extra} / Lightning, CPU", harness.ratio(cost, bare)))
        if setting == "frozen":
            cached = timings["all, validation on cached features frozen"]
            rows.append(
                (
                    "frozen: (Lightning + job extras, validation on cached features) / Lightning, CPU",
                    harness.ratio(cached, bare),
                )
            )
        rows.append((f"{setting}: bare Lightning per call, CPU", bare.describe()))
    harness.report(title, rows)


if __name__ == "__main__":
    main()
