"""Relative position in the encoder's attention (hpc_mim/models/relpos.py) against the references:
detectron2's ``add_decomposed_rel_pos`` (transcribed below) and BEiT's bias table formula."""
import pytest
import torch
import torch.nn.functional as F

from evaluation.layer_decay import EncoderModel
from hpc_mim.models.relpos import (
    RelPosAttention,
    add_relative_position,
    get_rel_pos,
    set_grid,
)
from hpc_mim.models.vit import ViTEncoder
from hpc_mim.models.windows import vitdet_features


def encoder(**kw) -> ViTEncoder:
    torch.manual_seed(0)
    return ViTEncoder(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, **kw).eval()


# ---------------------------------------------------------- detectron2, transcribed as reference
def d2_get_rel_pos(q_size, k_size, rel_pos):
    """facebookresearch/detectron2 detectron2/modeling/backbone/utils.py get_rel_pos."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos_resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
                                        size=max_rel_dist, mode="linear")
        rel_pos_resized = rel_pos_resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        rel_pos_resized = rel_pos
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos_resized[relative_coords.long()]


def d2_add_decomposed_rel_pos(attn, q, rel_pos_h, rel_pos_w, q_size, k_size):
    """detectron2 utils.py add_decomposed_rel_pos."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = d2_get_rel_pos(q_h, k_h, rel_pos_h)
    Rw = d2_get_rel_pos(q_w, k_w, rel_pos_w)
    B, _, dim = q.shape
    r_q = q.reshape(B, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
    return (attn.view(B, q_h, q_w, k_h, k_w) + rel_h[:, :, :, :, None]
            + rel_w[:, :, :, None, :]).view(B, q_h * q_w, k_h * k_w)


def d2_attention(attn: RelPosAttention, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """detectron2 vit.py Attention.forward on tokens (B, H*W, C), with ``attn``'s weights."""
    B, (H, W) = x.shape[0], hw
    qkv = attn.qkv(x).reshape(B, H * W, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * attn.num_heads, H * W, -1).unbind(0)
    a = (q * attn.scale) @ k.transpose(-2, -1)
    a = d2_add_decomposed_rel_pos(a, q, attn.rel_pos_h, attn.rel_pos_w, (H, W), (H, W))
    out = (a.softmax(dim=-1) @ v).view(B, attn.num_heads, H, W, -1).permute(0, 2, 3, 1, 4)
    return attn.proj(out.reshape(B, H * W, -1))


@pytest.mark.parametrize("table, grid", [((5, 7), (5, 7)), ((8, 8), (5, 7))])   # 2nd: resized
def test_decomposed_matches_detectron2(table, grid):
    torch.manual_seed(1)
    enc = encoder()
    add_relative_position(enc, "decomposed", table)
    set_grid(enc, grid)
    attn = enc.blocks[0].attn
    with torch.no_grad():
        attn.rel_pos_h.normal_(std=0.5)
        attn.rel_pos_w.normal_(std=0.5)
    assert attn.rel_pos_h.shape == (2 * table[0] - 1, 16) and attn.rel_pos_w.shape == (2 * table[1] - 1, 16)
    x = torch.randn(3, grid[0] * grid[1], 32)
    with torch.no_grad():
        assert torch.allclose(attn(x), d2_attention(attn, x, grid), atol=1e-5)
        for n in (3, 8):
            assert torch.equal(get_rel_pos(n, n, attn.rel_pos_h), d2_get_rel_pos(n, n, attn.rel_pos_h))


def test_windowed_blocks_get_window_tables_and_global_ones_the_grid():
    enc = encoder()
    add_relative_position(enc, "decomposed", (8, 8), window=4, global_blocks=[1, 3])
    sizes = [tuple(b.attn.rel_pos_h.shape[:1]) + tuple(b.attn.rel_pos_w.shape[:1]) for b in enc.blocks]
    assert sizes == [(7, 7), (15, 15), (7, 7), (15, 15)]


def beit_bias(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """BEiT's relative position bias (microsoft/unilm beit, timm beit.py), entry by entry:
    offset (dh, dw) -> row (dh + h - 1) * (2w - 1) + (dw + w - 1); with the cls token first,
    cls -> token, token -> cls and cls -> cls take the table's last three rows."""
    n, d = h * w, (2 * h - 1) * (2 * w - 1)
    out = torch.empty(table.shape[1], n + 1, n + 1)
    for i in range(n + 1):
        for j in range(n + 1):
            if i == 0 and j == 0:
                row = d + 2
            elif i == 0:
                row = d
            elif j == 0:
                row = d + 1
            else:
                (hi, wi), (hj, wj) = divmod(i - 1, w), divmod(j - 1, w)
                row = (hi - hj + h - 1) * (2 * w - 1) + (wi - wj + w - 1)
            out[:, i, j] = table[row]
    return out


def test_table_matches_beit_formula():
    torch.manual_seed(2)
    enc = encoder()
    add_relative_position(enc, "table", (3, 4))
    attn = enc.blocks[2].attn
    assert attn.relative_position_bias_table.shape == (5 * 7 + 3, 2)
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    expected_bias = beit_bias(attn.relative_position_bias_table.detach(), 3, 4)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(2, 13, 3, 2, 16).permute(2, 0, 3, 1, 4)
        probs = ((q @ k.transpose(-2, -1)) * attn.scale + expected_bias).softmax(-1)
        expected = attn.proj((probs @ v).transpose(1, 2).reshape(2, 13, 32))
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_table_with_several_prefix_tokens_gives_each_the_cls_entries():
    enc = encoder(num_cls_tokens=4)
    add_relative_position(enc, "table", (2, 2))
    attn = enc.blocks[0].attn
    with torch.no_grad():
        attn.relative_position_bias_table.copy_(torch.arange(12.0).repeat(2, 1).t())
    bias = attn.table_bias()[0, 0]                                          # (8, 8)
    assert (bias[:4, 4:] == 9).all() and (bias[4:, :4] == 10).all() and (bias[:4, :4] == 11).all()
    assert torch.equal(bias[4:, 4:], beit_bias(torch.arange(12.0)[:, None], 2, 2)[0, 1:, 1:])


@pytest.mark.parametrize("kind", ["decomposed", "table"])
def test_zero_initialised_tables_leave_the_encoder_unchanged(kind):
    enc = encoder()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = enc(x)
        windowed = vitdet_features(enc, x, 4, [1, 3])
        add_relative_position(enc, kind, (8, 8))
        assert all(isinstance(b.attn, RelPosAttention) for b in enc.blocks)
        assert torch.allclose(enc(x), before, rtol=0, atol=1e-6)
    if kind == "decomposed":
        enc2 = encoder()
        add_relative_position(enc2, kind, (8, 8), window=4, global_blocks=[1, 3])
        with torch.no_grad():
            assert torch.allclose(vitdet_features(enc2, x, 4, [1, 3]), windowed, rtol=0, atol=1e-6)
    # the state dict keeps the pre-trained names and adds the tables
    names = set(enc.state_dict())
    assert "blocks.0.attn.qkv.weight" in names and "blocks.3.attn.proj.bias" in names


@pytest.mark.parametrize("kind, names", [("decomposed", ("rel_pos_h", "rel_pos_w")),
                                         ("table", ("relative_position_bias_table",))])
def test_tables_are_fp32_and_decay_with_their_block(kind, names):
    class Model(EncoderModel):
        def __init__(self):
            super().__init__()
            self.encoder = encoder()
            add_relative_position(self.encoder, kind, (8, 8))
    model = Model()
    groups = model.param_groups(0.05, 0.5)
    for i in range(4):
        for n in names:
            p = getattr(model.encoder.blocks[i].attn, n)
            group = next(g for g in groups if any(q is p for q in g["params"]))
            assert group["lr_scale"] == pytest.approx(0.5 ** (4 + 1 - (i + 1)))     # layer i + 1
            assert p.dtype == torch.float32


def test_bf16_autocast_runs_with_fp32_tables():
    enc = encoder()
    add_relative_position(enc, "decomposed", (8, 8), window=4, global_blocks=[3])
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = vitdet_features(enc, torch.randn(1, 3, 32, 32), 4, [3])
    assert out.shape == (1, 32, 8, 8) and torch.isfinite(out).all()
