"""Atomic, resumable checkpoints: ``step_<n>/`` folders and a ``latest`` pointer written last.

A checkpoint is first written under ``step_<n>.tmp`` by every rank (DeepSpeed shards + one RNG
file per rank) and fsynced, then rank 0 renames it to ``step_<n>`` and atomically rewrites
``latest`` (temporary file, fsync, rename). A crash or kill at any point leaves ``latest``
naming a complete folder (or no ``latest`` at all); stale ``.tmp`` folders are removed on the
next save. Only the newest ``keep_last`` are kept, and never the one ``latest`` names.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from hpc_mim.rundir import atomic_write_text

SaveFn = Callable[[Path, str], None]   # (folder, tag) -> writes folder/tag (collective)
LoadFn = Callable[[Path, str], Any]    # (folder, tag) -> state (collective)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, and the folders themselves, to disk."""
    for path in sorted(Path(folder).rglob("*")) + [Path(folder)]:
        fsync_path(path)


class CheckpointManager:
    def __init__(self, folder: Path, keep_last: int = 2, is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None) -> None:
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.is_main = is_main
        self.barrier = barrier
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:08d}"

    def latest(self) -> str | None:
        """Tag named by ``latest`` if that folder exists, else None."""
        pointer = self.folder / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        return tag if (self.folder / tag).is_dir() else None

    def save(self, step: int, save_fn: SaveFn) -> str:
        tag = self.tag(step)
        tmp = f"{tag}.tmp"
        if self.is_main:
            for stale in self.folder.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        self.barrier()
        save_fn(self.folder, tmp)
        fsync_tree(self.folder / tmp)       # each rank: its shards reach the disk, not a cache
        self.barrier()                      # every shard is on disk before we publish
        if self.is_main:
            final = self.folder / tag
            if final.exists():              # re-saving a step after a resume
                shutil.rmtree(final)
            (self.folder / tmp).rename(final)
            fsync_path(self.folder)         # the rename itself is durable before `latest` names it
            atomic_write_text(self.folder / "latest", tag)
            self._prune()
        self.barrier()
        return tag

    def load(self, load_fn: LoadFn) -> Any | None:
        tag = self.latest()
        return None if tag is None else load_fn(self.folder, tag)

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in tags[:-self.keep_last]:
            shutil.rmtree(self.folder / old, ignore_errors=True)
