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
into the same run.

mlflow is imported on first use (``client``): only the processes that log pay its ~1 s import,
rank 0 of a job; on 8 nodes x 8 GPUs the other 63 ranks never load it.
"""
from __future__ import annotations

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

from hpc_mim.rundir import atomic_write_text  # noqa: E402

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


def ensure_experiment(uri: str, name: str, artifact_root: Path | None = None) -> str:
    """Experiment id, created if needed. Call once from one process first: a new sqlite store
    created by several processes at once gets corrupted (alembic migrations race)."""
    store = client(uri)
    exp = store.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root else None
    return store.create_experiment(name, artifact_location=location)


class MLflowLogger:
    """Log into one existing run. ``log_metrics`` buffers; ``flush`` sends one batch.

    With a ``spool`` file (the run directory's spool/<run_id>.jsonl), nothing is lost when the
    tracking server is unreachable: every call that fails is appended to the spool (one JSON
    line per operation, fsynced) and training goes on; while the spool is not empty new calls
    queue behind it, and every ``retry_s`` the spool is replayed in order. ``jobs/sync.py``
    replays what is left after a job ended. Without a spool, errors propagate.
    """

    def __init__(self, uri: str, run_id: str, flush_every: int = 200, spool: Path | None = None,
                 retry_s: float = 30.0) -> None:
        self.client = client(uri)
        self.uri = uri
        self.run_id = run_id
        self.flush_every = flush_every
        self.spool = Path(spool) if spool else None
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
        into it."""
        tags = {k: str(v) for k, v in (tags or {}).items()}     # MLflow's REST API takes strings
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        try:
            run = client(uri).create_run(experiment_id, run_name=name, tags=tags)
        except Exception as e:  # noqa: BLE001 - any failure to reach the store
            if spool_dir is None:
                raise
            local = f"pending-{uuid.uuid4().hex}"
            logger = cls(uri, local, spool=Path(spool_dir) / f"{local}.jsonl")
            logger._failed(e)
            logger._append({"op": "create", "experiment_id": experiment_id, "name": name, "tags": tags})
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
        self._call({"op": "artifact", "path": str(path), "folder": folder})

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
        kind = op["op"]
        if kind == "create":          # first line of a pending run's spool
            run = self.client.create_run(op["experiment_id"], run_name=op["name"], tags=op["tags"])
            atomic_write_text(self.spool.with_suffix(".run_id"), run.info.run_id)
            print(f"[tracking] created run {run.info.run_id} for {self.run_id}", file=sys.stderr, flush=True)
            self.run_id = run.info.run_id
        elif kind == "metrics":
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
            self.client.log_artifact(self.run_id, op["path"], op["folder"])
        elif op["status"] == "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.client.set_terminated(self.run_id, op["status"])

    def _call(self, op: dict[str, Any]) -> None:
        if self.spool is None:
            self._apply(op)
            return
        if self.pending() and not self.sync(quiet=True):
            self._append(op)                         # keep the order: behind the spool
            return
        try:
            self._apply(op)
        except Exception as e:  # noqa: BLE001 - any failure to reach the store: spool it
            self._failed(e)
            self._append(op)

    def pending(self) -> int:
        """Operations waiting in the spool."""
        if self.spool is None or not self.spool.is_file():
            return 0
        return sum(1 for line in self.spool.read_text().splitlines() if line.strip())

    def sync(self, quiet: bool = False) -> bool:
        """Replay the spool in order (at most every ``retry_s`` when ``quiet``); True when it is
        empty afterwards. What could not be sent stays, in order."""
        if not self.pending():
            return True
        if quiet and time.time() - self._last_failure < self.retry_s:
            return False
        ops = [json.loads(line) for line in self.spool.read_text().splitlines() if line.strip()]
        for i, op in enumerate(ops):
            try:
                self._apply(op)
            except Exception as e:  # noqa: BLE001
                self._failed(e)
                atomic_write_text(self.spool, "".join(json.dumps(o) + "\n" for o in ops[i:]))
                return False
        self.spool.unlink()
        print(f"[tracking] tracking server reachable again: {len(ops)} buffered operations sent "
              f"to run {self.run_id}", file=sys.stderr, flush=True)
        return True

    def _failed(self, error: Exception) -> None:
        if not self._last_failure or time.time() - self._last_failure >= self.retry_s:
            print(f"[tracking] {self.uri} unreachable ({type(error).__name__}: {str(error)[:200]}); "
                  f"buffering in {self.spool}, retrying every {self.retry_s:.0f} s",
                  file=sys.stderr, flush=True)
        self._last_failure = time.time()

    def _append(self, op: dict[str, Any]) -> None:
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spool, "a") as f:
            f.write(json.dumps(op) + "\n")
            f.flush()
            os.fsync(f.fileno())


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, int, float]]:
    """Every logged point of metric ``key`` as (step, timestamp ms, value)."""
    return [(m.step, m.timestamp, m.value) for m in client(uri).get_metric_history(run_id, key)]


def fetch_runs(uri: str, experiment_id: str, parent_run_id: str) -> list[Any]:
    """The parent run and its children (for reports and tests)."""
    store = client(uri)
    children = store.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return [store.get_run(parent_run_id), *children]
