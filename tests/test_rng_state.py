"""Each rank's RNG file in a checkpoint holds tensors and numbers only (hpc_mim/train/checkpoint.py
``save_rng``/``load_rng``): ``weights_only=True`` loads it, the generators continue exactly, a
file of the previous format still resumes, and a pickle that would run code is refused on resume
instead of executed (it used to be loaded with ``weights_only=False``: write access to a run
directory was code execution for whoever resumed it). Exact resume of a whole run:
tests/test_checkpoint.py (stop_signal, resume)."""
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpc_mim.train.checkpoint import CheckpointManager, load_rng, save_rng
from hpc_mim.train.process import rng_state, set_rng_state

CPU = torch.device("cpu")


def draws() -> tuple:
    """One draw of each generator a step uses, Gaussian caches included (python's gauss_next,
    numpy's cached_gaussian: a Box-Muller pair leaves one behind)."""
    return (random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.randint(1 << 30),
            torch.rand(3).tolist(), torch.randint(0, 1 << 30, (2,)).tolist())


def scramble() -> None:
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)


@pytest.mark.parametrize("writer", ["save_rng", "previous format"])
def test_rng_state_continues_exactly_after_a_save_and_load(tmp_path, writer):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()          # leave both Gaussian caches full
    path = tmp_path / "rng_rank0.pt"
    if writer == "save_rng":
        save_rng(path, rng_state(CPU))
        blob = torch.load(path, weights_only=True)          # no allowlist needed
        assert blob["python"]["gauss_next"] is not None and blob["numpy"]["has_gauss"] == 1
    else:
        torch.save(rng_state(CPU), path)                     # how checkpoints were written before
    expected = draws()
    scramble()
    set_rng_state(load_rng(path), CPU)
    assert draws() == expected


class RunsCode:
    """What a hostile RNG file would hold: unpickling it calls ``open(path, "w")``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_pickle_that_would_run_code_is_refused_on_resume_and_does_not_run(tmp_path, monkeypatch):
    """``TrainLoop.resume`` itself (DeepSpeed's part stubbed out) on a checkpoint whose RNG file
    was replaced by someone with write access to the run directory."""
    from hpc_mim.train import loop
    ckpt = CheckpointManager(tmp_path / "checkpoints")

    def save(folder: Path, tag: str) -> None:
        (folder / tag).mkdir()
        torch.save({"torch": torch.get_rng_state(), "numpy": RunsCode(tmp_path / "code_ran")},
                   folder / tag / "rng_rank0.pt")
    ckpt.save(4, save)
    monkeypatch.setattr(loop.ds, "load_checkpoint", lambda engine, folder, tag: {"step": 4})
    resuming = SimpleNamespace(ckpt=ckpt, engine=None, env=SimpleNamespace(rank=0), device=CPU,
                               log=print)
    with pytest.raises(pickle.UnpicklingError, match="not an RNG state file"):
        loop.TrainLoop.resume(resuming)
    assert not (tmp_path / "code_ran").exists()
