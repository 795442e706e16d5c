"""The report's Claims section from hand-made run results: values per arm (final metrics and
per-layer diagnostics), the verdicts, the markdown, and the HTML in headless Chromium."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from evaluation import report
from evaluation.report_claims import judge_claims, metric_value
from evaluation.report_data import RunResult
from evaluation.report_render import html, markdown
from evaluation.report_stats import CONTRADICTED, HOLDS, NOT_SHOWN
from evaluation.report_tables import build
from hpc_mim.claims import load_claims, parse_metric

CLAIMS = {
    "arms": {"mae": {"method": "mae"}, "lut": {"method": "lut"},
             "latent_mim": {"method": "latent_mim"},
             "latent_mim-online_target": {"method": "latent_mim", "set": ["method.latent_mim.target=online"]}},
    "claims": [
        {"id": "lut.probe", "paper": "LUT (arXiv 2310.13593)", "sentence": "more discriminative",
         "treatment": "lut", "control": "mae", "metric": "linear_probe/top1", "direction": "higher",
         "min_effect": 1.0},
        {"id": "latent.cosine", "paper": "LatentMIM", "sentence": "no collapse", "treatment": "latent_mim",
         "control": "latent_mim-online_target", "metric": "diagnostics/layer/pairwise_cosine@last",
         "direction": "lower", "min_effect": 0.05},
        {"id": "latent.cosine2", "paper": "LatentMIM", "sentence": "no collapse at block 2",
         "treatment": "latent_mim", "control": "latent_mim-online_target",
         "metric": "diagnostics/layer/pairwise_cosine@2", "direction": "lower", "min_effect": 0.05},
        {"id": "lut.rankme", "paper": "LUT", "sentence": "flatter spectrum", "treatment": "lut",
         "control": "mae", "metric": "diagnostics/rankme", "direction": "higher", "min_effect": 1.0}]}


def run(arm: str, seed: int, probe: float | None = None, cosine: list[float] | None = None) -> RunResult:
    r = RunResult(f"{arm}-seed{seed}", arm, arm.split("-")[0], seed, Path(f"/runs/claims/{arm}-seed{seed}"),
                  status="FINISHED")
    r.jobs = {"linear_probe": "linear_probe", "diagnostics": "diagnostics"}
    r.metrics = {"pretrained": {} if probe is None else {"linear_probe/top1": probe}}
    if cosine is not None:          # per layer, logged at steps 1..depth
        r.layers = {"pretrained": {"layer/pairwise_cosine": (np.arange(1.0, len(cosine) + 1), np.array(cosine))}}
    r.provenance = {"git_commit": "abc", "git_dirty": "false", "datasets": "fmnist:1"}
    return r


@pytest.fixture
def claims(tmp_path):
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(CLAIMS, sort_keys=False))
    return load_claims(path)


def results() -> list[RunResult]:
    out = [run("mae", s, p) for s, p in enumerate([70.0, 71.0, 72.0])]
    out += [run("lut", s, p) for s, p in enumerate([70.5, 71.5, 72.5])]
    out += [run("latent_mim", s, cosine=[0.5, 0.40 + s / 100, 0.30 + s / 100]) for s in range(3)]
    out += [run("latent_mim-online_target", s, cosine=[0.6, 0.42 + s / 100, 0.95 + s / 100]) for s in range(3)]
    return out


def test_metric_values_final_and_per_layer():
    r = run("latent_mim", 0, 80.0, cosine=[0.5, 0.4, 0.3])
    assert metric_value(r, parse_metric("linear_probe/top1", "f")) == 80.0
    assert metric_value(r, parse_metric("diagnostics/layer/pairwise_cosine@last", "f")) == pytest.approx(0.3)
    assert metric_value(r, parse_metric("diagnostics/layer/pairwise_cosine@1", "f")) == pytest.approx(0.5)
    assert metric_value(r, parse_metric("diagnostics/layer/pairwise_cosine@9", "f")) is None
    assert metric_value(r, parse_metric("knn/top1", "f")) is None


def test_claims_are_judged_on_their_arms(claims):
    judged = {j.claim.id: j for j in judge_claims(claims, results())}
    probe = judged["lut.probe"]               # +0.5, interval [-1.77, 2.77]: 32 seeds would settle it
    assert (probe.control, probe.treatment) == ([70.0, 71.0, 72.0], [70.5, 71.5, 72.5])
    assert probe.verdict.verdict == NOT_SHOWN and probe.verdict.n_to_settle == 32
    cosine = judged["latent.cosine"]          # last block: 0.30-0.32 vs 0.95-0.97, lower is better
    assert cosine.verdict.verdict == HOLDS and cosine.verdict.delta == pytest.approx(-0.65)
    at2 = judged["latent.cosine2"]            # block 2: 0.40-0.42 vs 0.42-0.44: -0.02, sd 0.01
    assert at2.verdict.verdict == CONTRADICTED   # interval [-0.043, 0.003] lies short of 0.05
    rankme = judged["lut.rankme"]             # never logged: no data, the cells named
    assert rankme.verdict is None and rankme.missing == ["mae-seed0", "mae-seed1", "mae-seed2",
                                                         "lut-seed0", "lut-seed1", "lut-seed2"]
    partial = judge_claims(claims, [r for r in results() if r.cell != "lut-seed2"])
    assert partial[0].verdict.n_treatment == 2 and partial[0].missing == []
    none = judge_claims(claims, [r for r in results() if r.group != "lut"])
    assert none[0].missing == ["lut (no run)"]


def page(claims) -> tuple[dict, str]:
    rep = build(results(), "mae")
    rep["claims"], rep["claims_file"] = judge_claims(claims, results()), "claims.yaml"
    return rep, markdown(rep, {}, "Sweep claims")


def test_markdown_section(claims):
    _, md = page(claims)
    section = md.split("## Claims")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(rows) == 5                     # header + 4 claims
    assert rows[1].startswith("| lut.probe | LUT (arXiv 2310.13593): more discriminative | lut: 71.5 ± 1 (n=3) "
                              "| mae: 71 ± 1 (n=3) | linear_probe/top1 (higher; counts from 1) | +0.5 [-1.77, +2.77] "
                              "| 0.573 / 0.700 | not shown at this n (the interval includes both 0 and 1) | 32 |")
    assert "| holds (lower by 0.65 >= 0.05, interval excludes 0) | settled |" in rows[2]
    assert "no data: mae-seed0" in rows[4]
    assert "Welch's t" in section and "Claims file: claims.yaml." in section


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium (Debian package) is not installed")
def test_the_claims_section_renders_in_headless_chromium(claims, tmp_path):
    rep, _ = page(claims)
    path = tmp_path / "report.html"
    path.write_text(html(rep, {}, "Sweep claims"))
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                          "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=3000",
                          "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'data-rendered="([^"]+)"', dom.stdout)
    assert found, dom.stderr[-2000:]
    rendered = json.loads(found.group(1).replace("&quot;", '"'))
    assert rendered == {"tables": path.read_text().count("<table>"), "images": 0, "broken": 0}
    claims_table = dom.stdout.split("<h2>Claims</h2>")[1].split("</table>")[0]
    assert claims_table.count("<tr>") == 5 and "latent.cosine2" in claims_table
    assert "contradicted (the interval excludes an effect of 0.05 or more)" in claims_table


def test_cli_refuses_a_bad_claims_file_before_reading_anything(tmp_path, capsys):
    bad = tmp_path / "claims.yaml"
    bad.write_text(yaml.safe_dump({**CLAIMS, "claims": [{**CLAIMS["claims"][0], "direction": "up"}]}))
    with pytest.raises(SystemExit) as e:
        report.main(["--sweep", str(tmp_path / "no-such-sweep"), "--claims", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --claims:" in err and "claim lut.probe: direction 'up'" in err
    with pytest.raises(SystemExit) as e:
        report.main(["--sweep", "x", "--min-effect", "-1"])
    assert e.value.code == 2
