#!/usr/bin/env bash
# Everything behind README.md, from the repository root: the six fine-tunes (tasks A and B, seeds 0-2),
# then the merged / negated backbones and the table (docs/results/merging/runs/results.json).
#   bash docs/results/merging/run.sh
set -euo pipefail
for seed in 0 1 2; do
  bash docs/results/merging/finetune.sh "$seed"
done
OMP_NUM_THREADS=1 .venv/bin/python docs/results/merging/evaluate.py --seeds 0,1,2
