"""Who am I in the job: rank, world size and rendezvous address, from whichever launcher ran us.

Sources, in order: torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT; the submitit launcher exports these too), plain ``srun`` (SLURM_PROCID, ...), or a
single process. On SLURM the rendezvous host is the first node's *address* from ``scontrol``,
not its name: node names need not resolve (the pretend nodes of the local test cluster don't).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self) -> None:
        """Write the torchrun-style variables that torch.distributed / DeepSpeed read."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK=str(self.local_rank), LOCAL_WORLD_SIZE=str(self.local_world_size),
                          MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


def port_for_job(job_id: str | int) -> int:
    """A port that differs between concurrent jobs but agrees between a job's tasks."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def job_port(launcher_job_id: str) -> int:
    """The rendezvous port of the running job: from SLURM's own job id when there is one (an
    array task has its own SLURM_JOB_ID; the launcher's "<array>_<task>" ids would collide:
    "12_34" and "123_4" read as the same digits), else from the launcher's id (local jobs)."""
    return port_for_job(os.environ.get("SLURM_JOB_ID") or launcher_job_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_master_addr(nodelist: str | None = None) -> str:
    """Address of the job's first node (``NodeAddr`` in ``scontrol show node``)."""
    nodelist = nodelist or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                               capture_output=True, text=True, timeout=30).stdout.split()
        info = subprocess.run(["scontrol", "show", "node", hosts[0]], check=True,
                              capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        raise RuntimeError(f"cannot resolve the first node of {nodelist!r} with scontrol: {e}") from e
    for field in info.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return hosts[0]


def detect() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       int(env.get("LOCAL_WORLD_SIZE", 1)), env.get("MASTER_ADDR", "127.0.0.1"),
                       int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                       int(env.get("SLURM_LOCALID", 0)),
                       int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
                       slurm_master_addr(), port_for_job(env.get("SLURM_JOB_ID", 0)))
    return DistEnv(master_port=free_port())


def cuda_index(local_rank: int, visible: int) -> int:
    """Which of the ``visible`` CUDA devices this process drives.

    SLURM either shows every GPU of the node to every task (``--gpus-per-node``: index =
    local rank) or binds one GPU per task (``--gpus-per-task=1``, ``--gpu-bind``: the task sees
    a single device, index 0, whatever its local rank). Anything else is a launch mistake
    that would put two ranks on one GPU, so it is an error rather than a silent wrap-around."""
    if visible < 1:
        raise RuntimeError("CUDA is available but no device is visible (CUDA_VISIBLE_DEVICES?)")
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise RuntimeError(
            f"local rank {local_rank} has no GPU of its own: {visible} visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            "start one task per GPU (cluster.tasks_per_node = cluster.gpus_per_node)")
    return local_rank


def training_device(env: DistEnv):
    """This process's device: its own GPU (made current, TF32 on for fp32 matmuls and
    convolutions, as the papers' A100/H100 runs had), else the CPU."""
    import torch
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", cuda_index(env.local_rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return device


def set_threads(env: DistEnv) -> int:
    """Split this host's cores between the processes sharing it (OMP per process).

    SLURM's cpus-per-task wins; otherwise cores / processes on this host. Oversubscribed
    OpenMP threads made a DDP step 3x slower on 2 cores (35 vs 111 ms).
    """
    import torch
    n = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or max(1, (os.cpu_count() or 1) // env.local_world_size)
    torch.set_num_threads(n)
    return n


def leave_process_group() -> None:
    """Leave the process group once this task's work is done (the launcher calls it after every
    job that returns). Left to interpreter exit, NCCL warns and may leak communicators, and the
    backends' threads torn down during exit can abort a finished process (SIGABRT: SLURM would
    record a job that did all its work as FAILED). Local to this rank, no collective; a job that
    never imported torch.distributed has no group to leave (and pays no import for it)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
