"""Submitting, watching and resuming a sweep (cells: jobs/sweep.py; arrays: jobs/sweep_arrays.py).

    python jobs/submit.py --sweep configs/sweeps/compare.yaml [--dry-run]
    python jobs/submit.py --method mae,lut --seeds 0,1 --preset smoke
    python jobs/submit.py --status compare        # every cell's jobs
    python jobs/submit.py --resume compare        # resubmit only what did not finish

Every cell is validated before anything is created. Then the sweep's MLflow parent run (tag
``sweep``), one run directory and child run per cell (tags ``sweep``, ``cell``, ``seed``; the
evaluations' runs are children of the cell's), and the arrays; submission returns at once.
``--resume`` reads each cell's jobs (status records, the scheduler), leaves finished and
still-queued cells alone, cancels evaluations that can never start, and resubmits the rest of
each broken cell into its own run directory: pre-training continues from its checkpoint and
MLflow run, an evaluation from its state folder, so no finished cell or job runs twice.

Each cell's jobs go to its own ``cluster.partition`` (a grid over it makes one array per
partition), checked against what the partition offers before anything is queued
(jobs/partition.py). The sweep folder is claimed atomically and private to its owner
(hpc_mim/rundir.py). Each array is recorded (sweep.json, the cells' jobs.json) as soon as its
sbatch returned; when a later sbatch fails the arrays already queued are cancelled, the cells'
MLflow runs marked FAILED, and the command exits 2 (jobs/submission.py), so ``--resume`` finds
cancelled jobs, never orphans still queued beside the cells it resubmits.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hpc_mim.config import Config, ConfigError, read_config
from hpc_mim.rundir import atomic_write_text, claim, find_sweep, runs_umask, umask
from jobs.follow import terminal_progress
from jobs.launcher import Launcher, resolve_cluster
from jobs.partition import check_before_queueing
from jobs.plan import JobSpec, build_plan, format_plan
from jobs.runs import check_inputs, check_tracking_store, create_run, tracking_experiment, tracking_uri
from jobs.status import collect, slurm_state, status_path
from jobs.submission import abandon_sweep
from jobs.sweep import SweepSpec
from jobs.sweep_arrays import (ALIVE, format_arrays, max_array_size, new_record, plan_arrays,
                               read_record, resolve_cells, write_record)


def submit_sweep(spec: SweepSpec, flags: list[str], cluster: str, dry_run: bool) -> int:
    try:
        sweep_dir, cells = resolve_cells(spec, flags)
        plans = {cid: build_plan(cfg, str(sweep_dir / cid)) for cid, (_, cfg) in cells.items()}
        first = next(iter(cells.values()))[1]
        note = check_before_queueing([(f"cell {cid}", cfg, plans[cid]) for cid, (_, cfg) in cells.items()],
                                     resolve_cluster(cluster), dry_run)
        # the cells share the first one's store (tracking_uri(first) below)
        check_tracking_store(first, list(plans.values()), resolve_cluster(cluster), cells=len(cells))
        launcher = Launcher(cluster, sweep_dir / "jobs", first.cluster.partition, first.share_runs_with_group)
        arrays = plan_arrays(plans, partitions_of(cells), max_array_size())
        scripts = [launcher.sbatch_script(a.specs[0], f"aftercorr:<array {a.after}>" if a.after is not None else "",
                                          len(a.cells), f"{spec.name}-{a.job}", a.partition)
                   for a in arrays] if launcher.cluster == "slurm" or dry_run else []
        if not dry_run:
            if sweep_dir.exists():
                raise ConfigError(f"sweep {spec.name}: {sweep_dir} exists; --resume {spec.name} "
                                  "or choose another name")
            for cid, (_, cfg) in cells.items():
                check_inputs(cfg, sweep_dir / cid)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if note:
        print(note, file=sys.stderr)
    print(format_cells(cells, sweep_dir))
    if launcher.cluster == "slurm" or dry_run:
        print(f"\n{len(arrays)} job array(s), at most {max_array_size()} tasks each:\n{format_arrays(arrays)}")
    if dry_run:
        print(f"\n# dry run: nothing created, nothing queued; sweep dir would be {sweep_dir}")
        for i, (a, script) in enumerate(zip(arrays, scripts)):
            print(f"\n# ---- sbatch script of array {i} ({a.job}), task 0 ----")
            print(script)
        return 0
    with umask(runs_umask(first.share_runs_with_group)):     # the sweep's files: its owner's
        try:
            claim(sweep_dir, first.share_runs_with_group, key=f"sweep {spec.name}",
                  hint=f"--resume {spec.name} or choose another name")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return create_and_submit(spec, sweep_dir, cells, plans, launcher, first)


def partitions_of(cells: dict[str, tuple[Any, Config]]) -> dict[str, str]:
    """Each cell's own ``cluster.partition`` (a grid may sweep it)."""
    return {cid: cfg.cluster.partition for cid, (_, cfg) in cells.items()}


def create_and_submit(spec: SweepSpec, sweep_dir: Path, cells: dict[str, tuple[Any, Config]],
                      plans: dict[str, list[JobSpec]], launcher: Launcher, first: Config) -> int:
    """In the claimed sweep folder: the MLflow runs, the cells' folders, the record; then queue."""
    from hpc_mim.tracking import MLflowLogger
    from jobs.provenance import git_state
    uri = tracking_uri(first)
    try:
        experiment = tracking_experiment(first, uri)
        parent = MLflowLogger.create_run(uri, experiment, spec.name, tags={"sweep": spec.name, "kind": "sweep",
                                                                          **git_state()})
        parent.log_params({"sweep": spec_summary(spec)})
        parent.finish("FINISHED")           # a container: its cells carry the states
        for cid, (cell, cfg) in cells.items():
            create_run(cfg, sweep_dir / cid, uri, experiment, parent.run_id,
                       tags={"sweep": spec.name, "cell": cid, "seed": cell.seed})
    except Exception as e:  # noqa: BLE001 - connection errors come in many types
        shutil.rmtree(sweep_dir, ignore_errors=True)      # created here; nothing was queued
        print(f"error: tracking.uri: cannot create the sweep's MLflow runs at {uri} "
              f"({type(e).__name__}: {str(e)[:300]}); nothing was queued", file=sys.stderr)
        return 2
    record = new_record(spec, sweep_dir, cells, launcher.cluster,
                        {"uri": uri, "experiment_id": experiment, "run_id": parent.run_id})
    write_record(sweep_dir, record)
    print(f"\nsweep dir:   {sweep_dir}\nmlflow run:  {parent.run_id} ({uri})")
    return submit_cells(sweep_dir, record, plans, launcher, "submit", {}, partitions_of(cells))


def spec_summary(spec: SweepSpec) -> dict[str, Any]:
    return {"methods": ",".join(spec.methods), "seeds": ",".join(map(str, spec.seeds)),
            "preset": spec.preset or "", "set": " ".join(spec.set), "grid": json.dumps(spec.grid),
            "claims": spec.claims or ""}


def format_cells(cells: dict[str, Any], sweep_dir: Path) -> str:
    rows = [("cell", "method", "seed", "swept", "run dir")]
    for cid, (cell, _) in cells.items():
        rows.append((cid, cell.method, str(cell.seed),
                     " ".join(f"{k}={v}" for k, v in cell.grid.items()) or "-", str(sweep_dir / cid)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return f"{len(cells)} cell(s):\n" + "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                                                  for r in rows)


def submit_cells(sweep_dir: Path, record: dict[str, Any], plans: dict[str, list[JobSpec]],
                 launcher: Launcher, kind: str, before: dict[str, dict[str, str]],
                 partitions: dict[str, str] | None = None) -> int:
    """Queue ``plans`` (cell -> its jobs to run) as arrays (SLURM; each cell on its own
    ``partitions[cell]``), or run them here one cell after another (local); record the
    submission in sweep.json and each cell's jobs.json as each array is queued."""
    partitions = partitions if partitions is not None else {c: launcher.partition for c in plans}
    submission: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "kind": kind,
                                  "arrays": [], "cells": {c: {"jobs": {}, "before": before.get(c, {})}
                                                          for c in plans}}
    record["submissions"].append(submission)
    if launcher.cluster != "slurm":
        failed = 0
        for cid, plan in plans.items():
            cell_launcher = Launcher(launcher.cluster, sweep_dir / cid / "jobs", partitions[cid],
                                     launcher.share_with_group)
            index = cell_launcher.folder / "jobs.json"
            before_index = json.loads(index.read_text()) if index.is_file() else {}
            outcome = cell_launcher.run_plan(plan, *terminal_progress(cell_launcher, f"{cid}/"))
            # keep the entries of jobs a resume did not rerun (run_plan indexes its plan only)
            after_index = json.loads(index.read_text()) if index.is_file() else {}
            atomic_write_text(index, json.dumps({**before_index, **after_index}, indent=2))
            submission["cells"][cid]["jobs"] = outcome
            failed += any(s != "ok" for s in outcome.values())
            print(f"{cid}: " + ", ".join(f"{job} {state}" for job, state in outcome.items()), flush=True)
        write_record(sweep_dir, record)
        return 1 if failed else 0
    arrays = plan_arrays(plans, partitions, max_array_size())
    ids: list[str] = []
    queued: dict[str, dict[str, Any]] = {c: {} for c in plans}
    for a in arrays:
        dep = f"aftercorr:{ids[a.after]}" if a.after is not None else ""
        status_files = [status_path(sweep_dir / c / "jobs", s.name) for c, s in zip(a.cells, a.specs)]
        try:
            jobs = launcher.submit_array(a.specs, status_files, dep, job_name=f"{record['name']}-{a.job}",
                                         partition=a.partition)
        except BaseException as e:  # noqa: BLE001 - Ctrl-C too: cancel what was queued
            return abandon_sweep(sweep_dir, record, plans, queued, ids, f"array {a.job} of {len(a.cells)} cell(s)", e)
        ids.append(jobs[0].job_id.split("_")[0])
        submission["arrays"].append({"id": ids[-1], "job": a.job, "cells": a.cells, "dependency": dep,
                                     "partition": a.partition})
        for cid, spec, job in zip(a.cells, a.specs, jobs):
            queued[cid][a.job] = job
            submission["cells"][cid]["jobs"][a.job] = job.job_id
            # recorded at once: a submission cut short leaves no job that --status, --resume miss
            update_index(Launcher("slurm", sweep_dir / cid / "jobs"), plans[cid], {a.job: job})
        write_record(sweep_dir, record)
    print(f"\nqueued {len(arrays)} job array(s):\n{format_arrays(arrays, ids)}")
    print(f"\nwatch:  squeue -r -j {','.join(ids)}\n        python jobs/submit.py --status {sweep_dir}"
          f"\nreport: python -m evaluation.report --sweep {sweep_dir} --html {sweep_dir}/report.html "
          f"--md {sweep_dir}/report.md")
    return 0


def update_index(launcher: Launcher, plan: list[JobSpec], jobs: dict[str, Any]) -> None:
    """A cell's jobs.json with these jobs' new ids; the entries of jobs not resubmitted stay."""
    path = launcher.folder / "jobs.json"
    index = json.loads(path.read_text()) if path.is_file() else {}
    launcher.write_index(plan, jobs)
    fresh = json.loads(path.read_text())
    index.update({name: entry for name, entry in fresh.items() if name in jobs})
    atomic_write_text(path, json.dumps(index, indent=2))


def cell_states(run_dir: Path) -> list[dict[str, Any]]:
    """The cell's job rows (jobs/status.py); none when it was never queued."""
    try:
        return collect(run_dir)
    except FileNotFoundError:
        return []


def finished(rows: dict[str, dict[str, Any]]) -> bool:
    """Every job of the cell completed by its own record."""
    return bool(rows) and all(r["state"] == "COMPLETED" for r in rows.values())


def is_alive(row: dict[str, Any]) -> bool:
    """Still queued or running by the scheduler's account (not a job that can never start)."""
    if row["state"] == "NEVER STARTS" or row["job_id"] in ("-", None):
        return False
    known = slurm_state(row["job_id"])
    return known is not None and known[0] in ALIVE


def status_sweep(name: str) -> int:
    sweep_dir = find_sweep(name)
    record = read_record(sweep_dir)
    rows, jobs = [], []
    for cid, cell in record["cells"].items():
        states = {r["job"]: r for r in cell_states(Path(cell["run_dir"]))}
        jobs += [j for j in states if j not in jobs]
        rows.append((cid, cell["method"], str(cell["seed"]), states))
    table = [("cell", "method", "seed", *jobs)]
    for cid, method, seed, states in rows:
        table.append((cid, method, seed, *(states[j]["state"] if j in states else "-" for j in jobs)))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    done = sum(all(s["state"] == "COMPLETED" for s in st.values()) and bool(st) for *_, st in rows)
    print(f"sweep {record['name']}: {len(rows)} cells, {done} finished ({sweep_dir}); "
          f"{len(record['submissions'])} submission(s)")
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table))
    fine = ("COMPLETED", "PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING")
    bad = [(cid, j, s) for cid, _, _, st in rows for j, s in st.items() if s["state"] not in fine]
    for cid, job, row in bad:
        print(f"  {cid} {job}: {row['state']} {row['detail']}  log {row['log']}")
    return 1 if bad else 0


def resume_sweep(name: str, cluster: str) -> int:
    sweep_dir = find_sweep(name)
    record = read_record(sweep_dir)
    launcher = Launcher(record.get("cluster", cluster), sweep_dir / "jobs")
    plans: dict[str, list[JobSpec]] = {}
    configs: dict[str, Config] = {}
    before: dict[str, dict[str, str]] = {}
    stuck: list[str] = []
    for cid, cell in record["cells"].items():
        run_dir = Path(cell["run_dir"])
        rows = {r["job"]: r for r in cell_states(run_dir)}
        if not finished(rows) and any(is_alive(r) for r in rows.values()):
            print(f"{cid}: still queued or running, left alone")
            continue
        # read again: a job that ended between the first read and the scheduler's answer had
        # written its record (COMPLETED) before it exited, and must not run again
        rows = {r["job"]: r for r in cell_states(run_dir)}
        if finished(rows):
            continue
        cfg = configs[cid] = read_config(run_dir / "config.yaml")
        todo = [s for s in build_plan(cfg, str(run_dir))
                if rows.get(s.name, {}).get("state") != "COMPLETED"]
        for spec in todo:
            spec.after = [a for a in spec.after if any(t.name == a for t in todo)]
        stuck += [r["job_id"] for r in rows.values() if r["state"] == "NEVER STARTS"]
        plans[cid] = todo
        before[cid] = {job: r["state"] for job, r in rows.items()}
        print(f"{cid}: resubmitting {', '.join(s.name for s in todo)} "
              f"(was {', '.join(f'{j} {s}' for j, s in before[cid].items()) or 'never queued'})")
    if not plans:
        print(f"sweep {record['name']}: nothing to resume")
        return 0
    # each cell on its own partition, which must still take its jobs (checked before any change)
    check_before_queueing([(f"cell {cid}", configs[cid], plans[cid]) for cid in plans], launcher.cluster, False)
    if stuck:
        subprocess.run(["scancel", *stuck], check=False)
    first = next(iter(configs.values()))
    launcher.share_with_group = first.share_runs_with_group
    print(format_plan(next(iter(plans.values()))))
    with umask(runs_umask(first.share_runs_with_group)):
        return submit_cells(sweep_dir, record, plans, launcher, "resume", before,
                            {cid: configs[cid].cluster.partition for cid in plans})
