"""Pre-training job entry point: ``python -m hpc_mim.train.pretrain --run-dir RUN``.

Reads everything from the run directory (written by jobs/submit.py), resumes from its latest
checkpoint if there is one, and keeps logging into the same MLflow run across restarts (tag
``restarts``). The run ends FINISHED; FAILED with the error as a tag (the chained evaluations
then never start); or KILLED with a ``stopped`` tag when a scheduler signal stopped it after a
checkpoint or it lost a peer (it turns RUNNING again when the requeued job starts).
"""
from __future__ import annotations

import argparse
import os
import socket
import time

from hpc_mim.config import read_config
from hpc_mim.distributed.env import detect
from hpc_mim.distributed.outcome import mlflow_end
from hpc_mim.distributed.preemption import STOP
from hpc_mim.rundir import RunDir
from hpc_mim.tracking import MLflowLogger
from hpc_mim.train.trainer import Trainer


def count_start(run: RunDir) -> int:
    """Append this start to logs/starts.log; returns how many starts came before it."""
    run.logs.mkdir(parents=True, exist_ok=True)
    before = len(run.starts_log.read_text().splitlines()) if run.starts_log.is_file() else 0
    with open(run.starts_log, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} host={socket.gethostname()} "
                f"slurm_job={os.environ.get('SLURM_JOB_ID', '-')} "
                f"slurm_restart_count={os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
    return before


def main(run_dir: str) -> dict[str, float]:
    STOP.install()            # also when started by torchrun or srun rather than our launcher

    run = RunDir(run_dir)
    cfg = read_config(run.config)
    logger = None
    if detect().is_main:
        tracking = run.read_tracking()
        logger = MLflowLogger(tracking["uri"], tracking["run_id"],
                              spool=run.spool / f"{tracking['run_id']}.jsonl",
                              retry_s=cfg.tracking.retry_s)
        logger.start()
        logger.set_tags({"restarts": count_start(run)})
    try:
        metrics = Trainer(cfg, run, logger=logger).fit()
    except BaseException as e:
        if logger:
            status, tag, text = mlflow_end(e)
            with STOP.polled():     # srun's SIGTERM (another rank failed) must not cut this short
                logger.set_tags({tag: text})
                logger.finish(status)
        raise
    if logger:
        for artifact in (run.config, run.encoder, run.pretrain_log):
            logger.log_artifact(artifact)
        if run.timm.is_dir():                   # the encoder in timm's format (if its export worked)
            for artifact in sorted(run.timm.iterdir()):
                logger.log_artifact(artifact, "timm")
        logger.finish("FINISHED")
    return metrics


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run-dir", required=True)
    main(ap.parse_args().run_dir)
