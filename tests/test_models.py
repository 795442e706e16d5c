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


def test_other_grids_build_their_sincos_table_once_per_device_and_dtype(monkeypatch):
    """Dense evaluations feed other sizes than img_size (512 px crops, padded detection inputs)
    every step: the table of such a grid is built once, not on the CPU and copied to the device
    every forward, and stays out of the state dict (checkpoints and exports are unchanged)."""
    from hpc_mim.models import vit
    builds = []
    real = vit.sincos_pos_embed
    monkeypatch.setattr(vit, "sincos_pos_embed", lambda *a, **k: builds.append(a[0]) or real(*a, **k))
    enc = ViTEncoder(**CFG).eval()
    builds.clear()                                                 # the default grid's buffer
    keys = list(enc.state_dict())
    x = torch.randn(2, 3, 40, 36)                                  # a 10 x 9 grid, not 7 x 7
    first, second = enc(x), enc(x)
    assert builds == [(10, 9)]                                     # once, for two forwards
    assert torch.equal(first, second)
    assert torch.equal(enc.position_embedding((40, 36)), real((10, 9), 32, 1))  # the uncached table
    enc(torch.randn(1, 3, 28, 28))                                 # the default grid: its buffer
    enc(torch.randn(1, 3, 32, 32))
    assert builds == [(10, 9), (8, 8)]
    assert list(enc.state_dict()) == keys and "_pos_cache" not in str(keys)
    enc.double()                                                   # moved / cast: no stale table
    pos = enc.position_embedding((40, 36))
    assert pos.dtype == torch.float64 and builds == [(10, 9), (8, 8), (10, 9)]
    assert [k[2] for k in enc._pos_cache] == [torch.float64]
    assert torch.equal(pos, real((10, 9), 32, 1).double())
    for side in range(1, 3 * vit.POS_CACHE_SIZE):                 # a few tables, not every shape
        enc.position_embedding((4 * side, 28))
    assert len(enc._pos_cache) == vit.POS_CACHE_SIZE


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
