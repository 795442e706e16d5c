"""What every evaluation job shares: read a run directory, pick the encoders, continue or
start their MLflow child runs, and train through the one loop (hpc_mim/train/loop.py).

Only the run directory's contract is used (config.yaml, encoder.pt, tracking.json): nothing
from pre-training. Each job evaluates the pre-trained encoder and each of ``eval.baselines``: a
randomly initialised encoder of the same shape (``random_init``) or the raw normalised pixels
(``pixels``, frozen-feature evaluations only). Each is an MLflow child run of the pre-training
run; one that raises is marked FAILED with the error as its ``error`` tag, and the job exits
non-zero (which is what SLURM and ``jobs/submit.py --status`` report).

Every rank of the job runs the evaluation (features, training, inference are sharded); rank 0
alone talks to MLflow and writes run/evals/. A job stopped by the scheduler (USR2, requeue)
checkpoints; when it starts again it continues the same child runs (tag ``restarts``), skips the
encoders it had finished and resumes the current one from its checkpoint
(run/evals/state/<child>-<config hash>/), so its final metrics are those of an uninterrupted run.

Once an encoder's evaluation finished and its metrics are recorded (child.json ``finished``,
evals/<child>.json, the MLflow child run), its checkpoints are removed (``prune``): a requeue
or a re-run skips it on child.json alone (and prints where its metrics are), nothing reads
them again, and a fine-tuning's full DeepSpeed state (weights, fp32 master copy, Adam moments)
is several times the encoder's size. A kill between the record and the removal is made good by
the next start, which prunes what it finds finished. ``eval.keep_checkpoints: true`` keeps them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from evaluation import baseline_cache
from hpc_mim.config import Config, load_config, read_config
from hpc_mim.datasets import manifest_sha256
from hpc_mim.distributed.outcome import mlflow_end
from hpc_mim.distributed.preemption import STOP
from hpc_mim.models import build_encoder, load_encoder
from hpc_mim.rundir import RunDir, atomic_write_text
from hpc_mim.tracking import MLflowLogger
from hpc_mim.train.loop import Budget, Task, TrainLoop
from hpc_mim.train.process import Process, join, seed_everything

BASELINES = ("random_init", "pixels")


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--run-dir", required=True, help="run directory written by jobs/submit.py")
    ap.add_argument("--dataset", default="", help="a dataset of configs/datasets.yaml (default: "
                    "the evaluation's eval.<name>.dataset, else the pre-training dataset)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the run's config for this evaluation only, e.g. "
                         "--set eval.segmentation.steps=2000 (repeatable)")
    ap.add_argument("--baseline", choices=BASELINES, default=None,
                    help="evaluate only a random-init encoder or raw pixels (default: the run's "
                         "encoder, then each of eval.baselines)")
    return ap.parse_args()


def load_run(run_dir: str, overrides: list[str] = ()) -> tuple[RunDir, Config]:
    """The run directory and its resolved config, with ``--set`` style ``overrides`` applied."""
    run = RunDir(run_dir)
    if overrides:
        return run, load_config(files=[str(run.config)], overrides=list(overrides))
    return run, read_config(run.config)


def encoder_for(run: RunDir, cfg: Config, baseline: str, **overrides: Any) -> torch.nn.Module | None:
    """The encoder to evaluate: the exported one, a fresh one of its architecture
    (``random_init``), or None (``pixels``). ``overrides``: e.g. ``drop_path`` for fine-tuning."""
    if baseline == "pixels":
        return None
    if baseline == "random_init":
        torch.manual_seed(cfg.train.seed)
        if run.encoder.is_file():     # same architecture as the method exported (e.g. UMD's)
            return load_encoder(run.encoder, weights=False, **overrides)
        return build_encoder(asdict(cfg.model), **overrides)
    if not run.encoder.is_file():
        raise FileNotFoundError(f"{run.encoder} missing: the pre-training job did not finish")
    return load_encoder(run.encoder, **overrides)


def child_name(label: str, baseline: str) -> str:
    return f"{label}[{baseline}]" if baseline else label


@dataclass
class EvalContext:
    """What an evaluation body gets: the run, its config, this evaluation's section, the
    dataset's registry entry, the job's label, this process, the encoders still to evaluate
    ("" = pre-trained), rank 0's loggers and each encoder's state folder."""
    run: RunDir
    cfg: Config
    section: Any
    info: dict[str, Any]
    label: str
    proc: Process
    baselines: list[str]
    loggers: dict[str, MLflowLogger]
    states: dict[str, Path]

    @property
    def device(self) -> torch.device:
        return self.proc.device

    def fit(self, baseline: str, task: Task, budget: Budget) -> dict[str, float]:
        """Train ``task`` through the one loop, checkpointed under the encoder's state folder
        (resumed from there after a requeue); the final evaluation's metrics + ``train_loss``."""
        name = child_name(self.label, baseline)
        budget.stall_timeout_min = self.cfg.cluster.stall_timeout_min
        loop = TrainLoop(task, budget, self.states[baseline] / "checkpoints", self.proc,
                         self.loggers.get(baseline), self.run.logs / f"{name}.log")
        metrics = loop.fit()
        return {**metrics, "train_loss": loop.last_metrics.get("train/loss", float("nan"))}

    def seed(self, rank_offset: bool = False) -> None:
        """The run's seed: the same on every rank (model initialisation), or one per rank
        (augmentation, dropout) once the model exists."""
        seed_everything(self.cfg.train.seed * 1000 + (self.proc.env.rank if rank_offset else 0))


# body: yields (baseline, metrics) as each encoder finishes
Body = Callable[[EvalContext], Iterator[tuple[str, dict[str, float]]]]


def run_eval(run_dir: str, name: str, body: Body, dataset: str = "", baseline: str | None = None,
             label: str = "", pixels: bool = True, overrides: list[str] = (),
             always: tuple[str, ...] = (), cacheable: bool = True) -> dict[str, dict[str, float]]:
    """Evaluation ``name`` of the run's encoder and each of ``eval.baselines`` (or only
    ``baseline``) on ``dataset``: one MLflow child run each, named ``label`` (the job's entry in
    ``evals``, e.g. ``linear_probe:cub``) plus ``[baseline]``; metrics also written to
    run/evals/. ``pixels=False``: the evaluation needs an encoder (fine-tuning, dense tasks).
    ``overrides`` (``--set``) change the run's config for this evaluation only; ``always``:
    baselines this evaluation runs whatever ``eval.baselines`` says (diagnostics: random_init).
    ``cacheable``: the random-init baseline's metrics are all it produces, so an earlier run's
    with the same key are reused (evaluation/baseline_cache.py)."""
    if baseline == "pixels" and not pixels:
        raise ValueError(f"{name} trains through an encoder: --baseline pixels applies to the "
                         "frozen-feature evaluations (knn, linear_probe) only")
    run, cfg = load_run(run_dir, overrides)
    section = getattr(cfg.eval, name)
    dataset = dataset or section.dataset or cfg.data.dataset
    label = label or name
    baselines = [baseline] if baseline is not None else \
        ["", *cfg.eval.baselines, *[b for b in always if b not in cfg.eval.baselines]]
    baselines = [b for b in baselines if pixels or b != "pixels"]
    proc = join(cfg.cluster.rendezvous_timeout_s, cfg.cluster.collective_timeout_s)
    params = {name: {**asdict(section), "dataset": dataset}, "seed": cfg.train.seed}
    states = {b: state_folder(run, label, b, params) for b in baselines}
    # rank 0 reads what an earlier start finished and every rank follows it: ranks deciding
    # alone (a stale NFS view on one node) would train different encoders, and their
    # collectives would never match; rank 0 has read before it writes anything
    done = [{b: finished(states[b]) for b in baselines} if proc.env.is_main else None]
    dist.broadcast_object_list(done, src=0)
    results = {b or "pretrained": metrics for b, metrics in done[0].items() if metrics}
    todo = [b for b in baselines if (b or "pretrained") not in results]
    for b in [b for b in baselines if b not in todo and proc.env.is_main]:
        print(f"[eval] {child_name(label, b)}: finished before this start, metrics in "
              f"{states[b] / 'child.json'}", flush=True)
        prune(states[b], cfg.eval.keep_checkpoints)      # a kill may have come before it did
    info = cfg.dataset_info(dataset, key=f"eval.{name}.dataset")
    cache = None
    if cacheable and "random_init" in todo:
        cache = baseline_cache.cache_file(run, label, params, baseline_cache.architecture(
            run, asdict(cfg.model)), manifest_sha256(info), proc.env.world_size,
            pixels=(info["mean"], info["std"]))
        found = [baseline_cache.lookup(cache) if proc.env.is_main else None]
        dist.broadcast_object_list(found, src=0)    # every rank must skip it or compute it
        if (hit := found[0]) is not None:
            todo.remove("random_init")
            results["random_init"] = hit["metrics"]
            if proc.env.is_main:
                reuse(run, label, name, dataset, params, states["random_init"], hit)
    loggers = {b: child_run(run, label, name, b, dataset, params, states[b]) for b in todo} \
        if proc.env.is_main else {}
    try:
        ctx = EvalContext(run, cfg, section, info, label, proc, todo, dict(loggers), states)
        tic = time.time()
        for b, metrics in body(ctx):
            results[b or "pretrained"] = metrics
            if proc.env.is_main:
                logger = loggers.pop(b)
                finish(run, logger, label, b, metrics, states[b])
                prune(states[b], cfg.eval.keep_checkpoints)
                run.record_stage(label, b or "pretrained", time.time() - tic)
                if b == "random_init" and cache is not None:
                    baseline_cache.store(cache, metrics, run, logger.run_id)
            tic = time.time()
    except BaseException as e:
        # a scheduler stop or a lost peer is not a failure: the requeued job continues these runs
        status, tag, text = mlflow_end(e)
        with STOP.polled():         # srun's SIGTERM (another rank failed) must not cut this short
            for logger in loggers.values():
                logger.set_tags({tag: text})
                logger.finish(status)
        raise
    return results


def reuse(run: RunDir, label: str, name: str, dataset: str, params: dict[str, Any], state: Path,
          hit: dict[str, Any]) -> None:
    """The random-init child of this run, with the metrics another run computed for the same
    key (tag ``reused_from``: that run's directory and MLflow child run)."""
    source = f"{hit['run_dir']} (MLflow run {hit['run_id']})"
    logger = child_run(run, label, name, "random_init", dataset, params, state)
    logger.set_tags({"reused_from": source})
    finish(run, logger, label, "random_init", hit["metrics"], state)
    run.record_stage(label, "random_init", 0.0, reused_from=source)
    print(f"[eval] {child_name(label, 'random_init')}: reused from {source}", flush=True)


def state_folder(run: RunDir, label: str, baseline: str, params: dict[str, Any]) -> Path:
    """run/evals/state/<child>-<hash of the evaluation's settings>: another ``--set`` is
    another evaluation, with its own checkpoints and child run."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
    return run.evals / "state" / f"{child_name(label, baseline)}-{digest[:10]}"


def finished(state: Path) -> dict[str, float] | None:
    """The metrics of an encoder this evaluation finished in an earlier start, else None."""
    record = state / "child.json"
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    return data.get("metrics") if data.get("finished") else None


def prune(state: Path, keep: bool = False) -> None:
    """Remove a finished evaluation's checkpoints (``state``/checkpoints/), unless ``keep``:
    child.json (the MLflow child run and the metrics), starts.log and evals/<child>.json stay,
    which is all a re-run and the report read. Rank 0 alone, after ``finish`` recorded the
    metrics: every rank is past the final save (its last barrier) by then."""
    if keep or finished(state) is None:
        return
    folder = state / "checkpoints"
    if folder.exists():
        shutil.rmtree(folder)
        print(f"[eval] removed {folder}: the evaluation finished, its metrics are recorded",
              flush=True)


def child_run(run: RunDir, label: str, name: str, baseline: str, dataset: str,
              params: dict[str, Any], state: Path) -> MLflowLogger:
    """The MLflow child run of the pre-training run, named e.g. ``knn`` or ``knn[pixels]``:
    the one an earlier start of this job created (recorded in ``state``/child.json), marked
    RUNNING again with the number of earlier starts as tag ``restarts``, or a new one."""
    tracking = run.read_tracking()
    record = state / "child.json"
    starts = state / "starts.log"
    state.mkdir(parents=True, exist_ok=True)
    before = len(starts.read_text().splitlines()) if starts.is_file() else 0
    with open(starts, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} host={socket.gethostname()} "
                f"slurm_job={os.environ.get('SLURM_JOB_ID', '-')}\n")
    if record.is_file():
        run_id = json.loads(record.read_text())["run_id"]
        logger = MLflowLogger(tracking["uri"], run_id, spool=run.spool / f"{run_id}.jsonl")
        logger.start()
        logger.set_tags({"restarts": before})
        print(f"[eval] {child_name(label, baseline)}: continuing MLflow run {logger.run_id} "
              f"(start {before + 1})", flush=True)
        return logger
    logger = MLflowLogger.create_run(
        tracking["uri"], tracking["experiment_id"], child_name(label, baseline),
        parent_run_id=tracking["run_id"], spool_dir=run.spool,
        tags={**tracking.get("tags", {}), "eval": name, "job": label, "dataset": dataset,
              "baseline": baseline or "pretrained", "restarts": before})
    atomic_write_text(record, json.dumps({"run_id": logger.run_id, "finished": False}))
    logger.log_params(params)
    return logger


def finish(run: RunDir, logger: MLflowLogger, label: str, baseline: str,
           metrics: dict[str, float], state: Path) -> None:
    name = child_name(label, baseline)
    logger.log_metrics(metrics, step=0)
    logger.finish("FINISHED")
    run.write_eval(name, metrics)
    record = json.loads((state / "child.json").read_text())
    atomic_write_text(state / "child.json", json.dumps({**record, "finished": True, "metrics": metrics}))
    print(f"[eval] {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                          if "/" not in k), flush=True)
