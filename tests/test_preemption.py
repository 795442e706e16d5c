"""Preemption, admin requeue and killed processes on the real local SLURM cluster (2 pretend
nodes, one task each, ZeRO-2): each interrupted pre-training job is requeued, resumes from a
checkpoint, ends with exactly the weights of an uninterrupted run, logs into the same MLflow
run, and its chained evaluation runs only after the job finally completed."""
import json
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from conftest import submit
from test_pipeline import scontrol, wait_for

STEPS = 40                       # 5 epochs x 8 steps: long enough to interrupt at step ~15
SETTINGS = ["train.epochs=5", "train.log_every=1", "checkpoint.every_steps=10", "evals=[knn]"]


def launch(root: Path, data_root: Path) -> tuple[dict[str, str], Path]:
    r = submit("--method", "mae", "--preset", "smoke", "--nodes", "2", "--cluster", "slurm",
               "--set", f"data.root={data_root}", "--set", f"runs_root={root}", "--set", "name=run",
               *[a for s in SETTINGS for a in ("--set", s)])
    assert r.returncode == 0, r.stderr
    return dict(re.findall(r"queued (\w+)\s+job (\d+)", r.stdout)), root / "run"


def wait_until(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def logged_step(run_dir: Path) -> int:
    log = run_dir / "logs" / "pretrain.log"
    steps = re.findall(r" step (\d+)/", log.read_text()) if log.is_file() else []
    return int(steps[-1]) if steps else 0


def task_pids(run_dir: Path) -> list[int]:
    """The job's Python task processes (not srun, slurmstepd or the batch shell)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            comm = (proc / "comm").read_text().strip()
        except (OSError, ValueError):
            continue
        if f"submitit.core._submit {run_dir}/jobs/pretrain" in cmd and comm.startswith("python"):
            pids.append(int(proc.name))
    return pids


def interrupt(how: str, job: str, run_dir: Path) -> None:
    if how == "usr2":            # SLURM's warning before a time limit / preemption
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
    elif how == "requeue":       # an admin's requeue: SIGTERM to the tasks, SLURM requeues
        subprocess.run(["scontrol", "requeue", job], check=True)
    else:                        # processes die without warning: only periodic checkpoints help
        wait_until(lambda: (run_dir / "checkpoints" / "latest").is_file(), "a periodic checkpoint")
        pids = task_pids(run_dir)
        assert len(pids) == 2, pids
        # kill_one: one node's task only; srun's --kill-on-bad-exit must end the other one,
        # which would otherwise wait in a collective until the timeout
        for pid in pids[:1] if how == "kill_one" else pids:
            os.kill(pid, 9)


def run_case(how: str, root: Path, data_root: Path) -> dict:
    ids, run_dir = launch(root, data_root)
    if how != "none":
        wait_until(lambda: logged_step(run_dir) >= 15, "step 15")
        interrupt(how, ids["pretrain"], run_dir)
    states = wait_for(ids, timeout=600)
    return {"ids": ids, "run_dir": run_dir, "states": states}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "encoder.pt", weights_only=False)["state_dict"]


def test_usr2_requeue_and_sigkill_each_resume_to_the_uninterrupted_weights(tmp_path, slurm_cluster, data_root):
    cases = ("none", "usr2", "requeue", "kill", "kill_one")
    # all at once: four 2-node jobs fit the pretend nodes (4 CPUs each), the fifth queues; each
    # waits ~12 s in the queue after a requeue, while the others run
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {how: pool.submit(run_case, how, tmp_path / how, data_root) for how in cases}
        results = {how: f.result() for how, f in futures.items()}
    reference = weights(results["none"]["run_dir"])
    for how in cases:
        res = results[how]
        run_dir, ids = res["run_dir"], res["ids"]
        logs = "\n".join(p.read_text() for p in (run_dir / "jobs").rglob("*_log.*"))
        assert res["states"] == {"pretrain": "COMPLETED", "knn": "COMPLETED"}, (how, logs[-4000:])
        info = scontrol(ids["pretrain"])
        # the evaluation started only after the requeued job's last run ended
        assert scontrol(ids["knn"])["StartTime"] >= info["EndTime"]
        mine = weights(run_dir)
        assert all(torch.equal(mine[k], reference[k]) for k in reference), how

        tracking = json.loads((run_dir / "tracking.json").read_text())
        client = MlflowClient(tracking["uri"])
        run = client.get_run(tracking["run_id"])
        assert run.info.status == "FINISHED", how
        history = client.get_metric_history(tracking["run_id"], "train/loss")
        assert sorted({m.step for m in history}) == list(range(1, STEPS + 1)), how
        by_step: dict[int, set[float]] = {}
        for m in history:                          # a step logged twice (after a kill) agrees
            by_step.setdefault(m.step, set()).add(m.value)
        assert all(len(v) == 1 for v in by_step.values()), how
        if how == "none":
            assert info["Restarts"] == "0" and run.data.tags["restarts"] == "0"
            continue
        assert info["Restarts"] == "1" and run.data.tags["restarts"] == "1", how
        resumed = re.search(r"resumed from step_\d+ at step (\d+)", logs)
        assert resumed and int(resumed.group(1)) > 0, (how, logs[-3000:])
        if how.startswith("kill"):   # no warning: back to the last periodic checkpoint (every 10)
            at = int(resumed.group(1))
            assert at % 10 == 0 and "requeued job" in logs, (at, logs[-3000:])
            assert "checkpoint saved, stopping" not in logs
        else:
            signal_name = "SIGUSR2" if how == "usr2" else "SIGTERM"
            stopped = re.search(rf"{signal_name} at step (\d+): checkpoint saved", logs)
            assert stopped and stopped.group(1) == resumed.group(1), (how, logs[-3000:])
            assert len(history) == STEPS               # every step exactly once
        if how == "usr2":
            assert "requeued job" in logs
