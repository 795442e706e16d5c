"""What the batch script does once ``srun`` has returned: requeue the job, or let it end.

    python jobs/after_tasks.py RC MAX_RESTARTS      (the EXIT trap of every SLURM job script)

The tasks' outcome markers (hpc_mim/distributed/outcome.py, in ``$HPC_MIM_OUTCOMES``) say why
each task ended; srun's exit code ``RC`` only says that one did. The policy (``decide``):

- RC 0, or the job is no longer RUNNING (cancelled, or already being requeued by SLURM): nothing.
- a task failed with a genuine error of the job: nothing (the job ends FAILED, the error named
  in its status record and log).
- tasks stopped on SIGUSR2 (time limit or preemption warning): requeue. The batch script does
  it, after every task has exited: a rank 0 that requeued by itself could be killed first by
  ``--kill-on-bad-exit`` once the other ranks exit.
- anything else (a task died from a signal, lost a peer, was aborted by NCCL's watchdog, or
  stalled): requeue. This includes tasks that stopped on a SIGTERM while the job is still
  RUNNING: SLURM's own SIGTERMs (``scontrol requeue``, preemption, ``scancel``, the time
  limit) change the job's state first, so this one came from srun ending the step after
  another task died (``--kill-on-bad-exit``).

Requeues stop after ``MAX_RESTARTS`` (``cluster.max_restarts``). Stdlib only and run as a
script: it starts in a few tens of milliseconds.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpc_mim.distributed.outcome import read_markers  # noqa: E402 - stdlib only


def decide(rc: int, markers: dict[str, list[tuple[int, str]]], restarts: int,
           max_restarts: int, running: bool) -> tuple[bool, str]:
    """(requeue?, what to print) for srun's exit code and the tasks' markers."""
    if rc == 0:
        return False, ""
    if not running:
        return False, "the job is not RUNNING (cancelled, or SLURM requeues it): nothing to do"
    if "error" in markers:
        rank, why = markers["error"][0]
        return False, f"rank {rank} failed with an error of the job: not requeued ({why[:500]})"
    stopped = [why for _, why in markers.get("stopped", [])]
    if any("SIGUSR2" in why for why in stopped):
        cause = "stopped on SIGUSR2 after a checkpoint"
    elif "lost" in markers:
        rank, why = markers["lost"][0]
        cause = f"rank {rank} {why[:300]}" if why.startswith("stalled") else f"rank {rank} lost a peer ({why[:300]})"
    elif stopped:
        cause = f"tasks stopped on SIGTERM while the job is RUNNING: srun ended the step (exit {rc})"
    else:
        cause = f"a task died from a signal or without a word (srun exit {rc})"
    if restarts >= max_restarts:
        return False, f"{cause}; not requeued: already restarted {restarts} times (cluster.max_restarts)"
    return True, f"{cause}; requeueing (restart {restarts + 1} of at most {max_restarts})"


def job_running(job_id: str) -> bool:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    return "JobState=RUNNING" in out.stdout


def main(argv: list[str]) -> int:
    rc, max_restarts = int(argv[0]), int(argv[1])
    job_id = os.environ.get("SLURM_JOB_ID", "")
    if rc == 0 or not job_id:
        return 0
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    folder = os.environ.get("HPC_MIM_OUTCOMES", "")
    markers = read_markers(Path(folder), job_id, restarts) if folder else {}
    requeue, message = decide(rc, markers, restarts, max_restarts, job_running(job_id))
    if requeue:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        message = (f"{message}: requeued job {job_id}" if done.returncode == 0 else
                   f"{message}: scontrol requeue {job_id} failed: {done.stderr.strip()}")
    if message:
        print(f"[launcher] tasks ended (srun exit {rc}): {message}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
