"""The run directory: the contract between the submitting process and the chained jobs.

    <runs_root>/<name>/
      config.yaml        resolved config (written once by jobs/submit.py)
      tracking.json      MLflow tracking URI, experiment id and the parent (pre-training) run id
      checkpoints/       DeepSpeed checkpoints: step_<n>/ folders + an atomic ``latest`` pointer
      encoder.pt         exported encoder weights + model config (what evaluations load)
      timm/              the same encoder for timm: model.safetensors + config.json (hpc_mim/export.py)
      evals/<name>.json  each evaluation's final metrics (evals/features/: cached frozen features)
      evals/state/<name>-<hash>/  an evaluation's checkpoints/ (kept across requeues, removed
                         once it finished: evaluation/common.py ``prune``), child.json (its MLflow
                         child run, whether it finished) and starts.log
      evals/diagnostics/<child>.pt  the diagnostics' per-layer pooled features, spectrum, CKA
      logs/pretrain.log  rank 0's progress lines (logs/<job>.log: an evaluation's; logs/starts.log:
                         one line per (re)start of pre-training; logs/stages.jsonl: where each
                         job spent its time, read by jobs/stages.py)
      spool/<run_id>.jsonl  MLflow calls made while the tracking server was unreachable
                         (pending-<uuid>.jsonl: a run to create; .run_id: the id it got;
                         <run_id>.rejected: calls the server refused, for jobs/sync.py)
      jobs/              submitit folders: sbatch scripts, logs, pickled results

Evaluations need nothing but this folder: they rebuild the encoder from ``encoder.pt``. A sweep's
cells are such folders, ``<runs_root>/<sweep>/<cell>/``, next to the sweep's ``sweep.json``
(jobs/sweep_arrays.py).

A run directory is claimed, never shared: ``run_dir_path`` resolves ``<runs_root>/<name>`` and
refuses a name that is not one folder directly inside ``runs_root`` (``..``, ``/abs``, ``a/b``)
or a path with a control character; ``claim`` creates it with ``mkdir`` without ``exist_ok``, so
of two submissions racing for one name exactly one wins. It is private to its owner (0700, and
the submitting process and the jobs run under umask 077: files 0600) unless the config's
``share_runs_with_group`` makes it readable by the group (0750, umask 027). Never writable by
others: whoever can write a run directory runs code in the jobs that resume from it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_mim.config_error import ConfigError

PRIVATE_UMASK = 0o077         # run directories and all in them: the owner's only
GROUP_UMASK = 0o027           # share_runs_with_group: the group reads, never writes
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename: readers see the old or the new file, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def runs_umask(share_with_group: bool = False) -> int:
    """The umask under which a run's files are made, by the submission and by its jobs."""
    return GROUP_UMASK if share_with_group else PRIVATE_UMASK


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run a block (and the processes it starts) under ``mask``; the caller's comes back after."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def refuse_control_characters(label: str, value: str) -> None:
    """ConfigError when ``value`` holds a control character (a newline in a path or name that
    reaches a job script would end its ``#SBATCH`` block and run the rest as a shell line)."""
    found = CONTROL.search(str(value))
    if found:
        raise ConfigError(f"{label}: {str(value)!r} contains the control character {found.group()!r}; "
                          "paths and names may not")


def run_dir_path(runs_root: str | Path, name: str, key: str = "name") -> Path:
    """``<runs_root>/<name>``, resolved (``..`` and links followed) before anything checks whether
    it exists, and refused (ConfigError naming ``key``) unless it is one folder directly inside
    the resolved ``runs_root``: ``zz/../<another run>``, ``/abs/path``, ``../../x``, ``a/b``."""
    refuse_control_characters(key, name)
    root = Path(runs_root).resolve()
    refuse_control_characters("runs_root", str(root))
    path = (root / name).resolve()
    if name in ("", ".", "..") or "/" in name or path.parent != root or path != root / name:
        raise ConfigError(f"{key}: {name!r} is not one folder name inside runs_root {root} "
                          "(letters, digits, '.', '_', '-'; no '/', no '..')")
    return path


def claim(path: Path, share_with_group: bool = False, unique: bool = False, key: str = "name",
          hint: str = "pick another --set name=...") -> Path:
    """Create the run (or sweep) directory ``path`` atomically and return it: ``mkdir`` without
    ``exist_ok``, so a folder that exists, or that another submission created a moment ago, is
    never written into (ConfigError naming ``key``, saying ``hint``). ``unique`` (a default
    name): take the first free ``<path>-2``, ``-3``, ... instead. Mode 0700 (0750 when shared
    with the group), whatever the umask; its parents (``runs_root``) are made as the umask says."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 100 if unique else 2):
        candidate = path if attempt == 1 else path.with_name(f"{path.name}-{attempt}")
        try:
            candidate.mkdir(mode=0o700)
        except FileExistsError:
            continue
        candidate.chmod(0o750 if share_with_group else 0o700)
        return candidate
    raise ConfigError(f"{key}: {path} already exists (another submission may have claimed it a "
                      f"moment ago); nothing in it was touched: {hint}")


@dataclass
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    config = property(lambda self: self.root / "config.yaml")
    tracking_file = property(lambda self: self.root / "tracking.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    encoder = property(lambda self: self.root / "encoder.pt")
    timm = property(lambda self: self.root / "timm")           # the encoder in timm's format
    evals = property(lambda self: self.root / "evals")
    jobs = property(lambda self: self.root / "jobs")
    logs = property(lambda self: self.root / "logs")
    pretrain_log = property(lambda self: self.root / "logs" / "pretrain.log")
    starts_log = property(lambda self: self.root / "logs" / "starts.log")
    spool = property(lambda self: self.root / "spool")

    def create(self) -> "RunDir":
        for folder in (self.root, self.checkpoints, self.evals, self.jobs, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        return self

    def read_tracking(self) -> dict[str, Any]:
        if not self.tracking_file.is_file():
            raise FileNotFoundError(f"{self.tracking_file} missing: was this run made by jobs/submit.py?")
        return json.loads(self.tracking_file.read_text())

    def write_tracking(self, info: dict[str, Any]) -> None:
        atomic_write_text(self.tracking_file, json.dumps(info, indent=2))

    def write_eval(self, name: str, metrics: dict[str, Any]) -> Path:
        self.evals.mkdir(parents=True, exist_ok=True)
        path = self.evals / f"{name}.json"
        atomic_write_text(path, json.dumps(metrics, indent=2))
        return path

    stages_log = property(lambda self: self.root / "logs" / "stages.jsonl")

    def record_stage(self, job: str, stage: str, seconds: float, **extra: Any) -> None:
        """Append where a job spent its time (rank 0; a requeued job appends again, so a stage's
        lines sum to all the time spent on it). jobs/stages.py prints and logs the breakdown."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.stages_log, "a") as f:
            f.write(json.dumps({"job": job, "stage": stage, "seconds": round(seconds, 2),
                                **extra}) + "\n")

    def read_stages(self) -> list[dict[str, Any]]:
        if not self.stages_log.is_file():
            return []
        return [json.loads(line) for line in self.stages_log.read_text().splitlines() if line.strip()]


def find_sweep(name: str, runs_root: str = "runs") -> Path:
    """A sweep's folder (the one holding ``sweep.json``, jobs/sweep_arrays.py): ``name`` as a
    path, or ``<runs_root>/<name>``."""
    for candidate in (Path(name), Path(runs_root) / name):
        if (candidate / "sweep.json").is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"no sweep {name!r}: neither {name}/sweep.json nor "
                            f"{runs_root}/{name}/sweep.json exists")
