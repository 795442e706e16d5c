"""A sweep's job arrays and its record.

On SLURM each resource group (cells whose jobs need the same resources on the same partition:
a grid over ``cluster.partition`` makes one group per partition) is one job array per job
(pre-training, each evaluation), chunked under the cluster's ``MaxArraySize``; task i of an
evaluation array waits for task i of its pre-training array (``--dependency=aftercorr``), so a
fast cell's evaluations start while a slow cell still trains. The sweep's record is
``<runs_root>/<sweep>/sweep.json``: its cells, its MLflow parent run, and every submission (the
arrays, and for a resume what each cell's jobs had become before it).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_mim.config import Config, ConfigError, load_config
from hpc_mim.rundir import atomic_write_text, run_dir_path
from jobs.plan import JobSpec
from jobs.sweep import Cell, SweepSpec, enumerate_cells, spec_dict

DEFAULT_MAX_ARRAY = 1001                          # SLURM's default MaxArraySize
ALIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
         "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING")


@dataclass
class Array:
    """One job array: job ``job`` of ``cells`` (same order as the pre-training array it
    depends on, ``after`` = that array's index in the submission)."""
    job: str
    cells: list[str]
    specs: list[JobSpec]
    after: int | None = None
    partition: str = ""                 # the cells' cluster.partition ("" the cluster's default)


def max_array_size() -> int:
    """The cluster's MaxArraySize (``scontrol show config``); arrays hold at most that many tasks."""
    if not shutil.which("scontrol"):
        return DEFAULT_MAX_ARRAY
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    return int(found.group(1)) if found else DEFAULT_MAX_ARRAY


def signature(plan: list[JobSpec], partition: str) -> tuple:
    return (partition, *((j.name, j.entry, j.nodes, j.tasks_per_node, j.cpus_per_task,
                          j.gpus_per_node, j.time_min, j.max_restarts, tuple(j.after)) for j in plan))


def plan_arrays(plans: dict[str, list[JobSpec]], partitions: str | dict[str, str],
                max_size: int) -> list[Array]:
    """Cells -> arrays: grouped by identical resources and partition (``partitions``: each
    cell's ``cluster.partition``, or one for all), chunked to ``max_size`` tasks; within a chunk
    one array per job, evaluations after the chunk's pre-training array."""
    groups: dict[tuple, list[str]] = {}
    for cell, plan in plans.items():
        part = partitions if isinstance(partitions, str) else partitions[cell]
        groups.setdefault(signature(plan, part), []).append(cell)
    arrays: list[Array] = []
    for key, cells in groups.items():
        for start in range(0, len(cells), max_size):
            chunk = cells[start:start + max_size]
            index: dict[str, int] = {}
            for k, spec in enumerate(plans[chunk[0]]):
                after = index[spec.after[0]] if spec.after else None
                index[spec.name] = len(arrays)
                arrays.append(Array(spec.name, chunk, [plans[c][k] for c in chunk], after, key[0]))
    return arrays


def format_arrays(arrays: list[Array], ids: list[str] | None = None) -> str:
    rows = [("array", "job", "tasks", "nodes x tasks", "gpus/node", "time", "dependency", "cells")]
    for i, a in enumerate(arrays):
        s = a.specs[0]
        dep = "-" if a.after is None else f"aftercorr:{ids[a.after] if ids else f'<array {a.after}>'}"
        rows.append((ids[i] if ids else f"<array {i}>", a.job, f"0-{len(a.cells) - 1}",
                     f"{s.nodes} x {s.tasks_per_node}", str(s.gpus_per_node), f"{s.time_min} min", dep,
                     ",".join(a.cells) if len(a.cells) <= 4 else f"{a.cells[0]} ... {a.cells[-1]}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def resolve_cells(spec: SweepSpec, flags: list[str]) -> tuple[Path, dict[str, tuple[Cell, Config]]]:
    """The sweep folder and every cell's validated config (a ConfigError names the cell)."""
    out: dict[str, tuple[Cell, Config]] = {}
    sweep_dir = None
    for cell in enumerate_cells(spec):
        try:
            cfg = load_config(cell.method, spec.preset, spec.config, [*spec.set, *cell.overrides(), *flags])
        except ConfigError as e:
            raise ConfigError(f"cell {cell.id}: {e}") from e
        cfg.runs_root, cfg.data.root = str(Path(cfg.runs_root).resolve()), str(Path(cfg.data.root).resolve())
        # resolved, one folder inside runs_root, no control character (the cwd may hold one)
        sweep_dir = sweep_dir or run_dir_path(cfg.runs_root, spec.name, key="sweep name")
        run_dir_path(sweep_dir, cell.id, key=f"sweep {spec.name}: cell id")
        cfg.name = f"{spec.name}/{cell.id}"
        out[cell.id] = (cell, cfg)
    return sweep_dir, out


def read_record(sweep_dir: Path) -> dict[str, Any]:
    return json.loads((sweep_dir / "sweep.json").read_text())


def write_record(sweep_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_text(sweep_dir / "sweep.json", json.dumps(record, indent=2))


def new_record(spec: SweepSpec, sweep_dir: Path, cells: dict[str, tuple[Cell, Config]],
               cluster: str, tracking: dict[str, str]) -> dict[str, Any]:
    return {"name": spec.name, "spec": spec_dict(spec), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "cluster": cluster, "tracking": tracking,
            "cells": {cid: {"method": c.method, "seed": c.seed, "grid": c.grid,
                            "run_dir": str(sweep_dir / cid)} for cid, (c, _) in cells.items()},
            "submissions": []}
