"""The tracking spool keeps only what a later try can deliver: a call the store rejects (a deleted
run, a changed param, a run that does not exist) goes to the dead-letter file with its error and
everything behind it, the final status included, still arrives; jobs/sync.py reports the dead
letters (exit 1) and requeues them on request; artifacts are uploaded only from inside the run
directory. A real MLflow sqlite store in tmp_path (the REST server case: test_tracking_outage.py).
"""
import errno
import json
import shutil
from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INVALID_STATE, PERMISSION_DENIED, TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from hpc_mim import tracking
from hpc_mim.distributed.env import free_port
from hpc_mim.rundir import RunDir
from hpc_mim.tracking import retryable
from hpc_mim.tracking_spool import Rejected, Spool
from jobs import sync


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A migrated, empty sqlite store (MLflow's migrations take ~5 s; a copy, milliseconds)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    tracking.client(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, empty_store):
    """(uri, run directory, MLflow run id): a run as jobs/submit.py leaves it."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "spool", artifact_root=tmp_path / "artifacts")
    run = RunDir(tmp_path / "run").create()
    run_id = MlflowClient(uri).create_run(experiment).info.run_id
    run.write_tracking({"uri": uri, "experiment_id": experiment, "run_id": run_id})
    return uri, run, run_id


def offline(run: RunDir, run_id: str) -> tracking.MLflowLogger:
    """A job's logger while the server is down: every call lands in the run's spool."""
    return tracking.MLflowLogger(f"http://127.0.0.1:{free_port()}", run_id,       # nobody listens
                                 spool=run.spool / f"{run_id}.jsonl", retry_s=3600)


def test_sync_dead_letters_a_rejected_call_and_sends_everything_behind_it(store, capsys):
    uri, run, run_id = store
    job = offline(run, run_id)
    job.start()
    job.log_params({"lr": 1e-3})
    for step in (1, 2, 3):
        job.log_metrics({"train/loss": 1.0 / step}, step)
    job.set_tags({"restarts": 0})
    job.finish("FINISHED")
    assert job.pending() == 5                             # status, params, metrics, tags, status
    client = MlflowClient(uri)
    client.log_param(run_id, "lr", "0.1")                # the spooled value now conflicts: 400

    assert sync.main([str(run.root)]) == 1
    out = capsys.readouterr()
    assert f"{run_id}: 4 of 5 buffered operations sent, 1 rejected" in out.out
    assert f"1 MLflow call(s) the tracking server rejected are kept in spool/{run_id}.rejected" in out.err
    assert "Changing param values is not allowed" in out.err and "--retry-rejected" in out.err
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.data.tags["restarts"] == "0"   # not blocked
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "train/loss"),
                                              key=lambda m: m.step)] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    [letter] = Spool(run.spool / f"{run_id}.jsonl").rejected()
    assert letter["op"] == {"op": "params", "params": [["lr", "0.001"]]}
    assert letter["error"].startswith("MlflowException: Changing param values is not allowed")
    assert not (run.spool / f"{run_id}.jsonl").exists()
    assert sync.main([str(run.root)]) == 1              # still reported, nothing resent
    assert "1 MLflow call(s)" in capsys.readouterr().err


def test_a_run_deleted_mid_training_blocks_nothing_and_is_filled_in_once_restored(store, capsys):
    """While training, the run is deleted in the UI: each call is dead-lettered (the job goes
    on, nothing queues behind them); restored, ``--retry-rejected`` delivers them."""
    uri, run, run_id = store
    client = MlflowClient(uri)
    live = tracking.MLflowLogger(uri, run_id, spool=run.spool / f"{run_id}.jsonl")
    live.log_metrics({"train/loss": 1.0}, 1)
    live.flush()
    client.delete_run(run_id)
    live.log_metrics({"train/loss": 0.5}, 2)
    live.finish("FINISHED")
    assert live.pending() == 0                           # nothing waits behind a rejected call
    letters = Spool(run.spool / f"{run_id}.jsonl").rejected()
    assert [x["op"]["op"] for x in letters] == ["metrics", "status"]
    assert all("must be in the 'active' state" in x["error"] for x in letters)
    assert "rejected" in capsys.readouterr().err

    client.restore_run(run_id)
    assert sync.main([str(run.root), "--retry-rejected"]) == 0
    assert f"{run_id}: 2 of 2 buffered operations sent (2 rejected before)" in capsys.readouterr().out
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2]
    assert not list(run.spool.iterdir())


def test_a_rejected_run_creation_dead_letters_its_calls_without_failing_the_job(store):
    uri, run, _ = store
    logger = tracking.MLflowLogger.create_run(uri, "424242", "knn", spool_dir=run.spool)  # no such experiment
    assert logger.run_id.startswith("pending-")
    logger.log_metrics({"knn/top1": 0.5}, 0)
    logger.finish("FINISHED")
    assert logger.pending() == 0
    letters = Spool(run.spool / f"{logger.run_id}.jsonl").rejected()
    assert [x["op"]["op"] for x in letters] == ["create", "metrics", "status"]
    assert "was rejected, so nothing can be logged into it" in letters[1]["error"]


def test_artifacts_are_uploaded_only_from_inside_the_run_directory(store, tmp_path):
    """A spool is a file in the run directory: a line naming ~/.ssh/id_rsa must not make the
    owner's jobs/sync.py upload it; a symbolic link out of the run directory neither."""
    uri, run, run_id = store
    secret = tmp_path / "outside" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    (run.root / "config.yaml").write_text("name: x\n")
    (run.root / "link.txt").symlink_to(secret)
    live = tracking.MLflowLogger(uri, run_id, spool=run.spool / f"{run_id}.jsonl")
    for path in (run.root / "config.yaml", secret, run.root / "link.txt"):
        live.log_artifact(path)
    spool = Spool(run.spool / f"{run_id}.jsonl")
    assert [x["error"] for x in spool.rejected()] == [
        f"Rejected: artifact {secret} is outside the run directory {run.root}: not uploaded",
        f"Rejected: artifact {run.root / 'link.txt'} is outside the run directory {run.root}: not uploaded"]
    spool.rejected_path.unlink()
    spool.append({"op": "artifact", "path": str(secret), "folder": None})     # written by someone else
    spool.append({"op": "status", "status": "FINISHED"})
    assert sync.main([str(run.root)]) == 1
    client = MlflowClient(uri)
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "outside the run directory" in spool.rejected()[0]["error"]


def test_only_errors_a_later_try_can_cure_are_retried(store):
    """Classified from the errors MLflow 3.17 really raises: a refused connection (wrapped as
    INTERNAL_ERROR, HTTP 500), a locked database (TEMPORARILY_UNAVAILABLE), a server's 5xx/429;
    not a deleted or missing run, a bad value (4xx), an INVALID_STATE, a vanished file."""
    uri, _, run_id = store
    client = MlflowClient(uri)

    def error_of(call) -> BaseException:
        try:
            call()
        except Exception as e:  # noqa: BLE001
            return e
        raise AssertionError("no error")

    down = tracking.client(f"http://127.0.0.1:{free_port()}")
    assert retryable(error_of(lambda: down.get_run(run_id)))
    assert not retryable(error_of(lambda: client.get_run("0" * 32)))           # RESOURCE_DOES_NOT_EXIST
    client.delete_run(run_id)
    assert not retryable(error_of(lambda: client.set_terminated(run_id, "FINISHED")))   # 400
    assert retryable(MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE))
    assert not retryable(MlflowException("wrong state", error_code=INVALID_STATE))
    assert retryable(RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}))
    assert not retryable(RestException({"error_code": "PERMISSION_DENIED", "message": "no"}))

    def http_error(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(response=response)
    assert retryable(http_error(503)) and retryable(http_error(429)) and not retryable(http_error(403))
    assert retryable(OSError(errno.ENOSPC, "No space left on device"))
    assert not retryable(FileNotFoundError(errno.ENOENT, "gone")) and not retryable(Rejected("outside"))


def test_a_spool_line_cut_short_by_a_kill_does_not_block_the_replay(store):
    uri, run, run_id = store
    spool = Spool(run.spool / f"{run_id}.jsonl")
    spool.append({"op": "tags", "tags": {"a": "1"}})
    with open(spool.path, "a") as f:
        f.write(json.dumps({"op": "tags", "tags": {"b": "2"}})[:12])      # SIGKILL mid-append
    assert sync.main([str(run.root)]) == 0
    assert MlflowClient(uri).get_run(run_id).data.tags["a"] == "1" and not spool.path.exists()


def test_a_replay_killed_after_creating_a_pending_run_does_not_create_it_twice(store):
    """The replay created the run and wrote ``<pending id>.run_id``, then was killed before it
    rewrote the spool: the next replay continues into that run, it does not create another."""
    uri, run, _ = store
    experiment = run.read_tracking()["experiment_id"]
    job = tracking.MLflowLogger.create_run(f"http://127.0.0.1:{free_port()}", experiment, "knn",
                                           spool_dir=run.spool)              # the server is down
    job.log_metrics({"knn/top1": 0.5}, 0)
    job.finish("FINISHED")
    assert job.pending() == 3                            # create, metrics, status
    created = MlflowClient(uri).create_run(experiment, run_name="knn").info.run_id
    (run.spool / f"{job.run_id}.run_id").write_text(created)         # then the kill
    assert sync.main([str(run.root)]) == 0
    [child] = MlflowClient(uri).search_runs([experiment], "attributes.run_name = 'knn'")
    assert child.info.run_id == created and child.info.status == "FINISHED"
    assert child.data.metrics["knn/top1"] == 0.5


def test_experiments_are_marked_as_model_training_and_a_chosen_kind_is_kept(tmp_path, empty_store):
    """MLflow 3's experiment kind (tag mlflow.experimentKind): new experiments and ones made
    before (no kind) become model training; a kind someone chose stays. The link opens the runs
    table even where the web UI ignores the kind (mlflow 3.17's defaults to its GenAI pages)."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = MlflowClient(uri)
    new = tracking.ensure_experiment(uri, "new")
    old = store.create_experiment("old")                          # as an older version made it
    chosen = store.create_experiment("chosen", tags={tracking.KIND_TAG: "genai_development"})
    assert tracking.ensure_experiment(uri, "old") == old
    assert tracking.ensure_experiment(uri, "chosen") == chosen
    kinds = {e: store.get_experiment(e).tags.get(tracking.KIND_TAG) for e in (new, old, chosen)}
    assert kinds == {new: "custom_model_development", old: "custom_model_development",
                     chosen: "genai_development"}
    assert tracking.runs_page(uri, new) == \
        f"http://127.0.0.1:5000/#/experiments/{new}/runs?workflowType=machine_learning"
    assert tracking.how_to_look("https://mlflow.example.org/", "7") == [
        "https://mlflow.example.org/#/experiments/7/runs?workflowType=machine_learning"]
    assert tracking.how_to_look(uri, new) == [f"mlflow ui --backend-store-uri {uri}", tracking.runs_page(uri, new)]


def test_an_experiment_whose_kind_cannot_be_set_is_still_used(tmp_path, empty_store, monkeypatch):
    """Someone else's experiment on a server with authentication refuses the tag
    (PERMISSION_DENIED): the submission goes on into it rather than stopping over a UI label."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    theirs = MlflowClient(uri).create_experiment("theirs")

    def refuse(self, *args, **kwargs):
        raise MlflowException("no", error_code=PERMISSION_DENIED)
    monkeypatch.setattr(MlflowClient, "set_experiment_tag", refuse)
    assert tracking.ensure_experiment(uri, "theirs") == theirs
