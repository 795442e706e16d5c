"""The report's "Claims" section: each claim of a claims file (hpc_mim/claims.py) judged on a
sweep's runs.

For each claim, the treatment and control arms' values of its metric over seeds (a run's arm is
its sweep cell without the seed: ``noised_mim-pixel_noise-seed2`` -> ``noised_mim-pixel_noise``),
their difference with a 95% Welch interval, Welch's and the exact permutation test's p, and a
verdict (evaluation/report_stats.py ``judge``): **holds** (the interval excludes 0 on the
claimed side and the effect is at least the claim's ``min_effect``), **contradicted** (the
interval lies below ``min_effect``), or **not shown at this n**, with the seeds per arm at
which the observed means and spread would settle it. Pure data; evaluation/report_render.py
prints it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from evaluation.report_data import RunResult
from evaluation.report_stats import Verdict, judge, mean_std
from hpc_mim.claims import Claim, Claims, Metric


@dataclass
class ClaimResult:
    claim: Claim
    control: list[float]                  # per seed
    treatment: list[float]
    verdict: Verdict | None               # None when an arm has no value at all
    missing: list[str]                    # cells of the two arms without the metric


def metric_value(result: RunResult, metric: Metric) -> float | None:
    """The pre-trained encoder's value: a final metric of the job, or a per-layer diagnostic's
    value at block ``metric.layer`` (``last``: the deepest block logged)."""
    if metric.layer is None:
        v = result.metrics.get("pretrained", {}).get(f"{metric.job}/{metric.key}")
    else:
        curve = result.layers.get("pretrained", {}).get(metric.key)
        if curve is None or not len(curve[0]):
            return None
        steps, values = curve
        at = np.flatnonzero(steps == (steps.max() if metric.layer == "last" else metric.layer))
        v = float(values[at[-1]]) if len(at) else None
    return None if v is None or math.isnan(v) else float(v)


def judge_claims(claims: Claims, results: list[RunResult], alpha: float = 0.05) -> list[ClaimResult]:
    """Every claim of the file on the runs whose group (arm) it names."""
    by_arm: dict[str, list[RunResult]] = {}
    for r in results:
        by_arm.setdefault(r.group, []).append(r)
    out = []
    for claim in claims.claims:
        values, missing = {}, []
        for arm in (claim.control, claim.treatment):
            runs = sorted(by_arm.get(arm, []), key=lambda r: r.seed)
            got = [(r, metric_value(r, claim.metric)) for r in runs]
            values[arm] = [v for _, v in got if v is not None]
            missing += [r.cell for r, v in got if v is None] or ([] if runs else [f"{arm} (no run)"])
        a, b = values[claim.control], values[claim.treatment]
        verdict = judge(a, b, claim.direction, claim.min_effect, alpha) if a and b else None
        out.append(ClaimResult(claim, a, b, verdict, missing))
    return out


def _mean(values: list[float]) -> str:
    if not values:
        return "missing"
    mean, std, n = mean_std(values)
    return f"{mean:.3g} ± {std:.2g} (n={n})" if n > 1 else f"{mean:.3g} (n=1)"


def claims_table(judged: list[ClaimResult]) -> dict:
    """The section's table: a row per claim."""
    header = ["claim", "paper: what it says", "treatment", "control", "metric (better)",
              "Δ [95% interval]", "Welch p / permutation p", "verdict", "seeds per arm to settle"]
    rows = []
    for j in judged:
        c, v = j.claim, j.verdict
        if v is None:
            delta, p, verdict, need = "-", "-", "no data: " + ", ".join(j.missing), "-"
        else:
            interval = "" if math.isnan(v.ci_low) else f" [{v.ci_low:+.3g}, {v.ci_high:+.3g}]"
            delta = f"{v.delta:+.3g}{interval}"
            p = ("n/a" if math.isnan(v.welch_p) else f"{v.welch_p:.3f}") + f" / {v.perm_p:.3f}"
            verdict = f"{v.verdict} ({v.reason})"
            need = (str(v.n_to_settle) if v.n_to_settle else
                    "settled" if v.verdict != "not shown at this n" else "unknown")
        rows.append([c.id, f"{c.paper}: {c.sentence}", f"{c.treatment}: {_mean(j.treatment)}",
                     f"{c.control}: {_mean(j.control)}", f"{c.metric.text} ({c.direction}; counts "
                     f"from {c.min_effect:g})", delta, p, verdict, need])
    return {"header": header, "rows": rows, "best": set()}


NOTES = ["Δ = treatment − control, mean over seeds, with the 95% interval of Welch's t "
         "(unequal variances). holds: the interval excludes 0 on the claimed side and |Δ| is at "
         "least the claim's smallest effect that counts; contradicted: the interval lies below "
         "that effect (none that counts, or the opposite); otherwise not shown at this n.",
         "Seeds per arm to settle: the n at which the observed Δ and spread would give an "
         "interval that settles it, the observed values taken as the truth and with no power "
         "margin (a design with 80% power needs about twice as many).",
         "The exact permutation test cannot reach p < 0.05 with 3 seeds per arm (its smallest p "
         "is 0.1); the verdict rests on the t interval, which assumes seed-to-seed variation is "
         "roughly normal."]
