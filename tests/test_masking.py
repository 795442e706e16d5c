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
