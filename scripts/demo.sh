#!/usr/bin/env bash
# Convert Fashion-MNIST (once), pre-train METHOD with local processes, run the chained
# evaluations of the preset's `evals` (kNN, linear probe, fine-tuning, segmentation and detection
# on composed scenes, diagnostics; each also for the random-init baseline, the frozen ones for raw
# pixels too), print the comparison table and where the time went (also logged to MLflow).
#   bash scripts/demo.sh [METHOD] [PRESET] [submit.py options...]
#   make demo METHOD=mae      make demo-full      make demo METHOD=lut ARGS="--set train.epochs=4"
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:-mae}
PRESET=${2:-fmnist_demo}
shift $(( $# < 2 ? $# : 2 ))      # the rest goes to submit.py (e.g. --set KEY=VALUE)
PY=.venv/bin/python
start=$(date +%s)
if [ ! -f data/fmnist/train.beton ]; then
  $PY -m data_prep.fashion_mnist --out data/fmnist
fi
if [ ! -f data/fmnist_scenes/coco/annotations/instances_val2017.json ]; then
  $PY -m data_prep.scenes --out data/fmnist_scenes --train 2000 --val 500 --force   # over a partial earlier one
fi
data_s=$(( $(date +%s) - start ))
NAME=demo-$METHOD-$(date +%Y%m%d-%H%M%S)
$PY jobs/submit.py --method "$METHOD" --preset "$PRESET" --cluster local --set "name=$NAME" "$@"
echo
echo "== $METHOD on Fashion-MNIST ($PRESET), $(( $(date +%s) - start )) s =="
$PY -m evaluation.report --run-dir "runs/$NAME" --json "runs/$NAME/report.json"
echo "== where the time went (logged to MLflow as time/*; runs/$NAME/stages.json) =="
$PY -m jobs.stages "runs/$NAME" --extra "data conversion=$data_s" --log-mlflow \
  --json "runs/$NAME/stages.json"
echo "== $(( $(date +%s) - start )) s in all =="
