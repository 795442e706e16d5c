"""Writing one converted split: the .beton file and its manifest (counts, classes, checksum)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hpc_mim.datasets import file_sha256 as sha256


def write_manifest(beton: Path, *, source: str, classes: list[str], labels: list[int],
                   extra: dict[str, Any] | None = None) -> Path:
    """``<beton>.json`` with sample and per-class counts and the file's sha256."""
    counts = [0] * len(classes)
    for y in labels:
        counts[y] += 1
    manifest = {
        "file": beton.name, "source": source, "num_samples": len(labels),
        "classes": classes, "class_counts": dict(zip(classes, counts)),
        "sha256": sha256(beton), "bytes": beton.stat().st_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {}),
    }
    out = beton.with_suffix(".json")
    out.write_text(json.dumps(manifest, indent=2))
    return out


def write_split(path: Path, dataset: Any, *, source: str, classes: list[str], labels: list[int],
                max_resolution: int | None, mode: str, num_workers: int = 2,
                largest: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """``dataset[i] -> (HWC uint8 RGB, label)`` to ``path`` (.beton), then ``path``.json.
    ``largest``: the biggest image {"file", "width", "height"}; the FFCV page size is made to
    hold it (images are never resized for the page), and the manifest says so."""
    from hpc_mim.data.ffcv_io import MIN_PAGE, page_size_for, write_beton

    start = time.time()
    page = MIN_PAGE
    if largest and largest.get("width"):
        page = page_size_for(largest["width"], largest["height"], mode, max_resolution)
    print(f"[data_prep] {len(labels)} images, {len(classes)} classes -> {path} "
          f"(page size {page >> 20} MiB)", flush=True)
    write_beton(str(path), dataset, max_resolution, mode, num_workers=num_workers, page_size=page)
    return write_manifest(path, source=source, classes=classes, labels=labels,
                          extra={"mode": mode, "max_resolution": max_resolution, "page_size": page,
                                 "largest_image": largest, "seconds": round(time.time() - start, 1),
                                 **(extra or {})})


def run_cli(convert: Callable[[], Any]) -> int:
    """Run a converter; a missing or malformed input is one line on stderr and exit code 1."""
    try:
        convert()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
