"""ViTDet's windowed attention on the encoder's timm blocks (hpc_mim/models/windows.py)."""
import pytest
import torch

from hpc_mim.models.vit import ViTEncoder
from hpc_mim.models.windows import evenly_spaced, vitdet_features, window_partition, window_unpartition, windowed_block


def test_global_blocks_are_four_evenly_spaced_as_vitdet_b():
    assert evenly_spaced(12) == [2, 5, 8, 11]          # ViTDet's ViT-B
    assert evenly_spaced(24) == [5, 11, 17, 23]        # ViT-L
    assert evenly_spaced(2) == [0, 1]


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (3, 9)])
def test_partition_then_unpartition_is_the_identity_with_padding_cut_off(grid):
    x = torch.randn(2, grid[0] * grid[1], 6)
    windows, padded = window_partition(x, grid, 4)
    assert padded == (-(-grid[0] // 4) * 4, -(-grid[1] // 4) * 4)
    assert windows.shape == (2 * padded[0] * padded[1] // 16, 16, 6)
    assert torch.equal(window_unpartition(windows, grid, padded, 4), x)
    # window (0, 0) of image 0 holds the top-left 4 x 4 tokens, in row order
    top_left = x[0].view(*grid, 6)[:4, :4].reshape(-1, 6)
    rows = min(4, grid[0]) * 4
    assert torch.equal(windows[0].view(4, 4, 6)[:min(4, grid[0]), :min(4, grid[1])],
                       top_left.view(-1, 4, 6)[:, :min(4, grid[1])][:rows // 4])


def encoder(**kw) -> ViTEncoder:
    torch.manual_seed(0)
    return ViTEncoder(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, **kw).eval()


def test_a_window_as_large_as_the_grid_is_global_attention_without_the_cls_token():
    enc = encoder()
    x = torch.randn(2, 3, 32, 32)
    tokens = enc.embed(x)[:, 1:]
    with torch.no_grad():
        expected = tokens
        for block in enc.blocks:
            expected = block(expected)
        got = vitdet_features(enc, x, window=8, global_blocks=[])
    assert torch.allclose(got, expected.transpose(1, 2).reshape(2, 32, 8, 8), atol=1e-5)


def test_windowed_blocks_see_only_their_window_and_global_blocks_join_them():
    enc = encoder()
    x = torch.randn(1, 64, 32)
    block = enc.blocks[0]
    y = windowed_block(block, x, (8, 8), 4)
    x2 = x.clone()
    x2[0, 63] += 5.0                                     # a token of the bottom-right window
    y2 = windowed_block(block, x2, (8, 8), 4)
    changed = (y2 - y).abs().sum(-1)[0].view(8, 8) > 0
    assert changed[4:, 4:].all() and not changed[:4].any() and not changed[:, :4].any()
    reach = lambda run: torch.autograd.grad(run(x.requires_grad_())[0, 0].sum(), x)[0][0, 63]  # noqa: E731
    assert reach(block).abs().sum() > 0                  # global: token 0 attends to token 63
    assert reach(lambda t: windowed_block(block, t, (8, 8), 4)).abs().sum() == 0
    x.requires_grad_(False)
    images = torch.randn(1, 3, 32, 32)
    images2 = images.clone()
    images2[..., 28:, 28:] += 1.0                        # the last patch only
    with torch.no_grad():
        windowed = [vitdet_features(enc, im, 4, []) for im in (images, images2)]
        mixed = [vitdet_features(enc, im, 4, [2]) for im in (images, images2)]
    moved = lambda a, b: ((a - b).abs().sum(1)[0] > 0)              # noqa: E731
    assert not moved(*windowed)[:4, :4].any()           # windows only: the far window untouched
    assert moved(*mixed)[:4, :4].all()                   # one global block reaches everywhere


def test_adaln_blocks_run_whole_per_window_with_the_condition_repeated():
    enc = encoder(num_cls_tokens=4, timestep_cond=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = vitdet_features(enc, x, window=8, global_blocks=[])
        tokens = enc.embed(x)[:, 4:]
        c = enc.condition(x, None)
        for block in enc.blocks:
            tokens = block(tokens, c)
    assert torch.allclose(full, tokens.transpose(1, 2).reshape(2, 32, 8, 8), atol=1e-5)
