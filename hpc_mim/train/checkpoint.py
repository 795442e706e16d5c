"""Atomic, resumable checkpoints: ``step_<n>/`` folders and a ``latest`` pointer written last.

A checkpoint is first written under ``step_<n>.tmp`` by every rank (DeepSpeed shards + one RNG
file per rank), each rank fsyncing the files it wrote (``owner``: on Lustre/GPFS an fsync of a
file another node wrote costs a lock round trip; 64 ranks fsyncing every file of a ZeRO
checkpoint made 64x the calls), then rank 0 renames it to a name no folder has yet and atomically
rewrites ``latest`` (temporary file, fsync, rename). A step saved again (a job resumed exactly
at its checkpoint and stopped before the next step) is published as ``step_<n>-1``, ``-2``, ...
next to the old one, never over it: deleting ``step_<n>`` first would leave ``latest`` naming
nothing if the job were killed before the rename. So a crash or kill at any point leaves
``latest`` naming a complete folder (or no ``latest`` at all); stale ``.tmp`` folders are
removed on the next save. Only the newest ``keep_last`` are kept, and never the one ``latest``
names.

Each rank's random generators (``rng_rank<rank>.pt``: torch, CUDA, numpy, python) are stored as
tensors and numbers only (``save_rng`` / ``load_rng``), so they load with ``weights_only=True``:
an unrestricted unpickle of a file in the run directory would run whatever code a pickle
names, i.e. write access to a run directory would be code execution for whoever resumes it.
Files of the previous format (numpy's and python's state tuples pickled as they are) still load
with ``weights_only=True``, allowing only numpy's array rebuild (``_LEGACY_NUMPY``), so runs
checkpointed before resume exactly, with no opt-in; anything else is refused, not executed.
DeepSpeed's own shards are loaded by DeepSpeed (hpc_mim/distributed/deepspeed.py).
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

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


# DeepSpeed's per-rank files: (bf16_)zero_pp_rank_<dp rank>_mp_rank_00_{optim,model}_states.pt;
# ours: rng_rank<rank>.pt. Anything else (mp_rank_00_model_states.pt, folders) is rank 0's.
_RANK_IN_NAME = re.compile(r"zero_pp_rank_(\d+)_|^rng_rank(\d+)\.")


def owner(name: str) -> int:
    """The rank that writes the checkpoint file called ``name``."""
    m = _RANK_IN_NAME.search(name)
    return int(m.group(1) or m.group(2)) if m else 0


def fsync_tree(folder: Path, rank: int | None = None) -> list[Path]:
    """Flush to disk the files under ``folder`` that ``rank`` wrote (every file when None), and
    on rank 0 the folders themselves. Returns what was flushed."""
    paths = [p for p in sorted(Path(folder).rglob("*")) + [Path(folder)]
             if rank is None or (owner(p.name) == rank if p.is_file() else rank == 0)]
    for path in paths:
        fsync_path(path)
    return paths


class CheckpointManager:
    def __init__(self, folder: Path, keep_last: int = 2, is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.rank = rank
        self.keep_last = keep_last
        self.is_main = is_main
        self.barrier = barrier
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def tag(step: int) -> str:
        return f"step_{step:08d}"

    def _published(self) -> list[str]:
        """Complete checkpoint folders, oldest first: by step, and of one step's versions the
        one ``latest`` names last (it is the newest)."""
        current = self.latest()

        def order(name: str) -> tuple[str, bool, int]:
            base, _, version = name.partition("-")
            return base, name == current, int(version or 0)
        return sorted((p.name for p in self.folder.glob("step_*")
                       if p.is_dir() and not p.name.endswith(".tmp")), key=order)

    def _free_name(self, tag: str) -> str:
        name, version = tag, 0
        while (self.folder / name).exists():
            version += 1
            name = f"{tag}-{version}"
        return name

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
        fsync_tree(self.folder / tmp, self.rank)    # each rank: its own shards reach the disk
        self.barrier()                      # every shard is on disk before we publish
        name = tag                          # what rank 0 publishes; the others only log it
        if self.is_main:
            name = self._free_name(tag)     # step_<n>-1 if step_<n> exists: never delete first
            (self.folder / tmp).rename(self.folder / name)
            fsync_path(self.folder)         # the rename itself is durable before `latest` names it
            atomic_write_text(self.folder / "latest", name)
            self._prune()
        self.barrier()
        return name

    def load(self, load_fn: LoadFn) -> Any | None:
        tag = self.latest()
        return None if tag is None else load_fn(self.folder, tag)

    def _prune(self) -> None:
        current = self.latest()
        for old in self._published()[:-self.keep_last]:
            if old != current:
                shutil.rmtree(self.folder / old, ignore_errors=True)


# ----------------------------------------------------------------------------- RNG state files
# What the previous format needs beyond weights_only's defaults: the numpy uint32 key array of
# np.random.get_state() (under numpy 1's module name too). No other callable is allowed.
_LEGACY_NUMPY = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType,
                 (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]


def save_rng(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (hpc_mim/train/process.py ``rng_state``: torch and CUDA byte tensors,
    numpy's ``("MT19937", keys[624] uint32, pos, has_gauss, cached_gaussian)``, python's
    ``(version, 625 ints, gauss_next)``) as tensors and plain numbers."""
    _, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    blob = {"format": 2, "torch": state["torch"],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            # the 624 Mersenne Twister words (< 2**32) and the position fit int64
            "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}
    if "cuda" in state:
        blob["cuda"] = state["cuda"]
    torch.save(blob, path)


def load_rng(path: Path) -> dict[str, Any]:
    """The state ``save_rng`` wrote to ``path`` (or the previous format), in ``rng_state``'s
    form, read with ``weights_only=True``. A file holding anything else (a pickle naming a
    function: code that would run on load) raises ``pickle.UnpicklingError``; nothing runs."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            with torch.serialization.safe_globals(_LEGACY_NUMPY):
                blob = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(
                f"{path}: not an RNG state file (it holds objects other than tensors and numbers, "
                f"which would run code when loaded): refused. Was the run directory altered by someone "
                f"else? ({str(e)[:300]})") from None
    if blob.get("format") != 2:           # the previous format: the tuples themselves
        return blob
    n = blob["numpy"]
    p = blob["python"]
    state = {"torch": blob["torch"],
             "numpy": ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                       n["cached_gaussian"]),
             "python": (p["version"], tuple(p["internal"].tolist()), p["gauss_next"])}
    if "cuda" in blob:
        state["cuda"] = blob["cuda"]
    return state
