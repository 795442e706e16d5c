"""The dataset registry (configs/datasets.yaml): converted datasets by name, of three kinds.

- ``classification``: FFCV ``train`` / ``val`` .beton files (data_prep.fashion_mnist,
  data_prep.image_folder for ImageNet, CUB, NABirds, iNat, Cars, Aircraft ...).
- ``segmentation``: a folder in the ADE20K layout (``format: ade20k``).
- ``detection``: a folder in the COCO layout (``format: coco``).

Paths are relative to ``data.root``. Torch-free: ``jobs/submit.py`` checks the files on the
login node before anything is queued.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from hpc_mim.config_error import ConfigError

KINDS = ("classification", "segmentation", "detection")
REGISTRY_PATH = Path(__file__).resolve().parent.parent / "configs" / "datasets.yaml"


def load_registry() -> dict[str, dict[str, Any]]:
    with open(REGISTRY_PATH) as f:
        return yaml.safe_load(f)


def dataset_info(name: str, root: str, key: str = "data.dataset") -> dict[str, Any]:
    """Registry entry ``name`` with ``kind`` filled in and its paths made absolute."""
    registry = load_registry()
    if name not in registry:
        raise ConfigError(f"{key}: unknown dataset {name!r}; configs/datasets.yaml has {sorted(registry)}")
    info = dict(registry[name], name=name)
    info.setdefault("kind", "classification")
    base = Path(root).resolve()             # relative to the current directory
    for field in ("train", "val", "root"):
        if field in info:
            info[field] = str(base / info[field])
    return info


def required_files(info: dict[str, Any]) -> list[Path]:
    """What must exist before a job reads dataset ``info``: the .beton files, or the folders
    and annotation files of the ADE20K / COCO layout."""
    if info["kind"] == "classification":
        return [Path(info["train"]), Path(info["val"])]
    root = Path(info["root"])
    if info["kind"] == "segmentation":
        return [root / sub / split for sub in ("images", "annotations")
                for split in ("training", "validation")]
    return [root / "annotations" / f"instances_{split}2017.json" for split in ("train", "val")] + \
           [root / f"{split}2017" for split in ("train", "val")]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The file's sha256, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest(info: dict[str, Any]) -> dict[str, str]:
    """What identifies a converted dataset's content, file by file: a .beton by the sha256 its
    converter recorded in the manifest next to it (``<split>.json``; computed once, at
    conversion), an annotation file by its sha256, an image folder by the sha256 of its sorted
    (relative path, size) listing (hashing every image of COCO at each submission would cost
    minutes)."""
    out: dict[str, str] = {}
    for path in required_files(info):
        if path.is_dir():
            listing = sorted((str(p.relative_to(path)), p.stat().st_size)
                             for p in path.rglob("*") if p.is_file())
            out[path.name] = "listing:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()
            continue
        recorded = path.with_suffix(".json")
        if path.suffix == ".beton" and recorded.is_file():
            out[path.name] = json.loads(recorded.read_text()).get("sha256") or file_sha256(path)
        else:
            out[path.name] = file_sha256(path)
    return out


def manifest_sha256(info: dict[str, Any]) -> str:
    """One sha256 for the dataset: of its ``manifest`` (sorted JSON)."""
    return hashlib.sha256(json.dumps(manifest(info), sort_keys=True).encode()).hexdigest()
