"""Where a run's wall time went: one row per job (its wall time as its status record has it,
process start, imports and data loaders included) and, under it, the stages the job recorded in
``logs/stages.jsonl`` (pre-training's loop and export; each evaluated encoder, marked when its
metrics were reused from the random-init cache rather than computed).

    python -m jobs.stages runs/<name> [--extra data_prep=41] [--log-mlflow]

``--extra NAME=SECONDS`` adds a stage measured outside the jobs (the demo's data conversion);
``--log-mlflow`` logs every figure to the run's MLflow parent run as ``time/<job>_s`` and
``time/<job>/<stage>_s``. ``make demo`` prints this at its end.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from hpc_mim.rundir import RunDir


def breakdown(run_dir: str | Path, extra: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Rows ``{job, stage, seconds, note}``; a job's own row has stage ``""``."""
    run = RunDir(run_dir)
    rows = [{"job": name, "stage": "", "seconds": s, "note": "outside the jobs"}
            for name, s in (extra or {}).items()]
    index_path = run.jobs / "jobs.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    stages: dict[str, dict[str, dict[str, Any]]] = {}
    for line in run.read_stages():          # requeues append again: sum them
        entry = stages.setdefault(line["job"], {}).setdefault(
            line["stage"], {"seconds": 0.0, "note": ""})
        entry["seconds"] += line["seconds"]
        if line.get("reused_from"):
            entry["note"] = f"reused: {line['reused_from']}"
    for job, entry in index.items():
        path = Path(entry["status_file"])
        record = json.loads(path.read_text()) if path.is_file() else {}
        total = record.get("seconds")
        rows.append({"job": job, "stage": "", "seconds": total,
                     "note": record.get("state", "NOT STARTED")})
        inner = stages.pop(job, {})
        for stage, s in inner.items():
            rows.append({"job": job, "stage": stage, "seconds": s["seconds"], "note": s["note"]})
        if total is not None and inner:
            rest = total - sum(s["seconds"] for s in inner.values())
            rows.append({"job": job, "stage": "start-up (imports, process group, loaders)",
                         "seconds": max(rest, 0.0), "note": ""})
    for job, inner in stages.items():          # run outside submit.py (python -m evaluation.knn)
        for stage, s in inner.items():
            rows.append({"job": job, "stage": stage, "seconds": s["seconds"], "note": s["note"]})
    return rows


def total_seconds(rows: list[dict[str, Any]]) -> float:
    return sum(r["seconds"] or 0.0 for r in rows if not r["stage"])


def format_breakdown(rows: list[dict[str, Any]]) -> str:
    total = total_seconds(rows) or 1.0
    lines = [f"{'stage':52s} {'seconds':>8s} {'share':>6s}  note"]
    for r in rows:
        name = f"  {r['stage']}" if r["stage"] else r["job"]
        s = r["seconds"]
        figure = f"{s:8.1f} {100 * s / total:5.1f}%" if s is not None else f"{'-':>8s} {'':>6s}"
        lines.append(f"{name[:52]:52s} {figure}  {r['note']}")
    lines.append(f"{'total (jobs + extra)':52s} {total_seconds(rows):8.1f}")
    return "\n".join(lines)


def metric_name(row: dict[str, Any]) -> str:
    """``time/<job>_s`` or ``time/<job>/<stage>_s`` in MLflow's metric-name alphabet."""
    clean = lambda text: re.sub(r"[^\w\-./]", "_", text.split(" (")[0].strip())  # noqa: E731
    stage = clean(row["stage"])
    return f"time/{clean(row['job'])}/{stage}_s" if stage else f"time/{clean(row['job'])}_s"


def log_to_mlflow(run_dir: str | Path, rows: list[dict[str, Any]]) -> None:
    """The breakdown as metrics of the run's MLflow parent run (which may have ended)."""
    from hpc_mim.tracking import MLflowLogger
    run = RunDir(run_dir)
    tracking = run.read_tracking()
    logger = MLflowLogger(tracking["uri"], tracking["run_id"],
                          spool=run.spool / f"{tracking['run_id']}.jsonl")
    metrics = {metric_name(r): float(r["seconds"]) for r in rows if r["seconds"] is not None}
    metrics["time/total_s"] = total_seconds(rows)
    logger.log_metrics(metrics, step=0)
    logger.flush()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=SECONDS")
    ap.add_argument("--log-mlflow", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    extra = {}
    for item in args.extra:
        name, _, seconds = item.partition("=")
        try:
            extra[name] = float(seconds)
        except ValueError:
            ap.error(f"--extra {item!r}: expected NAME=SECONDS")
    rows = breakdown(args.run_dir, extra)
    print(format_breakdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.log_mlflow:
        log_to_mlflow(args.run_dir, rows)


if __name__ == "__main__":
    main()
