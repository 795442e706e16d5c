"""Relative position in the encoder's attention logits, added to a pre-trained ViT for transfer.

Two kinds, each zero-initialised (the pre-training had none), so the swapped encoder computes
exactly what it computed before until the tables are trained:

- ``"decomposed"``: MViTv2's decomposed relative positions as ViTDet uses them (Li et al. arXiv
  2203.16527, ``use_rel_pos=True``; facebookresearch/detectron2
  detectron2/modeling/backbone/vit.py ``Attention`` and utils.py ``get_rel_pos`` /
  ``add_decomposed_rel_pos``). Per block, tables ``rel_pos_h`` (2h - 1, head_dim) and
  ``rel_pos_w`` (2w - 1, head_dim) shared by the heads; the logit of query i and key j gains
  q_i . Rh[hi - hj] + q_i . Rw[wi - wj] (q before the 1/sqrt(d) scale). A windowed block's tables
  are sized by the window, a global block's by the grid; another grid interpolates the tables
  linearly (``get_rel_pos``, detectron2's). ViTDet drops the
  cls token; where this project's encoder keeps its prefix tokens (detection's
  ``attention: global``), they get no relative position (zero rows and columns).
- ``"table"``: BEiT's per-block relative position bias (Bao et al. arXiv 2106.08254; MAE's ADE20K
  run used it, arXiv 2111.06377 App. A.4): a learned (heads,) bias per 2-D offset,
  ``relative_position_bias_table`` ((2h - 1)(2w - 1) + 3, heads), indexed by timm's
  ``gen_relative_position_index`` with BEiT's three extra entries cls -> token, token -> cls,
  cls -> cls. Several prefix tokens (UMD's four) each use the cls entries. Another grid gets the
  table resized bicubically (as BEiT does to a checkpoint; timm
  ``resize_rel_pos_bias_table_simple``), differentiably, in the forward.

The bias goes to ``F.scaled_dot_product_attention`` as ``attn_mask`` (a float mask is added to
the scaled logits), so the fused kernels stay (on CUDA the memory-efficient one, which takes a
bias and its gradient). Tables are fp32 parameters; the bias is cast to the queries' dtype
(bf16 under autocast). Parameter names are ``blocks.<i>.attn.{rel_pos_h, rel_pos_w,
relative_position_bias_table}`` (detectron2's / timm's BEiT names): ``ViTEncoder.group_matcher``
puts them in block i's layer for layer-wise lr decay, as detectron2's ``get_vit_lr_decay_rate``.

Shapes: attention input (B, N, D); N = P + h * w (global, P prefix tokens) or window ** 2.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import gen_relative_position_index
from torch import nn

KINDS = ("decomposed", "table")


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """detectron2's ``get_rel_pos`` (utils.py; timm's vision_transformer_sam has the same):
    table (L, C) -> (q_size, k_size, C), the entry of offset qi - kj, the table first resized
    linearly to 2 max(q, k) - 1 rows when it has another length. Written here rather than
    imported from timm only for the device: timm builds the offsets on the CPU, and indexing a
    CUDA table with them copies them over with a host sync in every block's forward."""
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = F.interpolate(rel_pos.t().unsqueeze(0), size=max_rel_dist, mode="linear")[0].t()
    q = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    return rel_pos[((q - k) + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


def decomposed_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                    size: tuple[int, int]) -> torch.Tensor:
    """detectron2's ``add_decomposed_rel_pos`` as an additive bias: q (B, heads, h*w, hd) ->
    (B, heads, h*w, h*w), entry [i, j] = q_i . Rh[hi, hj] + q_i . Rw[wi, wj]."""
    h, w = size
    b, heads, n, hd = q.shape
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)                           # (h, h, hd)
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)                           # (w, w, hd)
    r_q = q.reshape(b, heads, h, w, hd)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)                         # (B, heads, h, w, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)                         # (B, heads, h, w, w)
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, n, h * w)


def table_index(size: tuple[int, int], prefix: int, device: torch.device | None = None) -> torch.Tensor:
    """BEiT's index (P + h*w, P + h*w) into a table of (2h-1)(2w-1) (+3 with prefix tokens)
    rows: timm's ``gen_relative_position_index``, its cls row / column repeated for P > 1."""
    if prefix == 0:
        return gen_relative_position_index(size, device=device)
    base = gen_relative_position_index(size, class_token=True, device=device)   # (1 + L, 1 + L)
    keep = torch.cat([base.new_zeros(prefix), torch.arange(1, base.shape[0], device=device)])
    return base[keep][:, keep].contiguous()


class RelPosAttention(nn.Module):
    """A timm ``Attention`` (its own qkv / norms / proj modules, same state-dict names) whose
    logits gain a relative position term. ``size`` is the token grid the attention sees: the
    window for windowed blocks, the image grid for global ones (``set_grid`` changes it)."""

    def __init__(self, attn: nn.Module, kind: str, size: tuple[int, int], prefix: int) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"relative position kind {kind!r}: choose one of {KINDS}")
        for name, child in attn.named_children():             # qkv, q_norm, k_norm, proj, ...
            self.add_module(name, child)
        self.gate = getattr(attn, "gate", None)
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.scale = attn.scale
        self.kind, self.prefix = kind, prefix
        self.windowed = False                   # set by add_relative_position; see set_grid
        self.table_size = self.size = (int(size[0]), int(size[1]))
        device = attn.qkv.weight.device
        if kind == "decomposed":
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * size[0] - 1, self.head_dim, device=device))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * size[1] - 1, self.head_dim, device=device))
        else:
            rows = (2 * size[0] - 1) * (2 * size[1] - 1) + (3 if prefix else 0)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, self.num_heads, device=device))
            self.register_buffer("relative_position_index", table_index(self.size, prefix, device),
                                 persistent=False)

    def table_bias(self) -> torch.Tensor:
        """(1, heads, P + h*w, P + h*w) from the table, resized when ``size`` is not the
        table's (the (2h-1, 2w-1) part bicubically, the three cls entries as they are)."""
        table, (h, w) = self.relative_position_bias_table, self.size
        index = self.relative_position_index
        if self.size != self.table_size:
            th, tw = self.table_size
            extra = table[(2 * th - 1) * (2 * tw - 1):]
            grid = table[:(2 * th - 1) * (2 * tw - 1)].t().reshape(1, -1, 2 * th - 1, 2 * tw - 1)
            grid = F.interpolate(grid, size=(2 * h - 1, 2 * w - 1), mode="bicubic", align_corners=False)
            table = torch.cat([grid.reshape(self.num_heads, -1).t(), extra])
            index = table_index(self.size, self.prefix, table.device)
        n = self.prefix + h * w
        return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)

    def bias(self, q: torch.Tensor) -> torch.Tensor:
        """Additive logits (B or 1, heads, N, N) for queries q (B, heads, N, hd)."""
        h, w = self.size
        n = q.shape[2]
        if self.kind == "table":
            if n != self.prefix + h * w:
                raise ValueError(f"{n} tokens, but the table is for {self.prefix} + {h}x{w}")
            return self.table_bias().to(q.dtype)
        p = n - h * w                          # prefix tokens kept on the global path
        if p < 0:
            raise ValueError(f"{n} tokens, but the relative positions are for a {h}x{w} grid")
        bias = decomposed_bias(q[:, :, p:], self.rel_pos_h, self.rel_pos_w, self.size)
        return F.pad(bias, (p, 0, p, 0)) if p else bias     # prefix rows / columns: no position

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """timm ``Attention.forward`` (a timm ``Block`` passes ``attn_mask`` / ``is_causal``)
        with the relative position term as the SDPA mask."""
        if is_causal:
            raise ValueError("an encoder's attention is not causal")
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                               # (B, heads, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.bias(q)
        if attn_mask is not None:
            bias = bias + attn_mask
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        x = self.norm(x) if hasattr(self, "norm") else x
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def add_relative_position(encoder: nn.Module, kind: str, grid: tuple[int, int], window: int = 0,
                          global_blocks: Sequence[int] | None = None) -> None:
    """Swap every block's attention of ``encoder`` (a ViTEncoder) for a ``RelPosAttention`` of
    ``kind``, zero-initialised, in place. ``grid`` (h, w): the token grid of the task's input.
    ``window`` > 0 (decomposed only, ViTDet): blocks outside ``global_blocks`` (default ViTDet's
    four evenly spaced) attend in windows and get window-sized tables; their prefix tokens are
    dropped by the windowed path (hpc_mim/models/windows.py). The table kind counts the
    encoder's prefix tokens (``num_prefix``); the decomposed kind gives them none."""
    from hpc_mim.models.windows import evenly_spaced
    if kind not in KINDS:
        raise ValueError(f"relative position kind {kind!r}: choose one of {KINDS}")
    if window and kind != "decomposed":
        raise ValueError("windowed attention takes the decomposed kind (ViTDet)")
    depth = len(encoder.blocks)
    global_set = set(range(depth) if not window else
                     (global_blocks if global_blocks is not None else evenly_spaced(depth)))
    for i, block in enumerate(encoder.blocks):
        if isinstance(block.attn, RelPosAttention):
            raise ValueError(f"block {i} already has relative positions")
        size = tuple(grid) if i in global_set else (window, window)
        block.attn = RelPosAttention(block.attn, kind, size, encoder.num_prefix)
        block.attn.windowed = i not in global_set


def set_grid(encoder: nn.Module, grid: tuple[int, int]) -> None:
    """Tell the global blocks' relative positions the token grid of the next inputs (windowed
    blocks keep their window); a no-op for an encoder without relative positions."""
    for block in encoder.blocks:
        attn = block.attn
        if isinstance(attn, RelPosAttention) and not attn.windowed:
            attn.size = (int(grid[0]), int(grid[1]))
