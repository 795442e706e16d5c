"""UMD: Unified Auto-Encoding with Masked Diffusion (Hansen-Estruch et al., arXiv 2406.17688).

Reference code: philippe-eecs/small-vision (JAX). What it computes (shared/methods.md):

1. Each batch is split: the first ``int(B * no_noise_prob)`` samples are clean (t = 0) and
   masked at ``method.mask_ratio`` (0.75); the rest get ``t ~ U{0..T-1}``,
   ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps`` (cosine schedule, T = 1000) and are masked at
   ``noised_mask_ratio`` (0.375). The model is told ``t + 1``, so timestep 0 means clean --
   which is how evaluations run the exported encoder. (A fixed count per batch, floored, as the
   authors' ``train_ae.py`` does.)
2. Encoder and decoder are conditioned on the timestep by AdaLN; the encoder has 4 cls tokens
   whose mean is the representation (``pooling: cls``) and the decoder's one prefix token
   (the authors' ``decode(rep, ...)``): the decoder sees the mean, not the 4 tokens. The
   decoder's output is shift/scale-modulated by the timestep before the prediction (the
   authors' ``final_modulation``, zero-init).
3. Dual prediction: the decoder outputs 2 x p*p*C per patch, (x0, eps).
   Clean samples: ``mae_loss`` = MSE of x0 on masked pixels. Noised samples: ``eps_loss`` = MSE
   of eps on visible pixels, ``x0_loss`` = MSE of x0 on masked pixels, ``dit_loss = (eps_loss
   + x0_loss) / 2``. With ``noised_mask_ratio: 0`` nothing is masked and, as in the authors'
   code, both errors are means over every patch (the DiT ablation): ``dit_loss = (mean eps
   error + mean x0 error) / 2``.
4. ``loss = dit_loss * (1 - r) + mae_loss * r`` with r the clean fraction of the batch.
5. Gradient clipping 1.0 is ``train.clip_grad`` in configs/methods/umd.yaml.

The authors' recipe is configs/methods/umd.yaml's (checked in tests/methods/test_authors_recipes.py):
- Pixels in [-1, 1] (``data.normalize: symmetric``; ae_i1k.py ``value_range(-1, 1)``) for the
  input, its noising (x_t and the x0 target live in that range) and every evaluation of the run
  (the run's config, read through ``Config.dataset_info``). ``data.normalize: dataset`` (the
  per-channel standardised pixels, ~2x the std: ~4x the signal-to-noise ratio at every t, i.e.
  another noise schedule) is the project's earlier choice, kept as an option.
- Crops of area (0.8, 1) (``data.crop_scale``; ae_i1k.py ``area_min=80``), not MAE's (0.2, 1).
- Learned position embeddings in the encoder and the decoder (``model.pos_embed: learned``;
  models/ae.py ``pos_embedding``, ``dec_pos_embedding``, normal std 1/sqrt(L)); ``sincos`` is the
  option every other method uses.
- No weight decay on the cls tokens and the mask token (``train.no_weight_decay``; models/ae.py
  ``no_decay_list``); the LayerNorm scales, which the authors decay, follow timm's rule (no decay).
Departures left: the cls tokens start at normal(0.02) (the authors' at zero); crops are resized
by FFCV (the authors' by tf.image.resize, bilinear).
- The decoder keeps a linear input projection only when ``method.decoder_dim`` differs from the
  encoder's width; at the paper's width (768) it is the identity, as in the authors' code.
Variants by config: MAE (no_noise_prob 1), DiT (no_noise_prob 0, noised_mask_ratio 0),
MaskDiT (noised_mask_ratio 0.5).
"""
from __future__ import annotations

import torch

from hpc_mim.masking import patchify, random_masking
from hpc_mim.methods.base import MIMMethod
from hpc_mim.methods.mae import masked_mse
from hpc_mim.models.decoder import MAEDecoder
from hpc_mim.models.vit import build_encoder
from hpc_mim.noise import add_noise, cosine_alphas_cumprod


class UMD(MIMMethod):
    """``forward({"image": (B, C, H, W)})`` -> loss, mae_loss, dit_loss, x0_loss, eps_loss."""

    terms = ("mae_loss", "dit_loss", "x0_loss", "eps_loss")

    def __init__(self, model_cfg, method_cfg) -> None:
        super().__init__()
        o = method_cfg.umd
        self.encoder = build_encoder(model_cfg, num_cls_tokens=o.num_cls_tokens, timestep_cond=True)
        d, p = self.encoder.embed_dim, self.encoder.patch_size
        self.patch_dim = p * p * self.encoder.patch_embed.proj.in_channels
        self.decoder = MAEDecoder(self.encoder.grid, d, method_cfg.decoder_dim, method_cfg.decoder_depth,
                                  method_cfg.decoder_heads, out_dim=2 * self.patch_dim,
                                  num_prefix=1, timestep_cond=True,
                                  input_proj=method_cfg.decoder_dim != d,
                                  learned_pos=self.encoder.config["pos_embed"] == "learned")
        # float64 (alpha_bar near 1 must not round to 1), on the training device, not saved
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(o.diffusion_steps), persistent=False)
        self.clean_ratio, self.noised_ratio = method_cfg.mask_ratio, o.noised_mask_ratio
        self.no_noise_prob, self.steps = o.no_noise_prob, o.diffusion_steps

    def predict(self, x: torch.Tensor, t: torch.Tensor, mask_ratio: float):
        """Masked encode/decode at timesteps t (B,): ((x0, eps) predictions (B, L, P) each, mask
        (B, L) with 1 = hidden). The decoder's prefix is the mean of the P cls tokens."""
        m = random_masking(x.shape[0], self.encoder.num_patches, mask_ratio, x.device)
        z = self.encoder(x, m.ids_keep, t)                                  # (B, P+K, D)
        p = self.encoder.num_prefix
        z = torch.cat([z[:, :p].mean(dim=1, keepdim=True), z[:, p:]], dim=1)  # (B, 1+K, D)
        out = self.decoder(z, m.ids_restore, t)                              # (B, L, 2P)
        return out[..., :self.patch_dim], out[..., self.patch_dim:], m.mask.to(out.dtype)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0 = batch["image"]                                                  # (B, C, H, W)
        b, p = x0.shape[0], self.encoder.patch_size
        n_clean = int(b * self.no_noise_prob)
        zero = x0.sum() * 0
        mae_loss = dit_loss = x0_loss = eps_loss = zero
        if n_clean:
            clean = x0[:n_clean]
            t0 = torch.zeros(n_clean, dtype=torch.long, device=x0.device)
            pred_x0, _, mask = self.predict(clean, t0, self.clean_ratio)
            mae_loss = masked_mse(pred_x0, patchify(clean, p), mask)
        if n_clean < b:
            x = x0[n_clean:]
            t = torch.randint(0, self.steps, (b - n_clean,), device=x0.device)
            xt, eps = add_noise(x, self.alphas_cumprod[t])
            pred_x0, pred_eps, mask = self.predict(xt, t + 1, self.noised_ratio)
            # ratio 0 (DiT): no mask, so the x0 error counts over every patch, like eps's
            hidden = mask if self.noised_ratio > 0 else torch.ones_like(mask)
            x0_loss = masked_mse(pred_x0, patchify(x, p), hidden)
            eps_loss = masked_mse(pred_eps, patchify(eps, p), 1 - mask)
            dit_loss = (eps_loss + x0_loss) / 2
        r = n_clean / b
        return {"loss": dit_loss * (1 - r) + mae_loss * r, "mae_loss": mae_loss,
                "dit_loss": dit_loss, "x0_loss": x0_loss, "eps_loss": eps_loss}
