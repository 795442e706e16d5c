"""Per-method options: one dataclass per method, a section of ``method:`` in the config.

``method.mask_ratio``, ``method.norm_pix_loss`` and ``method.decoder_*`` are shared by every
method that uses them; what only one method reads lives in its own section, e.g.
``method.noised_mim.noise_block``. A preset may set the sections of several methods at once:
only the chosen method's section is used (and written into the run's config), and only it is
checked against the shared ``mask_ratio`` and the model depth. Every numeric option has its
range in its class's ``RANGES`` table, checked as values are read (hpc_mim/config_checks.py).
Torch-free, so the login-node CLI validates them before anything is queued.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hpc_mim.config_checks import LAYERS_MAX, PIXELS_MAX, WIDTH_MAX, Range
from hpc_mim.config_error import ConfigError


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"method.{key}: {message}")


@dataclass
class NoisedMIMOptions:
    """Hybrid masking + feature-space denoising inside the encoder (arXiv 2412.19104)."""
    style: str = "encoder"              # encoder (paper) | decoder (MAE-style ablation)
    noise_ratio: float = 0.2            # fraction of tokens noised; method.mask_ratio are masked
    noise_block: int = 2                # noise added to hidden states after this block; 0 = pixels
    noise_target: str = "pixels"        # what noised tokens regress: pixels (norm_pix) | features
    noise_steps: int = 1000             # cosine schedule length T
    noise_max_t: int = 500              # t ~ U{0..noise_max_t-1}: alpha_bar >= 0.49 (SNR >= 1) at T 1000
    noise_scale: str = "rms"            # rms: eps x each token's RMS (features) | unit: eps ~ N(0, 1)
    noise_loss_weight: float = 1.0
    disruption_weight: float = 0.1      # lambda of the disruption loss; 0 disables it
    RANGES: ClassVar[dict[str, Range]] = {
        "noise_ratio": "(0, 1)", "noise_block": (f"[0, {LAYERS_MAX})", "0 = pixels"),
        "noise_steps": "[1, 1000000]", "noise_max_t": "[1, 1000000]", "noise_loss_weight": "[0, inf)",
        "disruption_weight": ("[0, inf)", "0 disables it")}

    def validate(self, mask_ratio: float | None = None, depth: int | None = None) -> None:
        _check(self.style in ("encoder", "decoder"), "noised_mim.style",
               f"{self.style!r}; choose encoder or decoder")
        _check(0.0 < self.noise_ratio < 1.0, "noised_mim.noise_ratio", "must be in (0, 1)")
        if mask_ratio is not None:
            _check(mask_ratio + self.noise_ratio < 1.0, "mask_ratio",
                   f"{mask_ratio} + method.noised_mim.noise_ratio={self.noise_ratio} must be < 1 "
                   "(the masked and noised token sets are disjoint)")
        _check(self.noise_target in ("pixels", "features"), "noised_mim.noise_target",
               f"{self.noise_target!r}; choose pixels or features")
        _check(self.noise_block >= 0, "noised_mim.noise_block", "must be >= 0")
        if depth is not None:
            _check(self.noise_block < depth, "noised_mim.noise_block",
                   f"{self.noise_block} must be < model.depth={depth} (noise goes after that block)")
        _check(self.noise_target == "pixels" or self.noise_block > 0, "noised_mim.noise_target",
               "features needs noise_block >= 1 (block 0 noises pixels)")
        _check(self.noise_steps >= 1, "noised_mim.noise_steps", "must be >= 1")
        _check(1 <= self.noise_max_t <= self.noise_steps, "noised_mim.noise_max_t",
               f"{self.noise_max_t} must be in [1, method.noised_mim.noise_steps={self.noise_steps}]")
        _check(self.noise_scale in ("rms", "unit"), "noised_mim.noise_scale",
               f"{self.noise_scale!r}; choose rms or unit")
        _check(self.disruption_weight >= 0, "noised_mim.disruption_weight", "must be >= 0")


@dataclass
class LatentMIMOptions:
    """Latent MIM with patch discrimination (arXiv 2407.15837)."""
    gap: int = 4                        # max pixels between grid cells' patches (ViT-B/16: 4)
    head_hidden_dim: int = 4096         # 3-layer projection head D -> H -> H -> D
    temperature: float = 0.2            # InfoNCE tau
    momentum: float = 0.99              # EMA target encoder, cosine to 1
    target: str = "ema"                 # ema (paper) | online: the online encoder + head, with
                                        # gradients (the jointly optimised target of the paper's
                                        # section 3.3 that collapses; an ablation)
    sim_reg_weight: float = 0.0         # similarity regulariser c (authors' command: 0.1)
    sim_target: list[float] = field(default_factory=lambda: [0.75, 0.25])  # s, cosine start -> end
    RANGES: ClassVar[dict[str, Range]] = {
        "gap": f"[0, {PIXELS_MAX}]", "head_hidden_dim": f"[1, {WIDTH_MAX}]",
        "temperature": ("(0, inf)", "InfoNCE divides by it"), "momentum": "[0, 1]",
        "sim_reg_weight": ("[0, inf)", "0 turns the regulariser off"),
        "sim_target": ("[-1, 1]", "cosine similarities")}

    def validate(self, mask_ratio: float | None = None, depth: int | None = None) -> None:
        _check(self.gap >= 0, "latent_mim.gap", "must be >= 0")
        _check(self.head_hidden_dim > 0, "latent_mim.head_hidden_dim", "must be > 0")
        _check(self.temperature > 0, "latent_mim.temperature", "must be > 0")
        _check(0.0 <= self.momentum <= 1.0, "latent_mim.momentum", "must be in [0, 1]")
        _check(self.target in ("ema", "online"), "latent_mim.target",
               f"{self.target!r}; choose ema or online")
        _check(len(self.sim_target) == 2, "latent_mim.sim_target", "must be [start, end]")


@dataclass
class LUTOptions:
    """Learning with unmasked tokens (arXiv 2310.13593)."""
    head_hidden_dim: int = 4096         # projector / predictor D -> H -> D
    cross_view_weight: float = 0.25
    momentum: float = 0.996             # EMA teacher, cosine to 1
    RANGES: ClassVar[dict[str, Range]] = {
        "head_hidden_dim": f"[1, {WIDTH_MAX}]", "cross_view_weight": "[0, inf)", "momentum": "[0, 1]"}

    def validate(self, mask_ratio: float | None = None, depth: int | None = None) -> None:
        _check(self.head_hidden_dim > 0, "lut.head_hidden_dim", "must be > 0")
        if mask_ratio is not None:
            _check(mask_ratio >= 0.5, "mask_ratio",
                   f"{mask_ratio}: lut needs >= 0.5 (two disjoint visible sets from one shuffle)")
        _check(self.cross_view_weight >= 0, "lut.cross_view_weight", "must be >= 0")
        _check(0.0 <= self.momentum <= 1.0, "lut.momentum", "must be in [0, 1]")


@dataclass
class UMDOptions:
    """Unified masked diffusion (arXiv 2406.17688); method.mask_ratio is the clean samples'."""
    noised_mask_ratio: float = 0.375
    no_noise_prob: float = 0.5          # fraction of each batch kept clean (t = 0)
    diffusion_steps: int = 1000
    num_cls_tokens: int = 4
    RANGES: ClassVar[dict[str, Range]] = {
        "noised_mask_ratio": "[0, 1)", "no_noise_prob": ("[0, 1]", "a probability"),
        "diffusion_steps": "[1, 1000000]", "num_cls_tokens": f"[1, {LAYERS_MAX}]"}

    def validate(self, mask_ratio: float | None = None, depth: int | None = None) -> None:
        _check(0.0 <= self.noised_mask_ratio < 1.0, "umd.noised_mask_ratio", "must be in [0, 1)")
        _check(0.0 <= self.no_noise_prob <= 1.0, "umd.no_noise_prob", "must be in [0, 1]")
        _check(self.diffusion_steps >= 1, "umd.diffusion_steps", "must be >= 1")
        _check(self.num_cls_tokens >= 1, "umd.num_cls_tokens", "must be >= 1")
