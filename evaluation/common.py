"""What every evaluation job shares: read a run directory, build features, log a child run.

Only the run directory's contract is used (config.yaml, encoder.pt, tracking.json): nothing
from the training code. ``baseline`` swaps the pre-trained encoder for a randomly initialised
one of the same shape (``random_init``) or for the raw normalised pixels (``pixels``).
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from hpc_mim.config import Config, read_config
from hpc_mim.data.ffcv_io import build_loader, iterate
from hpc_mim.models import build_encoder, load_encoder
from hpc_mim.rundir import RunDir
from hpc_mim.tracking import MLflowLogger

BASELINES = ("random_init", "pixels")


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--run-dir", required=True, help="run directory written by jobs/submit.py")
    ap.add_argument("--baseline", choices=BASELINES, default=None,
                    help="evaluate only a random-init encoder or raw pixels (default: the run's "
                         "encoder, then each of eval.baselines)")
    return ap.parse_args()


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_run(run_dir: str) -> tuple[RunDir, Config]:
    run = RunDir(run_dir)
    return run, read_config(run.config)


def encoder_for(run: RunDir, cfg: Config, baseline: str) -> torch.nn.Module | None:
    if baseline == "pixels":
        return None
    if baseline == "random_init":
        torch.manual_seed(cfg.train.seed)
        if run.encoder.is_file():     # same architecture as the method exported (e.g. UMD's)
            return load_encoder(run.encoder, weights=False)
        return build_encoder(asdict(cfg.model))
    if not run.encoder.is_file():
        raise FileNotFoundError(f"{run.encoder} missing: the pre-training job did not finish")
    return load_encoder(run.encoder)


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


def split_features(run: RunDir, cfg: Config, baselines: list[str], pooling: str,
                   max_train: int) -> dict[str, tuple]:
    """Per encoder: (train_f, train_y, val_f, val_y, num_classes) of the evaluation dataset."""
    info = cfg.dataset_info(cfg.eval.dataset)
    start = time.time()
    train = cached_features(run, cfg, baselines, "train", info, pooling, max_train)
    val = cached_features(run, cfg, baselines, "val", info, pooling, 0)
    shapes = ", ".join(f"{b or 'pretrained'} {tuple(train[b][0].shape)}" for b in baselines)
    print(f"[eval] train features {shapes}; {len(val[baselines[0]][1])} val "
          f"in {time.time() - start:.1f}s", flush=True)
    return {b: (*train[b], *val[b], info["num_classes"]) for b in baselines}


Compute = Callable[..., dict[str, float]]   # (train_f, train_y, val_f, val_y, classes, section)


def run_all(run_dir: str, name: str, baseline: str | None, compute: Compute) -> dict[str, dict[str, float]]:
    """Evaluation ``name`` of the run's encoder and each of ``eval.baselines`` (or just
    ``baseline``): one MLflow child run each, features from one shared pass over the data,
    ``compute``'s metrics logged and written to run/evals/. Unfinished child runs are marked
    FAILED on any error."""
    run, cfg = load_run(run_dir)
    section = getattr(cfg.eval, name)
    baselines = [baseline] if baseline is not None else ["", *cfg.eval.baselines]
    params = {name: asdict(section), "dataset": cfg.eval.dataset or cfg.data.dataset}
    loggers = {b: child_run(run, name, b, params) for b in baselines}
    results: dict[str, dict[str, float]] = {}
    try:
        feats = split_features(run, cfg, baselines, section.pooling, section.max_train_samples)
        for b in baselines:
            results[b or "pretrained"] = finish(run, loggers.pop(b), name, b, compute(*feats[b], section))
    except BaseException:
        for logger in loggers.values():
            logger.finish("FAILED")
        raise
    return results


def child_run(run: RunDir, name: str, baseline: str, params: dict[str, Any]) -> MLflowLogger:
    """An MLflow child run of the pre-training run, named e.g. ``knn`` or ``knn[pixels]``."""
    tracking = run.read_tracking()
    label = f"{name}[{baseline}]" if baseline else name
    logger = MLflowLogger.create_run(tracking["uri"], tracking["experiment_id"], label,
                                     parent_run_id=tracking["run_id"],
                                     tags={"eval": name, "baseline": baseline or "pretrained"})
    logger.log_params(params)
    return logger


def finish(run: RunDir, logger: MLflowLogger, name: str, baseline: str,
           metrics: dict[str, float]) -> dict[str, float]:
    label = f"{name}[{baseline}]" if baseline else name
    logger.log_metrics(metrics, step=0)
    logger.finish("FINISHED")
    run.write_eval(label, metrics)
    print(f"[eval] {label}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), flush=True)
    return metrics
