"""scripts/setup.sh's profiles, as a plan (``--dry-run``: nothing installed), and what ``make
gpu-check`` sets up. A GPU node gives no root and needs neither SLURM, munge, chromium nor the
Debian Fashion-MNIST: ``--gpu-node`` must neither call apt nor stop for them.

The script runs from a copy (scripts/setup.sh and setup.cfg in a folder every user can read: the
plan is the same wherever the repository is), as ``nobody`` when the tests run as root, with
stand-ins on PATH: ``dpkg-query`` that knows no package (so every package is missing), ``apt-get``
that records its calls, ``pkg-config`` that finds no module; and a stand-in .venv whose pip
records its calls.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GPU_PACKAGES = "pkg-config libopencv-dev libturbojpeg0-dev g++ ninja-build"
CLUSTER_ONLY = ("dataset-fashion-mnist", "slurm-wlm", "munge", "chromium")


@pytest.fixture
def tree():
    """A copy of what setup.sh reads, readable by everyone. ``bin/`` holds the stand-ins and
    ``apt.log`` what the stand-in apt-get was asked; ``.venv/bin/{python,pip}`` are stand-ins
    too (``pip.log``), so that a script that ignored --dry-run would install nothing for real."""
    root = Path(tempfile.mkdtemp(prefix="hpc_mim-setup-"))
    try:
        (root / "scripts").mkdir()
        shutil.copy(REPO / "scripts" / "setup.sh", root / "scripts" / "setup.sh")
        shutil.copy(REPO / "setup.cfg", root / "setup.cfg")
        (root / "bin").mkdir()
        (root / ".venv" / "bin").mkdir(parents=True)
        stubs = {"bin/dpkg-query": "exit 1",                                 # no package installed
                 "bin/apt-get": f'echo "$*" >> {root / "apt.log"}',
                 "bin/pkg-config": "exit 1",                                 # no .pc module found
                 ".venv/bin/python": "exit 0",
                 ".venv/bin/pip": f'echo "$*" >> {root / "pip.log"}'}
        for name, body in stubs.items():
            (root / name).write_text(f"#!/bin/sh\n{body}\nexit 0\n" if "log" in body else f"#!/bin/sh\n{body}\n")
        for log in ("apt.log", "pip.log"):
            (root / log).write_text("")
            (root / log).chmod(0o666)
        for path in [root, *root.rglob("*")]:
            if path.is_dir() or path.relative_to(root).as_posix() in stubs:
                path.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def setup_sh(tree: Path, *args: str, root: bool = False, stubs: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """bash scripts/setup.sh ARGS in ``tree``, as nobody unless ``root`` (as the current user
    when the tests do not run as root)."""
    path = (f"{tree / 'bin'}:" if stubs else "") + os.environ["PATH"]
    cmd = ["env", f"PATH={path}", *[f"{k}={v}" for k, v in (env or {}).items()],
           "bash", str(tree / "scripts" / "setup.sh"), *args]
    if not root and os.geteuid() == 0:
        cmd = ["runuser", "-u", "nobody", "--", *cmd]
    elif root and os.geteuid() != 0:
        pytest.skip("needs root")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")


def test_gpu_profile_without_root_calls_no_apt_and_asks_for_no_cluster_package(tree):
    for how in (("--gpu-node", "--dry-run"), ("--dry-run",)):
        env = {"SETUP_PROFILE": "gpu"} if "--gpu-node" not in how else {}
        r = setup_sh(tree, *how, env=env)
        out = r.stdout + r.stderr
        assert r.returncode == 0, (how, out)
        assert "profile gpu" in out and "(not root)" in out
        assert f"missing Debian packages: {GPU_PACKAGES}" in out
        assert "apt: not called (not root)" in out and (tree / "apt.log").read_text() == ""
        for package in CLUSTER_ONLY:
            assert package not in out, (package, out)
        # what is missing and how to get it without root
        assert "build tools not found: opencv4 libturbojpeg" in out
        assert "conda install -c conda-forge opencv libjpeg-turbo pkg-config" in out
        assert "PKG_CONFIG_PATH=$CONDA_PREFIX/lib/pkgconfig" in out and "module load" in out
        # then the pinned stack all the same, into a new .venv
        steps = [line.split("pip ", 1)[1] for line in out.splitlines() if ".venv/bin/pip " in line]
        assert steps == ["install --upgrade pip wheel setuptools", "install torch==2.14.1 torchvision==0.29.1",
                         "install numpy", "install --no-build-isolation ffcv==1.0.2", "install -e .[test]"], out
        assert "pip steps (to do)" in out and "dry run: nothing was installed or changed" in out
        assert (tree / "pip.log").read_text() == "" and not (tree / ".venv" / ".hpc_mim-installed").exists()


def test_full_profile_without_root_stops_naming_the_missing_packages(tree):
    r = setup_sh(tree, "--dry-run")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"missing Debian packages: {GPU_PACKAGES} {' '.join(CLUSTER_ONLY)} (need root" in r.stderr
    assert "--gpu-node" in r.stderr and (tree / "apt.log").read_text() == ""
    # this machine's own packages (installed: the full profile goes on, without apt)
    real = setup_sh(tree, "--dry-run", stubs=False)
    assert "Debian packages of this profile: " + GPU_PACKAGES + " " + " ".join(CLUSTER_ONLY) in real.stdout
    assert "slurm-wlm" in real.stdout and "apt-get install" not in real.stdout


def test_as_root_each_profile_installs_only_its_packages(tree):
    gpu = setup_sh(tree, "--gpu-node", "--dry-run", root=True)
    assert gpu.returncode == 0 and f"apt: apt-get install {GPU_PACKAGES}\n" in gpu.stdout, gpu.stdout
    assert not any(p in gpu.stdout for p in CLUSTER_ONLY)
    full = setup_sh(tree, "--dry-run", root=True)
    assert full.returncode == 0 and f"apt: apt-get install {GPU_PACKAGES} {' '.join(CLUSTER_ONLY)}\n" in full.stdout
    assert (tree / "apt.log").read_text() == "" and (tree / "pip.log").read_text() == ""   # a dry run


def test_unknown_argument_is_an_error(tree):
    r = setup_sh(tree, "--gpu")
    assert r.returncode == 2 and "unknown argument '--gpu'" in r.stderr


def test_make_gpu_check_sets_up_the_gpu_profile_not_the_full_one():
    r = subprocess.run(["make", "-n", "gpu-check"], cwd=REPO, capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    setups = [line for line in lines if "scripts/setup.sh" in line]
    assert setups == ["bash scripts/setup.sh --gpu-node"], r.stdout
    assert any("scripts/gpu_check.sh" in line for line in lines)
    assert not any("local_slurm" in line or "fashion_mnist" in line for line in lines)
