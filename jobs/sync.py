"""Send what the jobs of a run buffered while the MLflow tracking server was unreachable, and
report the calls the server rejected.

    python jobs/sync.py runs/<name>                    # replay every spool of the run
    python jobs/sync.py runs/<name> --retry-rejected   # also requeue the rejected calls first

Training and evaluation jobs never stop because the tracking server is down: their MLflow calls
(metrics, tags, final status, artifacts) are appended to ``<run>/spool/<run_id>.jsonl`` and
replayed in order as soon as the server answers again. A job that ended during the outage
leaves its spool behind; this command replays it (safe to run twice: a replayed spool is
deleted). A call the server rejects (a deleted run, an invalid value: any 4xx) cannot succeed
by retrying and would block every call behind it; it is moved to
``<run>/spool/<run_id>.rejected`` with its error (hpc_mim/tracking_spool.py) and the rest goes
on. Once its cause is fixed (the run restored, the credentials renewed), ``--retry-rejected``
puts the rejected calls back at the head of their spool and replays them.

Exit code 0 when everything was sent, 1 when calls are still waiting (the server is still
unreachable) or rejected calls are kept (their count and first errors are printed), 2 when the
run directory or its tracking.json is missing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):        # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hpc_mim.rundir import RunDir  # noqa: E402

SHOWN_ERRORS = 3


def sync(run_dir: str, retry_rejected: bool = False) -> tuple[int, int, list[tuple[str, dict]]]:
    """(operations sent, operations still pending, [(spool name, dead letter)]) over every
    spool of the run."""
    from hpc_mim.tracking import MLflowLogger
    from hpc_mim.tracking_spool import spools
    run = RunDir(run_dir)
    uri = run.read_tracking()["uri"]
    sent = left = 0
    rejected: list[tuple[str, dict]] = []
    for spool in spools(run.spool):
        requeued = spool.requeue_rejected() if retry_rejected else 0
        before, dead_before = spool.count(), len(spool.rejected())
        if before:
            logger = MLflowLogger(uri, spool.path.stem, spool=spool.path, root=run.root)
            logger.sync()
        after, letters = spool.count(), spool.rejected()
        if before:
            print(f"{spool.path.stem}: {before - after - (len(letters) - dead_before)} of {before} "
                  "buffered operations sent" + (f" ({requeued} rejected before)" if requeued else "")
                  + (f", {after} left" if after else "")
                  + (f", {len(letters) - dead_before} rejected" if len(letters) > dead_before else ""))
        sent += before - after - (len(letters) - dead_before)
        left += after
        rejected += [(spool.path.stem, letter) for letter in letters]
    if not sent and not left and not rejected:
        print(f"nothing buffered in {run.spool}")
    return sent, left, rejected


def report_rejected(rejected: list[tuple[str, dict]], run_dir: str) -> None:
    """How many calls the server rejected, where they are kept, the first errors."""
    files = sorted({name for name, _ in rejected})
    print(f"{len(rejected)} MLflow call(s) the tracking server rejected are kept in "
          + ", ".join(f"spool/{name}.rejected" for name in files) + "; the first:", file=sys.stderr)
    for name, letter in rejected[:SHOWN_ERRORS]:
        print(f"  {name} {letter['op'].get('op', '?')} ({letter.get('time', '?')}): {letter['error'][:500]}",
              file=sys.stderr)
    print(f"fix the cause, then: python jobs/sync.py {run_dir} --retry-rejected", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--retry-rejected", action="store_true",
                    help="requeue the calls the server rejected (at the head of their spool) and replay them")
    args = ap.parse_args(argv)
    try:
        _, left, rejected = sync(args.run_dir, args.retry_rejected)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rejected:
        report_rejected(rejected, args.run_dir)
    return 1 if left or rejected else 0


if __name__ == "__main__":
    sys.exit(main())
