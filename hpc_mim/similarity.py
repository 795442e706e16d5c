"""Token similarity shared by LatentMIM's similarity regulariser (hpc_mim/methods/latent_mim.py)
and the representation diagnostics (evaluation/representation.py): one definition, so the
collapse the diagnostics report is the quantity LatentMIM regularises."""
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
