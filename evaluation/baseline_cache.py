"""The random-init baseline's metrics, computed once per (architecture, evaluation settings,
seed) and reused by every run that asks for the same.

A randomly initialised encoder is a function of its architecture and the seed alone, so its
kNN, probe, fine-tuning or dense figures are the same for every method pre-trained with that
architecture: a sweep of five methods, or a second demo, would otherwise recompute them each
time. The key hashes everything the result depends on: the encoder's architecture (as exported
in encoder.pt, so UMD's timestep-conditioned encoder is another key), the evaluation's settings
and seed, the job's label, dataset manifest and pixel normalisation (UMD's runs read [-1, 1] pixels:
``data.normalize``), the world size (sharded batches), the torch
version and the source of hpc_mim/ and evaluation/ (a code change invalidates every entry).
Entries live next to the runs that made them: ``<run>/../.baseline_cache/<label>-<key>.json``,
so the cells of one sweep (``runs/<sweep>/<cell>``) share theirs and plain runs (``runs/<name>``)
theirs. Reused children carry the MLflow tag ``reused_from`` and the report says so.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from hpc_mim.rundir import RunDir, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of every .py file of hpc_mim/ and evaluation/, in path order."""
    h = hashlib.sha256()
    for package in ("hpc_mim", "evaluation"):
        for path in sorted((ROOT / package).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def architecture(run: RunDir, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The encoder's constructor arguments: encoder.pt's (what random_init rebuilds), else the
    config's model section."""
    if run.encoder.is_file():
        return torch.load(run.encoder, map_location="cpu", weights_only=True)["model"]
    return model_cfg


def cache_file(run: RunDir, label: str, params: dict[str, Any], arch: dict[str, Any],
               dataset_digest: str, world_size: int, pixels: tuple[Any, Any] = ((), ())) -> Path:
    """``pixels``: the (mean, std) the evaluation's loaders normalise with."""
    key = {"label": label, "params": params, "architecture": arch, "dataset": dataset_digest,
           "pixels": [list(pixels[0]), list(pixels[1])], "world_size": world_size, "torch": torch.__version__, "code": code_digest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return run.root.parent / ".baseline_cache" / f"{label}-{digest[:16]}.json"


def lookup(path: Path) -> dict[str, Any] | None:
    """``{"metrics", "run_dir", "run_id"}`` of the run that computed this entry, or None."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):      # a torn entry is recomputed, never trusted
        return None


def store(path: Path, metrics: dict[str, float], run: RunDir, run_id: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"metrics": metrics, "run_dir": str(run.root),
                                        "run_id": run_id}, indent=2))
