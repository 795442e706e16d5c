"""Representation measures the seed papers argue with, as pure tensor functions.

- Mean attention distance (Dosovitskiy et al., arXiv 2010.11929, Fig. 7; Park et al. "What do
  self-supervised ViTs learn?", arXiv 2305.00729, naver-ai/cl-vs-mim) and attention NMI
  (Park et al.): how local and how query-specific each layer's attention is.
- Fourier analysis of token maps (Park et al.): the high-frequency log-amplitude relative to the
  zero frequency; the noised-MIM paper argues its lower blocks keep more high frequencies.
- Singular value spectrum and effective rank (RankMe, Garrido et al., arXiv 2210.02885).
- Mean pairwise cosine similarity of patch tokens (LatentMIM's collapse measure, arXiv 2407.15837).
- Linear CKA (Kornblith et al., arXiv 1905.00414), plain and debiased (the unbiased HSIC
  estimator of Song et al. 2012, as used by Nguyen et al., arXiv 2010.15327).

All computations are in float64 on the input's device: they are statistics, and fp32 loses
digits in the centred Gram matrices of a few thousand samples.
"""
from __future__ import annotations

import torch

# RankMe and the spectrum live beside the similarity: pre-training's collapse curves use them too
from hpc_mim.similarity import mean_pairwise_similarity, rankme, singular_spectrum  # noqa: F401


def patch_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(L, L) Euclidean distances in pixels between the centres of the L = gh*gw patches."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], dim=1).double() * patch_size
    return torch.cdist(centres, centres)


def patch_attention(attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """(B, h, N, N) softmax attention -> (B, h, L, L) among patches only: the cls rows and
    columns are dropped and each row is renormalised to sum to one."""
    a = attn[..., num_prefix:, num_prefix:].double()
    return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Mean attention distance per head (h,) in pixels for patch attention (B, h, L, L): each
    query's attention-weighted distance to the keys, averaged over queries and images."""
    dist = patch_distances(grid, patch_size).to(attn.device)
    per_query = (attn.double() * dist).sum(dim=-1)                      # (B, h, L)
    return per_query.mean(dim=(0, 2))


def attention_nmi(attn: torch.Tensor) -> torch.Tensor:
    """Normalised mutual information between query and key position per head (h,), for patch
    attention (B, h, L, L). Queries are uniform, p(q) = 1/L, and p(k|q) is the attention row;
    NMI = I(q; k) / sqrt(H(q) H(k)). 0: every query attends alike; 1: each query has its own keys.
    Averaged over images."""
    a = attn.double()
    L = a.shape[-1]
    joint = a / L                                                       # p(q, k)
    p_k = joint.sum(dim=-2, keepdim=True)                               # (B, h, 1, L)
    ratio = (joint / (p_k / L).clamp_min(1e-300)).clamp_min(1e-300)
    mi = (joint * ratio.log()).sum(dim=(-2, -1))                        # (B, h)
    h_q = torch.log(torch.tensor(float(L), dtype=torch.float64, device=a.device))
    h_k = -(p_k * p_k.clamp_min(1e-300).log()).sum(dim=(-2, -1))
    return (mi / (h_q * h_k).sqrt().clamp_min(1e-12)).mean(dim=0)


def log_amplitude_spectrum(maps: torch.Tensor) -> torch.Tensor:
    """(h, w) centred (fftshift) log-amplitude of the 2D FFT of feature maps (B, C, h, w),
    averaged over images and channels."""
    amp = torch.fft.fft2(maps.double()).abs().add(1e-6).log().mean(dim=(0, 1))
    return torch.fft.fftshift(amp).cpu()


def high_freq_from_spectrum(spectrum: torch.Tensor) -> float:
    """The diagonal of a centred spectrum (h, w) from the zero frequency towards the corner:
    its last point minus its first (the zero frequency)."""
    diag = spectrum.diagonal()[spectrum.shape[0] // 2:]
    return float(diag[-1] - diag[0])


def high_freq_log_amplitude(maps: torch.Tensor) -> float:
    """Relative log-amplitude of the highest frequency of feature maps (B, C, h, w), Park et
    al.'s recipe: |FFT2| per channel, log, averaged over images and channels, centred; on the
    diagonal, the highest frequency minus the zero frequency. Larger (less negative): more
    high-frequency content."""
    return high_freq_from_spectrum(log_amplitude_spectrum(maps))


def pairwise_cosine(tokens: torch.Tensor) -> float:
    """Mean cosine similarity of all (T x T, diagonal included) pairs of tokens of an image
    (B, T, D), averaged over images: LatentMIM's ``avg_pairwise_sim`` (the same function as its
    regulariser, hpc_mim/similarity.py), 1 = collapsed."""
    return float(mean_pairwise_similarity(tokens, torch.float64))


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def _hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al.'s unbiased HSIC of two Gram matrices (n, n), n >= 4."""
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    l = l.clone().fill_diagonal_(0)
    kl = (k * l).sum()
    ones = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = 2 * (k.sum(0) @ l.sum(0)) / (n - 2)
    return (kl + ones - cross) / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA between representations x (N, D1) and y (N, D2) of the same N inputs:
    HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = x x^T, L = y y^T of centred features;
    ``debiased`` uses the unbiased HSIC estimator (needs N >= 4)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same inputs: {x.shape[0]} vs {y.shape[0]} rows")
    k, l = _centred_gram(x), _centred_gram(y)
    if debiased:
        if x.shape[0] < 4:
            raise ValueError("debiased CKA needs at least 4 samples")
        hsic = _hsic_unbiased
    else:
        def hsic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a * b).sum()                      # tr(K H L H), the centring is in the Gram
    return float(hsic(k, l) / (hsic(k, k) * hsic(l, l)).sqrt().clamp_min(1e-300))
