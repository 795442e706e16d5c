"""Backbones and decoders. ``ViTEncoder`` is what evaluations rebuild from a run directory."""
from hpc_mim.models.vit import ViTEncoder, build_encoder, load_encoder, save_encoder

__all__ = ["ViTEncoder", "build_encoder", "load_encoder", "save_encoder"]
