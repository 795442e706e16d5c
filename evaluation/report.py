"""Comparison table of one or more runs, read back from MLflow.

    python -m evaluation.report --run-dir runs/<a> [--run-dir runs/<b> ...] [--json out.json]

For each run: the pre-training run's method and final loss, and every evaluation child run
(pre-trained encoder and baselines) as one row per encoder with a column per evaluation job
(its headline metric: top-1, mIoU, box AP and mask AP); a job that failed shows its status.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpc_mim.rundir import RunDir
from hpc_mim.tracking import fetch_runs

HEADLINE = {"knn": ["top1"], "linear_probe": ["top1"], "finetune": ["top1"],
            "segmentation": ["miou"], "detection": ["box_ap", "mask_ap"]}
ORDER = list(HEADLINE)


def collect(run_dir: str) -> dict:
    run = RunDir(run_dir)
    tracking = run.read_tracking()
    parent, *children = fetch_runs(tracking["uri"], tracking["experiment_id"], tracking["run_id"])
    rows: dict[str, dict[str, float]] = {}
    jobs: dict[str, str] = {}                       # job label -> evaluation name
    # oldest first: an evaluation re-run on the same run supersedes the earlier one
    for child in sorted(children, key=lambda c: c.info.start_time):
        encoder = child.data.tags.get("baseline", "pretrained")
        name = child.data.tags.get("eval", child.info.run_name)
        job = child.data.tags.get("job", name)
        jobs[job] = name
        for key, value in child.data.metrics.items():
            rows.setdefault(encoder, {})[f"{job}/{key}"] = value
        rows.setdefault(encoder, {})[f"{job}/status"] = child.info.status
    return {"run": run.root.name, "method": parent.data.tags.get("method", "?"),
            "status": parent.info.status, "final_loss": parent.data.metrics.get("train/loss"),
            "jobs": jobs, "rows": rows}


def columns(reports: list[dict]) -> list[tuple[str, str]]:
    """(job, metric) pairs, evaluations in ORDER, then by job label."""
    jobs = {job: name for rep in reports for job, name in rep["jobs"].items()}
    ordered = sorted(jobs, key=lambda j: (ORDER.index(jobs[j]) if jobs[j] in ORDER else 99, j))
    return [(job, metric) for job in ordered for metric in HEADLINE.get(jobs[job], ["top1"])]


def format_table(reports: list[dict]) -> str:
    cols = columns(reports)
    header = ["run", "method", "encoder", *[f"{job} {metric}" for job, metric in cols]]
    lines = [header]
    order = {"pretrained": 0, "random_init": 1, "pixels": 2}
    for rep in reports:
        for encoder in sorted(rep["rows"], key=lambda e: order.get(e, 9)):
            row = rep["rows"][encoder]
            cells = []
            for job, metric in cols:
                value = row.get(f"{job}/{metric}")
                cells.append(f"{value:.1f}" if value is not None else row.get(f"{job}/status", "-"))
            lines.append([rep["run"], rep["method"], encoder, *cells])
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", action="append", required=True)
    ap.add_argument("--json", type=Path, help="also write the collected figures here")
    args = ap.parse_args(argv)
    reports = [collect(d) for d in args.run_dir]
    print(format_table(reports))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
