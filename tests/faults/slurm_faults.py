"""Faults of the SLURM commands, injected outside the project's code (as sitecustomize.py injects
faults into jobs): what jobs/submit.py meets when one ``sbatch`` fails or the controller is down.
Everything else is the real local cluster (scripts/local_slurm.sh).

- ``failing_sbatch(folder, fail)``: an ``sbatch`` to put first on PATH. Every call is passed to
  the real one (the job is queued for real) except the given 1-based calls, which fail as sbatch
  does when slurmctld times out: ``sbatch: error: Batch job submission failed: Socket timed out
  on send/recv operation`` on stderr, exit 1, nothing queued.
- ``unreachable_controller(folder, message_timeout)``: a slurm.conf (for ``SLURM_CONF``) whose
  controller is a local port nothing listens on, so the real ``scontrol``/``sinfo``/``sbatch``
  fail as they do when slurmctld is down: ``Unable to contact slurm controller (connect
  failure)``, after retrying for about ``MessageTimeout`` seconds (SLURM's default 10: ~9 s).
"""
from __future__ import annotations

import shutil
import socket
from pathlib import Path

TIMEOUT = "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"


def failing_sbatch(folder: Path, fail: tuple[int, ...] = (2,)) -> Path:
    """Write ``folder/sbatch``; returns ``folder`` (prepend it to PATH). Its calls are counted
    in ``folder/sbatch.count``."""
    real = shutil.which("sbatch")
    assert real, "the real sbatch is not on PATH"
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "sbatch"
    shim.write_text(f"""#!/bin/bash
n=$(( $(cat {folder}/sbatch.count 2>/dev/null || echo 0) + 1 )); echo $n > {folder}/sbatch.count
case " {' '.join(map(str, fail))} " in *" $n "*) echo "{TIMEOUT}" >&2; exit 1 ;; esac
exec {real} "$@"
""")
    shim.chmod(0o755)
    return folder


def sbatch_calls(folder: Path) -> int:
    """How many times ``failing_sbatch``'s shim in ``folder`` was called."""
    count = folder / "sbatch.count"
    return int(count.read_text()) if count.exists() else 0


def unreachable_controller(folder: Path, message_timeout: int = 10) -> Path:
    """A slurm.conf whose slurmctld is not there; returns its path (set ``SLURM_CONF`` to it)."""
    with socket.socket() as s:            # a free port: bound, then closed, so nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(f"""ClusterName=unreachable
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={port}
MessageTimeout={message_timeout}
AuthType=auth/munge
NodeName=node1 CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return conf
