#!/usr/bin/env bash
# The runs behind README.md: MNIST-5k digits + Fashion-MNIST clothing on one shared EfficientNet-Lite0
# (data=mnist5k_fashion), trained together (equal weights), together with PCGrad, and each task alone
# (the same pipeline and step budget with the other task dropped). Every run: 4 epochs x 50 optimizer
# steps, batch 32 per task, 32x32 images, AdamW lr 1e-3 (as docs/results/domain_adaptation),
# checkpoint chosen on val/acc (the mean over the run's tasks), one thread.
# Usage (from the repository root; Fashion-MNIST needs `make data`):
#   bash docs/results/multitask/run.sh SEED [ARM ...]   ARM: multitask pcgrad alone_digit alone_fashion (default: all)
#   .venv/bin/python docs/results/multitask/table.py
set -euo pipefail
seed=${1:-0}
shift || true
arms=("$@")
[ ${#arms[@]} -gt 0 ] || arms=(multitask pcgrad alone_digit alone_fashion)
out=docs/results/multitask/runs
common=(data=mnist5k_fashion seed="$seed" data.image_size=32 trainer.max_epochs=4 trainer.limit_train_batches=50
  trainer.limit_val_batches=10 module.optimizer.lr=1e-3 logger=none callbacks.rich_progress_bar=null
  +trainer.enable_progress_bar=false)
for arm in "${arms[@]}"; do
  case "$arm" in
    multitask) extra=(strategy=multitask) ;;
    pcgrad) extra=(strategy=multitask_pcgrad) ;;
    alone_digit) extra=(strategy=multitask '~data.tasks.fashion') ;;
    alone_fashion) extra=(strategy=multitask '~data.tasks.digit') ;;
    *) echo "ARM must be multitask|pcgrad|alone_digit|alone_fashion, got $arm" >&2; exit 2 ;;
  esac
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python train.py "${common[@]}" "${extra[@]}" \
    paths.output_dir="$out/${arm}_seed$seed"
done
