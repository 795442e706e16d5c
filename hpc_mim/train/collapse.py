"""Collapse curves of pre-training: RankMe and the patch tokens' pairwise cosine of the encoder
on fixed validation images, every ``train.log_every`` steps (``train.collapse_images`` images;
0 turns it off). A representation that collapses (LatentMIM's jointly trained target, arXiv
2407.15837 section 3.3) shows as RankMe falling towards 1 and the cosine rising towards 1 while
the loss still looks fine; the diagnostics evaluation measures the same two quantities once, at
the end (evaluation/diagnostics.py: ``rankme`` with mean pooling, ``pairwise_cosine_last``).

Read as an 8-GPU run executes it: every rank runs the same forward over the same images (under
ZeRO-3 the encoder's parameters are gathered by its forward hooks, so every rank must take
part), in eval mode, under the run's autocast; the statistics are fp64 (hpc_mim/similarity.py)
and reading them is one host read per ``log_every`` steps (``tolist``; the SVD's own error
check may wait on the device too), beside the loss terms' one.
"""
from __future__ import annotations

import torch
from torch import nn

from hpc_mim.similarity import effective_rank, mean_pairwise_similarity


@torch.no_grad()
def collapse_measures(encoder: nn.Module, images: torch.Tensor, batch_size: int) -> dict[str, float]:
    """``rankme``: effective rank of the final-normed, mean-pooled patch tokens (N, D);
    ``pairwise_cosine``: mean cosine of each image's last-block patch tokens (before the final
    norm, all T x T pairs, diagonal included), averaged over the N images (B, C, H, W).

    Only module forwards are called (the encoder's, its final norm seen through a hook): under
    ZeRO-3 a module's parameters exist only inside its own forward."""
    was_training = encoder.training
    encoder.eval()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []       # (last block's tokens, normed tokens)
    handle = encoder.norm.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    try:
        # eager even when train.compile compiled the encoder: a hook and eval mode would make
        # dynamo compile another graph, and a new hook each time would recompile at every point
        with torch.compiler.set_stance("force_eager"):
            for x in images.split(batch_size):
                encoder(x)
    finally:
        handle.remove()
        encoder.train(was_training)
    p = encoder.num_prefix
    cos = sum(mean_pairwise_similarity(pre[:, p:], torch.float64) * pre.shape[0] for pre, _ in seen)
    pooled = torch.cat([post[:, p:].double().mean(dim=1) for _, post in seen])  # (N, D)
    # a diverging run (an absurd lr) has inf/nan features before its loss is caught: the SVD
    # would raise and end the job with the wrong error, so such features read nan, on the device
    finite = torch.isfinite(pooled).all()
    rank = effective_rank(torch.where(finite, pooled, torch.zeros_like(pooled)))
    rank = torch.where(finite, rank, torch.full_like(rank, float("nan")))
    rank, cosine = torch.stack([rank, cos / images.shape[0]]).tolist()           # one read
    return {"rankme": rank, "pairwise_cosine": cosine}
