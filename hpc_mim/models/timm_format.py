"""The encoder as a timm ``VisionTransformer``: the same weights under timm's key names, so that
timm (and through it mmpretrain, mmsegmentation, detectron2, Hugging Face) loads them.

The mapping (``ViTEncoder`` -> timm ``vision_transformer.VisionTransformer``):
- ``patch_embed.proj``, ``blocks.<i>.*`` and ``norm`` keep their names: the encoder is built of
  timm's own ``PatchEmbed`` and ``Block``.
- ``pos_embed``: timm keeps it as a parameter. Here it is a fixed sin-cos buffer (not in the
  state dict), or ``pos_embed_learned`` (UMD). The export writes the table of the pre-training
  grid. One cls token: ``(1, 1 + L, D)`` with a zero row for the cls token, MAE's layout and the
  one mmsegmentation and detectron2 read. Several cls tokens: ``(1, L, D)``, the patches' only,
  with ``no_embed_class=True`` (the cls rows are zeros anyway).
- ``cls_token`` (1, P, D): timm has one class token; UMD's other P - 1 become timm's
  ``reg_token`` (1, P - 1, D), which timm prepends after it, so the token order is unchanged.
- UMD's AdaLN blocks (arXiv 2406.17688; DiT's adaLN-Zero) at timestep t = 0, the clean input
  every evaluation gives them: the condition c = t_embed(0) is a constant, so each block's
  shift/scale/gate are constants too. ``modulate(LN(x), shift, scale)`` is a LayerNorm with
  weight 1 + scale and bias shift (timm's ``norm1``/``norm2``), and the residual gates are timm's
  LayerScale (``ls1.gamma``/``ls2.gamma``, created by ``init_values``). This is exact for t = 0
  and drops the noised-input path (t > 0), which only pre-training uses.

A model built from ``timm_model_args`` gives the encoder's tokens from ``forward_features``
(B, P + L, D), and with ``num_classes=0`` the first cls token (B, D) from ``forward``.
Another input size: timm resamples the exported table bicubically (``resample_abs_pos_embed``),
where ``ViTEncoder`` evaluates the sin-cos function on the new grid; for a sin-cos encoder the
two differ away from the pre-training size.
"""
from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from hpc_mim.models.vit import ViTEncoder

# timm's registered ViT sizes: (embed_dim, depth, num_heads) -> the size in the model's name
SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base",
         (1024, 24, 16): "large", (1280, 32, 16): "huge"}
FALLBACK_ARCH = "vit_base_patch16_224"      # any other shape: these defaults, all overridden


def timm_model_args(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(timm architecture name, keyword arguments) that build the timm twin of an encoder from
    its constructor arguments (``ViTEncoder.config``). The name is timm's registered model of
    the same shape when there is one (``vit_base_patch16_224`` for ViT-B/16 at 224 px), else
    ``FALLBACK_ARCH``; the arguments are complete either way, so either name builds it."""
    c = config
    size = SIZES.get((c["embed_dim"], c["depth"], c["num_heads"]))
    name = f"vit_{size}_patch{c['patch_size']}_{c['img_size']}" if size else ""
    args: dict[str, Any] = dict(img_size=c["img_size"], patch_size=c["patch_size"],
                                in_chans=c["in_chans"], embed_dim=c["embed_dim"], depth=c["depth"],
                                num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"], global_pool="token")
    if c["num_cls_tokens"] > 1:
        args.update(reg_tokens=c["num_cls_tokens"] - 1, no_embed_class=True)
    if c["timestep_cond"]:
        args.update(init_values=1.0)            # LayerScale parameters to hold the AdaLN gates
    # the registered name alone (no arguments) must build this very model
    simple = (c["num_cls_tokens"] == 1 and not c["timestep_cond"] and c["mlp_ratio"] == 4.0
              and c["in_chans"] == 3)
    return (name if simple and name and timm.is_model(name) else FALLBACK_ARCH), args


@torch.no_grad()
def timm_state_dict(encoder: ViTEncoder) -> dict[str, torch.Tensor]:
    """The encoder's weights (fp32, CPU) under timm's names; see the module docstring."""
    sd = {k: v.detach().float().cpu() for k, v in encoder.state_dict().items()}
    out = {k: v for k, v in sd.items() if k.split(".")[0] in ("patch_embed", "blocks", "norm")}
    p = encoder.num_prefix
    gh, gw = encoder.grid                                                 # the pre-training grid
    pos = encoder.position_embedding((gh * encoder.patch_size, gw * encoder.patch_size))
    pos = pos.detach().float().cpu()                                      # (1, P + L, D)
    out["pos_embed"] = pos if p == 1 else pos[:, p:]
    out["cls_token"] = sd["cls_token"][:, :1]
    if p > 1:
        out["reg_token"] = sd["cls_token"][:, 1:]
    if encoder.t_embed is not None:
        out = {k: v for k, v in out.items() if ".modulation." not in k} | fold_adaln(encoder)
    return out


def fold_adaln(encoder: ViTEncoder) -> dict[str, torch.Tensor]:
    """UMD's AdaLN blocks at t = 0 as plain timm blocks' LayerNorm affines and LayerScales."""
    t0 = torch.zeros(1, dtype=torch.long, device=encoder.cls_token.device)
    c = encoder.t_embed(t0)                                                # (1, D): t = 0
    out = {}
    for i, block in enumerate(encoder.blocks):
        mods = block.modulation(c)[0].detach().float().cpu()                 # (6 D,)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods.chunk(6)
        out.update({f"blocks.{i}.norm1.weight": 1 + scale1, f"blocks.{i}.norm1.bias": shift1,
                    f"blocks.{i}.ls1.gamma": gate1, f"blocks.{i}.norm2.weight": 1 + scale2,
                    f"blocks.{i}.norm2.bias": shift2, f"blocks.{i}.ls2.gamma": gate2})
    return out


def to_timm(encoder: ViTEncoder) -> tuple[str, nn.Module]:
    """(architecture, timm model with the encoder's weights, ``num_classes=0``), loaded with
    ``strict=True``: a key missing on either side raises here, not in the user's loader."""
    arch, args = timm_model_args(encoder.config)
    sd = timm_state_dict(encoder)
    with torch.device("meta"):               # no random init of weights about to be replaced
        model = timm.create_model(arch, pretrained=False, num_classes=0, **args)
    model.load_state_dict(sd, strict=True, assign=True)
    return arch, model.eval()
