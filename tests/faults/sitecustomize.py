"""Fault injection for the SLURM failure tests, outside the project's code.

A job started with ``PYTHONPATH=tests/faults`` and ``HPC_MIM_FAULT=<kind>@<step>:<rank>``
imports this module at interpreter start (Python's ``sitecustomize`` hook; sbatch passes the
submitting environment on), which patches the real code once it is imported:

- ``error@N:R``: rank R raises a ValueError after optimizer step N (a genuine error of the job);
- ``sleep@N:R``: rank R sleeps for an hour after step N (a rank stuck: every other rank waits
  in the next collective);
- ``loader@N:R``: FFCV's loader thread of rank R raises while preparing batch N of epoch 1
  (the training thread then waits for that batch forever).

Each fault fires in every run of the job (a requeued one too) at the same place.
"""
import importlib.abc
import os
import sys
import time

SPEC = os.environ.get("HPC_MIM_FAULT", "")


def _parse() -> tuple[str, int, int]:
    kind, _, rest = SPEC.partition("@")
    step, _, rank = rest.partition(":")
    return kind, int(step), int(rank)


def _my_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _patch_loop(module) -> None:
    kind, step, rank = _parse()
    agree = module.TrainLoop.agree
    calls = {"n": 0}

    def faulty_agree(self, loss):
        calls["n"] += 1
        start = getattr(self, "_fault_start", None)
        if start is None:                      # the step this process resumed from
            start = self._fault_start = self.ckpt.load(lambda f, t: int(t.split("_")[1].split("-")[0])) or 0
        if _my_rank() == rank and start + calls["n"] == step:
            if kind == "error":
                raise ValueError(f"injected genuine error at step {step} on rank {rank}")
            if kind == "sleep":
                print(f"[fault] rank {rank} sleeping at step {step}", file=sys.stderr, flush=True)
                time.sleep(3600)
        return agree(self, loss)

    module.TrainLoop.agree = faulty_agree


def _patch_loader(module) -> None:
    kind, step, rank = _parse()
    run_pipeline = module.EpochIterator.run_pipeline

    def faulty(self, b_ix, *args, **kwargs):
        if _my_rank() == rank and b_ix == step and self.loader.next_epoch - 1 == 1:
            raise RuntimeError(f"injected loader-thread error at batch {b_ix} on rank {rank}")
        return run_pipeline(self, b_ix, *args, **kwargs)

    module.EpochIterator.run_pipeline = faulty


PATCHES = {"hpc_mim.train.loop": _patch_loop, "ffcv.loader.epoch_iterator": _patch_loader}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of a patched module to patch it once run."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES or not SPEC:
            return None
        kind = _parse()[0]
        if (name == "ffcv.loader.epoch_iterator") != (kind == "loader"):
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                exec_module = spec.loader.exec_module

                def patched(module, exec_module=exec_module):
                    exec_module(module)
                    PATCHES[name](module)
                spec.loader.exec_module = patched
                return spec
        return None


if SPEC:
    sys.meta_path.insert(0, _AfterImport())
