"""Stop requests from the scheduler, and requeueing.

Two signals mean "this job must stop soon":

- ``SIGUSR2``: SLURM's warning before the time limit or a preemption (``--signal=USR2@90``,
  submitit's convention; also ``scancel --signal=USR2``). SLURM does not requeue by itself, so
  once every task has checkpointed and exited, the job's batch script requeues it
  (``scontrol requeue``, jobs/after_tasks.py): a task that requeued by itself could be killed
  first by srun's ``--kill-on-bad-exit`` when the other tasks exit.
- ``SIGTERM``: what ``scontrol requeue``, preemption with PreemptMode=REQUEUE and ``scancel``
  send first (then SIGKILL after KillWait, 30 s by default). SLURM decides about the requeue;
  the job only checkpoints and exits. (submitit ignores SIGTERM by default; we do not.)

The training loop (hpc_mim/train/loop.py: pre-training and the trained evaluations) declares
itself *cooperative* and polls ``STOP.received`` between steps, so it can finish the step,
checkpoint and raise :class:`Preempted`. Outside it (feature extraction, a final evaluation)
:class:`Preempted` is raised at once; the requeued job redoes that part from its checkpoints.

A job killed outright (SIGKILL: OOM killer, ``kill -9``, a node lost) cannot do anything; its
batch script requeues it (jobs/after_tasks.py, from the tasks' outcome markers:
hpc_mim/distributed/outcome.py) and it resumes from the last periodic checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class Preempted(BaseException):
    """The job stopped on a scheduler signal (after checkpointing, if it could).

    A BaseException, like KeyboardInterrupt: raised from the signal handler at any point of an
    evaluation, it must not be swallowed by an ``except Exception`` on its way up (the tracking
    spool's "server unreachable" handler would otherwise take it for an outage and the job
    would carry on to the end instead of requeueing)."""

    def __init__(self, signal_name: str, step: int | None = None) -> None:
        at = f" at step {step} (checkpoint saved)" if step is not None else ""
        super().__init__(f"stopped by {signal_name}{at}")
        self.signal_name, self.step = signal_name, step


class StopRequests:
    def __init__(self) -> None:
        self.received: str | None = None
        self.cooperative = False
        self.pid = 0

    def install(self) -> None:
        """Handle SIGUSR2 and SIGTERM in this process (main thread only)."""
        self.pid = os.getpid()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:      # a forked child (DataLoader worker) inherited the
            return                       # handler; SLURM signals it too. Its parent decides.
        name = signal.Signals(signum).name
        then = "stopping after the current step" if self.cooperative else "stopping now"
        # os.write: print() from a handler can hit "reentrant call" inside a buffered write
        os.write(2, f"[preemption] {name} received at {time.strftime('%H:%M:%S')}; {then}\n".encode())
        first = self.received is None
        self.received = self.received or name
        if first and not self.cooperative:       # a second signal (e.g. the SIGTERM of our own
            raise Preempted(name)                # requeue) must not interrupt the clean-up

    @contextmanager
    def polled(self) -> Iterator["StopRequests"]:
        """Inside this block signals only set ``received``; the caller checks it."""
        self.cooperative = True
        try:
            if self.received:              # arrived before the block: stop at the first check
                print(f"[preemption] {self.received} arrived earlier", file=sys.stderr, flush=True)
            yield self
        finally:
            self.cooperative = False


STOP = StopRequests()


def ignore_in_worker(worker_id: int = 0) -> None:
    """``worker_init_fn`` of a torch DataLoader: its worker processes ignore the stop signals.
    SLURM signals every process of the job step; torch's worker handler dies on SIGTERM, and
    the main process would then fail with "DataLoader worker ... killed by signal" instead of
    finishing the step and checkpointing. The main process ends the workers itself."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
