"""How a task of a job ended, told to the batch script that decides about the requeue.

Every task of a multi-node job that ends abnormally leaves one *outcome marker* in a folder
shared by all nodes (``HPC_MIM_OUTCOMES``, set by the launcher): the file
``<SLURM job id>.<restart>.rank<r>.<kind>`` holding the reason. The batch script reads them once
``srun`` has returned (jobs/after_tasks.py), with this policy:

- ``error``: a genuine error of the job's own code (an exception such as a ``ConfigError``, a
  non-finite loss, a bug), or a stall seen twice at the same step: never requeued; one such
  marker wins over every other task's ``lost``.
- ``stopped``: the task stopped on a scheduler signal after checkpointing (preemption.py):
  after SIGUSR2 the batch script requeues the job, after SIGTERM SLURM decides.
- ``lost``: the task lost a peer (a rank or node died: gloo's "Connection closed by peer", an
  NCCL error, a collective or store timeout) or stalled for the first time: requeued.
- no marker at all: a task died from a signal (SIGKILL of the OOM killer or a lost node, the
  SIGABRT of NCCL's watchdog): requeued.

Requeues stop after ``cluster.max_restarts``. Why markers rather than srun's exit code: with
``--kill-on-bad-exit`` srun kills the other tasks as soon as one exits, so its exit code says
which task ended first and how it was killed, not why the job failed (a surviving rank's
"Connection closed by peer" exits 1, as a genuine error does).

Stdlib only: the launcher, the training loop's watchdog and the batch script's policy use it.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

KINDS = ("error", "stopped", "lost")

# gloo and NCCL raise plain RuntimeErrors (or torch.distributed.DistError subclasses) when a
# peer is gone or a collective timed out; their texts are stable across torch releases
LOST_PEER = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|Connection refused"
    r"|Timed out waiting|timed out after|Socket Timeout|ncclRemoteError|ncclSystemError"
    r"|NCCL communicator was aborted|NCCL error|Watchdog caught collective operation timeout"
    r"|ProcessGroupNCCL|rendezvous failed at", re.IGNORECASE)


def is_lost_peer(error: BaseException) -> bool:
    """True when ``error`` (or an exception it was raised from) says that another rank, the
    rendezvous store or the interconnect failed, rather than this task's own code."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError"):
            return True
        if LOST_PEER.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def classify(error: BaseException) -> str:
    """``stopped``, ``lost`` or ``error`` (see the module docstring)."""
    from hpc_mim.distributed.preemption import Preempted
    if isinstance(error, Preempted):
        return "stopped"
    return "lost" if is_lost_peer(error) else "error"


def mlflow_end(error: BaseException) -> tuple[str, str, str]:
    """How a job's MLflow run ends on ``error``: (status, tag, text). FAILED with an ``error``
    tag for a genuine error, its own or another rank's (srun's SIGTERM then stopped this one);
    KILLED with a ``stopped`` tag when the job stops to be requeued (a scheduler signal, a lost
    peer): the requeued job marks the same run RUNNING again."""
    kind = classify(error)
    text = f"{type(error).__name__}: {error}"
    if kind != "error" and (failed := OUTCOME.others("error")):
        return "FAILED", "error", f"rank {failed[0][0]}: {failed[0][1]}"[:5000]
    if kind == "error":
        return "FAILED", "error", text[:5000]
    return "KILLED", "stopped", text[:5000]


def marker_name(job_id: str, restart: int, rank: int, kind: str) -> str:
    return f"{job_id}.{restart}.rank{rank}.{kind}"


def read_markers(folder: Path, job_id: str, restart: int) -> dict[str, list[tuple[int, str]]]:
    """kind -> [(rank, reason)] of one run (job id, restart) of a job."""
    out: dict[str, list[tuple[int, str]]] = {}
    pattern = re.compile(rf"^{re.escape(str(job_id))}\.{restart}\.rank(\d+)\.({'|'.join(KINDS)})$")
    for path in sorted(Path(folder).glob(f"{job_id}.{restart}.rank*")) if Path(folder).is_dir() else []:
        m = pattern.match(path.name)
        if m:
            try:
                reason = path.read_text()
            except OSError:
                reason = ""
            out.setdefault(m.group(2), []).append((int(m.group(1)), reason))
    return out


@dataclass
class JobOutcome:
    """This task's identity in the job and where its outcome goes; configured by the launcher
    (``configure``), used by it and by the training loop's watchdog. Unconfigured (a job run
    directly, a test), ``record`` only returns the kind."""
    folder: Path | None = None
    job_id: str = ""
    restart: int = 0
    rank: int = 0
    # (state, message) -> writes the job's status record; the launcher's, on the ranks it lets
    status: Callable[[str, str], None] | None = None
    notes: list[str] = field(default_factory=list)

    def configure(self, folder: Path | None, job_id: str, restart: int, rank: int,
                  status: Callable[[str, str], None] | None) -> None:
        self.folder, self.job_id, self.restart, self.rank, self.status = \
            (Path(folder) if folder else None), str(job_id), int(restart), int(rank), status

    def others(self, kind: str) -> list[tuple[int, str]]:
        """Markers of ``kind`` that other tasks of this run of the job left."""
        if self.folder is None:
            return []
        return [(r, why) for r, why in read_markers(self.folder, self.job_id, self.restart).get(kind, [])
                if r != self.rank]

    def record(self, kind: str, reason: str, write_status: bool = True) -> None:
        """Leave this task's marker (atomically, so the batch script reads all or nothing) and,
        with ``write_status``, update the status record: FAILED for an error (whatever the
        rank: it names the job's real error), REQUEUED for a lost peer on rank 0 unless another
        task already failed with an error (its record must stay)."""
        if kind not in KINDS:
            raise ValueError(f"outcome kind {kind!r}; choose one of {KINDS}")
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / marker_name(self.job_id, self.restart, self.rank, kind)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(reason[:4000])
            os.replace(tmp, path)
        if self.status is None or not write_status:
            return
        if kind == "error":
            self.status("FAILED", f"rank {self.rank}: {reason}")
        elif kind == "lost" and self.rank == 0 and not self.others("error"):
            self.status("REQUEUED", f"rank {self.rank}: {reason}; the batch script requeues the "
                                    "job while cluster.max_restarts allows")

    # ------------------------------------------------------------------ stalls
    def stalled_before_at(self, step: int) -> bool:
        """Whether any rank of an earlier run of this job (the SLURM job id stays the same when
        it is requeued) stalled at ``step``; remembers this rank's stall in this run. Job-wide,
        not per rank: which rank's watchdog fires first, and whether the others then see a lost
        peer instead, is a race between ranks whose timeouts end within a poll of each other."""
        if self.folder is None:
            return False
        before = False
        for path in self.folder.glob(f"{self.job_id}.stall.*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            before |= record.get("restart", self.restart) < self.restart and record.get("step") == step
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.job_id}.stall.{self.restart}.rank{self.rank}.json"
        path.write_text(json.dumps({"step": step, "restart": self.restart, "rank": self.rank,
                                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        return before


OUTCOME = JobOutcome()
