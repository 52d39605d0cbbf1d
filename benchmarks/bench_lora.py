"""LoRA vs full fine-tuning: training-step time and peak memory on the default job's model and batch.

Two arms on EfficientNet-Lite0 (ImageNet weights) + a linear head for 10 classes, the default job's
batch (32 images of 64 px), fixed random batches, interleaved by ``harness.interleave``; one call is
``--steps`` training steps (forward, cross-entropy, ``zero_grad``, backward, optimizer step):

* ``full_finetune``: every weight trains, BatchNorm in train mode (``strategy=full_finetune``);
* ``lora``: ``strategy=lora``'s adapters (``conf/strategy/lora.yaml``: rank 8 on the pointwise
  convolutions and ``conv_head``), the base frozen with its BatchNorm in eval mode.

Both take the optimizer ``TransferModule.configure_optimizers`` builds (AdamW over the named layer
groups; frozen parameters get no gradient and no update), no LR scheduler. Peak memory is each arm's
resident high-water mark in a fresh child process (``harness.peak_rss_in_child``), counted from after
its set-up (model built, batches made) to the end of its steps, so what the set-up holds counts and
its spikes do not.

Usage::

    python benchmarks/bench_lora.py [--steps 4] [--repeats 5] [--threads 1] [--batch-size 32]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from pathlib import Path

import harness
import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from tl_lightning.adapters.peft import keep_changed_only, lora
from tl_lightning.backbones import efficientnet_lite0
from tl_lightning.modules.heads import LinearHead
from tl_lightning.modules.transfer import TransferModule

CONF = Path(__file__).resolve().parents[1] / "conf"
CLASSES = 10
ARMS = ("full_finetune", "lora")


def new_module(strategy: str) -> TransferModule:
    """The module ``strategy`` trains, with that strategy's learning rate and weight decay."""
    settings = OmegaConf.load(CONF / "strategy" / f"{strategy}.yaml")
    backbone = efficientnet_lite0()
    if "adapter" in settings:
        adapter = {k: v for k, v in settings.adapter.items() if k != "_target_"}
        backbone = lora(backbone, **adapter)
    decay = OmegaConf.select(settings, "module.weight_decay", default=0.01)
    optimizer = partial(torch.optim.AdamW, lr=settings.module.optimizer.lr)
    module = TransferModule(
        backbone, LinearHead(backbone.num_features, CLASSES), CLASSES, optimizer, weight_decay=decay
    )
    if "adapter" in settings:
        keep_changed_only(module)
    return module.train()


def arm(strategy: str, steps: int, batch_size: int, image_size: int) -> Callable[[], None]:
    """One call: ``steps`` training steps of a fresh ``strategy`` module (set up outside the call)."""
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(batch_size, 3, image_size, image_size, generator=generator),
            torch.randint(0, CLASSES, (batch_size,), generator=generator),
        )
        for _ in range(steps)
    ]
    module = new_module(strategy)
    optimizer = module.configure_optimizers()

    def run() -> None:
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(module(x), y).backward()
            optimizer.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps per call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    title = (
        f"LoRA vs full fine-tuning: EfficientNet-Lite0, batch {args.batch_size}, {args.image_size} px, "
        f"{args.steps} steps per call, {args.repeats} rounds + 1 warm-up"
    )
    harness.begin(title, args.threads)
    torch.manual_seed(0)
    sizes = (args.steps, args.batch_size, args.image_size)
    timings = harness.interleave({name: arm(name, *sizes) for name in ARMS}, repeats=args.repeats)
    steps = {name: timing.per(args.steps) for name, timing in timings.items()}
    peaks = {name: harness.peak_rss_in_child("__main__:arm", name, *sizes) for name in ARMS}
    trainable = {}
    for name in ARMS:
        params = list(new_module(name).parameters())
        trainable[name] = sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)
    rows = [(f"{name}: CPU per step", timing.describe()) for name, timing in steps.items()]
    rows += [
        ("lora / full_finetune step, CPU", harness.ratio(steps["lora"], steps["full_finetune"])),
        ("lora / full_finetune step, wall", harness.ratio(steps["lora"], steps["full_finetune"], "wall")),
    ]
    rows += [(f"{name}: peak RSS (child)", f"{peaks[name] / 2**20:.0f} MiB") for name in ARMS]
    rows.append(("lora / full_finetune peak RSS", f"{peaks['lora'] / peaks['full_finetune']:.2f}x"))
    rows.append(
        ("full_finetune - lora peak RSS", f"{(peaks['full_finetune'] - peaks['lora']) / 2**20:.0f} MiB")
    )
    rows += [(f"{name}: trainable fraction", f"{trainable[name]:.4f}") for name in ARMS]
    harness.report(title, rows)


if __name__ == "__main__":
    main()
