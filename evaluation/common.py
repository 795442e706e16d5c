"""What every evaluation job shares: read a run directory, pick the encoders, log child runs.

Only the run directory's contract is used (config.yaml, encoder.pt, tracking.json): nothing
from the training code. Each job evaluates the pre-trained encoder and each of
``eval.baselines``: a randomly initialised encoder of the same shape (``random_init``) or the
raw normalised pixels (``pixels``, frozen-feature evaluations only). Each is an MLflow child run
of the pre-training run; one that raises is marked FAILED with the error as its ``error`` tag,
and the job exits non-zero (which is what SLURM and ``jobs/submit.py --status`` report).
"""
from __future__ import annotations

import argparse
import itertools
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from hpc_mim.config import Config, load_config, read_config
from hpc_mim.data.ffcv_io import build_loader, iterate
from hpc_mim.distributed.env import detect, training_device
from hpc_mim.distributed.preemption import Preempted
from hpc_mim.models import build_encoder, load_encoder
from hpc_mim.rundir import RunDir
from hpc_mim.tracking import MLflowLogger

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


def device() -> torch.device:
    """This process's GPU (its own one under one-GPU-per-task binding too), else the CPU."""
    return training_device(detect())


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


@torch.no_grad()
def extract_features(encoders: dict[str, torch.nn.Module | None], path: str, cfg: Config,
                     info: dict[str, Any], pooling: str,
                     max_samples: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Features (N, D) and labels (N,) of a split for several encoders in one pass over the data
    (center crop, no augmentation). An encoder of None means the raw normalised pixels."""
    dev = device()
    loader = build_loader(path, cfg.eval.batch_size, cfg.model.img_size, info["mean"], info["std"],
                          train=False, eval_crop_ratio=info.get("eval_crop_ratio", 1.0),
                          num_workers=cfg.data.num_workers, max_samples=max_samples, device=dev)
    for encoder in encoders.values():
        if encoder is not None:
            encoder.to(dev).eval()
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    labels = []
    for batch in iterate(loader):
        x = batch["image"].to(dev)
        for name, encoder in encoders.items():
            f = x.flatten(1) if encoder is None else encoder.pooled(x, pooling)
            # clone: FFCV recycles its batch buffers, so a kept view would be overwritten
            feats[name].append(f.float().cpu().clone())
        labels.append(batch["label"].cpu().clone())
    y = torch.cat(labels)
    return {name: (torch.cat(f), y) for name, f in feats.items()}


def cached_features(run: RunDir, cfg: Config, baselines: list[str], split: str, info: dict[str, Any],
                    pooling: str, max_samples: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Features of one split per encoder, computed once per run and shared by the evaluations
    (run/evals/features/): the encoders are frozen, so they never change."""
    def path(baseline: str) -> Path:
        key = f"{baseline or 'pretrained'}-{info['name']}-{split}-{pooling}-{max_samples or 'all'}"
        return run.evals / "features" / f"{key}.pt"

    missing = [b for b in baselines if not path(b).is_file()]
    if missing:
        encoders = {b: encoder_for(run, cfg, b) for b in missing}
        for b, feats in extract_features(encoders, info[split], cfg, info, pooling, max_samples).items():
            path(b).parent.mkdir(parents=True, exist_ok=True)
            tmp = path(b).with_name(f".{path(b).name}.tmp{os.getpid()}")
            torch.save(feats, tmp)
            os.replace(tmp, path(b))      # a concurrent job sees all of it or none of it
    return {b: torch.load(path(b), weights_only=True) for b in baselines}


def split_features(run: RunDir, cfg: Config, baselines: list[str], info: dict[str, Any],
                   pooling: str, max_train: int) -> dict[str, tuple]:
    """Per encoder: (train_f, train_y, val_f, val_y, num_classes) of a classification dataset."""
    start = time.time()
    train = cached_features(run, cfg, baselines, "train", info, pooling, max_train)
    val = cached_features(run, cfg, baselines, "val", info, pooling, 0)
    shapes = ", ".join(f"{b or 'pretrained'} {tuple(train[b][0].shape)}" for b in baselines)
    print(f"[eval] train features {shapes}; {len(val[baselines[0]][1])} val "
          f"in {time.time() - start:.1f}s", flush=True)
    return {b: (*train[b], *val[b], info["num_classes"]) for b in baselines}


@dataclass
class EvalContext:
    """What an evaluation body gets: the run, its config, this evaluation's section, the
    dataset's registry entry, the encoders to evaluate ("" = pre-trained) and their loggers."""
    run: RunDir
    cfg: Config
    section: Any
    info: dict[str, Any]
    baselines: list[str]
    loggers: dict[str, MLflowLogger]


# body: yields (baseline, metrics) as each encoder finishes
Body = Callable[[EvalContext], Iterator[tuple[str, dict[str, float]]]]


def run_eval(run_dir: str, name: str, body: Body, dataset: str = "", baseline: str | None = None,
             label: str = "", pixels: bool = True,
             overrides: list[str] = ()) -> dict[str, dict[str, float]]:
    """Evaluation ``name`` of the run's encoder and each of ``eval.baselines`` (or only
    ``baseline``) on ``dataset``: one MLflow child run each, named ``label`` (the job's entry in
    ``evals``, e.g. ``linear_probe:cub``) plus ``[baseline]``; metrics also written to
    run/evals/. ``pixels=False``: the evaluation needs an encoder (fine-tuning, dense tasks).
    ``overrides`` (``--set``) change the run's config for this evaluation only."""
    if baseline == "pixels" and not pixels:
        raise ValueError(f"{name} trains through an encoder: --baseline pixels applies to the "
                         "frozen-feature evaluations (knn, linear_probe) only")
    run, cfg = load_run(run_dir, overrides)
    section = getattr(cfg.eval, name)
    dataset = dataset or section.dataset or cfg.data.dataset
    label = label or name
    baselines = [baseline] if baseline is not None else ["", *cfg.eval.baselines]
    baselines = [b for b in baselines if pixels or b != "pixels"]
    params = {name: {**asdict(section), "dataset": dataset}}
    loggers = {b: child_run(run, label, name, b, dataset, params) for b in baselines}
    results: dict[str, dict[str, float]] = {}
    try:
        info = cfg.dataset_info(dataset, key=f"eval.{name}.dataset")
        for b, metrics in body(EvalContext(run, cfg, section, info, baselines, dict(loggers))):
            results[b or "pretrained"] = finish(run, loggers.pop(b), label, b, metrics)
    except BaseException as e:
        # a scheduler stop (Preempted) is not a failure: the requeued job starts new child runs
        stopped = isinstance(e, Preempted)
        for logger in loggers.values():
            logger.set_tags({"stopped" if stopped else "error": f"{type(e).__name__}: {e}"[:5000]})
            logger.finish("KILLED" if stopped else "FAILED")
        raise
    return results


def frozen(compute: Callable[..., dict[str, float]]) -> Body:
    """A body for frozen-feature evaluations: features of every encoder from one pass over the
    data, then ``compute(train_f, train_y, val_f, val_y, num_classes, section)`` per encoder,
    on the job's device (the kNN similarity matrix and the probe's training are GPU work)."""
    def body(ctx: EvalContext) -> Iterator[tuple[str, dict[str, float]]]:
        s, dev = ctx.section, device()
        feats = split_features(ctx.run, ctx.cfg, ctx.baselines, ctx.info, s.pooling, s.max_train_samples)
        for b in ctx.baselines:
            train_f, train_y, val_f, val_y, num_classes = feats[b]
            yield b, compute(train_f.to(dev), train_y.to(dev), val_f.to(dev), val_y.to(dev),
                             num_classes, s)
    return body


def child_run(run: RunDir, label: str, name: str, baseline: str, dataset: str,
              params: dict[str, Any]) -> MLflowLogger:
    """An MLflow child run of the pre-training run, named e.g. ``knn`` or ``knn[pixels]``."""
    tracking = run.read_tracking()
    logger = MLflowLogger.create_run(
        tracking["uri"], tracking["experiment_id"], f"{label}[{baseline}]" if baseline else label,
        parent_run_id=tracking["run_id"], spool_dir=run.spool,
        tags={"eval": name, "job": label, "dataset": dataset, "baseline": baseline or "pretrained"})
    logger.log_params(params)
    return logger


def finish(run: RunDir, logger: MLflowLogger, label: str, baseline: str,
           metrics: dict[str, float]) -> dict[str, float]:
    name = f"{label}[{baseline}]" if baseline else label
    logger.log_metrics(metrics, step=0)
    logger.finish("FINISHED")
    run.write_eval(name, metrics)
    print(f"[eval] {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
    return metrics


# ----------------------------------------------------------------- trained (dense) evaluations

def train_loader(dataset: Dataset, batch_size: int, cfg: Config,
                 collate_fn: Callable | None = None) -> DataLoader:
    """Shuffled, full batches, seeded by ``train.seed``: every encoder sees the same batches."""
    loader = DataLoader(dataset, batch_size, shuffle=True, drop_last=True, collate_fn=collate_fn,
                        num_workers=cfg.data.num_workers,
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} training images are fewer than one batch of {batch_size}")
    return loader


def fit(model: torch.nn.Module, loader: DataLoader, steps: int, opt: torch.optim.Optimizer,
        sched: Any, step_loss: Callable[[torch.nn.Module, Any], dict[str, torch.Tensor]],
        logger: MLflowLogger, tag: str) -> float:
    """``steps`` iterations (the dense benchmarks count iterations, not epochs) over ``loader``,
    reshuffled at each pass; ``step_loss(model, batch)`` returns the loss terms, whose sum is
    minimised. Progress printed and logged 20 times, the only times the device is waited for.
    Returns the last loss."""
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    every, start, total = max(1, steps // 20), time.time(), float("nan")
    model.train()
    for step, batch in zip(range(steps), batches):
        sched.step_update(step)
        terms = step_loss(model, batch)
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            total = loss.item()
            rate = (step + 1) * loader.batch_size / (time.time() - start)
            shown = {k: v.item() for k, v in terms.items()} if len(terms) > 1 else {}  # a lone term = loss
            parts = "".join(f" {k} {v:.3f}" for k, v in shown.items())
            print(f"[{tag}] step {step + 1}/{steps} loss {total:.4f}{parts} lr "
                  f"{opt.param_groups[-1]['lr']:.2e} {rate:.0f} img/s", flush=True)
            logger.log_metrics({"train/loss": total, **{f"train/{k}": v for k, v in shown.items()}},
                               step=step + 1)
    return total
