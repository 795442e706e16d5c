"""Comparison report of a sweep or of run directories, read back from MLflow and the run dirs.

    python -m evaluation.report --sweep compare --html report.html --md report.md
    python -m evaluation.report --run-dir runs/<a> --run-dir runs/<b> [--baseline mae] [--json out.json]
    python -m evaluation.report --sweep claims --claims configs/claims.yaml --md runs/claims/report.md

One row per method (and swept values); each evaluation's headline metric as mean ± std over
seeds, the best per column marked; each method's difference to the baseline (``--baseline``,
default mae) with a Welch t-test, an exact permutation test and a bootstrap 95% interval, or
"n too small" where no outcome could reach p < 0.05; the paper's figure, with its source,
where the config matches a paper setting (configs/papers.yaml: dataset, architecture,
pre-training epochs and evaluation protocol), and a warning when rows ran different evaluation
protocols; with ``--claims FILE``, each claim's verdict on the sweep's arms
(evaluation/report_claims.py: holds / not shown at this n / contradicted); the pre-trained vs
random-init gains, with a verdict by the same rule (``--min-effect``); failed or missing runs;
each cell's submission history; code version and dataset digests per run, with a warning when
they differ; curves (mean ± std over seeds on a common step grid) and the diagnostics per layer.
The markdown goes to stdout (and ``--md``); ``--html`` writes one self-contained page. Both are
logged as artifacts of the sweep's MLflow run (or of each listed run) under ``report/``.

Arguments are checked before anything is read or written (usage error, exit 2): each ``--rule``
is ``COLUMN=last|best``, and the folder of each output file (``--html``, ``--md``, ``--json``)
must exist. A missing folder is an error, not created: a mistyped path would otherwise leave a
stray folder tree, and a report over an existing sweep goes beside it (runs/<sweep>/).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evaluation import report_figures as figs
from evaluation.report_claims import judge_claims
from evaluation.report_data import read_run_dirs, read_sweep
from evaluation.report_render import html, markdown
from evaluation.report_tables import build
from hpc_mim.claims import load_claims
from hpc_mim.config import ConfigError


def figures(report: dict) -> dict:
    rows = report["rows"]
    base = next((r for r in rows if r.group == report["baseline"]), None)
    cka_uri, cka = figs.cka_between(rows, base)
    notes = [f"CKA with {report['baseline']} at the last block: "
             + ", ".join(f"{g} {v[-1]:.3f}" for g, v in cka.items())] if cka else []
    return {"curves": figs.curve_figures(rows), "diagnostics": figs.diagnostics_figure(rows),
            "diagnostics_notes": notes or ["(no cross-method CKA: no baseline row with diagnostics)"],
            "more": [("singular value spectrum", figs.spectrum_figure(rows)),
                     ("CKA with the baseline per layer", cka_uri)]}


def log_to_mlflow(tracking: list[dict], paths: list[Path]) -> None:
    from hpc_mim.tracking import MLflowLogger
    for t in tracking:
        logger = MLflowLogger(t["uri"], t["run_id"])
        for path in paths:
            logger.log_artifact(path, "report")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", help="a sweep's name (under runs/) or folder")
    ap.add_argument("--run-dir", action="append", default=[], help="run directories (repeatable)")
    ap.add_argument("--html", type=Path, help="write the self-contained HTML report here")
    ap.add_argument("--md", type=Path, help="write the markdown report here")
    ap.add_argument("--json", type=Path, help="write the figures per run here")
    ap.add_argument("--baseline", default="mae", help="the row the others are compared with")
    ap.add_argument("--rule", action="append", default=[], metavar="COLUMN=last|best",
                    help="e.g. finetune/top1=best: the maximum of its val curve instead of the final value")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--claims", type=Path, help="a claims file (configs/claims.yaml): adds the Claims "
                    "section, each claim's verdict on the sweep's arms")
    ap.add_argument("--min-effect", type=float, default=1.0, metavar="POINTS",
                    help="pre-trained vs random init: the smallest gain that counts (default 1 point)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log the report as an artifact")
    args = ap.parse_args(argv)
    if bool(args.sweep) == bool(args.run_dir):
        ap.error("give --sweep SWEEP or --run-dir DIR (repeatable)")
    rules = {}
    for item in args.rule:
        column, _, rule = item.partition("=")
        if not column.strip() or rule not in ("last", "best"):
            ap.error(f"--rule {item!r}: expected COLUMN=last|best, e.g. finetune/top1=best")
        rules[column.strip()] = rule
    if not 0 < args.alpha < 1:                       # also refuses nan
        ap.error(f"--alpha {args.alpha}: a significance level in (0, 1)")
    if not 0 <= args.min_effect < float("inf"):
        ap.error(f"--min-effect {args.min_effect}: the smallest gain that counts, >= 0 metric points")
    try:                                             # a bad claims file: before anything is read
        claims = load_claims(args.claims) if args.claims else None
    except ConfigError as e:
        ap.error(f"--claims: {e}")
    for flag in ("html", "md", "json"):
        out = getattr(args, flag)
        if out is not None and (out.is_dir() or not out.parent.is_dir()):
            ap.error(f"--{flag} {out}: " + (f"{out} is a folder; give a file name" if out.is_dir()
                                            else f"the folder {out.parent} does not exist"))
    if args.sweep:
        from hpc_mim.rundir import find_sweep
        try:
            sweep_dir = find_sweep(args.sweep)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        record, results = read_sweep(sweep_dir)
        title, tracking = f"Sweep {record['name']}: {len(results)} runs", [record["tracking"]]
    else:
        results = read_run_dirs(args.run_dir)
        title = f"Comparison of {len(results)} runs"
        tracking = [json.loads((Path(d) / "tracking.json").read_text()) for d in args.run_dir
                    if (Path(d) / "tracking.json").is_file()]
    report = build(results, args.baseline, rules, args.alpha)
    report["min_effect"] = args.min_effect
    if claims is not None:
        report["claims"], report["claims_file"] = judge_claims(claims, results, args.alpha), str(args.claims)
    text = markdown(report, {}, title)
    print(text)
    written = []
    drawn = figures(report) if args.html or args.md else {}
    if args.md:
        args.md.write_text(markdown(report, drawn, title))
        written.append(args.md)
    if args.html:
        args.html.write_text(html(report, drawn, title))
        written.append(args.html)
        print(f"wrote {args.html}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps([{"cell": r.cell, "group": r.group, "method": r.method, "seed": r.seed,
                                          "status": r.status, "metrics": r.metrics, "history": r.history,
                                          "provenance": r.provenance} for r in results], indent=2))
        written.append(args.json)
    if written and not args.no_mlflow:
        log_to_mlflow(tracking, written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
