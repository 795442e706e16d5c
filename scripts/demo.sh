#!/usr/bin/env bash
# Pre-train METHOD on Fashion-MNIST with local processes, run the chained evaluations of the
# preset's `evals` (kNN, linear probe, fine-tuning, segmentation and detection on composed
# scenes; each also for the random-init baseline, the frozen ones for raw pixels too), and print
# the comparison table.
#   bash scripts/demo.sh [METHOD] [PRESET] [submit.py options...]
#   make demo METHOD=mae      make demo METHOD=lut ARGS="--set train.epochs=4"
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:-mae}
PRESET=${2:-fmnist_tiny}
shift $(( $# < 2 ? $# : 2 ))      # the rest goes to submit.py (e.g. --set KEY=VALUE)
NAME=demo-$METHOD-$(date +%Y%m%d-%H%M%S)
start=$(date +%s)
.venv/bin/python jobs/submit.py --method "$METHOD" --preset "$PRESET" --cluster local --set "name=$NAME" "$@"
echo
echo "== $METHOD on Fashion-MNIST ($PRESET), $(( $(date +%s) - start )) s =="
.venv/bin/python -m evaluation.report --run-dir "runs/$NAME" --json "runs/$NAME/report.json"
