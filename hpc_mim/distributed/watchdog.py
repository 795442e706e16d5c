"""Progress watchdog: a training job that stops making optimizer steps ends instead of holding
its GPUs until the time limit.

Anything can stall a step: an exception in FFCV's loader thread (the training thread then waits
for a batch that never comes), a hung filesystem, one rank stuck while every other rank waits
for it in a collective (NCCL's own timeout defaults to 30 min, gloo's to ours). Each rank runs
a ``ProgressWatchdog`` thread; the training loop calls ``beat(step)`` after every optimizer step
(and around its evaluations and checkpoints). When no beat came for the timeout, the rank

1. writes the Python stacks of all its threads into its log (``faulthandler``: what it waited
   for), and any exception a thread died of (``threading.excepthook``, e.g. the loader's),
2. leaves its outcome (hpc_mim/distributed/outcome.py): ``lost``, so the batch script requeues
   the job, or ``error`` if an earlier run of the job stalled at the same step: a stall that
   comes back at the same place is a defect, not bad luck, and the job fails naming it,
3. ends the process (``os._exit``: the main thread may be blocked in C and cannot be
   interrupted). Checkpoints are atomic (train/checkpoint.py): nothing on disk is lost.

Every rank's watchdog fires within a poll interval of the others (the ranks that wait in a
collective make no steps either), so every rank's stacks are in its log.

The timeout: ``cluster.stall_timeout_min`` at least, and ``factor`` times the longest interval
between beats seen so far, so a slow configuration (large accumulation, long evaluations) is
not taken for a stall.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Callable

from hpc_mim.distributed.outcome import OUTCOME

STALL_EXIT = 75                    # EX_TEMPFAIL; the batch script reads the markers, not this


class ProgressWatchdog:
    def __init__(self, floor_s: float, factor: float = 10.0, poll_s: float | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        """``floor_s``: the shortest timeout; ``factor``: times the longest interval between
        beats; ``log``: also tell the job's progress log (rank 0's)."""
        self.floor_s, self.factor = float(floor_s), float(factor)
        self.poll_s = poll_s if poll_s is not None else min(10.0, max(0.2, self.floor_s / 20))
        self.log = log
        self.step, self.last, self.longest = 0, time.monotonic(), 0.0
        self.thread_errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_hook = threading.excepthook

    def timeout_s(self) -> float:
        return max(self.floor_s, self.factor * self.longest)

    def beat(self, step: int | None = None, measure: bool = True) -> None:
        """Progress: an optimizer step (``step``) or a phase that ended (an evaluation, a
        checkpoint). ``measure=False`` (the first step, which includes compilation and the
        loader's start) keeps the interval out of the timeout's sizing."""
        now = time.monotonic()
        if measure:
            self.longest = max(self.longest, now - self.last)
        self.last = now
        if step is not None:
            self.step = step

    def start(self) -> "ProgressWatchdog":
        self.last = time.monotonic()
        threading.excepthook = self._thread_died
        self._thread = threading.Thread(target=self._watch, name="hpc_mim-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        threading.excepthook = self._previous_hook
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> "ProgressWatchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _thread_died(self, args: threading.ExceptHookArgs) -> None:
        """An uncaught exception in another thread (FFCV's loader): print it as Python would,
        and keep it for the stall report, since the training thread itself never sees it."""
        name = args.thread.name if args.thread is not None else "?"
        self.thread_errors.append(f"thread {name!r} died: {args.exc_type.__name__}: {args.exc_value}")
        self._previous_hook(args)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s():
                self._stalled(idle)
                return

    def _stalled(self, idle: float) -> None:
        step, timeout = self.step, self.timeout_s()
        again = OUTCOME.stalled_before_at(step)
        reason = (f"stalled: no optimizer step for {idle / 60:.1f} min after step {step} "
                  f"(timeout {timeout / 60:.1f} min: cluster.stall_timeout_min, or {self.factor:g}x "
                  f"the longest step seen)")
        if self.thread_errors:
            reason += "; " + "; ".join(self.thread_errors)
        if again:
            reason += "; it stalled at this step in an earlier run of the job too: not requeued"
        line = f"[watchdog] rank {OUTCOME.rank}: {reason}. Python stacks of every thread follow."
        print(line, file=sys.stderr, flush=True)
        if self.log is not None:
            try:
                self.log(line)
            except Exception:  # noqa: BLE001 - the log is a courtesy; ending the job is not
                pass
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        try:
            OUTCOME.record("error" if again else "lost", reason)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(STALL_EXIT)
