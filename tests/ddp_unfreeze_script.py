"""Two-process CPU DDP run that unfreezes the backbone mid-training; each rank saves its parameters.

Usage: ``python tests/ddp_unfreeze_script.py OUT_DIR [--no-sync]``. Lightning relaunches this script
for rank 1. ``--no-sync`` disables GradualUnfreeze's gradient averaging of late-unfrozen parameters,
reproducing Lightning #20340 (ranks silently diverge).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from callback_helpers import TinyModel, dataloader, make_trainer

from tl_lightning.callbacks import GradualUnfreeze


class UnsyncedGradualUnfreeze(GradualUnfreeze):
    """GradualUnfreeze without the all-reduce of late-unfrozen gradients."""

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        pass


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    callback_cls = UnsyncedGradualUnfreeze if "--no-sync" in sys.argv else GradualUnfreeze
    model = TinyModel(optim="trainable", optimizer="adam", lr=0.01)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(
        out, 3, [callback_cls(milestones=[1, 2])], devices=2, strategy="ddp", use_distributed_sampler=True
    )
    # 64 samples: each rank gets its own 32 (DistributedSampler), 4 steps per epoch
    trainer.fit(model, dataloader(n=64))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"initial": initial, "final": params}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
