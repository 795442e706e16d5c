"""Method registry. Import paths, not classes, so that the login-node CLI can validate a method
name without importing torch; ``build_method`` imports the chosen one."""
from __future__ import annotations

import importlib
from typing import Any

REGISTRY: dict[str, str] = {
    "mae": "hpc_mim.methods.mae:MAE",
    "noised_mim": "hpc_mim.methods.noised_mim:NoisedMIM",
    "latent_mim": "hpc_mim.methods.latent_mim:LatentMIM",
    "lut": "hpc_mim.methods.lut:LUT",
    "umd": "hpc_mim.methods.umd:UMD",
}


def build_method(model_cfg: Any, method_cfg: Any):
    """Instantiate the method named by ``method_cfg.name`` (a ``MIMMethod``)."""
    if method_cfg.name not in REGISTRY:
        raise KeyError(f"unknown method {method_cfg.name!r}; choose one of {sorted(REGISTRY)}")
    module, cls = REGISTRY[method_cfg.name].split(":")
    return getattr(importlib.import_module(module), cls)(model_cfg, method_cfg)
