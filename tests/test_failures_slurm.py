"""What docs/nothing-lost.md's table promises for the ways a job ends without finishing,
on the real local SLURM cluster (2 pretend nodes, one task each): ``scancel`` (SIGTERM, no
requeue), a job killed on every start (``cluster.max_restarts``) and a non-finite loss on one
rank only. Checked as the preemption tests check: scontrol state, checkpoints, MLflow."""
import json
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import submit
from test_pipeline import scontrol
from test_preemption import logged_step, task_pids, wait_until

SMOKE = ["--method", "mae", "--preset", "smoke", "--nodes", "2", "--cluster", "slurm"]


def launch(root: Path, data_root: Path, *settings: str, env: dict | None = None) -> tuple[dict, Path]:
    args = [a for s in (f"data.root={data_root}", f"runs_root={root}", "name=run", "evals=[knn]",
                        *settings) for a in ("--set", s)]
    r = submit(*SMOKE, *args) if env is None else _submit_with(env, *SMOKE, *args)
    assert r.returncode == 0, r.stderr
    return dict(re.findall(r"queued (\w+)\s+job (\d+)", r.stdout)), root / "run"


def _submit_with(env: dict, *args: str) -> subprocess.CompletedProcess:
    from conftest import PYTHON, REPO
    return subprocess.run([PYTHON, str(REPO / "jobs" / "submit.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, **env})


def wait_state(job: str, states: tuple[str, ...], timeout: float = 400) -> dict:
    deadline = time.time() + timeout
    while (info := scontrol(job))["JobState"] not in states:
        assert time.time() < deadline, info
        time.sleep(1)
    return info


def mlflow_parent(run_dir: Path):
    tracking = json.loads((run_dir / "tracking.json").read_text())
    return MlflowClient(tracking["uri"]).get_run(tracking["run_id"])


def job_logs(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "jobs").rglob("*_log.*")))


def scancel_case(root: Path, data_root: Path) -> None:
    """``scancel``: SIGTERM to the tasks, no requeue. A checkpoint of the step it stopped at,
    the MLflow run KILLED, the job CANCELLED for good, the evaluation never starts."""
    ids, run_dir = launch(root, data_root, "train.epochs=12", "checkpoint.every_steps=1000")
    wait_until(lambda: logged_step(run_dir) >= 10, "step 10")
    subprocess.run(["scancel", ids["pretrain"]], check=True)
    wait_state(ids["pretrain"], ("CANCELLED",))
    time.sleep(15)                                   # a requeue would have happened by now
    info = scontrol(ids["pretrain"])
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    stopped = re.search(r"SIGTERM at step (\d+): checkpoint saved", job_logs(run_dir))
    assert stopped, job_logs(run_dir)[-3000:]
    step = int(stopped.group(1))
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}" and step >= 10
    parent = mlflow_parent(run_dir)
    assert parent.info.status == "KILLED" and "SIGTERM" in parent.data.tags["stopped"]
    knn = scontrol(ids["knn"])                       # the evaluation never ran
    assert knn["JobState"] == "PENDING" or (knn["JobState"] == "CANCELLED"
                                            and knn["RunTime"] == "00:00:00"), knn
    subprocess.run(["scancel", ids["knn"]], check=False)


def killed_on_every_start_case(root: Path, data_root: Path) -> None:
    """Tasks SIGKILLed at every start (an OOM that always comes back): with
    ``cluster.max_restarts=1`` the job is requeued once, then ends FAILED -- no endless loop."""
    ids, run_dir = launch(root, data_root, "train.epochs=12", "cluster.max_restarts=1")
    killed_runs = 0
    deadline = time.time() + 400
    while scontrol(ids["pretrain"])["JobState"] not in ("FAILED", "COMPLETED", "CANCELLED"):
        assert time.time() < deadline, scontrol(ids["pretrain"])
        pids = task_pids(run_dir)
        if len(pids) == 2 and logged_step(run_dir) >= 1:
            for pid in pids:
                os.kill(pid, 9)
            killed_runs += 1
            wait_until(lambda: not task_pids(run_dir), "the killed tasks to go")
            (run_dir / "logs" / "pretrain.log").unlink()          # count the next start afresh
        time.sleep(0.2)
    info = scontrol(ids["pretrain"])
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1" and killed_runs == 2, (info, killed_runs)
    assert job_logs(run_dir).count("requeued job") == 1, job_logs(run_dir)[-3000:]
    assert "not requeued: already restarted 1 times" in job_logs(run_dir)
    deadline = time.time() + 120
    while (knn := scontrol(ids["knn"]))["Reason"] == "Dependency" and time.time() < deadline:
        time.sleep(2)
    assert knn["Reason"] == "DependencyNeverSatisfied", knn
    subprocess.run(["scancel", ids["knn"]], check=False)


def test_scancel_stays_cancelled_and_max_restarts_caps_a_job_killed_on_every_start(tmp_path, slurm_cluster, data_root):
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(scancel_case, tmp_path / "scancel", data_root),
                   pool.submit(killed_on_every_start_case, tmp_path / "killed", data_root)]
        for f in futures:
            f.result()


# Loaded by every Python process of the job (PYTHONPATH): rank 1's loss becomes NaN from its
# 5th micro-batch on, rank 0 stays finite -- a fault no configuration of the run could cause.
NAN_ON_RANK_1 = '''
import os
if os.environ.get("SLURM_PROCID") == "1" and os.environ.get("SLURM_JOB_NAME", "").endswith("pretrain"):
    import hpc_mim.methods.mae as mae
    forward, calls = mae.MAE.forward, [0]
    def nan_forward(self, batch):
        out = forward(self, batch)
        calls[0] += 1
        if calls[0] >= 5:
            out["loss"] = out["loss"] * float("nan")
        return out
    mae.MAE.forward = nan_forward
'''


def test_nan_on_one_rank_stops_every_rank_at_that_step_and_status_says_never_starts(tmp_path, slurm_cluster, data_root):
    """A non-finite loss on rank 1 only: both ranks stop at the same step (they agree on it by
    an all-reduce) with the message, rank 1 naming its NaN and rank 0 its finite terms; the
    job is not requeued, and ``--status`` prints NEVER STARTS for the evaluation while it is
    still queued (nobody cancelled it first)."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(NAN_ON_RANK_1)
    ids, run_dir = launch(tmp_path, data_root, "checkpoint.every_steps=1",
                          env={"PYTHONPATH": str(inject)})
    wait_state(ids["pretrain"], ("FAILED",), timeout=300)
    assert scontrol(ids["pretrain"])["Restarts"] == "0"
    per_rank = {rank: (run_dir / "jobs" / "pretrain").rglob(f"*_{rank}_log.*") for rank in (0, 1)}
    text = {rank: "\n".join(p.read_text() for p in paths) for rank, paths in per_rank.items()}
    steps = {rank: re.findall(r"non-finite loss at step (\d+) \(epoch \d+\); terms on rank "
                              rf"{rank}: loss=([^,;\s]+)", text[rank]) for rank in (0, 1)}
    assert steps[0] and steps[1], (text[0][-2000:], text[1][-2000:])
    (s0, loss0), (s1, loss1) = steps[0][0], steps[1][0]
    assert s0 == s1 and loss1 == "nan" and loss0 != "nan", (steps, text[0][-1500:])
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{int(s0) - 1:08d}"
    parent = mlflow_parent(run_dir)
    assert parent.info.status == "FAILED" and f"non-finite loss at step {s0}" in parent.data.tags["error"]

    deadline = time.time() + 120               # slurmctld marks it on its next scheduling pass
    while scontrol(ids["knn"])["Reason"] == "Dependency" and time.time() < deadline:
        time.sleep(2)
    assert scontrol(ids["knn"])["JobState"] == "PENDING"           # still queued, not cancelled
    status = submit("--status", str(run_dir))
    rows = {line.split()[0]: line for line in status.stdout.splitlines() if line.strip()}
    assert "NEVER STARTS" in rows["knn"] and "pretrain did not succeed" in rows["knn"], status.stdout
    assert "FAILED" in rows["pretrain"] and f"non-finite loss at step {s0}" in rows["pretrain"]
    subprocess.run(["scancel", ids["knn"]], check=True)
