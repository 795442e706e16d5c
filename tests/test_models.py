import torch

from hpc_mim.models import ViTEncoder, load_encoder, save_encoder

CFG = dict(img_size=28, patch_size=4, in_chans=3, embed_dim=32, depth=3, num_heads=2,
           mlp_ratio=4.0, drop_path=0.0)


def test_encoder_shapes_full_and_masked():
    enc = ViTEncoder(**CFG).eval()
    x = torch.randn(2, 3, 28, 28)
    assert enc(x).shape == (2, 1 + 49, 32)
    ids = torch.tensor([[0, 5, 7], [1, 2, 48]])
    assert enc(x, ids).shape == (2, 4, 32)
    assert enc.pooled(x, "cls").shape == enc.pooled(x, "mean").shape == (2, 32)


def test_masked_embedding_selects_the_kept_tokens():
    # attention over a subset differs from the full forward, but the embedded tokens must match
    enc = ViTEncoder(**CFG).eval()
    x = torch.randn(1, 3, 28, 28)
    ids = torch.tensor([[3, 10]])
    full = enc.embed(x)
    sub = enc.embed(x, ids)
    assert torch.allclose(sub[:, 1:], full[:, 1 + ids[0]])
    assert torch.allclose(sub[:, 0], full[:, 0])


def test_sincos_position_embedding_is_fixed_and_distinct():
    enc = ViTEncoder(**CFG)
    pos = enc.pos_embed[0]
    assert pos.shape == (50, 32) and torch.count_nonzero(pos[0]) == 0    # cls slot is zero
    assert "pos_embed" not in dict(enc.named_parameters())
    assert torch.unique(pos[1:], dim=0).shape[0] == 49


def test_forward_intermediates_shapes():
    enc = ViTEncoder(**CFG)
    feats = enc.forward_intermediates(torch.randn(2, 3, 28, 28), [0, 2])
    assert [f.shape for f in feats] == [(2, 32, 7, 7)] * 2


def test_export_round_trip(tmp_path):
    enc = ViTEncoder(**CFG).eval()
    save_encoder(enc, tmp_path / "encoder.pt")
    again = load_encoder(tmp_path / "encoder.pt").eval()
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(enc(x), again(x))


def test_conditioned_multi_cls_encoder_exports_its_architecture(tmp_path):
    """UMD's encoder (4 cls tokens, AdaLN timestep conditioning) must come back as itself from
    encoder.pt, for the evaluations and for their random-init baseline alike."""
    enc = ViTEncoder(**CFG, num_cls_tokens=4, timestep_cond=True).eval()
    for block in enc.blocks:
        torch.nn.init.normal_(block.modulation[1].weight, std=0.1)
    save_encoder(enc, tmp_path / "encoder.pt")
    again = load_encoder(tmp_path / "encoder.pt").eval()
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(enc(x), again(x)) and again(x).shape == (2, 4 + 49, 32)
    fresh = load_encoder(tmp_path / "encoder.pt", weights=False)
    assert fresh.num_prefix == 4 and fresh.t_embed is not None
    assert fresh.forward_intermediates(x, [1])[0].shape == (2, 32, 7, 7)


def test_adaln_blocks_start_as_identity():
    enc = ViTEncoder(**CFG, timestep_cond=True).eval()
    x = torch.randn(2, 3, 28, 28)
    tokens = enc.embed(x)
    assert torch.allclose(enc(x), enc.norm(tokens), atol=1e-6)            # adaLN-Zero
