"""Token similarity and effective rank, shared by LatentMIM's similarity regulariser
(hpc_mim/methods/latent_mim.py), the collapse curves of pre-training (hpc_mim/train/collapse.py)
and the representation diagnostics (evaluation/representation.py): one definition, so the
collapse the diagnostics report is the quantity LatentMIM regularises and the curves show."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pairwise_similarity(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mean of the (N, T, T) cosine matrices of x (N, T, D), diagonal included: the LatentMIM
    authors' ``avg_pairwise_sim`` (yibingwei-1/LatentMIM models_lmim.py). The diagonal of ones
    raises an off-diagonal mean m to m + (1 - m) / T (up to 0.05 with ViT-B's 20 visible
    tokens), and the regulariser's target s is meant on this scale. Computed in ``dtype``
    (fp32 whatever the input in training; fp64 for the diagnostics); differentiable."""
    x = F.normalize(x.to(dtype), dim=-1)
    return torch.einsum("npd,nqd->npq", x, x).mean()


def singular_spectrum(features: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of the features (N, D) in fp64, normalised to sum to one."""
    s = torch.linalg.svdvals(features.double())
    return s / s.sum().clamp_min(1e-300)


def effective_rank(features: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe (Garrido et al., arXiv 2210.02885): exp of the entropy of p = sigma / ||sigma||_1
    + eps, of the features (N, D); a 0-d fp64 tensor on their device (not read: no host sync)."""
    p = singular_spectrum(features) + eps
    return torch.exp(-(p * p.log()).sum())


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """``effective_rank`` as a number (a host sync)."""
    return float(effective_rank(features, eps))
