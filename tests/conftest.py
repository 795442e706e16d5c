"""Shared fixtures: a small real Fashion-MNIST conversion and the real local SLURM cluster."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

# FFCV's numba JIT costs 10-20 s per loader; the interpreter path is plenty for a few hundred images.
os.environ.setdefault("HPC_MIM_FFCV_JIT", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

REPO = Path(__file__).resolve().parent.parent
SOURCE = Path("/usr/share/datasets/fashion-mnist")
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else "python"


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """data.root holding fmnist/{train,val}.beton (the first 512 real images of each split) and
    fmnist_scenes/ (24 + 8 composed scenes in the ADE20K and COCO layouts)."""
    from data_prep.fashion_mnist import convert
    from data_prep.scenes import generate
    root = tmp_path_factory.mktemp("data")
    convert(SOURCE, root / "fmnist", limit=512)
    generate(SOURCE, root / "fmnist_scenes", train=24, val=8)
    return root


@pytest.fixture(scope="session")
def slurm_cluster():
    """Two pretend nodes of 4 CPUs each on this machine, started by the project's own script
    (the tests' jobs take 1 CPU; four side by side overlap their waits)."""
    script = REPO / "scripts" / "local_slurm.sh"
    started = subprocess.run(["bash", str(script), "start", "2", "4"], capture_output=True, text=True,
                             timeout=240)
    if started.returncode != 0:
        pytest.fail(f"scripts/local_slurm.sh start 2 4 failed:\n{started.stdout}{started.stderr}", pytrace=False)
    yield
    subprocess.run(["bash", str(script), "stop"], check=False, timeout=120)


def submit(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run jobs/submit.py as a user would."""
    return subprocess.run([PYTHON, str(REPO / "jobs" / "submit.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def squeue_ids() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def queued_since(before: list[str]) -> set[str]:
    """Jobs in the queue now that were not in ``before`` (jobs of an earlier test may still be
    leaving it, and squeue's order changes as they do)."""
    return set(squeue_ids()) - set(before)


# ------------------------------------------------------------------ host syncs

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
PROJECT_DIRS = tuple(str(REPO / d) + os.sep for d in ("hpc_mim", "evaluation"))


class HostSyncs:
    """Counts the tensor -> host conversions (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``,
    ``int(t)``, ...) made by project code: on a GPU each one waits for the device to drain.
    A CPU has no such wait, but the calls are the same ones, so a CPU test can count them.
    ``sites`` maps "file:line" of the project frame that asked to the number of calls."""

    def __init__(self, patch=setattr) -> None:
        """``patch``: ``monkeypatch.setattr`` in a test (undone after it), plain ``setattr`` in a
        child process."""
        import sys
        import torch
        self.sites: dict[str, int] = {}
        torch_dir = os.path.dirname(torch.__file__) + os.sep

        def wrap(name, original):
            def counted(tensor, *args, **kwargs):
                frame = sys._getframe(1)
                while frame is not None and frame.f_code.co_filename.startswith(torch_dir):
                    frame = frame.f_back          # e.g. Tensor.__format__ -> item()
                if frame is not None and frame.f_code.co_filename.startswith(PROJECT_DIRS):
                    site = f"{os.path.relpath(frame.f_code.co_filename, REPO)}:{frame.f_lineno}"
                    self.sites[site] = self.sites.get(site, 0) + 1
                return original(tensor, *args, **kwargs)
            return counted

        for name in SYNC_METHODS:
            patch(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))

    @property
    def total(self) -> int:
        return sum(self.sites.values())
