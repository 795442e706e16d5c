"""Pre-training job entry point: ``python -m hpc_mim.train.pretrain --run-dir RUN``.

Reads everything from the run directory (written by jobs/submit.py), resumes from its latest
checkpoint if there is one, and marks the MLflow run finished, or failed with the error as a tag.
"""
from __future__ import annotations

import argparse

from hpc_mim.config import read_config
from hpc_mim.rundir import RunDir


def main(run_dir: str) -> dict[str, float]:
    from hpc_mim.distributed.env import detect
    from hpc_mim.tracking import MLflowLogger
    from hpc_mim.train.trainer import Trainer

    run = RunDir(run_dir)
    cfg = read_config(run.config)
    logger = None
    if detect().is_main:
        tracking = run.read_tracking()
        logger = MLflowLogger(tracking["uri"], tracking["run_id"])
        logger.start()
    try:
        metrics = Trainer(cfg, run, logger=logger).fit()
    except BaseException as e:
        if logger:
            logger.set_tags({"error": f"{type(e).__name__}: {e}"[:5000]})
            logger.finish("FAILED")
        raise
    if logger:
        for artifact in (run.config, run.encoder, run.pretrain_log):
            logger.log_artifact(artifact)
        logger.finish("FINISHED")
    return metrics


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run-dir", required=True)
    main(ap.parse_args().run_dir)
