import pytest
import torch

from hpc_mim.masking import gather_tokens, patchify, random_masking, unpatchify


@pytest.mark.parametrize("num_patches, ratio", [(49, 0.75), (196, 0.75), (64, 0.5), (49, 0.0), (10, 0.95)])
def test_random_masking_keeps_exact_count(num_patches, ratio):
    m = random_masking(8, num_patches, ratio, torch.device("cpu"), torch.Generator().manual_seed(0))
    keep = int(num_patches * (1 - ratio))
    assert m.ids_keep.shape == (8, keep)
    assert (m.mask.sum(1) == num_patches - keep).all()
    # visible positions are exactly ids_keep, and ids_restore inverts the shuffle
    visible = torch.zeros_like(m.mask).scatter_(1, m.ids_keep, 1.0)
    assert torch.equal(visible, 1 - m.mask)
    # the decoder's contract: [kept tokens, mask tokens] gathered by ids_restore puts every
    # kept token back at its own position and a mask token exactly where mask == 1
    tokens = torch.arange(num_patches).repeat(8, 1)
    placed = torch.cat([torch.gather(tokens, 1, m.ids_keep),
                        torch.full((8, num_patches - keep), -1)], dim=1)
    placed = torch.gather(placed, 1, m.ids_restore)
    assert torch.equal(placed == -1, m.mask.bool())
    assert torch.equal(placed[placed >= 0], tokens[placed >= 0])


def test_masks_differ_between_samples():
    m = random_masking(4, 49, 0.75, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert not torch.equal(m.mask[0], m.mask[1])


def test_patchify_layout_and_inverse():
    imgs = torch.randn(2, 3, 8, 12)
    p = patchify(imgs, 4)                                   # (2, 2*3, 4*4*3)
    assert p.shape == (2, 6, 48)
    # patch (row 1, col 2) pixel (i, j, c) sits at index (i * 4 + j) * 3 + c
    assert p[1, 1 * 3 + 2, (3 * 4 + 1) * 3 + 2] == imgs[1, 2, 4 + 3, 8 + 1]
    assert torch.equal(unpatchify(p, 4, 3, (2, 3)), imgs)


def test_gather_tokens():
    x = torch.randn(2, 5, 3)
    ids = torch.tensor([[4, 0], [1, 1]])
    out = gather_tokens(x, ids)
    assert torch.equal(out[0, 0], x[0, 4]) and torch.equal(out[1, 1], x[1, 1])


def test_hybrid_masking_gives_disjoint_sets_of_the_right_sizes():
    from hpc_mim.masking import hybrid_masking
    masked, noised = hybrid_masking(5, 49, 0.6, 0.2, torch.device("cpu"))
    assert masked.sum(1).tolist() == [29] * 5 and noised.sum(1).tolist() == [9] * 5
    assert not (masked & noised).any()
    assert not torch.equal(masked[0], masked[1])             # per-sample draws


def grid_offsets(g: int, p: int, gap: int, batch: int = 2, seed: int = 0):
    """Run the grid on images whose pixels hold their own row (resp. column) index, with the same
    draw: returns the (row, column) index images, (B, g*p, g*p) each."""
    from hpc_mim.masking import noncontiguous_grid
    s = g * (p + gap)
    rows = torch.arange(s).view(1, 1, s, 1).expand(batch, 3, s, s).float()
    cols = torch.arange(s).view(1, 1, 1, s).expand(batch, 3, s, s).float()
    torch.manual_seed(seed)
    out_r = noncontiguous_grid(rows, g, p, gap)
    torch.manual_seed(seed)
    out_c = noncontiguous_grid(cols, g, p, gap)              # same draw: read columns
    assert out_r.shape == (batch, 3, g * p, g * p)
    return out_r[:, 0], out_c[:, 0]


def test_noncontiguous_grid_geometry():
    """Every output patch is an intact p x p block of its own cell, at an offset in [0, gap);
    neighbours never touch."""
    g, p, gap = 7, 4, 3
    out_r, out_c = grid_offsets(g, p, gap)
    offsets_seen = set()
    for n in range(2):
        for i in range(g):
            for j in range(g):
                r = out_r[n, i * p:(i + 1) * p, j * p:(j + 1) * p]
                c = out_c[n, i * p:(i + 1) * p, j * p:(j + 1) * p]
                r0, c0 = int(r[0, 0]), int(c[0, 0])
                assert torch.equal(r, (r0 + torch.arange(p)).float().view(p, 1).expand(p, p))
                assert torch.equal(c, (c0 + torch.arange(p)).float().view(1, p).expand(p, p))
                dy, dx = r0 - i * (p + gap), c0 - j * (p + gap)
                assert 0 <= dy < gap and 0 <= dx < gap
                offsets_seen.add((dy, dx))
            for j in range(g - 1):                            # >= 1 pixel between columns
                assert (out_c[n, i * p, (j + 1) * p] - out_c[n, i * p, (j + 1) * p - 1]) >= 2
        for i in range(g - 1):                                # >= 1 pixel between rows
            assert (out_r[n, (i + 1) * p, 0] - out_r[n, (i + 1) * p - 1, 0]) >= 2
    assert offsets_seen == {(dy, dx) for dy in range(gap) for dx in range(gap)}


def test_noncontiguous_grid_draws_an_independent_offset_per_cell():
    """The authors' Patchify draws (dy, dx) per cell: along a row of cells dy varies (the
    previous grid drew one dy per row and one dx per column, so it could not)."""
    g, p, gap = 7, 4, 3
    out_r, out_c = grid_offsets(g, p, gap, batch=4)
    cell = p + gap
    dy = out_r[:, ::p, ::p] - (torch.arange(g) * cell).view(1, g, 1)   # (B, gi, gj)
    dx = out_c[:, ::p, ::p] - (torch.arange(g) * cell).view(1, 1, g)
    rows_with_distinct_dy = sum(len(set(dy[n, i].tolist())) > 1 for n in range(4) for i in range(g))
    cols_with_distinct_dx = sum(len(set(dx[n, :, j].tolist())) > 1 for n in range(4) for j in range(g))
    # one draw per row / column of cells: 0 such rows; per cell: all but ~3^-6 of them
    assert rows_with_distinct_dy >= 4 * g - 1 and cols_with_distinct_dx >= 4 * g - 1


def authors_patchify(imgs: torch.Tensor, patch: int, gap: int) -> torch.Tensor:
    """yibingwei-1/LatentMIM:vits.py ``Patchify.patchify``, transcribed (square patches, CPU):
    (N, 3, H, W) -> (N, L, p*p*3), an independent (dy, dx) per cell, dy drawn first."""
    bs = imgs.shape[0]
    ph = pw = patch
    h, w = imgs.shape[-2:]
    th, tw = h // (ph + gap), w // (pw + gap)
    x = imgs.reshape(bs, 3, th, ph + gap, tw, pw + gap)
    x = torch.einsum("nchpwq->nhwpqc", x)
    stx = torch.randint(0, gap, x.shape[:3]).unsqueeze(-1) + torch.arange(ph)
    sty = torch.randint(0, gap, x.shape[:3]).unsqueeze(-1) + torch.arange(pw)
    x = x.gather(dim=3, index=stx[:, :, :, :, None, None].repeat(1, 1, 1, 1, x.shape[4], x.shape[5]))
    x = x.gather(dim=4, index=sty[:, :, :, None, :, None].repeat(1, 1, 1, x.shape[3], 1, x.shape[5]))
    return x.reshape(bs, th * tw, ph * pw * 3)


@pytest.mark.parametrize("g,p,gap", [(7, 4, 1), (7, 4, 3), (3, 16, 4)])
def test_noncontiguous_grid_is_the_authors_patchify_on_the_same_draws(g, p, gap):
    from hpc_mim.masking import noncontiguous_grid
    imgs = torch.randn(3, 3, g * (p + gap), g * (p + gap))
    torch.manual_seed(5)
    ours = patchify(noncontiguous_grid(imgs, g, p, gap), p)
    torch.manual_seed(5)
    assert torch.equal(ours, authors_patchify(imgs, p, gap))


def test_noncontiguous_grid_without_gap_is_the_image():
    from hpc_mim.masking import noncontiguous_grid
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(noncontiguous_grid(x, 7, 4, 0), x)
