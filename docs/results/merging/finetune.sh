#!/usr/bin/env bash
# The fine-tunes behind README.md: EfficientNet-Lite0 (ImageNet) fine-tuned in full on digits 0-4
# (task A) and on digits 5-9 (task B), one seed per call, 64 px, 10 epochs (170 optimizer steps).
# Usage: bash docs/results/merging/finetune.sh SEED   (from the repository root)
set -euo pipefail
seed=${1:-0}
for task in A B; do
  if [[ $task == A ]]; then classes="[0,1,2,3,4]"; else classes="[5,6,7,8,9]"; fi
  OMP_NUM_THREADS=1 .venv/bin/python train.py strategy=full_finetune "data.classes=$classes" seed="$seed" \
    trainer.max_epochs=10 logger=none callbacks.rich_progress_bar=null +trainer.enable_progress_bar=false \
    paths.output_dir="docs/results/merging/runs/task${task}_seed${seed}"
done
