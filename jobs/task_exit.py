"""How the process of a task that finished its work ends: every ``atexit`` handler while the
interpreter is whole, then ``os._exit(0)``, never the interpreter's own teardown.

Why (gdb on the core of a ZeRO-2 run that did its work and then died with SIGABRT, 3 in 89
runs on 2 loaded cores; the CI of issue 28 saw it once): a gloo worker thread that finishes an
all-reduce drops the last reference to its tensors, and freeing a tensor whose Python object it
owns takes the GIL. Once the interpreter is finalizing, ``take_gil`` ends that thread with
``pthread_exit``, whose forced unwind through a ``noexcept`` destructor calls ``std::terminate``
("terminate called without an active exception"). The task exits 134 after submitit recorded
its result: SLURM marks the job FAILED and the evaluations chained ``afterok`` never start.
``destroy_process_group`` does not stop the worker threads while DeepSpeed still holds the
groups, and NCCL's watchdog thread frees its work the same way (pytorch/pytorch#190489; an
``atexit`` destroy in torch itself, #179291, was abandoned). A process whose outcome is on disk
has nothing left for the teardown to do, so it does not run it.

A task that failed is left to exit as usual, with its status."""
from __future__ import annotations

import atexit
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path


def end_without_teardown(finished: Callable[[], bool]) -> None:
    """At interpreter exit, if ``finished()``: run the other ``atexit`` handlers (logging,
    multiprocessing, MLflow; they run last-registered first, as Python would), flush, and end the
    process with status 0 before the interpreter finalizes. Registered once the task's work is
    done; checked at exit because submitit records the result after the entry point returns."""

    def end() -> None:
        if not finished():
            return
        atexit.unregister(end)
        atexit._run_exitfuncs()          # noqa: SLF001 - the handlers, in a whole interpreter
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):     # closed by a handler, or a broken pipe
                pass
        os._exit(0)

    atexit.register(end)


def result_says_success(result_pickle: Path) -> Callable[[], bool]:
    """Whether submitit recorded ``("success", ...)`` for this task (it writes the file after
    the entry point returned; a failure to write it must still fail the task)."""

    def check() -> bool:
        try:
            with open(result_pickle, "rb") as f:
                return pickle.load(f)[0] == "success"
        except Exception:  # noqa: BLE001 - missing, half-written or unreadable: not finished
            return False

    return check
