"""What became of a submitted run: each job's state, its error, and its MLflow runs.

    python jobs/submit.py --status runs/<name>

Sources, most specific first: the status record each job writes when it starts and ends
(``jobs/<job>.status.json``: COMPLETED, FAILED with the exception, or REQUEUED / STOPPED after
a scheduler signal), then the scheduler
(``scontrol``: PENDING with its reason, RUNNING, or an end the job could not record itself,
such as TIMEOUT, CANCELLED, OUT_OF_MEMORY, NODE_FAIL), then MLflow (the parent run of
pre-training, the child runs of each evaluation).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any


def status_path(jobs_folder: Path, job_name: str) -> Path:
    """Where a job of a run whose jobs folder is ``jobs_folder`` records its state."""
    return Path(jobs_folder) / f"{job_name}.status.json"


def write_status(path: Path, state: str, **fields: Any) -> None:
    """Atomically replace the job's status record."""
    from hpc_mim.rundir import atomic_write_text
    record = {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    atomic_write_text(Path(path), json.dumps(record, indent=2))


def slurm_state(job_id: str) -> tuple[str, str] | None:
    """(JobState, Reason) from ``scontrol``; None once SLURM has forgotten the job (MinJobAge)."""
    if not shutil.which("scontrol"):
        return None
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True)
    fields = dict(re.findall(r"(\w+)=(\S+)", out.stdout))
    if out.returncode or "JobState" not in fields:
        return None
    return fields["JobState"], fields.get("Reason", "None")


def job_row(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    record_path = Path(entry["status_file"])
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    state, detail = record.get("state", "NOT STARTED"), record.get("error", "")
    if entry["job_id"] and entry["cluster"] == "slurm" and state not in ("COMPLETED", "FAILED"):
        known = slurm_state(entry["job_id"])
        if known is not None:          # not finished by its own account: the scheduler knows more
            state, reason = known
            if state == "PENDING" and reason == "DependencyNeverSatisfied":
                state, detail = "NEVER STARTS", f"{', '.join(entry['after'])} did not succeed"
            elif reason != "None":        # keep why it was requeued, add why it waits
                detail = f"{detail}; {reason}" if detail else reason
    return {"job": name, "job_id": entry["job_id"] or "-", "state": state, "detail": detail,
            "log": entry.get("log") or "-"}


def mlflow_states(run_dir: Path) -> dict[str, str]:
    """Job name -> the status of its MLflow run(s), e.g. ``FINISHED`` or ``detection FAILED,
    detection[random_init] FAILED``."""
    from hpc_mim.rundir import RunDir
    from hpc_mim.tracking import fetch_runs
    tracking = RunDir(run_dir).read_tracking()
    parent, *children = fetch_runs(tracking["uri"], tracking["experiment_id"], tracking["run_id"])
    states: dict[str, list[str]] = {"pretrain": [parent.info.status]}
    for child in sorted(children, key=lambda c: c.info.run_name):
        job = child.data.tags.get("job", child.data.tags.get("eval", "?"))
        states.setdefault(job, []).append(f"{child.info.run_name} {child.info.status}")
    return {job: ", ".join(s) for job, s in states.items()}


def collect(run_dir: str | Path) -> list[dict[str, Any]]:
    run_dir = Path(run_dir)
    index_path = run_dir / "jobs" / "jobs.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} missing: was {run_dir} submitted by jobs/submit.py?")
    rows = [job_row(name, entry) for name, entry in json.loads(index_path.read_text()).items()]
    try:
        mlflow = mlflow_states(run_dir)
    except Exception as e:  # noqa: BLE001 - the scheduler's view is still worth printing
        mlflow = {row["job"]: f"(MLflow unreachable: {type(e).__name__})" for row in rows}
    for row in rows:
        row["mlflow"] = mlflow.get(row["job"], "-")
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    header = ("job", "job id", "state", "mlflow", "detail")
    lines = [header] + [(r["job"], str(r["job_id"]), r["state"], r["mlflow"], r["detail"]) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1]
                     for line in lines)
