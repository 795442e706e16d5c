"""The report's tables and pages from hand-made run results (the sweep test builds one from real
runs on SLURM)."""
from pathlib import Path

import numpy as np
import pytest

from evaluation.report_data import RunResult
from evaluation.report_render import html, markdown
from evaluation.report_tables import build, versus_random

VIT_B_IMAGENET = {"data.dataset": "imagenet", "model.embed_dim": "768", "model.depth": "12",
                  "model.patch_size": "16"}


def result(method: str, seed: int, knn: float | None, commit: str = "abc", data: str = "fmnist:1",
           config: dict | None = None, **curves) -> RunResult:
    r = RunResult(f"{method}-seed{seed}", method, method, seed, Path(f"/runs/{method}-seed{seed}"),
                  status="FINISHED", config=config or {})
    r.jobs = {"knn": "knn"}
    r.job_status = {"pretrained": {"knn": "FINISHED" if knn is not None else "FAILED"}}
    r.metrics = {"pretrained": {"knn/top1": knn} if knn is not None else {}}
    r.provenance = {"git_commit": commit, "git_dirty": "false", "datasets": data}
    r.curves = {k: (np.array([1.0, 2.0, 3.0]), np.array(v)) for k, v in curves.items()}
    return r


def test_table_rows_best_differences_and_missing():
    runs = [result("mae", 0, 70.0), result("mae", 1, 72.0), result("mae", 2, 71.0),
            result("lut", 0, 75.0), result("lut", 1, 76.0), result("lut", 2, None)]
    report = build(runs, baseline="mae")
    rows = {r.group: r for r in report["rows"]}
    assert rows["mae"].values["knn/top1"] == [70.0, 72.0, 71.0]
    assert rows["lut"].values["knn/top1"] == [75.0, 76.0]           # the failed seed is not a value
    assert rows["lut"].best == {"knn/top1"} and not rows["mae"].best
    diff = rows["lut"].diffs["knn/top1"]
    assert diff.delta == pytest.approx(75.5 - 71.0)
    assert diff.min_p == pytest.approx(1 / 10) and diff.too_small       # 3 vs 2: 1 / C(5, 2)
    assert report["missing"] == [("lut-seed2", "knn/top1", "FAILED")]
    md = markdown(report, {}, "t")
    assert "| lut | 0, 1, 2 | **75.50 ± 0.71 (n=2)** |" in md
    assert "| mae | 0, 1, 2 | 71.00 ± 1.00 (n=3) |" in md
    assert "lut-seed2: knn/top1 — FAILED" in md and "n too small for p < 0.05" in md
    assert "WARNING" not in md


def test_rows_that_differ_in_code_or_data_are_warned_about():
    runs = [result("mae", 0, 70.0, commit="aaa"), result("lut", 0, 71.0, commit="bbb", data="fmnist:2")]
    warnings = build(runs)["provenance"]["warnings"]
    assert any("different code versions: aaa, bbb" in w for w in warnings)
    assert any("different data: fmnist:1 vs fmnist:2" in w for w in warnings)


def test_paper_column_only_where_the_config_matches_a_paper_setting():
    runs = [result("mae", 0, 60.0, config={**VIT_B_IMAGENET, "train.epochs": "1600"}),
            result("latent_mim", 0, 50.0, config={**VIT_B_IMAGENET, "train.epochs": "800",
                                                  "eval.knn.protocol": "latentmim"}),
            result("lut", 0, 55.0, config={**VIT_B_IMAGENET, "model.depth": "24"})]
    rows = {r.group: r for r in build(runs)["rows"]}
    assert rows["mae"].paper["linear_probe/top1"][0] == 68.0
    assert rows["latent_mim"].paper["knn/loo_top1"][0] == 50.1
    assert rows["lut"].paper == {}                                    # ViT-L: no paper figure here


def paper(method: str, **config) -> dict:
    return build([result(method, 0, 1.0, config={**VIT_B_IMAGENET, **config})])["rows"][0].paper


def test_paper_figures_need_the_same_epochs_and_protocol_and_name_their_source():
    # MAE's ViT-B figures are 1600-epoch ones: none next to mae.yaml's 800 epochs
    assert paper("mae", **{"train.epochs": "800", "eval.finetune.protocol": "mae"}) == {}
    mae = paper("mae", **{"train.epochs": "1600", "eval.finetune.protocol": "mae"})
    assert mae["finetune/top1"][0] == 83.6 and "Table 3" in mae["finetune/top1"][1]
    assert "FINETUNE.md" in mae["linear_probe/top1"][1]
    # LUT's 84.2 is its own fine-tuning recipe: shown under protocol lut only
    lut = {"train.epochs": "1600"}
    assert "finetune/top1" not in paper("lut", **lut, **{"eval.finetune.protocol": "mae"})
    assert paper("lut", **lut, **{"eval.finetune.protocol": "lut"})["finetune/top1"][0] == 84.2
    assert paper("lut", **{"train.epochs": "800", "eval.finetune.protocol": "lut"}) == {}
    # LatentMIM's 1-NN figure under its own kNN protocol only; its other figures regardless
    lmim = {"train.epochs": "800", "eval.finetune.protocol": "mae"}
    dino = paper("latent_mim", **lmim, **{"eval.knn.protocol": "dino"})
    assert "knn/loo_top1" not in dino and "knn/top1" not in dino
    assert (dino["linear_probe/top1"][0], dino["finetune/top1"][0]) == (72.0, 83.0)
    assert "README" in paper("latent_mim", **lmim, **{"eval.knn.protocol": "latentmim"})["knn/loo_top1"][1]
    # UMD's 100-shot figure: B/4 at 64 px, 800 epochs, eval.fewshot with 100 shots first
    umd = {"model.img_size": "64", "model.patch_size": "4", "train.epochs": "800",
           "eval.fewshot.l2_reg": "1024.0", "eval.fewshot.pooling": "cls"}
    assert paper("umd", **umd, **{"eval.fewshot.shots": "[100]"})["fewshot/top1"][0] == 31.8
    assert paper("umd", **umd, **{"eval.fewshot.shots": "[10, 100]"}) == {}


def test_every_paper_entry_names_a_source_and_reads_the_resolved_configs_keys():
    from dataclasses import asdict

    import yaml

    from evaluation.report_tables import PAPERS, matches
    from hpc_mim.config import load_config
    from hpc_mim.tracking import flatten
    entries = yaml.safe_load(PAPERS.read_text())
    keys = set(flatten(asdict(load_config("mae"))))
    for entry in entries:
        assert entry["source"].strip() and entry["figures"]
        assert set(entry["when"]) <= keys, set(entry["when"]) - keys   # a typo would never match
    # each method's own config: UMD's recipe is its paper's setting; MAE's 800 epochs is not
    shown = {m: {k for e in entries if e["method"] == m and
                 matches(flatten(asdict(load_config(m))), e["when"]) for k in e["figures"]}
             for m in ("mae", "latent_mim", "lut", "umd")}
    assert shown == {"mae": set(), "latent_mim": {"linear_probe/top1", "finetune/top1"},
                     "lut": set(), "umd": {"fewshot/top1"}}


def test_a_knn_column_per_protocol_reported_and_rows_on_different_protocols_are_warned():
    dino, lmim = result("mae", 0, 70.0), result("lut", 0, None)
    lmim.metrics = {"pretrained": {"knn/loo_top1": 40.0}}
    lmim.job_status = {"pretrained": {"knn": "FINISHED"}}
    dino.config, lmim.config = {"eval.knn.protocol": "dino"}, {"eval.knn.protocol": "latentmim"}
    report = build([dino, lmim])
    assert [c.key for c in report["columns"]] == ["knn/top1", "knn/loo_top1"]
    assert any("different evaluation protocols (eval.knn.protocol: dino, latentmim)" in w
               for w in report["provenance"]["warnings"])
    assert [c.key for c in build([dino])["columns"]] == ["knn/top1"]   # no empty loo column


def test_best_rule_takes_the_curve_maximum():
    runs = [result("mae", 0, 70.0, **{"knn/val/top1": [60.0, 74.0, 70.0]})]
    last = build(runs)["rows"][0].values["knn/top1"]
    best = build(runs, rules={"knn/top1": "best"})["rows"][0].values["knn/top1"]
    assert (last, best) == ([70.0], [74.0])


def test_html_is_self_contained():
    runs = [result("mae", s, 70.0 + s, **{"train/loss": [3.0, 2.0, 1.0 + s]}) for s in (0, 1)]
    from evaluation.report_figures import curve_figures
    report = build(runs)
    page = html(report, {"curves": curve_figures(report["rows"])}, "t")
    assert page.count("<img ") == 1 and "src='data:image/svg+xml;base64," in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    assert "<style>" in page and "data-rendered" in page


def test_pretrained_vs_random_init_gives_a_verdict_only_when_the_seeds_allow_one():
    """One seed cannot tell (the demo's +0.14 probe points were called "pre-training helps");
    with 3 seeds the claims' rule: the 95% Welch interval excludes 0 and the gain is >= 1."""
    r = result("mae", 0, 72.0)
    r.jobs["segmentation"] = "segmentation"
    r.metrics = {"pretrained": {"knn/top1": 72.0, "segmentation/miou": 20.0},
                 "random_init": {"knn/top1": 64.5, "segmentation/miou": 22.5}}
    r.reused = {"knn": "/runs/demo-a (MLflow run 123)"}
    md = markdown(build([r]), {}, "t")
    assert "## Pre-trained vs random init at this budget" in md
    assert ("| mae | knn/top1 | 72.00 (n=1) | 64.50 (n=1)* | +7.50 | cannot tell at this n (one seed: "
            "no spread to judge by (run 3+ seeds)) |") in md
    assert "| mae | segmentation/miou | 20.00 (n=1) | 22.50 (n=1) | -2.50 | cannot tell at this n" in md
    assert "helps" not in md.split("## Pre-trained vs random init")[1].split("##")[0].replace(
        "\"pre-training helps\"", "")
    assert "* random-init figures reused from /runs/demo-a (MLflow run 123)" in md
    runs = []
    for seed, (pre, rnd, seg_pre, seg_rnd) in enumerate([(72, 64, 20.1, 20.0), (73, 65, 20.3, 20.1),
                                                         (74, 66, 20.2, 20.2)]):
        x = result("mae", seed, pre)
        x.jobs["segmentation"] = "segmentation"
        x.metrics = {"pretrained": {"knn/top1": pre, "segmentation/miou": seg_pre},
                     "random_init": {"knn/top1": rnd, "segmentation/miou": seg_rnd}}
        runs.append(x)
    rows = {(row[0], row[1]): row for row in versus_random(build(runs)["rows"], build(runs)["columns"])}
    # knn: +8 +- 1 and 1: interval [5.73, 10.27] (t(4) = 2.776, se 0.816)
    assert rows[("mae", "knn/top1")][4:] == ["+8.00", "pre-training helps (by >= 1)"]
    # miou: +0.1, sd 0.1 each: interval [-0.13, 0.33] lies below 1
    assert rows[("mae", "segmentation/miou")][4:] == ["+0.10", "pre-training does not help by 1 or more"]
    # at min_effect 0.05 the +0.1 counts, but its interval includes 0: t(2n-2) 0.1 sqrt(2/n) < 0.1
    # first at n = 9 (t(16) = 2.120 x 0.471 = 0.999; n = 8: t(14) = 2.145 x 0.5 = 1.07)
    assert versus_random(build(runs)["rows"], build(runs)["columns"], min_effect=0.05)[1][5] == \
        "cannot tell at this n (about 9 seeds would settle it)"


def test_one_method_has_no_best_cells_and_no_difference_table():
    runs = [result("mae", s, 70.0 + s) for s in (0, 1)]
    report = build(runs)
    assert not report["rows"][0].best
    md = markdown(report, {}, "t")
    assert "## Difference to" not in md and "**" not in md and "One row: nothing to rank." in md
    assert "★" not in html(report, {}, "t")


def test_a_curve_of_one_point_is_drawn_with_a_marker_and_its_spread_as_an_error_bar():
    """The demo's detection val/* is logged once (at its last step): a line of one point drew
    empty axes."""
    import matplotlib.pyplot as plt

    from evaluation.report_figures import band
    fig, ax = plt.subplots()
    band(ax, [(np.array([40.0]), np.array([12.0])), (np.array([40.0]), np.array([14.0]))], "mae", "C0")
    (line,) = ax.lines[:1]
    assert line.get_marker() == "o" and list(line.get_xydata()[0]) == [40.0, 13.0]
    caps = [c for c in ax.containers]                      # the error bar: mean +- std over seeds
    assert len(caps) == 1
    segment = caps[0].lines[2][0].get_segments()[0]
    assert np.allclose(segment, [[40.0, 13.0 - np.sqrt(2)], [40.0, 13.0 + np.sqrt(2)]])
    long = [(np.arange(100.0), np.arange(100.0))]
    fig2, ax2 = plt.subplots()
    band(ax2, long, "mae", "C0")
    assert ax2.lines[0].get_marker() in (None, "None", "")  # a dense curve stays a plain line
    plt.close(fig)
    plt.close(fig2)
