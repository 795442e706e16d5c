"""What reproduces a run, recorded on its MLflow run when it is submitted: the code version
(tags ``git_commit``, ``git_dirty``), the resolved config (artifact ``config.yaml``) and every
dataset it reads as an MLflow dataset input (name, digest = the first 16 hex digits of the
dataset's manifest sha256; the whole sha256 in the input's profile; context training or
evaluation). ``evaluation/report.py`` shows them per row and warns when rows differ.
"""
from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from hpc_mim.config import Config
from hpc_mim.datasets import manifest_sha256

REPO = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=None)
def git_state(root: Path = REPO) -> dict[str, str]:
    """{"git_commit": sha or "unknown", "git_dirty": "true" | "false" | "unknown"}; dirty
    counts modified and untracked files (runs/ and data/ are ignored by .gitignore)."""
    def git(*args: str) -> str | None:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": "true" if git("status", "--porcelain") else "false"}


@lru_cache(maxsize=None)
def _dataset_sha(name: str, root: str) -> tuple[str, str]:
    """(manifest sha256, source path) of a dataset, once per submission (a sweep's cells share
    their datasets)."""
    from hpc_mim.datasets import dataset_info
    info = dataset_info(name, root)
    return manifest_sha256(info), info.get("root") or str(Path(info["train"]).parent)


def datasets_of(cfg: Config) -> dict[str, str]:
    """Dataset name -> MLflow context: the pre-training one, then each evaluation's."""
    out = {cfg.data.dataset: "training"}
    for _, _, dataset in cfg.eval_jobs():
        out.setdefault(dataset, "evaluation")
    return out


def record(logger: Any, cfg: Config, config_path: Path) -> dict[str, Any]:
    """Tag, attach and declare what reproduces the run of ``logger`` (an MLflowLogger);
    returns the tags and ``datasets`` (name -> manifest sha256), which the run directory keeps
    too (tracking.json ``provenance``: the exported encoder's config names them)."""
    tags = git_state()
    logger.set_tags(tags)
    logger.log_artifact(config_path)
    shas = {}
    for name, context in datasets_of(cfg).items():
        sha, source = _dataset_sha(name, cfg.data.root)
        logger.log_dataset(name, sha[:16], source, context, {"manifest_sha256": sha})
        shas[name] = sha
    return {**tags, "datasets": shas}
