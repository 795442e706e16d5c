"""The comparison's tables: methods x evaluations (mean +- std over seeds, the best per column,
the paper's figure where a row's config matches a paper setting), the difference of each method
to the baseline with its tests, the runs that failed or are missing, and what reproduces each
row. Pure data; evaluation/report_render.py prints them as markdown and HTML.

A paper figure (configs/papers.yaml) shows only next to a row whose resolved config matches
every key of its ``when``: dataset and architecture, the pre-training length
(``train.epochs``) and the evaluation protocol it was measured under (``eval.knn.protocol``,
``eval.finetune.protocol``, ``eval.fewshot.shots``), each figure with its source. Rows that ran
different evaluation protocols are warned about: their columns do not compare.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evaluation.report_data import RunResult
from evaluation.report_stats import CONTRADICTED, HOLDS, NOT_SHOWN, Difference, compare, judge, mean_std

# knn: top1 under eval.knn.protocol dino, loo_top1 under latentmim (a run has one of them)
HEADLINE = {"knn": ["top1", "loo_top1"], "linear_probe": ["top1"], "fewshot": ["top1"],
            "finetune": ["top1"], "segmentation": ["miou"], "detection": ["box_ap", "mask_ap"],
            "diagnostics": ["rankme"]}
RANKED = {"knn", "linear_probe", "fewshot", "finetune", "segmentation", "detection"}   # higher is better
PAPERS = Path(__file__).resolve().parent.parent / "configs" / "papers.yaml"
# last: the evaluation's final value (the papers report the end of the schedule);
# best: the maximum of its curve (val/<metric> every eval_every steps)
RULES = {"knn": "last", "linear_probe": "last", "fewshot": "last", "finetune": "last",
         "segmentation": "last", "detection": "last", "diagnostics": "last"}
# the config keys naming an evaluation's protocol: rows that differ in one do not compare
PROTOCOL_KEYS = ("eval.knn.protocol", "eval.finetune.protocol")


@dataclass
class Column:
    job: str
    metric: str
    evaluation: str
    rule: str

    @property
    def key(self) -> str:
        return f"{self.job}/{self.metric}"


@dataclass
class Row:
    group: str
    method: str
    cells: list[RunResult]
    values: dict[str, list[float]] = field(default_factory=dict)      # column key -> per seed
    best: set[str] = field(default_factory=set)
    diffs: dict[str, Difference] = field(default_factory=dict)
    paper: dict[str, tuple[float, str]] = field(default_factory=dict)


def columns(results: list[RunResult], rules: dict[str, str]) -> list[Column]:
    """One column per job and headline metric that some run reported (all of the job's
    headline metrics when none did, so a job that failed everywhere still shows)."""
    jobs = {job: name for r in results for job, name in r.jobs.items()}
    reported = {key for r in results for m in r.metrics.values() for key in m}
    order = list(HEADLINE)
    ordered = sorted(jobs, key=lambda j: (order.index(jobs[j]) if jobs[j] in order else 99, j))
    out = []
    for job in ordered:
        metrics = HEADLINE.get(jobs[job], ["top1"])
        metrics = [m for m in metrics if f"{job}/{m}" in reported] or metrics
        for metric in metrics:
            rule = rules.get(f"{job}/{metric}", rules.get(jobs[job], RULES.get(jobs[job], "last")))
            out.append(Column(job, metric, jobs[job], rule))
    return out


def value(result: RunResult, col: Column) -> float | None:
    if col.rule == "best" and f"{col.job}/val/{col.metric}" in result.curves:
        return float(np.max(result.curves[f"{col.job}/val/{col.metric}"][1]))
    v = result.metrics.get("pretrained", {}).get(col.key)
    return None if v is None or math.isnan(v) else float(v)


def matches(config: dict[str, str], when: dict[str, Any]) -> bool:
    """The flattened config (values as strings) has every ``when`` key at its value: a figure
    needs the row's dataset, architecture, pre-training length and evaluation protocol."""
    return all(config.get(k) == str(v) for k, v in when.items())


def paper_figures(config: dict[str, str], method: str,
                  papers: Path = PAPERS) -> dict[str, tuple[float, str]]:
    """Column key -> (figure, source) of the first paper setting whose ``when`` the config
    matches (configs/papers.yaml)."""
    entries = yaml.safe_load(papers.read_text()) if papers.is_file() else []
    out: dict[str, tuple[float, str]] = {}
    for entry in entries:
        if entry["method"] == method and matches(config, entry["when"]):
            for key, figure in entry["figures"].items():
                out.setdefault(key, (float(figure), entry["source"]))
    return out


def build(results: list[RunResult], baseline: str = "mae", rules: dict[str, str] | None = None,
          alpha: float = 0.05) -> dict[str, Any]:
    """Everything the report prints (but the figures)."""
    cols = columns(results, rules or {})
    rows: dict[str, Row] = {}
    for r in results:
        rows.setdefault(r.group, Row(r.group, r.method, [])).cells.append(r)
    for row in rows.values():
        row.cells.sort(key=lambda r: r.seed)
        for col in cols:
            vals = [v for r in row.cells if (v := value(r, col)) is not None]
            if vals:
                row.values[col.key] = vals
        row.paper = paper_figures(row.cells[0].config, row.method)
    for col in cols:
        means = {g: np.mean(r.values[col.key]) for g, r in rows.items() if col.key in r.values}
        if col.evaluation in RANKED and len(means) > 1:      # one row is no one's best
            rows[max(means, key=means.get)].best.add(col.key)
    base = rows.get(baseline) or next((r for r in rows.values() if r.method == baseline), None)
    if base is not None:
        for row in rows.values():
            if row is base:
                continue
            for col in cols:
                a, b = base.values.get(col.key), row.values.get(col.key)
                if a and b:
                    row.diffs[col.key] = compare(a, b, alpha)
    missing = []
    for r in results:
        for col in cols:
            if value(r, col) is None:
                status = r.job_status.get("pretrained", {}).get(col.job, "no run")
                missing.append((r.cell, col.key, status if not r.error else r.error))
    return {"columns": cols, "rows": list(rows.values()), "baseline": base.group if base else None,
            "missing": missing, "provenance": provenance(results), "alpha": alpha}


def versus_random(rows: list[Row], cols: list[Column], min_effect: float = 1.0,
                  alpha: float = 0.05) -> list[list[str]]:
    """Per method and task column: does the pre-trained encoder beat the random-init one of the
    same architecture, seed and protocol at this budget, by at least ``min_effect`` (metric
    units: top-1, mIoU or AP points)? The claims' rule (report_stats.judge): "pre-training
    helps" only when the 95% interval excludes 0 and the gain is at least ``min_effect``; one
    seed cannot tell. ``[method, column, pre-trained, random init, difference, verdict]``; a
    random init reused from another run is marked with ``*``."""
    out = []
    for row in rows:
        for col in cols:
            if col.evaluation not in RANKED:
                continue
            pre = [v for r in row.cells if (v := r.metrics.get("pretrained", {}).get(col.key)) is not None]
            rnd = [v for r in row.cells if (v := r.metrics.get("random_init", {}).get(col.key)) is not None]
            if not pre or not rnd:
                continue
            v = judge(rnd, pre, "higher", min_effect, alpha)
            verdict = {HOLDS: f"pre-training helps (by >= {min_effect:g})",
                       CONTRADICTED: f"pre-training does not help by {min_effect:g} or more"}.get(
                           v.verdict, "cannot tell at this n")
            if v.verdict == NOT_SHOWN:
                verdict += (f" ({v.reason})" if v.n_to_settle is None else
                            f" (about {v.n_to_settle} seeds would settle it)")
            reused = "*" if any(col.job in r.reused for r in row.cells) else ""
            show = lambda values: fmt_mean(values) if len(values) > 1 else f"{values[0]:.2f} (n=1)"  # noqa: E731
            out.append([row.group, col.key, show(pre), show(rnd) + reused, f"{v.delta:+.2f}", verdict])
    return out


def provenance(results: list[RunResult]) -> dict[str, Any]:
    """Per run: code version and datasets; warnings when the rows of one table differ."""
    per_run = [(r.cell, r.provenance.get("git_commit", "?")[:10]
                + ("+dirty" if r.provenance.get("git_dirty") == "true" else ""),
                r.provenance.get("datasets", "?")) for r in results]
    warnings = []
    if len({code for _, code, _ in per_run}) > 1:
        warnings.append("rows come from different code versions: " +
                        ", ".join(sorted({code for _, code, _ in per_run})))
    if any(code.endswith("+dirty") for _, code, _ in per_run):
        warnings.append("some runs were submitted from a modified (dirty) tree: their commit does "
                        "not reproduce them exactly")
    if len({data for _, _, data in per_run}) > 1:
        warnings.append("rows read different data: " + " vs ".join(sorted({d for _, _, d in per_run})))
    for key in PROTOCOL_KEYS:
        ran = {r.config[key] for r in results if key in r.config}
        if len(ran) > 1:
            warnings.append(f"rows ran different evaluation protocols ({key}: "
                            f"{', '.join(sorted(ran))}): those columns do not compare")
    return {"runs": per_run, "warnings": warnings}


def fmt_mean(values: list[float]) -> str:
    mean, std, n = mean_std(values)
    return f"{mean:.2f} ± {std:.2f} (n={n})" if n > 1 else f"{mean:.2f} (n=1)"


def fmt_diff(d: Difference, alpha: float) -> str:
    welch = "n/a" if math.isnan(d.welch_p) else f"{d.welch_p:.3f}"
    text = (f"{d.delta:+.2f} [{d.ci_low:+.2f}, {d.ci_high:+.2f}]; Welch p={welch}; "
            f"permutation p={d.perm_p:.3f}")
    if d.too_small:
        text += f"; n too small for p < {alpha:g} (smallest possible p={d.min_p:.3f})"
    return text
