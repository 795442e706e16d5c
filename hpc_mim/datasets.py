"""The dataset registry (configs/datasets.yaml): converted datasets by name, of three kinds.

- ``classification``: FFCV ``train`` / ``val`` .beton files (data_prep.fashion_mnist,
  data_prep.image_folder for ImageNet, CUB, NABirds, iNat, Cars, Aircraft ...).
- ``segmentation``: a folder in the ADE20K layout (``format: ade20k``).
- ``detection``: a folder in the COCO layout (``format: coco``).

Paths are relative to ``data.root``. Torch-free: ``jobs/submit.py`` checks the files on the
login node before anything is queued, and that a classification set's ``num_classes`` agrees
with the classes its converter recorded in the manifests (``check_classes``): a label beyond
``num_classes`` would otherwise surface as an index error inside kNN, hours later.

A .beton's identity: the sha256 its converter recorded in its manifest (``<split>.json``), as
long as the manifest describes the file next to it (the same size and mtime: a conversion
killed between its two renames leaves a new file beside the old manifest), else the file's
own sha256. ``file_identity`` is the cheap form the feature cache keys on.
"""
from __future__ import annotations

import hashlib
import json
import os
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
        recorded = recorded_sha256(path) if path.suffix == ".beton" else None
        out[path.name] = recorded or file_sha256(path)
    return out


def read_manifest(beton: Path) -> dict[str, Any] | None:
    """The converter's manifest next to ``beton`` (``<split>.json``), or None."""
    recorded = Path(beton).with_suffix(".json")
    if not recorded.is_file():
        return None
    try:
        data = json.loads(recorded.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def recorded_sha256(beton: Path) -> str | None:
    """The sha256 the manifest records, when it describes the file next to it: the same size,
    and the same mtime where it records one (older manifests do not); else None."""
    data = read_manifest(beton)
    if not data or not data.get("sha256"):
        return None
    st = os.stat(beton)
    if data.get("bytes") not in (None, st.st_size):
        return None
    if data.get("mtime_ns") is not None and data["mtime_ns"] // 10**9 != st.st_mtime_ns // 10**9:
        return None                     # seconds: a copy that keeps times may round them
    return str(data["sha256"])


def file_identity(path: Path) -> str:
    """A cheap identity of a dataset file, for caches of what is computed from it: the recorded
    sha256 (or "unrecorded") with the file's size, mtime and inode. A re-conversion writes a
    new file (a new inode, renamed into place), so it is another identity even where the
    content hash was not recomputed; a copy of the same data is only a cache miss."""
    st = os.stat(path)
    recorded = recorded_sha256(Path(path)) if str(path).endswith(".beton") else None
    return f"{recorded or 'unrecorded'}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def check_classes(info: dict[str, Any], key: str = "data.dataset") -> None:
    """A classification set's registry ``num_classes`` against each split's manifest: the
    number of classes the converter recorded (its labels are 0 .. that - 1: data_prep refuses
    any other). A ConfigError names the dataset, the manifest and both numbers. Splits without
    a manifest (converted by other means) are not checked."""
    if info.get("kind", "classification") != "classification" or "num_classes" not in info:
        return
    expected = int(info["num_classes"])
    for split in ("train", "val"):
        if split not in info:
            continue
        data = read_manifest(Path(info[split]))
        if data is None or not isinstance(data.get("classes"), list):
            continue
        where = Path(info[split]).with_suffix(".json")
        recorded = len(data["classes"])         # the converter's labels: 0 .. recorded - 1
        if recorded != expected:
            raise ConfigError(f"{key}={info['name']}: configs/datasets.yaml says num_classes: "
                              f"{expected}, but {where} records {recorded} classes (labels 0.."
                              f"{recorded - 1}); correct num_classes or convert the dataset again")


def manifest_sha256(info: dict[str, Any]) -> str:
    """One sha256 for the dataset: of its ``manifest`` (sorted JSON)."""
    return hashlib.sha256(json.dumps(manifest(info), sort_keys=True).encode()).hexdigest()
