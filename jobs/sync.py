"""Send what the jobs of a run buffered while the MLflow tracking server was unreachable.

    python jobs/sync.py runs/<name>

Training and evaluation jobs never stop because the tracking server is down: their MLflow calls
(metrics, tags, final status, artifacts) are appended to ``<run>/spool/<run_id>.jsonl`` and
replayed in order as soon as the server answers again. A job that ended during the outage
leaves its spool behind; this command replays it (safe to run twice: a replayed spool is
deleted). Exit code 1 when something could still not be sent.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):        # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpc_mim.rundir import RunDir  # noqa: E402


def sync(run_dir: str) -> tuple[int, int]:
    """(operations sent, operations still pending) over every spool of the run."""
    from hpc_mim.tracking import MLflowLogger
    run = RunDir(run_dir)
    uri = run.read_tracking()["uri"]
    sent = left = 0
    for spool in sorted(run.spool.glob("*.jsonl")) if run.spool.is_dir() else []:
        logger = MLflowLogger(uri, spool.stem, spool=spool)
        before = logger.pending()
        logger.sync()
        after = logger.pending()
        print(f"{spool.stem}: {before - after} of {before} buffered operations sent"
              + (f", {after} left" if after else ""))
        sent, left = sent + before - after, left + after
    if not sent and not left:
        print(f"nothing buffered in {run.spool}")
    return sent, left


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    args = ap.parse_args(argv)
    try:
        _, left = sync(args.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
