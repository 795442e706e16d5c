"""``make check-paper-scale``'s memory column (benchmarks/paper_scale.py ``stage_model``): the
activation memory is extrapolated to the batch one GPU really holds under the recipe. Fine-tuning
runs on as many GPUs as pre-training (``eval.finetune.nodes: 0``) with its batch spread over
them, so its per-GPU batch is finetune.batch_size / (train.batch_size / train.micro_batch_size),
not the unset ``micro_batch_size`` (0, which priced the column at 0 GB)."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO
from hpc_mim.config import load_config
from hpc_mim.methods import REGISTRY
from hpc_mim.models.vit import ViTEncoder, save_encoder


def load_paper_scale():
    spec = importlib.util.spec_from_file_location("paper_scale", REPO / "benchmarks" / "paper_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_finetune_memory_is_priced_at_the_real_per_gpu_batch(tmp_path, method):
    paper_scale = load_paper_scale()
    cfg = load_config(method)                    # the paper recipe, no CPU overrides
    # the architecture comes from the run's encoder.pt; a small one keeps the test fast
    save_encoder(ViTEncoder(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2),
                 tmp_path / "encoder.pt")
    _, _, per_gpu, bf16 = paper_scale.stage_model("finetune", cfg, tmp_path)
    gpus = cfg.train.batch_size // cfg.train.micro_batch_size       # ViT-B/16 recipes: 4096 / 64
    assert cfg.eval.finetune.nodes == 0 and cfg.eval.finetune.micro_batch_size == 0
    assert per_gpu == cfg.eval.finetune.batch_size // gpus > 0
    assert per_gpu == {"umd": 64}.get(method, 16)     # 1024 over 16 GPUs (UMD) or 64 GPUs
    assert bf16
    # a recipe that sets its micro batch is priced at it
    cfg.eval.finetune.micro_batch_size = 32
    assert paper_scale.stage_model("finetune", cfg, tmp_path)[2] == 32
