"""MLflow logging (the only module that imports mlflow).

Uses ``MlflowClient`` with explicit run ids rather than mlflow's global "active run", because
several processes and chained jobs write to one run tree: the submitting process creates the
parent (pre-training) run, the pre-training job logs into it, each evaluation job creates a
child run (tag ``mlflow.parentRunId``). Metrics are buffered and sent with ``log_batch``: one
call per flush instead of one HTTP round trip per number (200 points: ~0.1 s vs 10-15 s).
While the tracking server is unreachable, everything is spooled to the run directory and sent
later (``MLflowLogger``, ``jobs/sync.py``) -- the creation of an evaluation's child run too: the
job then logs under a local id (``pending-<uuid>``) until the creation is replayed, and the
server's run id is kept next to the spool (``<local id>.run_id``) so a later replay continues
into the same run. Only errors a later try can cure are spooled; a call the server rejects goes
to the dead-letter file next to the spool and the rest goes on (hpc_mim/tracking_spool.py).
Artifacts are uploaded only from inside the run directory: a spool is a file in it, and
whoever can write there must not make ``jobs/sync.py`` upload the owner's other files.
Exception texts are redacted (hpc_mim/redact.py) before they are printed or kept.

mlflow is imported on first use (``client``): only the processes that log pay its ~1 s import,
rank 0 of a job; on 8 nodes x 8 GPUs the other 63 ranks never load it.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

# A tracking server that is down must not stall training for minutes: mlflow's HTTP client
# retries 7 times with exponential backoff by default. Fail fast; the spool keeps everything.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

from hpc_mim.redact import redact  # noqa: E402
from hpc_mim.rundir import atomic_write_text  # noqa: E402
from hpc_mim.tracking_spool import Rejected, Spool  # noqa: E402

MAX_PARAMS_PER_BATCH = 100


def client(uri: str) -> Any:
    """An ``MlflowClient`` of ``uri``."""
    from mlflow.tracking import MlflowClient
    return MlflowClient(uri)


def default_uri(runs_root: Path) -> str:
    return f"sqlite:///{Path(runs_root).resolve() / 'mlflow.db'}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


# MLflow 3's experiment kind: model training, not GenAI (traces, judges). Set on the experiment,
# unless someone chose another kind. The web UI bundled with mlflow 3.17 does not read it (a
# browser-wide "GenAI | Model training" switch decides, GenAI by default), so ``runs_page`` is
# the link that opens on the runs table there too.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None) -> str:
    """Experiment id, created if needed and marked as model training (``KIND_TAG``). Call once
    from one process first: a new sqlite store created by several processes at once gets
    corrupted (alembic migrations race)."""
    from mlflow.exceptions import MlflowException
    store = client(uri)
    exp = store.get_experiment_by_name(name)
    if exp is not None:
        if KIND_TAG not in exp.tags:           # made by an older version, or by hand
            try:
                store.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
            except MlflowException:            # someone else's experiment on a server with auth:
                pass                           # a label of the web UI's, not worth a refusal
        return exp.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root else None
    return store.create_experiment(name, artifact_location=location, tags={KIND_TAG: KIND})


def runs_page(uri: str, experiment_id: str) -> str:
    """The web page of the experiment's runs table: on the tracking server itself, or on what
    ``mlflow ui`` serves for a local store (its default address)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def how_to_look(uri: str, experiment_id: str) -> list[str]:
    """What to type to see the runs: ``mlflow ui`` first for a local store, then the page."""
    serve = [] if uri.startswith(("http://", "https://")) else [f"mlflow ui --backend-store-uri {uri}"]
    return [*serve, runs_page(uri, experiment_id)]


# MlflowException error codes of the 5xx / 429 family that a later try cannot cure: the request
# itself is wrong for the store (mlflow/exceptions.py ERROR_CODE_TO_HTTP_STATUS maps them to 500
# and 501, with TEMPORARILY_UNAVAILABLE, DEADLINE_EXCEEDED and INTERNAL_ERROR).
_PERMANENT_CODES = frozenset({"INVALID_STATE", "DATA_LOSS", "NOT_IMPLEMENTED"})


def retryable(error: BaseException) -> bool:
    """Whether ``error`` from an MLflow call means "try again later" rather than "never".

    How MLflow 3.17 reports failures (mlflow/utils/rest_utils.py, mlflow/exceptions.py): an
    answer with a JSON body raises ``RestException`` with the server's ``error_code``; one
    without, ``MlflowException`` with the code of its HTTP status; a refused connection, a
    timeout, or 5xx answers still failing after urllib3's retries are wrapped as
    ``MlflowException`` with INTERNAL_ERROR (HTTP 500). ``get_http_status_code()`` maps the
    code back to a status. A sqlite store's "database is locked" is TEMPORARILY_UNAVAILABLE
    (mlflow/store/db/utils.py). Artifact uploads to an ``mlflow-artifacts`` server raise
    ``requests`` errors; to a file store, ``OSError``.
    """
    if isinstance(error, Rejected):
        return False
    import requests
    from mlflow.exceptions import MlflowException
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return (status >= 500 or status == 429) and error.error_code not in _PERMANENT_CODES
    if isinstance(error, requests.HTTPError) and error.response is not None:
        status = error.response.status_code
        return status >= 500 or status in (408, 429)
    if isinstance(error, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return True
    try:                                    # a database store that is down or locked
        from sqlalchemy.exc import OperationalError
        if isinstance(error, OperationalError):
            return True
    except ImportError:
        pass
    # a full artifact file system frees up; a missing or unreadable file stays so
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


class MLflowLogger:
    """Log into one existing run. ``log_metrics`` buffers; ``flush`` sends one batch.

    With a ``spool`` file (the run directory's spool/<run_id>.jsonl), nothing is lost when the
    tracking server is unreachable: every call that fails with a ``retryable`` error is appended
    to the spool (one JSON line per operation, fsynced) and training goes on; while the spool is
    not empty new calls queue behind it, and every ``retry_s`` the spool is replayed in order.
    A call the server rejects goes to the dead-letter file instead (``Spool.reject``) and
    training goes on. ``jobs/sync.py`` replays what is left after a job ended. Without a spool,
    errors propagate. ``root``, the folder artifacts must lie in, defaults to the run directory
    holding the spool folder (``<root>/spool/<run_id>.jsonl``).
    """

    def __init__(self, uri: str, run_id: str, flush_every: int = 200, spool: Path | None = None,
                 retry_s: float = 30.0, root: Path | None = None) -> None:
        self.client = client(uri)
        self.uri = uri
        self.run_id = run_id
        self.flush_every = flush_every
        self.spool = Path(spool) if spool else None
        self.queue = Spool(self.spool) if self.spool else None
        self.root = Path(root) if root else (self.spool.parent.parent if self.spool else None)
        self.retry_s = retry_s
        self._buffer: list[list] = []            # [key, value, timestamp ms, step]
        self._last_failure = 0.0
        created = self.spool.with_suffix(".run_id") if self.spool else None
        if created is not None and created.is_file():    # a pending run created by an earlier replay
            self.run_id = created.read_text().strip()

    @classmethod
    def create_run(cls, uri: str, experiment_id: str, name: str, parent_run_id: str | None = None,
                   tags: dict[str, str] | None = None, spool_dir: Path | None = None) -> "MLflowLogger":
        """A new run. With ``spool_dir``, an unreachable server does not fail the job: the run
        is created later, when the spool is replayed, and everything logged meanwhile goes
        into it; a creation the server rejects is dead-lettered with everything logged into
        the run (``jobs/sync.py --retry-rejected`` creates it once the cause is fixed)."""
        tags = {k: str(v) for k, v in (tags or {}).items()}     # MLflow's REST API takes strings
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        try:
            run = client(uri).create_run(experiment_id, run_name=name, tags=tags)
        except Exception as e:  # noqa: BLE001 - spooled or dead-lettered, never fatal
            if spool_dir is None:
                raise
            local = f"pending-{uuid.uuid4().hex}"
            logger = cls(uri, local, spool=Path(spool_dir) / f"{local}.jsonl")
            logger._undelivered({"op": "create", "experiment_id": experiment_id, "name": name,
                                 "tags": tags}, e)
            return logger
        spool = Path(spool_dir) / f"{run.info.run_id}.jsonl" if spool_dir else None
        return cls(uri, run.info.run_id, spool=spool)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._call({"op": "params", "params": items[i:i + MAX_PARAMS_PER_BATCH]})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._buffer += [[k, float(v), now, step] for k, v in metrics.items()]
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            batch, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self._call({"op": "metrics", "metrics": batch})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        # absolute: jobs/sync.py replays it from another working directory
        self._call({"op": "artifact", "path": str(Path(path).absolute()), "folder": folder})

    def log_dataset(self, name: str, digest: str, source: str, context: str,
                    profile: dict[str, Any] | None = None) -> None:
        """An MLflow dataset input of the run (``context``: training or evaluation)."""
        self._call({"op": "dataset", "name": name, "digest": digest, "source": source,
                    "context": context, "profile": json.dumps(profile or {})})

    def start(self) -> None:
        """Mark the run RUNNING (also after a requeue, which reopens a finished run)."""
        self._call({"op": "status", "status": "RUNNING"})

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self._call({"op": "status", "status": status})

    # ---------------------------------------------------------------- delivery
    def _apply(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
        kind, pending = op["op"], self.run_id.startswith("pending-")
        if kind == "create":          # first line of a pending run's spool
            if pending:               # else created by a replay that a kill cut short (<id>.run_id)
                run = self.client.create_run(op["experiment_id"], run_name=op["name"], tags=op["tags"])
                atomic_write_text(self.spool.with_suffix(".run_id"), run.info.run_id)
                print(f"[tracking] created run {run.info.run_id} for {self.run_id}", file=sys.stderr,
                      flush=True)
                self.run_id = run.info.run_id
            return
        if pending:                   # its creation was dead-lettered: nothing can reach it
            raise Rejected(f"the creation of MLflow run {self.run_id} was rejected, so nothing "
                           "can be logged into it")
        if kind == "metrics":
            self.client.log_batch(self.run_id, metrics=[Metric(*m) for m in op["metrics"]])
        elif kind == "params":
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in op["params"]])
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "dataset":
            dataset = Dataset(op["name"], op["digest"], "local", op["source"], profile=op["profile"])
            context = InputTag("mlflow.data.context", op["context"])
            self.client.log_inputs(self.run_id, [DatasetInput(dataset, [context])])
        elif kind == "artifact":
            self.client.log_artifact(self.run_id, self._inside_root(op["path"]), op["folder"])
        elif op["status"] == "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.client.set_terminated(self.run_id, op["status"])

    def _inside_root(self, path: str) -> str:
        """``path`` if it lies in the run directory (symbolic links resolved), else Rejected."""
        if self.root is not None and not Path(path).resolve().is_relative_to(self.root.resolve()):
            raise Rejected(f"artifact {path} is outside the run directory {self.root}: not uploaded")
        return path

    def _call(self, op: dict[str, Any]) -> None:
        if self.queue is None:
            self._apply(op)
            return
        if self.pending() and not self.sync(quiet=True):
            self.queue.append(op)                    # keep the order: behind the spool
            return
        try:
            self._apply(op)
        except Exception as e:  # noqa: BLE001 - spooled or dead-lettered, never fatal
            self._undelivered(op, e)

    def _undelivered(self, op: dict[str, Any], error: Exception) -> None:
        """Spool ``op`` if a later try may succeed, else move it to the dead-letter file."""
        if retryable(error):
            self._failed(error)
            self.queue.append(op)
        else:
            self._reject(op, error)

    def pending(self) -> int:
        """Operations waiting in the spool."""
        return self.queue.count() if self.queue is not None else 0

    def sync(self, quiet: bool = False) -> bool:
        """Replay the spool in order (at most every ``retry_s`` when ``quiet``); True when it is
        empty afterwards. What could not be sent for now stays, in order; what the server
        rejects goes to the dead-letter file and the replay goes on. A kill during the replay
        sends some calls again on the next one (MLflow keeps a metric point logged twice)."""
        if not self.pending():
            return True
        if quiet and time.time() - self._last_failure < self.retry_s:
            return False
        ops = self.queue.ops()
        rejected = 0
        for i, op in enumerate(ops):
            try:
                self._apply(op)
            except Exception as e:  # noqa: BLE001 - classified: retried later or dead-lettered
                if retryable(e):
                    self._failed(e)
                    self.queue.replace(ops[i:])
                    return False
                self._reject(op, e)
                rejected += 1
        self.queue.replace([])
        print(f"[tracking] tracking server reachable again: {len(ops) - rejected} buffered operations "
              f"sent to run {self.run_id}" + (f", {rejected} rejected" if rejected else ""),
              file=sys.stderr, flush=True)
        return True

    def _failed(self, error: Exception) -> None:
        if not self._last_failure or time.time() - self._last_failure >= self.retry_s:
            text = redact(f"{type(error).__name__}: {error}")[:300]
            print(f"[tracking] {redact(self.uri)} unreachable ({text}); buffering in {self.spool}, "
                  f"retrying every {self.retry_s:.0f} s", file=sys.stderr, flush=True)
        self._last_failure = time.time()

    def _reject(self, op: dict[str, Any], error: Exception) -> None:
        text = redact(f"{type(error).__name__}: {error}")[:2000]
        self.queue.reject(op, text)
        print(f"[tracking] {op['op']} call for run {self.run_id} rejected ({text[:300]}); kept in "
              f"{self.queue.rejected_path} (python jobs/sync.py <run dir> reports it)",
              file=sys.stderr, flush=True)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, int, float]]:
    """Every logged point of metric ``key`` as (step, timestamp ms, value)."""
    return [(m.step, m.timestamp, m.value) for m in client(uri).get_metric_history(run_id, key)]


def fetch_runs(uri: str, experiment_id: str, parent_run_id: str) -> list[Any]:
    """The parent run and its children (for reports and tests)."""
    store = client(uri)
    children = store.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return [store.get_run(parent_run_id), *children]
