"""scripts/local_slurm.sh itself: two starts at once, and an empty /etc/slurm/slurm.conf left by an
interrupted one, both end with the cluster up (the tests' own cluster, restarted as they had it)."""
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import REPO

SCRIPT = str(REPO / "scripts" / "local_slurm.sh")
ETC = Path("/etc/slurm/slurm.conf")


def start() -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, "start", "2", "4"], capture_output=True, text=True, timeout=300)


def idle_nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], capture_output=True, text=True)
    return sorted(set(out.stdout.split()))


def test_two_starts_at_once_and_an_empty_config_leave_the_cluster_up(slurm_cluster):
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: start(), range(2)))
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert "hpc_mim scripts/local_slurm.sh" in ETC.read_text()
    assert idle_nodes() == ["node1", "node2"]

    ETC.write_text("")                      # what a start killed mid-copy used to leave
    r = start()
    assert r.returncode == 0, r.stderr
    assert "hpc_mim scripts/local_slurm.sh" in ETC.read_text() and idle_nodes() == ["node1", "node2"]

    ETC.write_text("ClusterName=theirs\n")  # somebody else's config is still never replaced
    try:
        r = start()
        assert r.returncode == 1 and "is not ours; refusing to replace it" in r.stderr
    finally:                                # the tests after this one need the cluster back
        ETC.unlink()
        assert start().returncode == 0 and idle_nodes() == ["node1", "node2"]
