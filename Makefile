# hpc_mim: `make demo` and `make test` work on a fresh Debian 12 machine as root
# (they install the Debian packages, create .venv and install the pinned stack first).
PY := .venv/bin/python
METHOD ?= mae
PRESET ?= fmnist_demo
ARGS ?=

.PHONY: setup data demo demo-full bench test check-paper-scale gpu-check slurm-start slurm-stop clean

setup:
	bash scripts/setup.sh

data: setup
	@test -f data/fmnist/train.beton || $(PY) -m data_prep.fashion_mnist --out data/fmnist
	@test -f data/fmnist_scenes/coco/annotations/instances_val2017.json || \
		$(PY) -m data_prep.scenes --out data/fmnist_scenes --train 2000 --val 500 --force

# 8.5-9 min from a fresh clone on 2 AVX-512 cores, ~14-18 min estimated without AVX-512
# (scripts/demo.sh converts the data on first use)
demo: setup
	bash scripts/demo.sh $(METHOD) $(PRESET) $(ARGS)

# the 16-epoch showcase of the README (preset fmnist_tiny, ~75 min on 2 AVX-512 cores)
demo-full: setup
	bash scripts/demo.sh $(METHOD) fmnist_tiny $(ARGS)

# method step, pipeline loop vs plain PyTorch, loader, the last demo's stages (< 15 min)
bench: setup
	@test -f data/fmnist/train.beton || $(PY) -m data_prep.fashion_mnist --out data/fmnist
	$(PY) benchmarks/bench.py --out runs/bench.json $(ARGS)

test: setup
	$(PY) -m pytest -q -rs tests

# every paper recipe and evaluation protocol at its real shapes, on CPU through the local SLURM
# cluster (~1 h on 2 cores; not part of `make test`)
check-paper-scale: setup
	bash scripts/local_slurm.sh start 2
	$(PY) benchmarks/paper_scale.py --out runs/paper_scale $(ARGS)

# on one GPU node: NCCL, bf16 steps and exact resume per method, the evaluations, MAE ViT-B/16
# throughput and MFU (under 10 min; skips with a reason without CUDA). Sets up the GPU profile
# only (the Python stack and its build tools; no SLURM, no datasets, no root needed)
gpu-check:
	bash scripts/setup.sh --gpu-node
	bash scripts/gpu_check.sh $(ARGS)

slurm-start: setup
	bash scripts/local_slurm.sh start 2

slurm-stop:
	bash scripts/local_slurm.sh stop

clean:
	rm -rf runs .pytest_cache
