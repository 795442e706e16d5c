"""Writing one converted split: the .beton file and its manifest (counts, classes, checksum),
the converters' refusal to replace data already there (``refuse_existing``: exit code 2 unless
``--force``) and their shared command-line ending (``run_cli``).

A split is written under a temporary name in its folder (hpc_mim/tempfiles.py) and
``os.replace``d over the old ``<split>.beton`` only when complete, then its manifest likewise:
FFCV's writer opens its output with ``open(path, 'wb')``, which truncated the good file of a
re-conversion at once, so every job that had it memory-mapped died of SIGBUS at its next page
fault, and a failed conversion then deleted it. Now a failure (a bad record, a writer worker
killed, Ctrl-C) leaves the old file and manifest as they were, byte for byte and inode for
inode, and removes the temporary; a temporary a killed conversion left behind is removed by
the next conversion into that folder. The manifest records the file's ``bytes`` and
``mtime_ns``, so a reader can tell a manifest that does not describe the file next to it (a kill
between the two renames) from one that does (hpc_mim/datasets.py ``manifest``).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from hpc_mim.datasets import file_sha256 as sha256
from hpc_mim.rundir import atomic_write_text
from hpc_mim.tempfiles import remove_stale, temp_name


class Refused(Exception):
    """The command would destroy data that is already there (exit code 2, nothing touched)."""


def refuse_existing(targets: list[Path], force: bool) -> None:
    """Raise ``Refused`` naming every target that exists, unless ``force``."""
    there = [str(t) for t in targets if os.path.lexists(t)]
    if there and not force:
        raise Refused(f"{', '.join(there)} already exist{'s' if len(there) == 1 else ''}: "
                      "this would replace them (real datasets live there under data.root); "
                      "choose another --out, or pass --force to replace them")


def manifest_path(beton: Path) -> Path:
    return Path(beton).with_suffix(".json")


def check_labels(labels: list[int], classes: list[str], source: str) -> None:
    """Every label in [0, len(classes)), else a ValueError naming ``source`` and the label
    (a negative one would be counted into the last class, a large one break kNN's one-hot)."""
    bad = next(((i, y) for i, y in enumerate(labels) if not 0 <= y < len(classes)), None)
    if bad is not None:
        raise ValueError(f"{source}: label {bad[1]} (sample {bad[0]}) is outside "
                         f"[0, {len(classes)}): {len(classes)} classes")


def write_manifest(beton: Path, *, source: str, classes: list[str], labels: list[int],
                   extra: dict[str, Any] | None = None) -> Path:
    """``<beton>.json`` with sample and per-class counts, the file's sha256, size and mtime;
    written atomically (readers see the old manifest or the new one, whole)."""
    check_labels(labels, classes, source)
    counts = [0] * len(classes)
    for y in labels:
        counts[y] += 1
    st = beton.stat()
    manifest = {
        "file": beton.name, "source": source, "num_samples": len(labels),
        "classes": classes, "class_counts": dict(zip(classes, counts)),
        "sha256": sha256(beton), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {}),
    }
    out = manifest_path(beton)
    atomic_write_text(out, json.dumps(manifest, indent=2))
    return out


def write_split(path: Path, dataset: Any, *, source: str, classes: list[str], labels: list[int],
                max_resolution: int | None, mode: str, num_workers: int = 2,
                largest: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """``dataset[i] -> (HWC uint8 RGB, label)`` to ``path`` (.beton), then ``path``.json, each
    replacing the old one only once complete (module docstring). ``largest``: the biggest image
    {"file", "width", "height"}; the FFCV page size is made to hold it (images are never
    resized for the page), and the manifest says so."""
    from hpc_mim.data.ffcv_io import MIN_PAGE, page_size_for, write_beton

    check_labels(labels, classes, source)            # before anything is written
    start = time.time()
    page = MIN_PAGE
    if largest and largest.get("width"):
        page = page_size_for(largest["width"], largest["height"], mode, max_resolution)
    print(f"[data_prep] {len(labels)} images, {len(classes)} classes -> {path} "
          f"(page size {page >> 20} MiB)", flush=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent)                        # what a killed conversion left here
    tmp = temp_name(path)
    try:
        write_beton(str(tmp), dataset, max_resolution, mode, num_workers=num_workers, page_size=page)
        os.replace(tmp, path)         # rename keeps the inode, size and mtime the manifest records
    finally:
        tmp.unlink(missing_ok=True)
    return write_manifest(path, source=source, classes=classes, labels=labels,
                          extra={"mode": mode, "max_resolution": max_resolution, "page_size": page,
                                 "largest_image": largest, "seconds": round(time.time() - start, 1),
                                 **(extra or {})})


def run_cli(convert: Callable[[], Any]) -> int:
    """Run a converter; a missing or malformed input is one line on stderr and exit code 1; a
    refusal to overwrite data already there (``Refused``) is one line and exit code 2."""
    try:
        convert()
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
