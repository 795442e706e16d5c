import pytest
import torch
from timm.scheduler import CosineLRScheduler

from evaluation.finetune import Classifier
from hpc_mim.models.vit import ViTEncoder


def test_layer_decay_assigns_decay_power_per_block_and_one_to_the_head():
    depth, decay = 4, 0.5
    model = Classifier(ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=depth, num_heads=2), 10, "mean")
    groups = model.param_groups(weight_decay=0.05, layer_decay=decay)
    scale = {}
    for g in groups:
        for p in g["params"]:
            scale[id(p)] = (g["lr_scale"], g["weight_decay"])
    names = dict(model.named_parameters())
    # MAE's lrd: embeddings decay^(depth + 1), block i decay^(depth - i), final norm and head 1
    assert scale[id(names["encoder.patch_embed.proj.weight"])] == (decay ** (depth + 1), 0.05)
    assert scale[id(names["encoder.cls_token"])] == (decay ** (depth + 1), 0.0)   # no decay on cls
    for i in range(depth):
        assert scale[id(names[f"encoder.blocks.{i}.attn.qkv.weight"])] == (decay ** (depth - i), 0.05)
        assert scale[id(names[f"encoder.blocks.{i}.norm1.weight"])] == (decay ** (depth - i), 0.0)
    assert scale[id(names["encoder.norm.weight"])] == (1.0, 0.0)
    assert scale[id(names["head.weight"])] == (1.0, 0.05)
    assert scale[id(names["fc_norm.bias"])] == (1.0, 0.0)
    assert len(scale) == len(names)                      # every parameter in exactly one group


def test_timm_scheduler_applies_the_scale_to_each_group():
    model = Classifier(ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2), 10, "mean")
    opt = torch.optim.AdamW(model.param_groups(0.05, 0.5), lr=1e-3)
    sched = CosineLRScheduler(opt, t_initial=100, warmup_t=0, t_in_epochs=False)
    sched.step_update(0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])


def test_encoder_accepts_other_sizes_with_the_sincos_embedding_of_their_grid():
    enc = ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    assert torch.equal(enc.position_embedding((28, 28)), enc.pos_embed)
    pos = enc.position_embedding((64, 32))                       # 16 x 8 grid
    assert pos.shape == (1, 1 + 16 * 8, 32)
    assert torch.equal(pos[:, :1], enc.pos_embed[:, :1])         # the cls slot stays zero
    # the patches the two grids share keep their pre-training embedding (same spacing)
    torch.testing.assert_close(pos[0, 1:].view(16, 8, 32)[:7, :7], enc.pos_embed[0, 1:].view(7, 7, 32))
    assert enc(torch.randn(1, 3, 64, 32)).shape == (1, 1 + 128, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc(torch.randn(1, 3, 30, 28))
