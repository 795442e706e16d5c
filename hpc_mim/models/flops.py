"""Analytic FLOP counts of the matmuls of a MAE training step, for model FLOPs utilisation.

Counted: every matrix product (2 FLOPs per multiply-add) -- the patch embedding, each block's
qkv / projection / MLP and the two attention products (QK^T, AV), the decoder's embedding and
prediction head. Not counted: norms, softmax, GELU, additions (memory-bound, a few percent).
A training step is the forward plus a backward of twice its matmuls, less the input gradient
of the patch embedding (the images need none). MFU = counted FLOPs per second / the card's
peak dense bf16 FLOP/s (PaLM's definition, arXiv 2204.02311 App. B, without recomputation).
tests/test_flops.py checks these numbers against torch.utils.flop_counter on a real step.
"""
from __future__ import annotations

from typing import Any


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> int:
    """One pre-norm transformer block on ``tokens`` tokens of width ``dim``, forward."""
    hidden = int(dim * mlp_ratio)
    linear = 2 * tokens * dim * (3 * dim + dim) + 2 * tokens * dim * hidden * 2
    attention = 2 * 2 * tokens * tokens * dim                # QK^T and AV over all heads
    return linear + attention


def mae_flops(model: Any, method: Any) -> dict[str, int]:
    """Forward and training FLOPs per image of MAE (``model`` / ``method``: the config
    sections, dataclasses or dicts). Shapes: L = (img/p)^2 patches, K = int(L (1 - ratio))
    visible, encoder on 1 + K tokens of width D, decoder on 1 + L tokens of width d."""
    get = (lambda section, key: section[key]) if isinstance(model, dict) else getattr  # noqa: E731
    img, p, d_enc = get(model, "img_size"), get(model, "patch_size"), get(model, "embed_dim")
    depth, ratio = get(model, "depth"), get(model, "mlp_ratio")
    d_dec, dec_depth = get(method, "decoder_dim"), get(method, "decoder_depth")
    chans = get(model, "in_chans")
    patches = (img // p) ** 2
    visible = int(patches * (1 - get(method, "mask_ratio")))
    patch_embed = 2 * patches * (chans * p * p) * d_enc        # every patch is embedded, then kept
    encoder = depth * block_flops(1 + visible, d_enc, ratio)
    decoder = (2 * (1 + visible) * d_enc * d_dec              # embedding of the visible tokens
               + dec_depth * block_flops(1 + patches, d_dec, 4.0)
               + 2 * (1 + patches) * d_dec * chans * p * p)    # prediction head
    forward = patch_embed + encoder + decoder
    return {"forward": forward, "train": 3 * forward - patch_embed}
