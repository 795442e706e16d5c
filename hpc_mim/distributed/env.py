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
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:                   # torch stays unimported in the launcher until the entry needs it
    import torch


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

    def export(self, device: torch.device | None = None) -> None:
        """Write the torchrun-style variables that torch.distributed / DeepSpeed read.

        ``device``: this process's device once chosen (``training_device``). DeepSpeed reads
        ``LOCAL_RANK`` as the CUDA ordinal to drive, not as a position among the node's tasks
        (its ``comm.get_local_rank`` says "local rank (= GPU device ID)"). In DeepSpeed 0.19:

        - ``runtime/engine.py`` ``_configure_with_arguments``: ``self.local_rank =
          int(os.environ['LOCAL_RANK'])``, then ``_set_distributed_vars``:
          ``get_accelerator().set_device(self.local_rank)`` and ``self.device`` (no ``args`` of
          ours carries a ``device_rank``, so that is the only source);
        - ``comm/torch.py`` ``init_process_group``: ``device_id`` from ``LOCAL_RANK`` (only when
          DeepSpeed creates the group; ``init_distributed`` here makes it first);
        - ``runtime/zero/partition_parameters.py`` (``zero.Init``'s ``local_device``) and
          ``runtime/zero/utils.py`` (``assert_lst_len_same_as_other_ranks``,
          ``get_lst_from_rank0``): ``device_name(os.environ["LOCAL_RANK"])``;
        - ``comm/utils.py`` ``get_local_rank_from_launcher`` (``dist.get_local_rank``).

        With every GPU of the node visible the ordinal is the local rank, as torchrun has it;
        with one GPU bound per task (``--gpus-per-task=1``, ``--gpu-bind``) it is 0 on every
        task, and a ``LOCAL_RANK`` of 5 would make DeepSpeed call ``set_device(5)``: "invalid
        device ordinal". So with a CUDA ``device`` we export its index, and the true local
        rank stays in ``self.local_rank``. Re-reading the variables (``detect``) then gives
        the ordinal as local rank, which ``cuda_index`` maps to the same device again. Without
        a device (the launcher, before torch is imported), or on the CPU, the local rank."""
        local = self.local_rank
        if device is not None and device.type == "cuda" and device.index is not None:
            local = device.index
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(self.local_world_size),
                          MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


# Rendezvous ports: [10000, 32768), just below Linux's default ephemeral range. The kernel
# hands ports of net.ipv4.ip_local_port_range (default 32768-60999) to every outgoing
# connection and to every bind(port 0) (NCCL's and gloo's own sockets, other users' clients):
# a rendezvous port drawn from that range is now and then taken by one of them ("address
# already in use"). Every task computes the port on its own node, so it must not depend on
# that node: it is a function of the job id and this fixed window alone as long as the
# node's range leaves the window free, which the default and the IANA range (49152-65535)
# both do. Only a node whose range reaches below 32768 narrows the window (see
# ``rendezvous_ports``); the nodes of a cluster share their sysctl settings.
PORT_WINDOW = (10_000, 32_768)                   # [low, high)
LINUX_EPHEMERAL = (32_768, 60_999)               # net.ipv4.ip_local_port_range's default
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
# services that may listen on a compute node inside the window
SERVICE_PORTS = frozenset({
    10050, 10051,                                # Zabbix agent / server
    11211,                                       # memcached
    15672, 25672,                                # RabbitMQ management / inter-node
    27017, 27018, 27019,                         # MongoDB
    29400,                                       # torchrun's c10d rendezvous default
    29500,                                       # torch.distributed's default MASTER_PORT
})


def ephemeral_port_range(path: str = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """This node's ephemeral ports (first, last, inclusive); Linux's default where the file
    cannot be read (not Linux, a sandbox without /proc)."""
    try:
        with open(path) as f:
            first, last = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return LINUX_EPHEMERAL
    return first, last


@lru_cache(maxsize=4)
def rendezvous_ports(ephemeral: tuple[int, int]) -> tuple[int, ...]:
    """The ports a job may rendezvous on, given the node's ephemeral range: the window minus
    the ephemeral range and the services' ports; if the range covers the whole window, any
    unprivileged port outside it; if it covers them all, the window (nothing is safe then)."""
    first, last = ephemeral
    outside = lambda p: not first <= p <= last and p not in SERVICE_PORTS     # noqa: E731
    for candidates in (range(*PORT_WINDOW), range(1024, 65536)):
        ports = tuple(p for p in candidates if outside(p))
        if ports:
            return ports
    return tuple(p for p in range(*PORT_WINDOW) if p not in SERVICE_PORTS)


def port_for_job(job_id: str | int, ephemeral: tuple[int, int] | None = None) -> int:
    """A port that differs between concurrent jobs, agrees between a job's tasks, and lies
    outside the ephemeral range (``ephemeral``, default: this node's, see PORT_WINDOW).
    Consecutive job ids get consecutive ports, so two jobs collide only when their ids differ
    by a multiple of the window's ~22,750 ports and they share a first node."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    ports = rendezvous_ports(ephemeral or ephemeral_port_range())
    return ports[int(digits) % len(ports)]


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
