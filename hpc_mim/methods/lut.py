"""LUT: Learning with Unmasked Tokens Drives Stronger Vision Learners (Kim, Chun, Heo, Han;
arXiv 2310.13593). Reference code: naver-ai/lut (built on facebookresearch/mae).

What it computes (shared/methods.md):

1. Two views of each image, as the authors' ``TwoGlobalViewAugmentation`` (main_lut.py): each
   view its own Resize(short side) + RandomCrop(padding 4, reflect) + flip (``data.crop:
   pad`` in configs/methods/lut.yaml; not MAE's RandomResizedCrop); view 2 adds colour jitter
   (p 0.8, the four ops in a random order) + one of grayscale / solarize / blur
   (``extra_views = ("strong_color",)``, hpc_mim/data/views.py).
2. One shuffle per sample masks both views: view 1 keeps ``ids[:, :K]``, view 2 keeps
   ``ids[:, K:2K]`` -- disjoint 25% visible sets (needs mask_ratio >= 0.5).
3. MAE branch on view 1: decoder reconstructs its masked patches (norm_pix MSE).
4. Teacher = EMA of the student encoder + projector (momentum cosine 0.996 -> 1), in eval mode
   (its BatchNorm uses running statistics, EMA'd from the student's; methods/ema.py), encodes
   both views unmasked. Projector and predictor: 2-layer MLPs D -> H -> D with BatchNorm synced
   across ranks and ReLU, no bias.
5. ``student_v = predictor(projector(mean of view v's visible patch tokens))``, each view
   through the heads on its own (its own batch statistics, as the authors' model),
   ``teacher_v = projector_ema(mean of view v's patch tokens)``;
   ``L = L_mae(view 1) + 0.25 * mean over (v, v'), v != v' of (2 - 2 cos(student_v, sg(teacher_v')))``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpc_mim.masking import masking_from_shuffle, patchify
from hpc_mim.methods.base import MIMMethod
from hpc_mim.methods.ema import EMATeacher, cosine_momentum
from hpc_mim.methods.mae import masked_mse, norm_pix
from hpc_mim.models.decoder import MAEDecoder
from hpc_mim.models.heads import mlp_head
from hpc_mim.models.vit import build_encoder


def cross_view_loss(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
    """Mean over ordered pairs of different views of ``2 - 2 cos(student_v, teacher_v')``
    (BYOL's normalised MSE), averaged over the batch, in fp32. Each tensor (B, D)."""
    terms = [2 - 2 * F.cosine_similarity(s.float(), t.detach().float(), dim=-1).mean()
             for i, s in enumerate(students) for j, t in enumerate(teachers) if i != j]
    return torch.stack(terms).mean()


class LUT(MIMMethod):
    """``forward({"image": view 1, "strong_color": view 2})``, both (B, C, H, W) ->
    loss, mae_loss, cross_view_loss."""

    terms = ("mae_loss", "cross_view_loss")
    extra_views = ("strong_color",)

    def __init__(self, model_cfg, method_cfg) -> None:
        super().__init__()
        o = method_cfg.lut
        self.encoder = build_encoder(model_cfg)
        d, p = self.encoder.embed_dim, self.encoder.patch_size
        c = self.encoder.patch_embed.proj.in_channels
        self.decoder = MAEDecoder(self.encoder.grid, d, method_cfg.decoder_dim, method_cfg.decoder_depth,
                                  method_cfg.decoder_heads, out_dim=p * p * c)
        self.projector = mlp_head(d, o.head_hidden_dim, d, layers=2, norm="bn", act=nn.ReLU)
        self.predictor = mlp_head(d, o.head_hidden_dim, d, layers=2, norm="bn", act=nn.ReLU)
        self.teacher = EMATeacher(encoder=self.encoder, projector=self.projector)
        self.keep = int(self.encoder.num_patches * (1 - method_cfg.mask_ratio))
        if 2 * self.keep > self.encoder.num_patches:
            raise ValueError(f"lut needs method.mask_ratio >= 0.5 for two disjoint visible sets, "
                             f"got {method_cfg.mask_ratio}")
        self.norm_pix_loss, self.weight, self.base_momentum = (
            method_cfg.norm_pix_loss, o.cross_view_weight, o.momentum)

    def students(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "projector": self.projector}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views = [batch["image"], batch["strong_color"]]                      # (B, C, H, W) each
        b, k = views[0].shape[0], self.keep
        ids = torch.argsort(torch.rand(b, self.encoder.num_patches, device=views[0].device), dim=1)
        m1 = masking_from_shuffle(ids, k)                                    # view 1: ids[:, :K]
        latents = [self.encoder(views[0], m1.ids_keep), self.encoder(views[1], ids[:, k:2 * k])]

        pred = self.decoder(latents[0], m1.ids_restore)                      # (B, L, p*p*C)
        target = patchify(views[0], self.encoder.patch_size)
        if self.norm_pix_loss:
            target = norm_pix(target)
        mae_loss = masked_mse(pred, target, m1.mask)

        # each view through the heads on its own: BatchNorm statistics per view (B samples)
        students = [self.predictor(self.projector(z[:, 1:].mean(dim=1))) for z in latents]  # (B, D)
        with torch.no_grad():                # eval mode: running statistics (methods/ema.py)
            teachers = [self.teacher["projector"](self.teacher["encoder"](v)[:, 1:].mean(dim=1))
                        for v in views]
        cv = cross_view_loss(students, teachers)
        return {"loss": mae_loss + self.weight * cv, "mae_loss": mae_loss, "cross_view_loss": cv}

    @torch.no_grad()
    def on_optimizer_step(self, progress: float) -> None:
        self.teacher.update(self.students(), cosine_momentum(self.base_momentum, progress))

    def ema_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return self.teacher.parameters_of(self.students())
