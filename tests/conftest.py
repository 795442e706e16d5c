"""Shared fixtures: a small real Fashion-MNIST conversion, the real local SLURM cluster, and
empty MLflow stores (one made per session, copied per test)."""
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


def ended_state(job_id: str, within: float = 30) -> str:
    """The job's JobState from ``scontrol`` once it is no longer queued, running or completing
    (a job cancelled as it started is COMPLETING until its processes are gone)."""
    import re
    import time
    deadline = time.time() + within
    while True:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                               check=False).stdout
        state = (re.search(r"\bJobState=(\S+)", shown) or [None, "?"])[1]
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING") or time.time() > deadline:
            return state
        time.sleep(0.2)


def placeholder_data(root: Path) -> Path:
    """A data.root whose fmnist files exist (empty): enough for jobs/submit.py's input check, for
    tests whose jobs are refused, or cancelled as soon as they are queued."""
    (root / "fmnist").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "fmnist" / f"{split}.beton").write_bytes(b"")
    return root


# ------------------------------------------------------------------ MLflow stores

@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty sqlite MLflow store, made once per session: creating one runs MLflow's
    migrations (5-9 s here), copying it takes milliseconds."""
    from hpc_mim.tracking import client
    db = tmp_path_factory.getbasetemp() / "mlflow_template" / "mlflow.db"
    if not db.is_file():
        db.parent.mkdir(exist_ok=True)
        making = db.with_name(f"making-{os.getpid()}.db")
        client(f"sqlite:///{making}").search_experiments()
        os.replace(making, db)            # whole or absent
    return db


@pytest.fixture
def mlflow_uri(mlflow_template, tmp_path) -> str:
    """A fresh copy of the empty store for this test, outside its runs folder."""
    import shutil
    copy = tmp_path / "store" / "mlflow.db"
    copy.parent.mkdir()
    shutil.copy(mlflow_template, copy)
    return f"sqlite:///{copy}"


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


def submitted_run(folder: Path, cfg) -> tuple:
    """A run directory as jobs/submit.py leaves it: the resolved config, an MLflow parent run
    in a sqlite store next to it, tracking.json. Returns (RunDir, tracking URI, parent run id)."""
    from hpc_mim import tracking
    from hpc_mim.config import save_config
    from hpc_mim.rundir import RunDir
    run = RunDir(folder / "run").create()
    save_config(cfg, run.config)
    uri = tracking.default_uri(folder)
    exp = tracking.ensure_experiment(uri, "test")
    parent = tracking.MLflowLogger.create_run(uri, exp, "pretrain")
    run.write_tracking({"uri": uri, "experiment_id": exp, "run_id": parent.run_id})
    return run, uri, parent.run_id
