"""Noised MIM: masked image modeling with feature-space denoising inside the encoder and a
disruption loss (Choi, Kim, Cha, Yi, Min; "Improving Generative Pre-Training: An In-depth
Study of Masked Image Modeling and Denoising Models", arXiv 2412.19104).

No public code exists (nor for MTO, arXiv 2404.08330, which the disruption loss derives
from), so every choice below is ours, made from the paper's text and configurable
(``method.noised_mim.*``, hpc_mim/methods/options.py):

1. Token sets (``masking.hybrid_masking``): one shuffle per sample; ``int(L * mask_ratio)``
   tokens masked, the next ``int(L * noise_ratio)`` noised, the rest clean. Disjoint.
2. Encoder style (the paper's, ``style: encoder``): SimMIM-like, the encoder processes all L
   tokens (+ cls); masked patches' embeddings are replaced by a learned [MASK] embedding before
   the position embedding is added; a linear head on the final tokens reconstructs.
   Decoder style (the ablation, ``style: decoder``): MAE-like, the encoder sees clean + noised
   tokens, an MAE decoder with mask tokens reconstructs.
3. Noise (``noise_block`` k): Gaussian noise on the noised tokens' hidden states at the output
   of encoder block k (1-based; k = 0 noises their pixels before the patch embedding):
   ``h' = sqrt(a) h + sqrt(1 - a) s eps`` with ``a = alpha_bar(t)`` of a cosine schedule of
   ``noise_steps`` T = 1000 steps, ``t ~ U{0..noise_max_t-1}`` per sample. Blocks are not
   conditioned on t: the ViT stays a plain ViT for transfer.
   Two choices the paper leaves open (it gives the noise level only as diffusion-style, and
   names the trade-off: too much noise makes the restoration impossible, too little brings
   nothing; shared/methods.md, seeds/noised_mim-2412.19104.md), decided so:
   - ``noise_scale: rms`` (default): s = each token's root-mean-square over its D features,
     stop-gradient, so that a = alpha_bar(t) means the signal-to-noise ratio a / (1 - a) it
     means for unit-scale pixels, whatever the scale of block k's hidden states (a pre-norm
     residual stream has no fixed scale: unit noise would be drowned or drowning, and would
     change as training moves that scale). Pixel-space noise (k = 0) keeps s = 1: standardised
     pixels are the unit scale. ``unit`` (s = 1 everywhere) is the earlier variant.
   - ``noise_max_t: 500`` (default): t stops where the cosine schedule's SNR falls to 1
     (alpha_bar(499) = 0.49); beyond it a noised token approaches pure noise (alpha_bar(999)
     ~ 2e-9), carries nothing of its clean content and turns into a masked token with a random
     embedding, which the masked set already covers. ``noise_max_t: 1000`` is the full range.
4. Targets: masked tokens -> norm_pix patches (``mask_loss``); noised tokens -> their clean
   patches (``noise_target: pixels``, same head) or their clean block-k hidden states,
   stop-gradient (``features``, a second linear head) (``noise_loss``), MSE.
5. Disruption loss (``disruption_weight`` lambda; 0 turns it off and skips its cost): in
   every block after block k (encoder style) -- or every decoder block (decoder style, where
   the masked tokens first meet the noised ones) -- the attention probability mass that
   noised queries put on masked keys and that masked queries put on noised keys, each
   averaged over the queries of its set, the two directions averaged, then the mean over heads,
   blocks and samples (``disruption_loss``). Its minimum 0 means the two sets ignore each other.
6. ``loss = mask_loss + noise_loss_weight * noise_loss + lambda * disruption``.

Ablations of the paper by config alone: ``noise_block`` 0/2/4/6, ``disruption_weight`` 0,
``style`` encoder/decoder.
"""
from __future__ import annotations

import torch
from torch import nn

from hpc_mim.masking import gather_tokens, hybrid_masking, patchify, unpatchify
from hpc_mim.methods.base import MIMMethod
from hpc_mim.methods.mae import masked_mse, norm_pix
from hpc_mim.models.decoder import MAEDecoder
from hpc_mim.models.vit import attention_probs, build_encoder
from hpc_mim.noise import add_noise, cosine_alphas_cumprod


def disruption_loss(probs: list[torch.Tensor], noised: torch.Tensor, masked: torch.Tensor,
                    num_prefix: int = 1) -> torch.Tensor:
    """Mean attention mass between the noised and masked token sets.

    probs: per block (B, h, P+L, P+L) softmax attention; noised, masked: (B, L) bool.
    For each block, sample and head: the mean over noised queries of their total attention on
    masked keys, and the same with the roles swapped; the two are averaged, then everything is
    averaged over heads, samples and blocks.
    """
    n, m = noised.float(), masked.float()                                    # (B, L)
    per_block = []
    for a in probs:
        a = a[..., num_prefix:, num_prefix:].float()                         # (B, h, L, L)
        on_masked = a @ m[:, None, :, None]                                  # (B, h, L, 1)
        on_noised = a @ n[:, None, :, None]
        n_to_m = (on_masked.squeeze(-1) * n[:, None]).sum(-1) / n.sum(-1, keepdim=True).clamp(min=1)
        m_to_n = (on_noised.squeeze(-1) * m[:, None]).sum(-1) / m.sum(-1, keepdim=True).clamp(min=1)
        per_block.append(((n_to_m + m_to_n) / 2).mean())
    return torch.stack(per_block).mean()


class NoisedMIM(MIMMethod):
    """``forward({"image": (B, C, H, W)})`` -> loss, mask_loss, noise_loss[, disruption]."""

    def __init__(self, model_cfg, method_cfg) -> None:
        super().__init__()
        o = method_cfg.noised_mim
        self.encoder = build_encoder(model_cfg)
        d, p = self.encoder.embed_dim, self.encoder.patch_size
        out = p * p * self.encoder.patch_embed.proj.in_channels
        self.opts, self.mask_ratio, self.norm_pix_loss = o, method_cfg.mask_ratio, method_cfg.norm_pix_loss
        if o.style == "encoder":
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
            nn.init.normal_(self.mask_token, std=0.02)
            self.head = nn.Linear(d, out)                                    # SimMIM's light head
            feat_in = d
        else:
            self.decoder = MAEDecoder(self.encoder.grid, d, method_cfg.decoder_dim,
                                      method_cfg.decoder_depth, method_cfg.decoder_heads, out_dim=out)
            feat_in = method_cfg.decoder_dim
        if o.noise_target == "features":
            self.feature_head = nn.Linear(feat_in, d)
        # float64 (alpha_bar near 1 must not round to 1), on the training device, not saved
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(o.noise_steps), persistent=False)
        self.terms = ("mask_loss", "noise_loss") + (("disruption",) if o.disruption_weight > 0 else ())

    def _noise(self, x: torch.Tensor, which: torch.Tensor, alpha_bar: torch.Tensor,
               rms: bool = False) -> torch.Tensor:
        """Noise the tokens ``which`` (B, N) bool of x (B, N, F); the others stay as they are.
        ``rms``: the noise of each token is scaled by that token's RMS over F (no gradient)."""
        eps = torch.randn_like(x)                                            # one draw, as before
        if rms:
            eps = eps * x.detach().float().pow(2).mean(-1, keepdim=True).sqrt()   # (B, N, 1)
        return torch.where(which.unsqueeze(-1), add_noise(x, alpha_bar, eps)[0], x)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        imgs = batch["image"]                                                # (B, C, H, W)
        enc, o, k = self.encoder, self.opts, self.opts.noise_block
        b, L = imgs.shape[0], enc.num_patches
        masked, noised = hybrid_masking(b, L, self.mask_ratio, o.noise_ratio, imgs.device)
        t = torch.randint(0, o.noise_max_t, (b,), device=imgs.device)
        alpha_bar = self.alphas_cumprod[t]
        patches = patchify(imgs, enc.patch_size)                             # (B, L, P)
        if k == 0:                                                           # pixel-space noise
            imgs = unpatchify(self._noise(patches, noised, alpha_bar), enc.patch_size,
                              imgs.shape[1], enc.grid)
        want_probs = o.disruption_weight > 0
        probs: list[torch.Tensor] = []
        clean_feats = None

        if o.style == "encoder":
            x = enc.embed(imgs, replace=masked, mask_token=self.mask_token)  # (B, 1+L, D)
            token_noised = noised
        else:
            # visible = clean + noised tokens, in patch order; the masked ones go last
            ids_shuffle = torch.argsort(masked.float(), dim=1, stable=True)
            ids_keep = ids_shuffle[:, :L - int(L * self.mask_ratio)]      # hybrid_masking's count
            x = enc.embed(imgs, ids_keep)                                    # (B, 1+K, D)
            token_noised = gather_tokens(noised.unsqueeze(-1).float(), ids_keep).squeeze(-1).bool()
        for i, block in enumerate(enc.blocks):
            if want_probs and o.style == "encoder" and i >= k:
                probs.append(attention_probs(block, x))
            x = block(x)
            if i + 1 == k:                                                   # feature-space noise
                clean_feats = x[:, 1:].detach()
                noised_feats = self._noise(x[:, 1:], token_noised, alpha_bar, o.noise_scale == "rms")
                x = torch.cat([x[:, :1], noised_feats], dim=1)
        x = enc.norm(x)

        if o.style == "encoder":
            tokens = x[:, 1:]                                                # (B, L, D)
            pred = self.head(tokens)
        else:
            y = self.decoder.prepare(x, torch.argsort(ids_shuffle, dim=1))   # (B, 1+L, d)
            for block in self.decoder.blocks:
                if want_probs:
                    probs.append(attention_probs(block, y))
                y = block(y)
            pred = self.decoder.head(y)
            tokens = y[:, 1:]
        target = norm_pix(patches) if self.norm_pix_loss else patches
        out = {"mask_loss": masked_mse(pred, target, masked)}
        if o.noise_target == "features":
            # decoder style: the clean features are those of the kept tokens; scatter to patch order
            if o.style == "decoder":
                full = clean_feats.new_zeros(b, L, clean_feats.shape[-1])
                clean_feats = full.scatter(1, ids_keep.unsqueeze(-1).expand_as(clean_feats), clean_feats)
            out["noise_loss"] = masked_mse(self.feature_head(tokens), clean_feats, noised)
        else:
            out["noise_loss"] = masked_mse(pred, target, noised)
        loss = out["mask_loss"] + o.noise_loss_weight * out["noise_loss"]
        if want_probs:
            out["disruption"] = disruption_loss(probs, noised, masked)
            loss = loss + o.disruption_weight * out["disruption"]
        return {"loss": loss, **out}
