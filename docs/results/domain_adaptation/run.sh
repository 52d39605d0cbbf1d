#!/usr/bin/env bash
# The runs behind README.md: source_only, dann, mmd on data=mnist5k_to_digits, one seed per call.
# Usage: bash docs/results/domain_adaptation/run.sh SEED [small|medium]   (from the repository root)
#   small:  50 source images per class, 2 epochs x 20 optimizer steps (40 steps)
#   medium: all 3,000 MNIST-5k training images, 4 epochs x 50 optimizer steps (200 steps)
set -euo pipefail
seed=${1:-0}
budget=${2:-small}
case "$budget" in
  small) budget_args=(data.source.train_per_class=50 trainer.max_epochs=2 trainer.limit_train_batches=20) ;;
  medium) budget_args=(trainer.max_epochs=4 trainer.limit_train_batches=50) ;;
  *) echo "budget must be small or medium, got $budget" >&2; exit 2 ;;
esac
for strategy in source_only dann mmd; do
  .venv/bin/python train.py data=mnist5k_to_digits strategy="$strategy" seed="$seed" \
    monitor=val/source_acc data.image_size=32 "${budget_args[@]}" trainer.limit_val_batches=10 \
    module.optimizer.lr=1e-3 logger=none callbacks.rich_progress_bar=null +trainer.enable_progress_bar=false \
    paths.output_dir="docs/results/domain_adaptation/runs/${budget}/${strategy}_seed${seed}"
done
