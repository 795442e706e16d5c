"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., arXiv 2111.06377).

Reference code: facebookresearch/mae:models_mae.py. Per-sample random masking keeps
``int(L * (1 - mask_ratio))`` patches; the encoder sees only those (+ cls); the decoder gets the
mask tokens back in place and predicts every patch; the loss is the MSE to the per-patch
normalised pixels (``norm_pix_loss``) averaged over the masked patches only.
"""
from __future__ import annotations

import torch

from hpc_mim.masking import patchify, random_masking
from hpc_mim.methods.base import MIMMethod
from hpc_mim.models.decoder import MAEDecoder
from hpc_mim.models.vit import build_encoder


def norm_pix(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Normalise each patch (B, L, P) by its own mean and variance (MAE's norm_pix_loss)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches of the per-patch MSE: pred/target (B, L, P), mask (B, L).
    Computed in fp32 whatever the inputs (bf16 under autocast). A mask that selects nothing
    gives 0 (a term with nothing to cover), decided on the device: no host sync."""
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)          # (B, L)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)


class MAE(MIMMethod):
    """Masked autoencoder. ``forward({"image": (B, C, H, W)})`` -> ``{"loss": ()}``."""

    def __init__(self, model_cfg, method_cfg) -> None:
        super().__init__()
        self.encoder = build_encoder(model_cfg)
        self.mask_ratio = method_cfg.mask_ratio
        self.norm_pix_loss = method_cfg.norm_pix_loss
        p, c = self.encoder.patch_size, self.encoder.patch_embed.proj.in_channels
        self.decoder = MAEDecoder(self.encoder.grid, self.encoder.embed_dim, method_cfg.decoder_dim,
                                  method_cfg.decoder_depth, method_cfg.decoder_heads, out_dim=p * p * c)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        imgs = batch["image"]                                                # (B, C, H, W)
        m = random_masking(imgs.shape[0], self.encoder.num_patches, self.mask_ratio, imgs.device)
        latent = self.encoder(imgs, m.ids_keep)                              # (B, 1+K, D)
        pred = self.decoder(latent, m.ids_restore)                           # (B, L, p*p*C)
        target = patchify(imgs, self.encoder.patch_size)                     # (B, L, p*p*C)
        if self.norm_pix_loss:
            target = norm_pix(target)
        return {"loss": masked_mse(pred, target, m.mask)}
