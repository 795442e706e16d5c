"""The MLflow tracking server goes away mid-run: training goes on, metrics wait in the run
directory's spool and reach the server once it is back; jobs/sync.py sends what a job left."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO
from test_checkpoint import start_pretrain, wait_for_step

STEPS = 96


class Server:
    """A real ``mlflow server`` on a sqlite store, stopped and restarted on the same port."""

    def __init__(self, root: Path) -> None:
        from hpc_mim.distributed.env import free_port
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "art"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)      # the server and its workers, at once
        self.proc.wait()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    yield s
    if s.proc.poll() is None:
        s.stop()


def make_run(tmp_path: Path, uri: str, data_root: Path, overrides: list[str]):
    from hpc_mim import tracking
    from hpc_mim.config import load_config, save_config
    from hpc_mim.rundir import RunDir
    cfg = load_config("mae", "smoke", overrides=[f"data.root={data_root}", f"tracking.uri={uri}", *overrides])
    run = RunDir(tmp_path / "run").create()
    save_config(cfg, run.config)
    experiment = tracking.ensure_experiment(uri, "outage")
    parent = tracking.MLflowLogger.create_run(uri, experiment, "pretrain")
    run.write_tracking({"uri": uri, "experiment_id": experiment, "run_id": parent.run_id})
    return run, parent.run_id


def test_metrics_logged_while_the_server_is_down_reach_it_when_it_is_back(tmp_path, data_root, server):
    run, run_id = make_run(tmp_path, server.uri, data_root,
                           ["train.epochs=12", "train.log_every=1", "checkpoint.every_steps=10",
                            "tracking.retry_s=1"])
    proc = start_pretrain(run)
    wait_for_step(run, 10, proc)
    server.stop()                                    # the tracking server goes away
    wait_for_step(run, 40, proc)                     # training goes on meanwhile ...
    spool = run.spool / f"{run_id}.jsonl"
    deadline = time.time() + 60
    while not spool.is_file() and time.time() < deadline:
        time.sleep(0.1)
    assert spool.is_file()                           # ... buffering in the run directory
    os.kill(proc.pid, signal.SIGSTOP)                # hold training while the server restarts
    server.start()
    os.kill(proc.pid, signal.SIGCONT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "unreachable" in out and "reachable again" in out, out[-3000:]
    assert not spool.exists()                        # everything was sent, nothing left

    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("train/loss", "train/lr", "train/img_per_s"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, STEPS + 1)), key     # not one lost, none twice


def test_sync_sends_what_a_job_left_in_the_spool(tmp_path, data_root, server):
    """A job that ended during the outage: its spooled calls, final status included, are
    replayed in order by jobs/sync.py; a second sync has nothing left to do."""
    from hpc_mim.tracking import MLflowLogger
    from hpc_mim.distributed.env import free_port

    run, run_id = make_run(tmp_path, server.uri, data_root, [])
    dead = MLflowLogger(f"http://127.0.0.1:{free_port()}", run_id,     # nobody listens there
                        spool=run.spool / f"{run_id}.jsonl", retry_s=3600)
    dead.start()
    for step in range(1, 6):
        dead.log_metrics({"train/loss": 1.0 / step}, step)
    dead.set_tags({"restarts": 0})
    dead.finish("FINISHED")
    assert dead.pending() == 4                       # status, metrics, tags, status

    sync = [sys.executable, str(REPO / "jobs" / "sync.py"), str(run.root)]
    r = subprocess.run(sync, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{run_id}: 4 of 4 buffered operations sent" in r.stdout
    client = MlflowClient(server.uri)
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.data.tags["restarts"] == "0"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0 / s) for s in range(1, 6)]
    again = subprocess.run(sync, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing buffered" in again.stdout


def test_a_stop_signal_during_a_tracking_call_is_not_taken_for_an_outage(tmp_path):
    """An evaluation is stopped by raising Preempted from the signal handler, wherever it is.
    When USR2 lands while the logger talks to the store, the stop must reach the job (which
    is then requeued), not be caught as "server unreachable" and spooled while the
    evaluation carries on to its end."""
    from hpc_mim import tracking
    from hpc_mim.distributed.preemption import STOP, Preempted

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.MLflowLogger.create_run(uri, tracking.ensure_experiment(uri, "stop"), "eval").run_id
    logger = tracking.MLflowLogger(uri, run_id, flush_every=1, spool=tmp_path / "spool.jsonl")
    send = logger.client.log_batch

    def log_batch_when_the_signal_lands(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR2)      # the handler runs before the next bytecode
        return send(*args, **kwargs)

    logger.client.log_batch = log_batch_when_the_signal_lands
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    STOP.received = None
    STOP.install()
    try:
        with pytest.raises(Preempted, match="SIGUSR2"):
            logger.log_metrics({"miou": 0.5}, step=1)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        STOP.received = None
    assert logger.pending() == 0 and not (tmp_path / "spool.jsonl").exists()


def test_an_evaluation_started_while_the_server_is_down_loses_nothing(tmp_path, data_root, server):
    """The tracking server is unreachable when a kNN job starts: the child runs cannot be
    created, yet the job finishes (exit 0), spooling their creation with everything logged
    into them; jobs/sync.py later creates them under the pre-training run, with the params,
    metrics and final status, and a second sync does not create them twice. (The child run
    used to be created unspooled: the evaluation failed.)"""
    from test_checkpoint import pretrain

    run, run_id = make_run(tmp_path, server.uri, data_root, ["train.epochs=1", "evals=[knn]"])
    assert pretrain(run).returncode == 0
    server.stop()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    r = subprocess.run([sys.executable, "-m", "evaluation.knn", "--run-dir", str(run.root)],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pending = sorted(run.spool.glob("pending-*.jsonl"))
    written = {p.stem: json.loads(p.read_text()) for p in run.evals.glob("*.json")}
    assert len(pending) == len(written) >= 1          # the encoder (and each baseline)
    server.start()
    sync = [sys.executable, str(REPO / "jobs" / "sync.py"), str(run.root)]
    assert subprocess.run(sync, capture_output=True, text=True, timeout=120).returncode == 0
    client = MlflowClient(server.uri)
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(written)
    for child in children:
        assert child.info.status == "FINISHED" and child.data.params["knn.ks"]
        for key, value in written[child.info.run_name].items():
            assert abs(child.data.metrics[key] - value) < 1e-9, key
    assert not list(run.spool.glob("*.jsonl"))
    again = subprocess.run(sync, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing buffered" in again.stdout
    assert len(client.search_runs([children[0].info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'")) == len(written)
