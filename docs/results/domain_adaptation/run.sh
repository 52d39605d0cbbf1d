#!/usr/bin/env bash
# The runs behind README.md: source_only, dann, mmd on data=mnist5k_to_digits, one seed per call.
# Usage: bash docs/results/domain_adaptation/run.sh SEED   (from the repository root)
# The budget is tiny (40 optimizer steps) because it was measured on a shared 2-core CPU.
set -euo pipefail
seed=${1:-0}
for strategy in source_only dann mmd; do
  .venv/bin/python train.py data=mnist5k_to_digits strategy="$strategy" seed="$seed" \
    monitor=val/source_acc data.image_size=32 data.source.train_per_class=50 \
    trainer.max_epochs=2 +trainer.limit_train_batches=20 +trainer.limit_val_batches=10 \
    module.optimizer.lr=1e-3 logger=none callbacks.rich_progress_bar=null +trainer.enable_progress_bar=false \
    paths.output_dir="docs/results/domain_adaptation/runs/${strategy}_seed${seed}"
done
