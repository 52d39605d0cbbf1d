"""Merge fine-tuned backbones by task arithmetic; write one evaluable checkpoint per kept head.

Task vectors ``tau_i = theta_ft_i - theta_pre`` come from ``train.py`` checkpoints (read with
``weights_only=True``); the pretrained base is rebuilt from each checkpoint's recorded backbone config
and must be the same for all of them. The merged backbone ``theta_pre + merge(w_i tau_i)`` is written
into a copy of every ``--heads`` checkpoint (default: the ``--vectors`` ones) as ``OUT/head<i>.ckpt``,
keeping that checkpoint's heads and run config; ``OUT/merge.json`` lists the files and the recipe.

Usage::

    # task A + task B, both heads kept (head0.ckpt: A's head, head1.ckpt: B's head)
    python scripts/merge.py --vectors A.ckpt B.ckpt --weights 0.5 0.5 --out merged
    # forget task B, keep task A's head
    python scripts/merge.py --vectors B.ckpt --weights -0.5 --heads A.ckpt --out negated
    # TIES / DARE through PEFT's merging utilities
    python scripts/merge.py --vectors A.ckpt B.ckpt --weights 1 1 --method ties --density 0.2 --out ties

Evaluate a written checkpoint with the run's own test loop (fit has nothing left to do, the test runs
on the merged weights and ``metrics.json`` is written), or with ``predict.py``/``export.py``::

    python train.py ckpt_path=merged/head0.ckpt <the overrides of A's run> paths.output_dir=eval_A

where ``A.ckpt`` stands for ``<run of task A>/checkpoints/last.ckpt``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tl_lightning.adapters.merging import BN_STATS_MODES, MAJORITY_SIGN_METHODS, METHODS
from tl_lightning.run.checkpointing import AtomicCheckpointIO
from tl_lightning.run.merge import merge_checkpoints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", nargs="+", required=True, help="fine-tuned train.py checkpoints")
    parser.add_argument("--weights", nargs="+", type=float, required=True, help="one coefficient per vector")
    parser.add_argument("--heads", nargs="+", help="checkpoints whose heads are kept (default: --vectors)")
    parser.add_argument("--method", default="task_arithmetic", choices=list(METHODS))
    parser.add_argument("--density", type=float, default=1.0, help="share of entries kept (TIES, DARE)")
    parser.add_argument("--majority-sign", default="total", choices=list(MAJORITY_SIGN_METHODS))
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random drop")
    parser.add_argument("--bn-stats", default="merge", choices=list(BN_STATS_MODES))
    parser.add_argument("--out", type=Path, required=True, help="folder for head<i>.ckpt and merge.json")
    args = parser.parse_args(argv)
    checkpoints = merge_checkpoints(
        args.vectors,
        args.weights,
        args.heads,
        method=args.method,
        density=args.density,
        majority_sign_method=args.majority_sign,
        seed=args.seed,
        bn_stats=args.bn_stats,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    writer = AtomicCheckpointIO()
    files = {}
    for i, checkpoint in enumerate(checkpoints):
        path = args.out / f"head{i}.ckpt"
        writer.save_checkpoint(checkpoint, path)
        files[str(path)] = checkpoint["tl_lightning"]["merge"]["head"]
    recipe = {k: v for k, v in checkpoints[0]["tl_lightning"]["merge"].items() if k != "head"}
    (args.out / "merge.json").write_text(json.dumps({"files": files, **recipe}, indent=2))
    for path, head in files.items():
        print(f"{path}: merged backbone with the head of {head}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
