"""Comparison table of one or more runs, read back from MLflow.

    python -m evaluation.report --run-dir runs/<a> [--run-dir runs/<b> ...] [--json out.json]

For each run: the pre-training run's method and final loss, and every evaluation child run
(pre-trained encoder and baselines) as one row per encoder with a column per evaluation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpc_mim.rundir import RunDir
from hpc_mim.tracking import fetch_runs

COLUMNS = (("knn", "top1", "kNN top-1"), ("linear_probe", "top1", "linear top-1"))


def collect(run_dir: str) -> dict:
    run = RunDir(run_dir)
    tracking = run.read_tracking()
    parent, *children = fetch_runs(tracking["uri"], tracking["experiment_id"], tracking["run_id"])
    rows: dict[str, dict[str, float]] = {}
    for child in children:
        encoder = child.data.tags.get("baseline", "pretrained")
        name = child.data.tags.get("eval", child.info.run_name)
        for key, value in child.data.metrics.items():
            rows.setdefault(encoder, {})[f"{name}/{key}"] = value
        rows.setdefault(encoder, {})[f"{name}/status"] = child.info.status
    return {"run": run.root.name, "method": parent.data.tags.get("method", "?"),
            "status": parent.info.status, "final_loss": parent.data.metrics.get("train/loss"),
            "rows": rows}


def format_table(reports: list[dict]) -> str:
    header = ["run", "method", "encoder", *[label for _, _, label in COLUMNS]]
    lines = [header]
    order = {"pretrained": 0, "random_init": 1, "pixels": 2}
    for rep in reports:
        for encoder in sorted(rep["rows"], key=lambda e: order.get(e, 9)):
            row = rep["rows"][encoder]
            cells = []
            for name, metric, _ in COLUMNS:
                value = row.get(f"{name}/{metric}")
                cells.append(f"{value:.1f}" if value is not None else row.get(f"{name}/status", "-"))
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
