"""A run's encoder for other tools: ``<run>/timm/`` holds ``model.safetensors`` (timm's
``VisionTransformer`` key names, hpc_mim/models/timm_format.py) and ``config.json`` in the layout
timm's ``save_for_hf`` writes and ``timm.create_model("local-dir:<run>/timm", pretrained=True)``
reads: the architecture, ``model_args``, ``pretrained_cfg`` (input size, mean/std and crop of
the run's dataset, pooling ``token``), and an ``hpc_mim`` block saying where the weights come
from (method, pre-training epochs and steps, dataset and its manifest sha256, git commit).

Pre-training writes it after ``encoder.pt`` (hpc_mim/train/trainer.py);
``python -m jobs.export --run-dir RUN --format timm`` writes it for any finished run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from timm.models import save_for_hf

from hpc_mim.config import Config, read_config
from hpc_mim.models.timm_format import to_timm
from hpc_mim.models.vit import load_encoder
from hpc_mim.rundir import RunDir, runs_umask, umask
from hpc_mim.tempfiles import remove_stale, replace_whole, temp_name

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def provenance(run: RunDir, cfg: Config, trained: dict[str, Any], arch: dict[str, Any]) -> dict[str, Any]:
    """Where the weights come from: recorded at submission (tracking.json ``provenance``: git
    state and dataset digests, jobs/provenance.py) and by pre-training (steps, epochs);
    ``arch``: the encoder's constructor arguments."""
    recorded = run.read_tracking().get("provenance", {}) if run.tracking_file.is_file() else {}
    cls = arch["num_cls_tokens"]
    readout = f"forward_features(x)[:, :{cls}].mean(1)" if cls > 1 else "forward(x): the cls token"
    return {"method": cfg.method.name, "run": run.root.name,
            "pretrain_epochs": cfg.train.epochs, "trained_steps": trained.get("steps"),
            "trained_epochs": trained.get("epochs"), "dataset": cfg.data.dataset,
            "dataset_sha256": recorded.get("datasets", {}).get(cfg.data.dataset, "unknown"),
            "git_commit": recorded.get("git_commit", "unknown"),
            "git_dirty": recorded.get("git_dirty", "unknown"),
            "global_feature": readout,
            "timestep": "t = 0 folded into the blocks" if arch["timestep_cond"] else "none"}


def export_timm(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``out`` (default ``<run>/timm``) from the run's ``encoder.pt`` and ``config.yaml``;
    the folder is replaced whole (written beside it, then renamed). Returns its path."""
    run = RunDir(run_dir)
    if not run.encoder.is_file():
        raise FileNotFoundError(f"{run.encoder} missing: has pre-training finished?")
    cfg = read_config(run.config)
    trained = torch.load(run.encoder, map_location="cpu", weights_only=True).get("trained", {})
    encoder = load_encoder(run.encoder).eval()
    arch, model = to_timm(encoder)
    info, c = cfg.dataset_info(), encoder.config
    size = (c["in_chans"], c["img_size"], c["img_size"])
    # in place of the registered model's (its tag, licence and preprocessing are not these weights')
    model.pretrained_cfg = {"architecture": arch, "tag": f"hpc_mim_{cfg.method.name}", "input_size": size,
                            "first_conv": "patch_embed.proj", "classifier": "head", "num_classes": 0}
    data = {"input_size": size, "interpolation": "bicubic",
            "mean": tuple(info["mean"]), "std": tuple(info["std"]),
            "crop_pct": float(info.get("eval_crop_ratio", 1.0)), "crop_mode": "center"}
    target = Path(out) if out is not None else run.root / "timm"
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target.parent)              # what an export killed half-way left
    tmp = temp_name(target)
    mask = runs_umask(cfg.share_runs_with_group)
    with umask(mask):                        # the run's files: its owner's (and group's) only
        save_for_hf(model, str(tmp), model_config={"hpc_mim": provenance(run, cfg, trained, encoder.config)},
                    safe_serialization=True, data_config=data)
    for f in tmp.iterdir():                  # the safetensors writer sets its own mode
        f.chmod(0o666 & ~mask)
    replace_whole(tmp, target)
    return target


def read_export(folder: str | Path) -> dict[str, Any]:
    """The exported ``config.json``."""
    return json.loads((Path(folder) / CONFIG).read_text())
