"""The tracking spool: MLflow calls waiting in the run directory, and the ones the server refused.

``<run>/spool/<run_id>.jsonl`` holds, one JSON line per operation (fsynced), the calls a job
could not send because the tracking server was unreachable; they are replayed in order
(hpc_mim/tracking.py ``MLflowLogger.sync``, ``jobs/sync.py``). Only an error that a later try
can cure keeps a call there (hpc_mim/tracking.py ``retryable``): no connection, a timeout, a 5xx or 429 answer, a
locked database. A call the server rejects (a deleted run: INVALID_PARAMETER_VALUE; a run that
does not exist: RESOURCE_DOES_NOT_EXIST; any other 4xx) or that this side refuses (``Rejected``:
an artifact outside the run directory, a vanished file) would fail the same way forever and
block every call behind it, the final status included; it goes to the dead-letter file
``<run>/spool/<run_id>.rejected`` (JSON lines: the operation, the redacted error, the time) and
the replay goes on. ``jobs/sync.py`` reports dead letters and can requeue them
(``--retry-rejected``) once their cause is fixed.

Plain files only: hpc_mim/tracking.py, the only module that imports mlflow, decides what a
call's error means.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from hpc_mim.rundir import atomic_write_text


class Rejected(Exception):
    """A call that cannot succeed as it stands, decided on this side (no server round trip)."""


class Spool:
    """The spool file of one run and its dead-letter file next to it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rejected_path = self.path.with_suffix(".rejected")

    def ops(self) -> list[dict[str, Any]]:
        """The waiting operations, oldest first."""
        return _read(self.path)

    def count(self) -> int:
        """Lines waiting (without parsing them: called on every logging call while it waits)."""
        if not self.path.is_file():
            return 0
        with open(self.path, "rb") as f:
            return sum(1 for line in f if line.strip())

    def append(self, op: dict[str, Any]) -> None:
        _append(self.path, op)

    def replace(self, ops: list[dict[str, Any]]) -> None:
        """Keep exactly ``ops`` (atomically: a kill leaves the old or the new list)."""
        if ops:
            atomic_write_text(self.path, "".join(json.dumps(o) + "\n" for o in ops))
        else:
            self.path.unlink(missing_ok=True)

    def reject(self, op: dict[str, Any], error: str) -> None:
        """Move ``op`` to the dead-letter file with its (already redacted) error."""
        _append(self.rejected_path, {"op": op, "error": error,
                                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def rejected(self) -> list[dict[str, Any]]:
        """The dead letters: {"op", "error", "time"}, oldest first."""
        return _read(self.rejected_path)

    def requeue_rejected(self) -> int:
        """Put the dead letters back at the head of the spool (they are older than what waits
        there), for a replay after their cause was fixed; returns how many. The spool is
        written before the dead-letter file goes: a kill in between repeats, never loses."""
        letters = self.rejected()
        if letters:
            self.replace([letter["op"] for letter in letters] + self.ops())
            self.rejected_path.unlink()
        return len(letters)


def spools(folder: Path) -> list[Spool]:
    """Every run's spool in a run directory's ``spool/`` folder, with a spool file, a
    dead-letter file or both."""
    if not Path(folder).is_dir():
        return []
    names = {p.stem for p in Path(folder).iterdir() if p.suffix in (".jsonl", ".rejected")}
    return [Spool(Path(folder) / f"{name}.jsonl") for name in sorted(names)]


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:          # only an append cut short by a kill is expected
                raise
    return out


def _append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
