"""Multi-node start-up: the rendezvous address comes from SLURM's node address, and a
rendezvous that never completes ends with an error naming host and port."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO
from test_checkpoint import make_run


def test_master_addr_is_the_first_nodes_address_not_its_name(slurm_cluster):
    code = "from hpc_mim.distributed.env import slurm_master_addr; print(slurm_master_addr())"
    r = subprocess.run(["srun", "--nodes", "2", "--ntasks-per-node", "1", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["127.0.0.1", "127.0.0.1"]        # NodeAddr of node1, on both ranks
    try:                                                        # while the name does not resolve
        socket.gethostbyname("node1")
        raise AssertionError("node1 resolves here: the test proves nothing")
    except socket.gaierror:
        pass


def test_rendezvous_timeout_names_host_and_port(tmp_path, data_root):
    """Rank 1 of 2 waits for a rank 0 that never comes: a clear error after the timeout."""
    from hpc_mim.distributed.env import free_port
    run, _, _ = make_run(tmp_path, [f"data.root={data_root}", "cluster.rendezvous_timeout_s=2"])
    port = free_port()
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "hpc_mim.train.pretrain", "--run-dir", str(run.root)],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode != 0
    assert f"rendezvous failed at 127.0.0.1:{port} (rank 1/2, backend gloo)" in r.stderr, r.stderr[-3000:]
    assert time.time() - start < 120


def test_array_tasks_get_their_rendezvous_port_from_their_own_slurm_job_id(monkeypatch):
    from hpc_mim.distributed.env import job_port, port_for_job
    # submitit names array tasks "<array>_<task>": "12_34" and "123_4" read as the same digits
    assert port_for_job("12_34") == port_for_job("123_4")
    monkeypatch.setenv("SLURM_JOB_ID", "57")            # task 12_34's own job id
    first = job_port("12_34")
    monkeypatch.setenv("SLURM_JOB_ID", "61")            # task 123_4's
    assert first != job_port("123_4") and first == port_for_job("57")
    monkeypatch.delenv("SLURM_JOB_ID")                  # a local job: the launcher's id
    assert job_port("4242") == port_for_job("4242")


def test_rendezvous_ports_stay_out_of_the_ephemeral_range_and_agree_between_nodes():
    """The kernel hands ports of net.ipv4.ip_local_port_range to outgoing connections and to
    every bind(port 0): a rendezvous port drawn from it is now and then taken ("address already
    in use"). Every task computes the port on its own node, so nodes must agree on it."""
    from hpc_mim.distributed.env import (LINUX_EPHEMERAL, SERVICE_PORTS, ephemeral_port_range,
                                         port_for_job)
    proc = Path("/proc/sys/net/ipv4/ip_local_port_range")
    first, last = ephemeral_port_range()
    if proc.is_file():
        assert (first, last) == tuple(int(v) for v in proc.read_text().split())
    ids = list(range(0, 400_000, 13)) + [f"{j}_{j % 7}" for j in range(0, 40_000, 17)]
    ports = [port_for_job(j) for j in ids]
    outside = [p for p in ports if not first <= p <= last]
    assert outside == ports, f"{len(ports) - len(outside)} of {len(ports)} in {first}-{last}"
    assert ports == [port_for_job(j) for j in ids]                     # deterministic
    assert all(1024 <= p < 65536 and p not in SERVICE_PORTS for p in ports)
    assert len({port_for_job(j) for j in range(20_000)}) == 20_000     # consecutive jobs differ
    # nodes with another range that leaves the window free compute the same ports
    default = [port_for_job(j, LINUX_EPHEMERAL) for j in ids]
    for other in ((49152, 65535), (32768, 65535), (40000, 60999)):
        assert [port_for_job(j, other) for j in ids] == default
    # a range reaching into the window (or over all of it): still outside, and deterministic
    for first, last in ((15000, 65000), (9000, 60999), (1024, 40000)):
        ports = [port_for_job(j, (first, last)) for j in ids]
        assert not any(first <= p <= last for p in ports), (first, last)
        assert ports == [port_for_job(j, (first, last)) for j in ids]


def test_a_finished_job_leaves_its_process_group_and_a_job_without_one_imports_nothing():
    """What the launcher does after every job that returned (not at interpreter exit, where
    the backends' threads can abort a process that did all its work)."""
    code = ("import sys\nfrom hpc_mim.distributed.env import leave_process_group\n"
            "leave_process_group(); print('torch.distributed' in sys.modules)\n"
            "import torch.distributed as dist\n"
            "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
            "print(dist.is_initialized()); leave_process_group(); print(dist.is_initialized())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "True", "False"]
