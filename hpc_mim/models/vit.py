"""ViT encoder on timm blocks with fixed 2D sin-cos position embeddings and cls token(s).

Follows the MAE encoder (arXiv 2111.06377; facebookresearch/mae:models_mae.py): pre-norm timm
``Block``s, LayerNorm eps 1e-6, xavier-uniform linear init, the cls token's position embedding
is zero. ``forward(x, ids_keep)`` runs on a subset of patches (masked pre-training);
``forward_intermediates`` returns spatial feature maps of chosen blocks (dense evaluations).
Other input sizes than ``img_size`` are accepted (dense evaluations): the fixed sin-cos
position embedding is evaluated on the larger grid. ``pos_embed="learned"`` (UMD's authors):
a learned embedding of the patches (normal, std 1/sqrt(L); the cls tokens get none), resampled
bicubically (timm) for another grid.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed, resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from hpc_mim.masking import gather_tokens
from hpc_mim.models.adaln import AdaLNBlock, TimestepEmbedder, modulate, run_blocks

_norm = partial(nn.LayerNorm, eps=1e-6)


def sincos_pos_embed(grid: tuple[int, int], dim: int, num_prefix: int = 1,
                     device: torch.device | None = None) -> torch.Tensor:
    """(1, P + gh*gw, dim) fp32 fixed sin-cos embedding; the P cls slots are zeros, as in MAE.
    Computed on ``device`` (default the CPU)."""
    pos = build_sincos2d_pos_embed(list(grid), dim=dim, device=device)      # (gh*gw, dim)
    return torch.cat([torch.zeros(num_prefix, dim, device=device), pos], dim=0).unsqueeze(0)


# At most this many other grids' tables per encoder, the oldest dropped first. Segmentation
# needs one (its crop), detection one per padded batch shape (longest side 1024 px, the other
# a multiple of 32 px: up to 64 shapes, ~12 MB each for ViT-B): a miss costs a few small
# kernels on the device, a table held costs memory, so a few.
POS_CACHE_SIZE = 8


def init_mae_weights(module: nn.Module) -> None:
    """MAE init: xavier-uniform Linear weights, zero bias, LayerNorm weight 1 / bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTEncoder(nn.Module):
    """Vision Transformer encoder.

    Shapes: images (B, C, H, W) -> tokens (B, P + K, D), where P = ``num_cls_tokens`` (1, or 4
    for UMD) and K = L = (H/p)*(W/p) without masking, or K = ids_keep.shape[1] with it.
    ``timestep_cond`` makes every block an AdaLN block conditioned on a diffusion timestep
    ``t`` (B,) (UMD); t = 0 (the default) means a clean image, which is how evaluations run it.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, num_cls_tokens: int = 1,
                 timestep_cond: bool = False, pos_embed: str = "sincos") -> None:
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed {pos_embed!r}: choose sincos or learned")
        # the constructor arguments travel with exported weights (see save_encoder)
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, drop_path=drop_path,
                           num_cls_tokens=num_cls_tokens, timestep_cond=timestep_cond,
                           pos_embed=pos_embed)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_prefix = num_cls_tokens
        # strict_img_size=False: dense evaluations feed larger images (see position_embedding)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.grid = self.patch_embed.grid_size                               # (gh, gw)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, num_cls_tokens, embed_dim))
        # A buffer, not a parameter: the embedding is fixed, and rebuilding it from the config
        # keeps exported weights independent of the image size.
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, embed_dim, num_cls_tokens),
                             persistent=False)
        # sin-cos tables of other grids (dense evaluations: 512 px crops, padded detection
        # inputs), built on the device once per (grid, device, dtype), where every forward
        # built one on the CPU (~0.1 s for 64 x 48 x 768) and copied it over (a host sync).
        # A plain dict, not buffers: outside state_dict() and checkpoints; emptied whenever
        # the module moves or is cast (``_apply``), so it holds no stale copy.
        self._pos_cache: dict[tuple[tuple[int, int], torch.device, torch.dtype], torch.Tensor] = {}
        self.pos_embed_learned = None
        if pos_embed == "learned":                                           # (1, L, D)
            self.pos_embed_learned = nn.Parameter(
                torch.randn(1, self.num_patches, embed_dim) / self.num_patches ** 0.5)
        if timestep_cond:
            self.t_embed = TimestepEmbedder(embed_dim)
            self.blocks = nn.ModuleList(AdaLNBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        else:
            self.t_embed = None
            rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth
            self.blocks = nn.ModuleList(
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=_norm, drop_path=r)
                for r in rates)
        self.norm = _norm(embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))   # treat the conv as a linear layer
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_mae_weights)
        for block in self.blocks:
            if isinstance(block, AdaLNBlock):
                block.zero_modulation()

    def embed(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None,
              replace: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Patch + position embedding, cls prepended: (B, P+K, D).

        ``ids_keep`` (B, K) keeps a subset of patches (MAE-style); ``replace`` (B, L) bool swaps
        those patches' embeddings for ``mask_token`` (1, 1, D) before the position embedding is
        added (SimMIM-style, all L patches stay)."""
        pos = self.position_embedding(x.shape[-2:])
        x = self.patch_embed(x)                                              # (B, L, D)
        if replace is not None:
            x = torch.where(replace.unsqueeze(-1), mask_token.to(x.dtype), x)
        x = x + pos[:, self.num_prefix:]
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)                                   # (B, K, D)
        cls = (self.cls_token + pos[:, :self.num_prefix]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def grid_of(self, hw: tuple[int, int] | torch.Size) -> tuple[int, int]:
        h, w = hw
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def position_embedding(self, hw: tuple[int, int] | torch.Size) -> torch.Tensor:
        """(1, P + gh*gw, D) for an input of ``hw`` pixels. The embedding is the fixed sin-cos
        function of the patch coordinates, so another grid gets it evaluated at its own
        coordinates: a patch keeps the spacing to its neighbours it had in pre-training (the
        bicubic resampling used for learned embeddings would squeeze a 16 x 16 grid into the
        7 x 7 range and change the apparent scale)."""
        grid = self.grid_of(hw)
        if self.pos_embed_learned is not None:
            # resampled every call, never cached: the result is a function of a Parameter that
            # the optimizer changes each step and the gradient must flow back through
            pos = self.pos_embed_learned
            if grid != tuple(self.grid):
                pos = resample_abs_pos_embed(pos, list(grid), list(self.grid), num_prefix_tokens=0)
            return torch.cat([pos.new_zeros(1, self.num_prefix, self.embed_dim), pos], dim=1)
        if grid == tuple(self.grid):
            return self.pos_embed
        key = (grid, self.pos_embed.device, self.pos_embed.dtype)
        pos = self._pos_cache.get(key)
        if pos is None:
            with torch.inference_mode(False):    # first made under inference mode: still usable
                pos = sincos_pos_embed(grid, self.embed_dim, self.num_prefix,
                                       device=self.pos_embed.device).to(self.pos_embed.dtype)
            if len(self._pos_cache) >= POS_CACHE_SIZE:
                self._pos_cache.pop(next(iter(self._pos_cache)))
            self._pos_cache[key] = pos
        return pos

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.cuda()``, ``.bfloat16()`` and the like (DeepSpeed moves the module
        this way too): the cached tables were made for the old device and dtype."""
        self._pos_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def group_matcher(self, coarse: bool = False, prefix: str = "") -> dict[str, Any]:
        """timm's parameter grouping (used by ``timm.optim.param_groups_layer_decay``): the
        embeddings are layer 0, block i is layer i + 1; the final norm is left unmatched, so
        it joins whatever comes after the blocks (a task head) in the last layer, as in MAE's
        lrd. ``prefix`` is this encoder's attribute path in a bigger model (e.g. ``"encoder."``)."""
        p = prefix.replace(".", r"\.")
        return {"stem": rf"^{p}(?:cls_token|pos_embed|patch_embed|t_embed)",
                "blocks": rf"^{p}blocks\.(\d+)"}

    def condition(self, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor | None:
        """Timestep embedding (B, D) for AdaLN blocks (t = 0 when not given); None otherwise."""
        if self.t_embed is None:
            return None
        if t is None:
            t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.t_embed(t)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None,
                t: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) [+ ids_keep (B, K)] [+ timesteps (B,)] -> normalised tokens (B, P+K, D)."""
        c = self.condition(x, t)
        return self.norm(run_blocks(self.blocks, self.embed(x, ids_keep), c))

    def pooled(self, x: torch.Tensor, pooling: str = "cls", final_norm: bool = True) -> torch.Tensor:
        """Global representation (B, D): the cls token(s) (mean of them when several, as UMD
        does) or the mean of the patch tokens. ``final_norm=False`` pools the last block's
        tokens before the encoder's final LayerNorm: MAE's global-pool fine-tuning
        (facebookresearch/mae:models_vit.py drops ``norm`` and normalises the pooled vector with
        ``fc_norm``) and LatentMIM's kNN read them so."""
        c = self.condition(x, None)
        tokens = run_blocks(self.blocks, self.embed(x), c)
        tokens = self.norm(tokens) if final_norm else tokens
        p = self.num_prefix
        return tokens[:, :p].mean(dim=1) if pooling == "cls" else tokens[:, p:].mean(dim=1)

    def forward_intermediates(self, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Feature maps (B, D, gh, gw) after each block in ``indices`` (0-based), in that order
        (an index may repeat)."""
        maps = {}
        c = self.condition(x, None)
        tokens = self.embed(x)
        grid = self.grid_of(x.shape[-2:])
        for i, block in enumerate(self.blocks[:max(indices) + 1]):
            tokens = block(tokens) if c is None else block(tokens, c)
            if i in indices:
                patches = tokens[:, self.num_prefix:]                        # (B, L, D)
                maps[i] = patches.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return [maps[i] for i in indices]


def attention_probs(block: nn.Module, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """The softmax attention (B, heads, N, N) that ``block`` computes on its input ``x``
    (B, N, D): a timm ``Block``, or an ``AdaLNBlock`` with its condition ``c`` (B, D). timm's
    fused kernel does not return it, so q and k are recomputed from the block's own weights
    (differentiably)."""
    attn = block.attn
    b, n, _ = x.shape
    h = block.norm1(x)
    if isinstance(block, AdaLNBlock):
        shift, scale = block.modulation(c).chunk(6, dim=-1)[:2]
        h = modulate(h, shift, scale)
    qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim)
    q, k = qkv.permute(2, 0, 3, 1, 4)[:2]                                     # (B, h, N, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)


def build_encoder(model_cfg: dict[str, Any], **overrides: Any) -> ViTEncoder:
    """Encoder from the ``model`` section of a config (a dict or ModelConfig); a method adds
    what its architecture needs (e.g. UMD: ``num_cls_tokens=4, timestep_cond=True``)."""
    if not isinstance(model_cfg, dict):
        model_cfg = vars(model_cfg)
    return ViTEncoder(**{**model_cfg, **overrides})


def save_encoder(encoder: ViTEncoder, path: Path, state_dict: dict[str, torch.Tensor] | None = None,
                 trained: dict[str, float] | None = None) -> None:
    """Write ``{"model": constructor args, "state_dict": fp32 weights, "trained": {"steps",
    "epochs"}}`` atomically (``trained``: how long pre-training ran, for hpc_mim/export.py)."""
    sd = state_dict if state_dict is not None else encoder.state_dict()
    sd = {k: v.detach().float().cpu() for k, v in sd.items()}
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": dict(encoder.config), "state_dict": sd, "trained": dict(trained or {})}, tmp)
    tmp.replace(path)


def load_encoder(path: Path, map_location: str = "cpu", weights: bool = True,
                 **overrides: Any) -> ViTEncoder:
    """Rebuild an encoder exported by ``save_encoder``; the weights must match exactly.
    ``weights=False`` gives the same architecture freshly initialised (the random-init baseline);
    ``overrides`` change constructor arguments that hold no weights (e.g. ``drop_path``)."""
    blob = torch.load(path, map_location=map_location, weights_only=True)
    encoder = build_encoder({**blob["model"], **overrides})
    if weights:
        encoder.load_state_dict(blob["state_dict"], strict=True)
    return encoder
