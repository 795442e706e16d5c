"""What a comparison report reads: for each run (a sweep's cell, or a run directory), its
method, seed and swept values, its pre-training run's curves, every evaluation's final metrics
and curves, the diagnostics per layer, what reproduces it (code version, datasets), and what
became of its jobs. Only run directories, sweep.json and MLflow are read. A run that cannot be
read is listed with its error, URLs redacted (hpc_mim/redact.py: MLflow's texts carry them).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hpc_mim.redact import redact
from hpc_mim.rundir import RunDir
from hpc_mim.tracking import fetch_runs, flatten, metric_history

Curve = tuple[np.ndarray, np.ndarray]          # steps, values


@dataclass
class RunResult:
    cell: str                                  # the sweep cell's id, or the run directory's name
    group: str                                 # one row of the tables: method + swept values
    method: str
    seed: int
    run_dir: Path
    status: str = "MISSING"                    # the pre-training run's MLflow status
    error: str = ""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)   # encoder -> job/metric
    job_status: dict[str, dict[str, str]] = field(default_factory=dict)  # encoder -> job -> status
    jobs: dict[str, str] = field(default_factory=dict)                   # job label -> evaluation
    curves: dict[str, Curve] = field(default_factory=dict)               # train/* and job/val/*
    layers: dict[str, dict[str, Curve]] = field(default_factory=dict)    # encoder -> layer/* curves
    diagnostics: dict[str, Path] = field(default_factory=dict)           # encoder -> .pt file
    reused: dict[str, str] = field(default_factory=dict)                 # job -> the random-init source
    provenance: dict[str, str] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)                 # flattened, as strings
    history: list[str] = field(default_factory=list)


def history(uri: str, run_id: str, key: str) -> Curve:
    points = sorted(metric_history(uri, run_id, key))
    last: dict[int, float] = {}
    for step, _, value in points:           # a step logged twice (a resumed job): the later value
        last[step] = value
    return np.array(list(last), dtype=np.float64), np.array(list(last.values()), dtype=np.float64)


def read_run(run_dir: Path, cell: str, group: str, seed: int | None = None) -> RunResult:
    """One run's result; ``group`` "" = its method."""
    run = RunDir(run_dir)
    config = flatten(yaml.safe_load(run.config.read_text())) if run.config.is_file() else {}
    method = str(config.get("method.name", "?"))
    result = RunResult(cell, group or method, method,
                       int(seed if seed is not None else config.get("train.seed", 0)), run.root, config=config)
    try:
        tracking = run.read_tracking()
        uri = tracking["uri"]
        parent, *children = fetch_runs(uri, tracking["experiment_id"], tracking["run_id"])
    except Exception as e:  # noqa: BLE001 - a missing or unreachable run is listed, not fatal
        result.error = redact(f"{type(e).__name__}: {e}")[:200]   # redacted, then cut: no half URL
        return result
    result.status = parent.info.status
    tags = parent.data.tags
    result.provenance = {"git_commit": tags.get("git_commit", "?"), "git_dirty": tags.get("git_dirty", "?"),
                         "datasets": ", ".join(sorted(f"{d.dataset.name}:{d.dataset.digest}"
                                                      for d in parent.inputs.dataset_inputs)) or "?"}
    if tags.get("restarts", "0") != "0":
        result.history.append(f"pre-training started {int(tags['restarts']) + 1} times "
                              f"({run.starts_log.name}: {run.starts_log})")
    for key in parent.data.metrics:
        if key.startswith("train/") and key != "train/epoch":
            result.curves[key] = history(uri, parent.info.run_id, key)
        elif key.startswith("val/"):      # pre-training's collapse curves (val/rankme, val/pairwise_cosine)
            result.curves[f"pretrain/{key}"] = history(uri, parent.info.run_id, key)
    # oldest first: an evaluation re-run on the same run supersedes the earlier one
    for child in sorted(children, key=lambda c: c.info.start_time):
        encoder = child.data.tags.get("baseline", "pretrained")
        job = child.data.tags.get("job", child.info.run_name)
        result.jobs[job] = child.data.tags.get("eval", job)
        result.job_status.setdefault(encoder, {})[job] = child.info.status
        if "reused_from" in child.data.tags:
            result.reused[job] = child.data.tags["reused_from"]
        final = {f"{job}/{k}": v for k, v in child.data.metrics.items()
                 if not k.startswith(("layer/", "cka/", "spectrum", "train/", "val/"))}
        result.metrics.setdefault(encoder, {}).update(final)
        for key in child.data.metrics:
            if key.startswith("val/") and encoder == "pretrained":
                result.curves[f"{job}/{key}"] = history(uri, child.info.run_id, key)
            elif key.startswith("layer/"):
                result.layers.setdefault(encoder, {})[key] = history(uri, child.info.run_id, key)
        if result.jobs[job] == "diagnostics":
            name = child.info.run_name
            if (run.evals / "diagnostics" / f"{name}.pt").is_file():
                result.diagnostics[encoder] = run.evals / "diagnostics" / f"{name}.pt"
    return result


def read_sweep(sweep_dir: Path) -> tuple[dict[str, Any], list[RunResult]]:
    """sweep.json and every cell's result, with the cell's submissions as its history."""
    record = json.loads((Path(sweep_dir) / "sweep.json").read_text())
    results = []
    for cid, cell in record["cells"].items():
        group = re.sub(r"-seed-?\d+$", "", cid)
        result = read_run(Path(cell["run_dir"]), cid, group, cell["seed"])
        for k, sub in enumerate(record["submissions"], 1):
            mine = sub["cells"].get(cid)
            if mine is None:
                continue
            was = ", ".join(f"{j} {s}" for j, s in mine.get("before", {}).items())
            jobs = ", ".join(f"{j} {i}" for j, i in mine["jobs"].items())
            result.history.append(f"submission {k} ({sub['kind']}, {sub['time']}): {jobs}"
                                  + (f"; before it: {was}" if was else ""))
        results.append(result)
    return record, results


def read_run_dirs(run_dirs: list[str]) -> list[RunResult]:
    """Runs made one by one: a row per method (several runs of a method are its seeds)."""
    return [read_run(Path(d), Path(d).name, group="") for d in run_dirs]
