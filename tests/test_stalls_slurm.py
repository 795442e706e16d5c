"""A job that stops making progress, or fails by its own fault, on the real local SLURM cluster
(2 pretend nodes, one task each): faults injected from outside the project's code
(tests/faults/sitecustomize.py) into rank 1 of a 2-node pre-training job.

- a genuine error on one rank: the job ends FAILED, is not requeued, and its status record and
  MLflow run name that error (the other rank's "lost peer" does not hide it);
- one rank stuck (a sleep), or FFCV's loader thread dying: every rank's watchdog ends the job
  within the stall timeout plus a minute with its Python stacks in its log, the job is
  requeued once, stalls at the same step again and ends FAILED naming the stall; its
  checkpoints are intact.
"""
import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import REPO
from test_failures_slurm import job_logs, launch, mlflow_parent, wait_state
from test_pipeline import scontrol

TIMEOUT_MIN = 0.25                 # cluster.stall_timeout_min: 15 s, the watchdog's floor
SETTINGS = (f"cluster.stall_timeout_min={TIMEOUT_MIN}", "train.log_every=1")


def run_case(fault: str, restarts: int, every: int, root: Path, data_root: Path) -> dict:
    """Submit with ``fault``; wait until the job has ended after ``restarts`` requeues (a job
    being requeued shows FAILED for a moment before it is PENDING again)."""
    start = time.time()
    ids, run_dir = launch(root, data_root, *SETTINGS, f"checkpoint.every_steps={every}",
                          env={"PYTHONPATH": str(REPO / "tests" / "faults"), "HPC_MIM_FAULT": fault})
    deadline = start + 500
    while not ((info := scontrol(ids["pretrain"]))["JobState"] in ("FAILED", "COMPLETED", "CANCELLED")
               and int(info["Restarts"]) >= restarts):
        assert time.time() < deadline, info
        time.sleep(0.5)
    took = time.time() - start
    time.sleep(3)                  # a requeue that should not happen would show by now
    status = json.loads((run_dir / "jobs" / "pretrain.status.json").read_text())
    return {"ids": ids, "run_dir": run_dir, "took": took, "info": scontrol(ids["pretrain"]),
            "logs": job_logs(run_dir), "status": status}


def check_genuine_error(res: dict) -> None:
    info, logs, status = res["info"], res["logs"], res["status"]
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, logs[-3000:])
    assert "rank 1 failed with an error of the job: not requeued" in logs, logs[-3000:]
    assert status["state"] == "FAILED" and "injected genuine error at step 6" in status["error"], status
    parent = mlflow_parent(res["run_dir"])
    assert parent.info.status == "FAILED" and "injected genuine error" in parent.data.tags["error"]


def check_stall(res: dict, what: str) -> None:
    info, logs, status, run_dir = res["info"], res["logs"], res["status"], res["run_dir"]
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", (info, logs[-4000:])
    stalls = re.findall(r"\[watchdog\] rank (\d): stalled: no optimizer step for ([\d.]+) min "
                        r"after step (\d+)", logs)
    # both runs: the stuck rank's own watchdog, within the timeout plus a minute of its last
    # step, at the same step. Rank 0 waits for it in a collective: its watchdog fires within a
    # poll of rank 1's, or it sees its peer gone first (a race either way it ends)
    assert sum(rank == "1" for rank, _, _ in stalls) == 2, stalls
    assert len({step for _, _, step in stalls}) == 1, stalls
    assert all(float(idle) < TIMEOUT_MIN + 1 for _, idle, _ in stalls), stalls
    assert logs.count("(most recent call first)") >= 2                     # faulthandler's stacks
    assert "requeued job" in logs and "earlier run of the job too: not requeued" in logs, logs[-4000:]
    assert status["state"] == "FAILED" and "stalled" in status["error"], status
    if what == "loader":
        assert "thread" in logs and "injected loader-thread error" in logs
    latest = (run_dir / "checkpoints" / "latest").read_text()               # nothing lost
    assert sorted(p.name for p in (run_dir / "checkpoints" / latest).glob("rng_rank*.pt")) == \
        ["rng_rank0.pt", "rng_rank1.pt"]
    # two runs, each ended by the watchdog: start-up + a few steps + the timeout (+ a requeue)
    assert res["took"] < 2 * (TIMEOUT_MIN * 60 + 60) + 150, res["took"]


def test_genuine_errors_fail_and_stalls_are_requeued_once_then_fail(tmp_path, slurm_cluster, data_root):
    # 8 steps per epoch; the loader's fault is in epoch 1, which a resume from the checkpoint
    # at its start (step 8) reaches again at the same step
    cases = {"error": ("error@6:1", 0, 4), "sleep": ("sleep@6:1", 1, 4), "loader": ("loader@5:1", 1, 8)}
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {name: pool.submit(run_case, fault, restarts, every, tmp_path / name, data_root)
                   for name, (fault, restarts, every) in cases.items()}
        results = {name: f.result() for name, f in futures.items()}
    check_genuine_error(results["error"])
    check_stall(results["sleep"], "sleep")
    check_stall(results["loader"], "loader")
    for res in results.values():                     # the evaluation never ran
        assert wait_state(res["ids"]["knn"], ("PENDING", "CANCELLED"), timeout=60)["RunTime"] == "00:00:00"
        subprocess.run(["scancel", res["ids"]["knn"]], check=False)
