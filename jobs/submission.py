"""When an ``sbatch`` fails part way through a submission: nothing stays queued that nobody tracks.

A run is several ``sbatch`` calls (pre-training, then each evaluation; a sweep: one per job
array). One of them can fail after the others queued (a bad partition, more nodes than the
partition has, a slurmctld timeout). Each queued job is recorded in the run's ``jobs.json`` as
soon as its ``sbatch`` returned (``Launcher.submit_plan``, ``jobs/sweep_commands.py``); on a
failure the jobs already queued are cancelled (``scancel``), their status records say
CANCELLED and why, the MLflow run(s) are marked FAILED, and the CLI says what failed and that
nothing stays queued (exit 2). ``--resume`` of a sweep then sees cancelled jobs, not orphans
still queued, and resubmits those cells once.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from jobs.plan import JobSpec


class SubmissionError(RuntimeError):
    """An ``sbatch`` failed after ``queued`` jobs had been queued (and then cancelled, unless
    ``cancel_error`` says why not)."""

    def __init__(self, what: str, reason: str, queued: list[str], cancel_error: str | None = None) -> None:
        self.what, self.reason, self.queued, self.cancel_error = what, reason, queued, cancel_error
        super().__init__(self.message())

    def message(self) -> str:
        text = f"sbatch of {self.what} failed: {self.reason}"
        if not self.queued:
            return text + "; nothing was queued"
        ids = " ".join(self.queued)
        if self.cancel_error:
            return (f"{text}; the jobs queued before it ({ids}) could NOT be cancelled "
                    f"({self.cancel_error}): cancel them yourself with `scancel {ids}`")
        return f"{text}; cancelled the jobs queued before it ({ids}): nothing of it stays queued"


def sbatch_reason(error: BaseException) -> str:
    """The line that says why: submitit's FailedJobError carries sbatch's stderr
    (``sbatch: error: Batch job submission failed: ...``)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    told = [line for line in lines if "error" in line.lower()]
    return (told[-1] if told else lines[-1] if lines else type(error).__name__)[:500]


def cancel(job_ids: list[str]) -> str | None:
    """``scancel`` these jobs (an array id cancels all its tasks); None when done, else why not."""
    if not job_ids:
        return None
    try:
        done = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"
    return None if done.returncode == 0 else (done.stderr.strip()[:300] or f"scancel exit {done.returncode}")


def record_cancelled(status_files: dict[str, Path], job_ids: dict[str, str], why: str) -> None:
    """Each cancelled job's status record: CANCELLED and why (``--status`` reads it after SLURM
    has forgotten the job)."""
    from jobs.status import write_status
    for name, path in status_files.items():
        write_status(path, "CANCELLED", job_id=job_ids[name], error=why)


def mark_failed(uri: str, run_ids: list[str]) -> list[str]:
    """Mark these MLflow runs FAILED; returns the ones that could not be (best effort: the
    jobs are what matters, and they are cancelled already)."""
    from hpc_mim.tracking import MLflowLogger
    missed = []
    for run_id in run_ids:
        try:
            MLflowLogger(uri, run_id).finish("FAILED")
        except Exception:  # noqa: BLE001 - the store may be what failed
            missed.append(run_id)
    return missed


def failed_runs_note(uri: str, tracking: list[dict[str, Any]]) -> str:
    """Mark the runs of ``tracking.json`` records FAILED and say so in one line."""
    ids = [t["run_id"] for t in tracking if t.get("run_id")]
    missed = mark_failed(uri, ids)
    done = [i for i in ids if i not in missed]
    note = f"MLflow run(s) {', '.join(done)} marked FAILED" if done else ""
    if missed:
        note += ("; " if note else "") + f"could not mark {', '.join(missed)} FAILED at {uri}"
    return note


def abandon_sweep(sweep_dir: Path, record: dict[str, Any], plans: dict[str, list[JobSpec]],
                  queued: dict[str, dict[str, Any]], ids: list[str], what: str, error: BaseException) -> int:
    """An array's sbatch failed (or Ctrl-C): cancel the arrays queued before it, record their
    jobs CANCELLED, mark FAILED the MLflow runs of the cells whose pre-training this submission
    was to run, say so; exit code 2."""
    from hpc_mim.rundir import RunDir
    from jobs.status import status_path
    from jobs.sweep_arrays import write_record
    cancel_error = cancel(ids)
    if not cancel_error:
        why = f"cancelled at submission: sbatch of {what} failed"
        for cid, jobs in queued.items():
            record_cancelled({job: status_path(sweep_dir / cid / "jobs", spec.name)
                              for spec in plans[cid] for job in [spec.name] if job in jobs},
                             {job: j.job_id for job, j in jobs.items()}, why)
    failure = SubmissionError(what, sbatch_reason(error), ids, cancel_error)
    record["submissions"][-1]["failed"] = {"what": what, "error": failure.reason, "cancelled": ids,
                                           "cancel_error": cancel_error}
    write_record(sweep_dir, record)
    runs: dict[str, list[dict[str, Any]]] = {}
    for cid, plan in plans.items():
        if not any(spec.name == "pretrain" for spec in plan):
            continue            # a resume of its evaluations only: its finished pre-training's run stays
        try:
            tracking = RunDir(sweep_dir / cid).read_tracking()
        except (FileNotFoundError, ValueError):
            continue
        runs.setdefault(tracking["uri"], []).append(tracking)
    notes = [failed_runs_note(uri, tracked) for uri, tracked in runs.items()]
    print(f"error: sweep {record['name']}: {failure}" + "".join(f"; {n}" for n in notes if n)
          + ("" if cancel_error else f"; --resume {sweep_dir} submits these cells again"), file=sys.stderr)
    return 2
