"""The run directory: the contract between the submitting process and the chained jobs.

    <runs_root>/<name>/
      config.yaml        resolved config (written once by jobs/submit.py)
      tracking.json      MLflow tracking URI, experiment id and the parent (pre-training) run id
      checkpoints/       DeepSpeed checkpoints: step_<n>/ folders + an atomic ``latest`` pointer
      encoder.pt         exported encoder weights + model config (what evaluations load)
      evals/<name>.json  each evaluation's final metrics (evals/features/: cached frozen features)
      evals/state/<name>-<hash>/  an evaluation's checkpoints/, child.json (its MLflow child
                         run, whether it finished) and starts.log, kept across requeues
      evals/diagnostics/<child>.pt  the diagnostics' per-layer pooled features, spectrum, CKA
      logs/pretrain.log  rank 0's progress lines (logs/<job>.log: an evaluation's; logs/starts.log:
                         one line per (re)start of pre-training; logs/stages.jsonl: where each
                         job spent its time, read by jobs/stages.py)
      spool/<run_id>.jsonl  MLflow calls made while the tracking server was unreachable
                         (pending-<uuid>.jsonl: a run to create; .run_id: the id it got)
      jobs/              submitit folders: sbatch scripts, logs, pickled results

Evaluations need nothing but this folder: they rebuild the encoder from ``encoder.pt``. A sweep's
cells are such folders, ``<runs_root>/<sweep>/<cell>/``, next to the sweep's ``sweep.json``
(jobs/sweep_arrays.py).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename: readers see the old or the new file, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    config = property(lambda self: self.root / "config.yaml")
    tracking_file = property(lambda self: self.root / "tracking.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    encoder = property(lambda self: self.root / "encoder.pt")
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
