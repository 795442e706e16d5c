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
    assert "encoder.norm.weight" not in names             # mean pooling: MAE deletes the final norm
    assert scale[id(names["head.weight"])] == (1.0, 0.05)
    assert scale[id(names["fc_norm.bias"])] == (1.0, 0.0)
    assert len(scale) == len(names)                      # every parameter in exactly one group
    cls_model = Classifier(ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=depth, num_heads=2),
                           10, "cls")
    groups = cls_model.param_groups(weight_decay=0.05, layer_decay=decay)
    in_groups = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    names = dict(cls_model.named_parameters())
    assert in_groups[id(names["encoder.norm.weight"])] == 1.0 and "fc_norm.weight" not in names
    assert len(in_groups) == len(names)


def tiny_encoder() -> ViTEncoder:
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=28, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    with torch.no_grad():                                # norms away from identity: the paths differ
        for m in enc.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.5), m.bias.normal_(0.0, 0.5)
    return enc


def test_mean_pooling_classifier_is_maes_global_pool_without_the_final_norm():
    """facebookresearch/mae:models_vit.py, global_pool: fc_norm(mean of the last block's patch
    tokens) -> head; the encoder's norm deleted. The old path (norm -> mean -> fc_norm) differs."""
    enc = tiny_encoder()
    old_norm = enc.norm                                  # the encoder's final LayerNorm
    model = Classifier(enc, 10, "mean").eval()
    with torch.no_grad():
        model.fc_norm.weight.normal_(1.0, 0.5), model.fc_norm.bias.normal_(0.0, 0.5)
        model.head.weight.normal_(0.0, 0.5)
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        tokens = enc.embed(x)
        for block in enc.blocks:
            tokens = block(tokens)                       # (B, 1 + L, D)
        want = model.head(model.fc_norm(tokens[:, enc.num_prefix:].mean(dim=1)))
        old = model.head(model.fc_norm(old_norm(tokens)[:, enc.num_prefix:].mean(dim=1)))
        got = model(x)
    torch.testing.assert_close(got, want)
    assert (got - old).abs().max() > 1e-2
    assert isinstance(model.encoder.norm, torch.nn.Identity)
    assert not any(n.startswith("encoder.norm") for n, _ in model.named_parameters())


def test_cls_pooling_classifier_is_maes_norm_then_cls_token_without_fc_norm():
    enc = tiny_encoder()
    model = Classifier(enc, 10, "cls").eval()
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        tokens = enc.embed(x)
        for block in enc.blocks:
            tokens = block(tokens)
        want = model.head(enc.norm(tokens)[:, 0])
        torch.testing.assert_close(model(x), want)


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
