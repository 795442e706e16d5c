"""LatentMIM: Towards Latent Masked Image Modeling (Wei, Gupta, Morgado; arXiv 2407.15837).

Reference code: yibingwei-1/LatentMIM. What it computes (shared/methods.md):

1. Non-contiguous grid: training crops are ``g * (p + gap)`` px; each of the g x g cells gives
   one p x p patch at its own random (dy, dx) offset, as the authors' ``Patchify`` (vits.py), so
   neighbouring patches never touch (``masking.noncontiguous_grid``). The packed patches are a
   normal ``g*p`` px ViT input.
2. ~90% masked: ``K = round(L * (1 - mask_ratio))`` visible patches (20 of 196 for ViT-B/16);
   every other patch is a target.
3. Online encoder on the visible patches, then a 3-layer projection head on every token
   (D -> H -> H -> D, LayerNorm, GELU, output norm, no bias).
4. Target = EMA copy of encoder + head (no gradient) on the target patches only; momentum
   cosine from 0.99 to 1 over training, updated every optimizer step. ``target: online`` is
   the paper's section 3.3 ablation instead: the online encoder + head give the targets, with
   gradients through both branches (joint optimisation, which the paper finds collapses).
5. Cross-attention decoder with visual cues (models/cross_decoder.py) predicts the targets; its
   queries are its own learned cls token and the mask token (zero at init), as xvits.py.
6. Loss: patch discrimination InfoNCE within each image (``patch_discrimination_loss``), plus
   the optional similarity regulariser ``c * (avgsim(pred) - s)^2 + c * (avgsim(vis) - s)^2``
   with s going 0.75 -> 0.25 by a cosine; avgsim is the mean of an image's full token cosine
   matrix, each token's similarity with itself included, as the authors' ``avg_pairwise_sim``
   (so with T tokens avgsim >= 1/T, not 0); ``vis`` the projected visible patch tokens.
7. Optimisation as main_lmim.py / util/lr_sched.py (configs/methods/latent_mim.yaml): the cosine
   ends at 0.25 x lr and the warm-up starts there (``train.warmup_from_floor``), and parameters
   named ``*embed*`` (the patch embedding, the decoder's input projection) get no weight decay
   (``train.no_weight_decay: [embed]``), besides timm's 1-D tensors and biases.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpc_mim.masking import masking_from_shuffle, noncontiguous_grid
from hpc_mim.methods.base import MIMMethod
from hpc_mim.methods.ema import EMATeacher, cosine_momentum
from hpc_mim.models.cross_decoder import CrossAttentionDecoder
from hpc_mim.models.heads import mlp_head
from hpc_mim.models.vit import build_encoder
from hpc_mim.similarity import mean_pairwise_similarity


def patch_discrimination_loss(pred: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE over the T target patches of each image; negatives are the image's other patches.

    pred, target (N, T, D). pred is standardised over the patches, both are L2-normalised,
    scores (N, T, T) = pred . target / tau, and the loss is cross-entropy against the diagonal,
    scaled by 2 * tau as in the authors' code.
    """
    pred, target = pred.float(), target.float()                              # fp32 under autocast
    pred = (pred - pred.mean(dim=1, keepdim=True)) / (pred.std(dim=1, keepdim=True) + 1e-4)
    pred, target = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    scores = torch.einsum("npd,nqd->npq", pred, target) / tau                # (N, T, T)
    n, t = scores.shape[:2]
    labels = torch.arange(t, device=scores.device).repeat(n)
    return F.cross_entropy(scores.flatten(0, 1), labels) * 2 * tau


class LatentMIM(MIMMethod):
    """``forward({"image": (B, C, g(p+gap), g(p+gap))})`` -> loss, infonce[, sim_reg]."""

    def __init__(self, model_cfg, method_cfg) -> None:
        super().__init__()
        o = method_cfg.latent_mim
        self.encoder = build_encoder(model_cfg)
        d = self.encoder.embed_dim
        self.head = mlp_head(d, o.head_hidden_dim, d, layers=3, norm="ln", act=nn.GELU, out_norm=True)
        self.decoder = CrossAttentionDecoder(self.encoder.grid, d, method_cfg.decoder_dim,
                                             method_cfg.decoder_depth, method_cfg.decoder_heads, d)
        # the online ablation keeps no copy: nothing to update, save or gather under ZeRO-3
        self.target = EMATeacher(encoder=self.encoder, head=self.head) if o.target == "ema" else None
        self.gap, self.tau, self.base_momentum = o.gap, o.temperature, o.momentum
        self.sim_weight, self.sim_target = o.sim_reg_weight, tuple(o.sim_target)
        self.num_keep = max(1, round(self.encoder.num_patches * (1 - method_cfg.mask_ratio)))
        # training progress in [0, 1]; a buffer so that a resumed run continues the s schedule
        self.register_buffer("progress", torch.zeros(()))
        self.terms = ("infonce", "sim_reg") if self.sim_weight > 0 else ("infonce",)

    @property
    def input_size(self) -> int:
        return self.encoder.grid[0] * (self.encoder.patch_size + self.gap)

    def students(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "head": self.head}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        enc = self.encoder
        x = noncontiguous_grid(batch["image"], enc.grid[0], enc.patch_size, self.gap)  # (B, C, gp, gp)
        ids = torch.argsort(torch.rand(x.shape[0], enc.num_patches, device=x.device), dim=1)
        m = masking_from_shuffle(ids, self.num_keep)
        ids_target = ids[:, self.num_keep:]                                  # (B, T) the hidden ones
        vis = self.head(enc(x, m.ids_keep))                                  # (B, 1+K, D)
        pred = self.decoder(vis, m.ids_keep, ids_target)                     # (B, T, D)
        if self.target is None:          # joint optimisation: gradients through the target too
            target = self.head(enc(x, ids_target))[:, 1:]                    # (B, T, D)
        else:
            with torch.no_grad():
                target = self.target["head"](self.target["encoder"](x, ids_target))[:, 1:]
        out = {"infonce": patch_discrimination_loss(pred, target, self.tau)}
        loss = out["infonce"]
        if self.sim_weight > 0:
            start, end = self.sim_target
            # on the device from the progress buffer: no host sync per step
            s = end + (start - end) * (1 + torch.cos(math.pi * self.progress)) / 2
            out["sim_reg"] = self.sim_weight * ((mean_pairwise_similarity(pred) - s) ** 2
                                                + (mean_pairwise_similarity(vis[:, 1:]) - s) ** 2)
            loss = loss + out["sim_reg"]
        return {"loss": loss, **out}

    @torch.no_grad()
    def on_optimizer_step(self, progress: float) -> None:
        self.progress.fill_(progress)
        if self.target is not None:
            self.target.update(self.students(), cosine_momentum(self.base_momentum, progress))

    def ema_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return self.target.parameters_of(self.students()) if self.target is not None else ([], [])
