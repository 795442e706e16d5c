"""The report as markdown and as one self-contained HTML page (inline CSS and SVG figures, no
external resource, so it opens from a login node or an e-mail). The page's small inline script
only counts what rendered (tables, images, broken images) into ``body[data-rendered]``, which
the headless-browser test reads.
"""
from __future__ import annotations

import html as htmllib
import time
from typing import Any

from evaluation.report_claims import NOTES as CLAIM_NOTES
from evaluation.report_claims import claims_table
from evaluation.report_stats import mean_std
from evaluation.report_tables import fmt_diff, fmt_mean, versus_random

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
color:#222;max-width:1400px}h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid
#ddd}table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid #ccc;padding:4px
8px;text-align:left;vertical-align:top}th{background:#f3f3f3}td.best{font-weight:bold;background:#eaf6ea}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:6px 10px;margin:6px 0}.note{color:#555;
font-size:12px}.figs{display:flex;flex-wrap:wrap;gap:8px}figure{margin:6px 0;flex:0 1 auto}img{max-width:100%}"""

CHECK = """<script>window.addEventListener('load',function(){var im=document.images,b=0;
for(var i=0;i<im.length;i++){if(!im[i].complete||im[i].naturalWidth===0)b++;}
document.body.setAttribute('data-rendered',JSON.stringify({tables:document.querySelectorAll('table').length,
images:im.length,broken:b}));});</script>"""


ENCODERS = ["pretrained", "random_init", "pixels"]


def sections(report: dict[str, Any], figures: dict[str, Any]) -> list[tuple[str, Any]]:
    """(heading, content) with content a table (header, rows, best cells), text lines, or
    figures [(title, uri)]: one description rendered both ways."""
    cols, rows, alpha = report["columns"], report["rows"], report["alpha"]
    out: list[tuple[str, Any]] = []
    header = ["method", "seeds", *[c.key for c in cols], "paper (same data, architecture, epochs, protocol; source)"]
    body, best = [], set()
    for i, row in enumerate(rows):
        cells = [row.group, ", ".join(str(r.seed) for r in row.cells)]
        for j, c in enumerate(cols):
            cells.append(fmt_mean(row.values[c.key]) if c.key in row.values else "missing")
            if c.key in row.best:
                best.add((i, j + 2))
        cells.append("; ".join(f"{k} {v:.1f} ({src})" for k, (v, src) in row.paper.items())
                     or "no paper figure for this data, architecture, epochs and protocol")
        body.append(cells)
    out.append(("Methods x evaluations", {"header": header, "rows": body, "best": best}))
    out.append(("", ["Rule per column: " + ", ".join(f"{c.key}: {c.rule}" for c in cols)
                     + " (last = the evaluation's final value, as the papers report; best = the "
                       "maximum of its val curve). "
                     + ("Best mean per task column in bold; diagnostics are not ranked." if len(rows) > 1
                        else "One row: nothing to rank.")]))
    if report.get("claims"):
        out.append(("Claims", claims_table(report["claims"])))
        out.append(("", CLAIM_NOTES + [f"Claims file: {report.get('claims_file', '?')}."]))
    diff_rows = [[row.group, *[fmt_diff(row.diffs[c.key], alpha) if c.key in row.diffs else "-"
                               for c in cols]] for row in rows if row.diffs]
    if diff_rows:              # one method, or no baseline row: nothing to compare with
        out.append((f"Difference to {report['baseline']}", {"header": ["method", *[c.key for c in cols]],
                                                            "rows": diff_rows, "best": set()}))
        out.append(("", ["Δ = method − baseline, mean over seeds [bootstrap 95% interval]; Welch's "
                         "t-test and the exact permutation test of the means, two-sided."]))
    encoders = [[row.group, enc, *[fmt_mean(v) if (v := [r.metrics.get(enc, {}).get(c.key) for r in row.cells
                                                         if r.metrics.get(enc, {}).get(c.key) is not None]) else "-"
                                   for c in cols]]
                for row in rows for enc in sorted({e for r in row.cells for e in r.metrics}, key=ENCODERS.index)]
    out.append(("Every encoder (pretrained, random_init, pixels baselines)",
                {"header": ["method", "encoder", *[c.key for c in cols]], "rows": encoders, "best": set()}))
    versus = versus_random(rows, cols, report.get("min_effect", 1.0), alpha)
    if versus:
        out.append(("Pre-trained vs random init at this budget",
                    {"header": ["method", "evaluation", "pre-trained", "random init", "Δ", "verdict"],
                     "rows": versus, "best": set()}))
        sources = sorted({src for row in rows for r in row.cells for src in r.reused.values()})
        out.append(("", ["Same architecture, seed, protocol and batches; Δ = pre-trained − random init. "
                         f"A verdict needs the 95% Welch interval to exclude 0 and Δ >= "
                         f"{report.get('min_effect', 1.0):g} (--min-effect, metric points), as the "
                         "claims' verdicts; one seed cannot tell."]
                    + [f"* random-init figures reused from {src} (same architecture, evaluation "
                       "settings, seed, data and code: evaluation/baseline_cache.py)" for src in sources]))
    missing = [f"{cell}: {key} — {status}" for cell, key, status in report["missing"]]
    out.append(("Failed or missing", missing or ["none: every run has every evaluation"]))
    history = [f"{r.cell}: " + " | ".join(r.history) for row in rows for r in row.cells
               if len(r.history) > 1 or any("started" in h for h in r.history)]
    out.append(("Run history (cells submitted more than once)", history or ["every cell ran once"]))
    prov = report["provenance"]
    out.append(("Reproducibility", {"header": ["run", "code", "datasets (name:manifest digest)"],
                                    "rows": [list(p) for p in prov["runs"]], "best": set()}))
    if prov["warnings"]:
        out.append(("", [f"WARNING: {w}" for w in prov["warnings"]]))
    if figures.get("curves"):
        out.append(("Curves", figures["curves"]))
    if figures.get("diagnostics"):
        diag = [[row.group, *[summary(row, k) for k in DIAG]] for row in rows]
        out.append(("Diagnostics (pre-trained, mean over seeds)",
                    {"header": ["method", *DIAG.values()], "rows": diag, "best": set()}))
        out.append(("", figures["diagnostics_notes"]))
        out.append(("Diagnostics per layer", [("solid: pre-trained; dashed: random init; ± std over "
                                                "seeds", figures["diagnostics"])]
                    + [(t, u) for t, u in figures.get("more", []) if u]))
    return out


DIAG = {"diagnostics/rankme": "RankMe (representation)", "diagnostics/attn_distance_mean":
        "attention distance, mean over layers (px)", "diagnostics/attn_nmi_mean": "attention NMI, mean",
        "diagnostics/fourier_high_freq_first": "Δ log amplitude, block 1",
        "diagnostics/pairwise_cosine_last": "pairwise cosine, last block",
        "diagnostics/cka_first_last": "CKA block 1 vs last"}


def summary(row: Any, key: str) -> str:
    values = [r.metrics.get("pretrained", {}).get(key) for r in row.cells]
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, std, n = mean_std(values)
    return f"{mean:.3g} ± {std:.2g}" if n > 1 else f"{mean:.3g}"


def markdown(report: dict[str, Any], figures: dict[str, Any], title: str) -> str:
    lines = [f"# {title}", "", f"Generated {time.strftime('%Y-%m-%d %H:%M')}. Figures: see the HTML report.", ""]
    for heading, content in sections(report, figures):
        if heading:
            lines += [f"## {heading}", ""]
        if isinstance(content, dict):
            lines.append("| " + " | ".join(content["header"]) + " |")
            lines.append("|" + "---|" * len(content["header"]))
            for i, row in enumerate(content["rows"]):
                lines.append("| " + " | ".join(f"**{c}**" if (i, j) in content["best"] else str(c)
                                               for j, c in enumerate(row)) + " |")
        elif content and isinstance(content[0], tuple):
            lines += [f"- figure: {t}" for t, _ in content]
        else:
            lines += [f"- {line}" if heading else line for line in content]
        lines.append("")
    return "\n".join(lines)


def html(report: dict[str, Any], figures: dict[str, Any], title: str) -> str:
    e = htmllib.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>"
             f"<p class='note'>Generated {time.strftime('%Y-%m-%d %H:%M')} by evaluation/report.py.</p>"]
    for heading, content in sections(report, figures):
        if heading:
            parts.append(f"<h2>{e(heading)}</h2>")
        if isinstance(content, dict):
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in content["header"]) + "</tr>")
            for i, row in enumerate(content["rows"]):
                parts.append("<tr>" + "".join(
                    f"<td class='best'>{e(str(c))} ★</td>" if (i, j) in content["best"] else f"<td>{e(str(c))}</td>"
                    for j, c in enumerate(row)) + "</tr>")
            parts.append("</table>")
        elif content and isinstance(content[0], tuple):
            parts.append("<div class='figs'>" + "".join(
                f"<figure><img alt='{e(t)}' src='{uri}'><figcaption class='note'>{e(t)}</figcaption></figure>"
                for t, uri in content) + "</div>")
        else:
            parts += [f"<p class='{'warn' if line.startswith('WARNING') else 'note'}'>{e(line)}</p>" for line in content]
    parts.append(CHECK + "</body></html>")
    return "\n".join(parts)
