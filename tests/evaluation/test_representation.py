"""The diagnostics' measures against values known independently of their implementation."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from evaluation import representation as rep
from hpc_mim.models.vit import ViTEncoder, attention_probs


def test_linear_cka_of_one_feature_is_the_squared_correlation():
    # Kornblith et al. 2019: for one-dimensional representations linear CKA is r^2
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0], [6.0]])
    y = torch.tensor([[2.0], [1.0], [4.0], [3.0], [7.0]])
    r = pearsonr(x[:, 0].double().numpy(), y[:, 0].double().numpy())[0]
    assert rep.linear_cka(x, y) == pytest.approx(r ** 2, rel=1e-12)
    # by hand: S_xy = 15.6, S_xx = 14.8, S_yy = 21.2
    assert rep.linear_cka(x, y) == pytest.approx(15.6 ** 2 / (14.8 * 21.2), rel=1e-12)


def hsic_u_statistic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. 2012's unbiased HSIC as the U-statistic over ordered 4-tuples of distinct
    indices: h = k_ij l_ij + k_ij l_qr - 2 k_ij l_iq."""
    n = len(k)
    total = sum(k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
                for i, j, q, r in itertools.permutations(range(n), 4))
    return total / math.perm(n, 4)


def test_debiased_cka_equals_the_u_statistic_estimator():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = x @ torch.randn(3, 4, generator=g, dtype=torch.float64) + 0.5 * torch.randn(7, 4, generator=g, dtype=torch.float64)
    k, l = (x @ x.T).numpy(), (y @ y.T).numpy()
    expected = hsic_u_statistic(k, l) / math.sqrt(hsic_u_statistic(k, k) * hsic_u_statistic(l, l))
    assert rep.linear_cka(x, y, debiased=True) == pytest.approx(expected, rel=1e-10)
    # biased and debiased differ on few samples; both are 1 for a rotated, scaled copy
    assert abs(rep.linear_cka(x, y) - expected) > 1e-3
    q = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    for debiased in (False, True):
        assert rep.linear_cka(x, 3 * x @ q + 1.0, debiased) == pytest.approx(1.0, abs=1e-12)


def test_attention_distance_of_a_known_map():
    # 4 x 4 patches of 8 px; every query attends only to its right neighbour (or, in the last
    # column, to itself): 12 of 16 queries at 8 px, the rest at 0 -> 6 px
    grid, patch = (4, 4), 8
    attn = torch.zeros(1, 1, 16, 16)
    for q in range(16):
        attn[0, 0, q, q + 1 if q % 4 != 3 else q] = 1.0
    assert rep.attention_distance(attn, grid, patch).tolist() == [6.0]
    # uniform attention on 2 x 2 patches of 1 px: per query (0 + 1 + 1 + sqrt 2) / 4
    uniform = torch.full((2, 3, 4, 4), 0.25)
    expected = (2 + math.sqrt(2)) / 4
    assert rep.attention_distance(uniform, (2, 2), 1) == pytest.approx(torch.full((3,), expected, dtype=torch.float64))


def test_patch_attention_drops_cls_and_renormalises():
    attn = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)
    a = rep.patch_attention(attn, num_prefix=1)
    assert a.shape == (2, 3, 4, 4)
    assert torch.allclose(a.sum(-1), torch.ones(2, 3, 4, dtype=torch.float64))
    assert torch.allclose(a[0, 0, 0], attn[0, 0, 1, 1:].double() / attn[0, 0, 1, 1:].sum())


def test_attention_nmi_limits():
    L = 9
    uniform = torch.full((1, 2, L, L), 1 / L)                # every query attends alike: I = 0
    assert rep.attention_nmi(uniform).tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    perm = torch.eye(L)[torch.randperm(L)].expand(1, 2, L, L)  # one key per query: I = H = log L
    assert rep.attention_nmi(perm).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    # two groups of queries each spread uniformly over its own half of 8 keys: I = log 2,
    # H(q) = log 8, H(k) = log 8 -> NMI = log 2 / log 8 = 1/3
    half = torch.zeros(1, 1, 8, 8)
    half[0, 0, :4, :4] = half[0, 0, 4:, 4:] = 0.25
    assert rep.attention_nmi(half).item() == pytest.approx(1 / 3, abs=1e-12)


def test_fourier_high_frequency_of_a_pure_sinusoid():
    # the diagonal's last point of an 8 x 8 centred spectrum is frequency (3, 3) / 8; a cosine
    # there has 4 peaks of amplitude 64 / 4 = 16, a constant c has 64 c at zero frequency
    n, c = 8, 2.0
    y, x = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    wave = torch.cos(2 * math.pi * 3 * x / n) * torch.cos(2 * math.pi * 3 * y / n)
    maps = (c + wave).double().expand(2, 5, n, n)
    assert rep.high_freq_log_amplitude(maps) == pytest.approx(math.log(16 / (64 * c)), abs=1e-6)
    # a constant map has no high frequency at all: log(1e-6) - log(64 c)
    flat = torch.full((1, 1, n, n), c)
    assert rep.high_freq_log_amplitude(flat) == pytest.approx(math.log(1e-6) - math.log(64 * c), abs=1e-6)


def test_effective_rank_of_an_orthogonal_matrix_is_its_size():
    q = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    assert rep.rankme(q) == pytest.approx(16, rel=1e-5)        # all singular values equal
    assert rep.singular_spectrum(q).tolist() == pytest.approx([1 / 16] * 16)
    rank_one = torch.randn(32, 1) @ torch.randn(1, 8)
    assert rep.rankme(rank_one) == pytest.approx(1.0, abs=1e-3)


def test_pairwise_cosine_includes_the_diagonal():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])   # cos matrix: 5 ones of 9
    assert rep.pairwise_cosine(tokens) == pytest.approx(5 / 9)


def test_attention_probs_of_an_adaln_block_include_its_modulation():
    enc = ViTEncoder(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, timestep_cond=True)
    block = enc.blocks[0]
    torch.nn.init.normal_(block.modulation[1].weight)              # a non-trivial modulation
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    probs = attention_probs(block, x, c)
    # the block's own attention output, recomputed from these probabilities, matches timm's
    shift, scale = block.modulation(c).chunk(6, dim=-1)[:2]
    h = block.norm1(x) * (1 + scale[:, None]) + shift[:, None]
    v = block.attn.qkv(h).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)[2]
    out = block.attn.proj((probs @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(out, block.attn(h), atol=1e-5)
