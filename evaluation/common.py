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
from typing import Any

import torch

from hpc_mim.config import Config, read_config
from hpc_mim.data.ffcv_io import build_loader, iterate
from hpc_mim.models import build_encoder, load_encoder
from hpc_mim.rundir import RunDir
from hpc_mim.tracking import MLflowLogger

BASELINES = ("", "random_init", "pixels")


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--run-dir", required=True, help="run directory written by jobs/submit.py")
    ap.add_argument("--baseline", choices=BASELINES[1:], default=None,
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
        return build_encoder(asdict(cfg.model))
    if not run.encoder.is_file():
        raise FileNotFoundError(f"{run.encoder} missing: the pre-training job did not finish")
    return load_encoder(run.encoder)


@torch.no_grad()
def extract_features(encoder: torch.nn.Module | None, path: str, cfg: Config, info: dict[str, Any],
                     pooling: str, max_samples: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and labels (N,) of a split, center-cropped, without augmentation."""
    dev = device()
    loader = build_loader(path, cfg.eval.batch_size, cfg.model.img_size, info["mean"], info["std"],
                          train=False, eval_crop_ratio=info.get("eval_crop_ratio", 1.0),
                          num_workers=cfg.data.num_workers, max_samples=max_samples, device=dev)
    if encoder is not None:
        encoder = encoder.to(dev).eval()
    feats, labels = [], []
    for batch in iterate(loader):
        x = batch["image"].to(dev)
        f = x.flatten(1) if encoder is None else encoder.pooled(x, pooling)
        # clone: FFCV recycles its batch buffers, so a kept view would be overwritten
        feats.append(f.float().cpu().clone())
        labels.append(batch["label"].cpu().clone())
    return torch.cat(feats), torch.cat(labels)


def cached_features(run: RunDir, cfg: Config, encoder, baseline: str, split: str,
                    info: dict[str, Any], pooling: str, max_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of one split, computed once per run and encoder and shared by the evaluations
    (run/evals/features/); the encoder is frozen, so they never change."""
    key = f"{baseline or 'pretrained'}-{info['name']}-{split}-{pooling}-{max_samples or 'all'}"
    path = run.evals / "features" / f"{key}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    feats = extract_features(encoder, info[split], cfg, info, pooling, max_samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(feats, tmp)
    os.replace(tmp, path)                 # a concurrent job sees all of it or none of it
    return feats


def split_features(run: RunDir, cfg: Config, baseline: str, pooling: str,
                   max_train: int) -> tuple[torch.Tensor, ...]:
    """(train_f, train_y, val_f, val_y, num_classes) for the evaluation dataset."""
    info = cfg.dataset_info(cfg.eval.dataset)
    encoder = encoder_for(run, cfg, baseline)
    start = time.time()
    train = cached_features(run, cfg, encoder, baseline, "train", info, pooling, max_train)
    val = cached_features(run, cfg, encoder, baseline, "val", info, pooling, 0)
    print(f"[eval] features {tuple(train[0].shape)} train / {tuple(val[0].shape)} val "
          f"in {time.time() - start:.1f}s", flush=True)
    return (*train, *val, info["num_classes"])


def run_all(run_dir: str, baseline: str | None, evaluate) -> dict[str, dict[str, float]]:
    """Evaluate the run's encoder and then each of ``eval.baselines`` (or just ``baseline``)."""
    run, cfg = load_run(run_dir)
    names = [baseline] if baseline is not None else ["", *cfg.eval.baselines]
    return {name or "pretrained": evaluate(run, cfg, name) for name in names}


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
