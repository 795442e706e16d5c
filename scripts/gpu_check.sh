#!/usr/bin/env bash
# One-command check of the GPU path on one GPU node (make gpu-check), in under 10 minutes:
#   tests/gpu: NCCL (1 rank, and 2 when two GPUs are visible); per method 50 bf16 steps of a
#   ViT-S/16 at 224, a checkpoint at step 40 and a resume that reproduces steps 41-50 exactly;
#   fine-tuning 20 steps, segmentation (512 crops) and detection (1024 px) 10 steps each;
#   then benchmarks/gpu_throughput.py: MAE ViT-B/16 img/s, peak GPU memory and MFU.
# Without CUDA the tests are skipped with the reason and the benchmark is not run.
# Needs no dataset: tests/gpu make theirs with data_prep.synthetic, the benchmark uses random batches.
# Output: runs/gpu_check/{pytest.log,throughput.json}
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# the venv's tools first: DeepSpeed's op builds call `ninja` by name, and on a node without
# root the one found may be pip's (a DeepSpeed dependency, in .venv/bin)
export PATH="$PWD/.venv/bin:$PATH"
OUT=runs/gpu_check
mkdir -p "$OUT"
export CUBLAS_WORKSPACE_CONFIG=:4096:8          # deterministic cuBLAS for the exact-resume check
export PYTHONUNBUFFERED=1
$PY - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, "
      f"devices: {torch.cuda.device_count()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
PY
set +e
$PY -m pytest -q -rs tests/gpu "$@" 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
set -e
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  $PY benchmarks/gpu_throughput.py --out "$OUT/throughput.json"
else
  echo "gpu-check: no CUDA device here; the throughput benchmark needs one (tests skipped above)"
fi
exit "$status"
