"""Pre-training job entry point: ``python -m hpc_mim.train.pretrain --run-dir RUN``.

Reads everything from the run directory (written by jobs/submit.py), resumes from its latest
checkpoint if there is one, and marks the MLflow run finished or failed.
"""
from __future__ import annotations

import argparse
import sys

from hpc_mim.config import read_config
from hpc_mim.rundir import RunDir


def main(run_dir: str) -> dict[str, float]:
    from hpc_mim.tracking import MLflowLogger
    from hpc_mim.train.trainer import Trainer

    run = RunDir(run_dir)
    cfg = read_config(run.config)
    trainer = Trainer(cfg, run)
    try:
        metrics = trainer.fit()
    except BaseException:
        if trainer.logger:
            trainer.logger.finish("FAILED")
        raise
    if trainer.logger:
        for artifact in (run.config, run.encoder, run.pretrain_log):
            trainer.logger.log_artifact(artifact)
        trainer.logger.finish("FINISHED")
    return metrics


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run-dir", required=True)
    main(ap.parse_args().run_dir)
    sys.exit(0)
