"""A sweep of two methods x 2 seeds on the real local SLURM cluster: job arrays with
``aftercorr``, one cell's pre-training killed, ``--resume`` finishing only that cell, and the
report built from it -- also looked at in a real browser (headless Chromium)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import PYTHON, REPO, submit

# two methods with different losses and pre-training recipes are enough for arrays, resume and
# the report (test_pipeline.py runs all five through SLURM); five cost ~75 s more here
METHODS = ("mae", "lut")
KILLED = "lut-seed1"                      # the last task of the pre-training array
CLAIMS = """
arms: {mae: {method: mae}, lut: {method: lut}}
claims:
  - {id: lut.knn, paper: LUT, sentence: more discriminative, treatment: lut, control: mae,
     metric: knn/top1, direction: higher, min_effect: 1.0}
  - {id: lut.span, paper: LUT, sentence: wider attention, treatment: lut, control: mae,
     metric: diagnostics/layer/attn_distance@last, direction: higher, min_effect: 0.5}
"""
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def scontrol(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def states(sweep_dir: Path) -> dict[str, dict[str, str]]:
    """cell -> job -> state, from each cell's status records (what --status reads first)."""
    out = {}
    for cell in json.loads((sweep_dir / "sweep.json").read_text())["cells"]:
        jobs = sweep_dir / cell / "jobs"
        out[cell] = {p.name.split(".")[0]: json.loads(p.read_text())["state"] for p in jobs.glob("*.status.json")}
    return out


def wait_until(predicate, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def sweep_left_the_queue() -> bool:
    """No job of this sweep (its array jobs are named ``acc-<job>``) is queued or running; an
    earlier test's leftovers (a failed test's never-satisfiable job) are not this sweep's."""
    names = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
    return not any(n.startswith("acc-") for n in names)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, slurm_cluster, data_root):
    root = tmp_path_factory.mktemp("sweeps")
    r = submit("--method", ",".join(METHODS), "--seeds", "0,1", "--preset", "smoke", "--cluster", "slurm",
               "--sweep-name", "acc", "--set", f"data.root={data_root}", "--set", f"runs_root={root}",
               "--set", "evals=[knn, diagnostics]", "--set", "eval.baselines=[]")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sweep_dir = root / "acc"
    record = json.loads((sweep_dir / "sweep.json").read_text())
    arrays = record["submissions"][0]["arrays"]
    # one array per job, one task per cell, evaluations aftercorr on the pre-training array
    pre = next(a for a in arrays if a["job"] == "pretrain")
    shown = {a["job"]: scontrol(f"{a['id']}_0") for a in arrays}
    index = pre["cells"].index(KILLED)
    # kill one cell's pre-training once it has checkpointed (step 4 of 16)
    killed = f"{pre['id']}_{index}"
    log = sweep_dir / KILLED / "logs" / "pretrain.log"
    wait_until(lambda: log.is_file() and re.search(r" step ([4-9]|1\d)/", log.read_text()), f"{killed} step 4", 600)
    subprocess.run(["scancel", killed], check=True)
    # the killed cell's evaluations can never start (slurmctld says so at its next pass);
    # --resume resubmits that cell at once and leaves the others, still running, alone
    stuck = [f"{a['id']}_{index}" for a in arrays if a["job"] != "pretrain"]
    wait_until(lambda: all(scontrol(j).get("Reason") == "DependencyNeverSatisfied" for j in stuck),
               "the killed cell's evaluations marked never to start", 120)
    status = submit("--status", str(sweep_dir))
    resume = submit("--resume", str(sweep_dir))
    wait_until(sweep_left_the_queue, "every cell, the resumed one too", 900)
    again = submit("--resume", str(sweep_dir))
    html, md = sweep_dir / "report.html", sweep_dir / "report.md"
    claims = root / "claims.yaml"           # the two methods as arms: a final metric and a layer's
    claims.write_text(CLAIMS)
    report = subprocess.run([PYTHON, "-m", "evaluation.report", "--sweep", str(sweep_dir), "--html", str(html),
                             "--md", str(md), "--claims", str(claims)], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    yield {"dir": sweep_dir, "record": record, "arrays": arrays, "shown": shown, "submit": r, "status": status,
           "resume": resume, "again": again, "report": report, "html": html, "md": md}


def test_sweep_arrays_kill_resume_and_report(sweep):
    arrays, shown = sweep["arrays"], sweep["shown"]
    assert [a["job"] for a in arrays] == ["pretrain", "knn", "diagnostics"]
    assert all(len(a["cells"]) == 2 * len(METHODS) for a in arrays)
    pre = arrays[0]
    for a in arrays:                                # as SLURM itself shows them
        assert shown[a["job"]]["ArrayJobId"] == a["id"] and shown[a["job"]]["ArrayTaskId"] == "0"
    for a in arrays[1:]:
        assert a["dependency"] == f"aftercorr:{pre['id']}"
        assert shown[a["job"]]["Dependency"].startswith(f"aftercorr:{pre['id']}_")
    assert set(sweep["record"]["cells"]) == {f"{m}-seed{s}" for m in METHODS for s in (0, 1)}

    # --status named the killed cell's jobs; --resume resubmitted that cell only
    assert re.search(rf"{KILLED}\s+lut\s+1\s+(CANCELLED|STOPPED)\s+NEVER STARTS\s+NEVER STARTS", sweep["status"].stdout), sweep["status"].stdout
    assert sweep["resume"].returncode == 0, sweep["resume"].stdout + sweep["resume"].stderr
    assert re.findall(r"^(\S+): resubmitting", sweep["resume"].stdout, re.M) == [KILLED]
    record = json.loads((sweep["dir"] / "sweep.json").read_text())
    second = record["submissions"][1]
    assert second["kind"] == "resume" and list(second["cells"]) == [KILLED]
    assert second["cells"][KILLED]["before"]["knn"] == "NEVER STARTS"
    assert "nothing to resume" in sweep["again"].stdout and len(record["submissions"]) == 2
    final = states(sweep["dir"])
    assert all(set(s.values()) == {"COMPLETED"} and len(s) == 3 for s in final.values()), final
    for cell in record["cells"]:                    # the others did not run again
        starts = (sweep["dir"] / cell / "logs" / "starts.log").read_text().splitlines()
        assert len(starts) == (2 if cell == KILLED else 1), (cell, starts)
        evaluations = list((sweep["dir"] / cell / "evals" / "state").glob("*/starts.log"))
        assert len(evaluations) == 3 and all(len(e.read_text().splitlines()) == 1 for e in evaluations), cell

    # MLflow: one sweep parent, ten cell runs under it, each with its two evaluations
    tracking = record["tracking"]
    client = MlflowClient(tracking["uri"])
    cells = client.search_runs([tracking["experiment_id"]], f"tags.mlflow.parentRunId = '{tracking['run_id']}'")
    assert sorted(c.data.tags["cell"] for c in cells) == sorted(record["cells"])
    for c in cells:
        assert c.info.status == "FINISHED" and c.data.tags["sweep"] == "acc"
        assert c.data.tags["git_commit"] and c.data.tags["seed"] in ("0", "1")
        assert [d.dataset.name for d in c.inputs.dataset_inputs] == ["fmnist"]
        evals = client.search_runs([tracking["experiment_id"]], f"tags.mlflow.parentRunId = '{c.info.run_id}'")
        assert sorted(e.info.run_name for e in evals) == ["diagnostics", "diagnostics[random_init]", "knn"]
        assert all(e.data.tags["cell"] == c.data.tags["cell"] for e in evals)
        assert all(e.info.status == "FINISHED" for e in evals)
        diag = next(e for e in evals if e.info.run_name == "diagnostics")
        assert [m.step for m in client.get_metric_history(diag.info.run_id, "layer/attn_distance")] == [1, 2]
        assert diag.data.params["recipe.cka"].startswith("linear, debiased")

    # the report: 5 rows with mean +- std (n=2), the diagnostics of every method, the history
    assert sweep["report"].returncode == 0, sweep["report"].stderr[-3000:]
    md = sweep["md"].read_text()
    for m in METHODS:
        stat = r"(\*\*)?\d+\.\d\d ± \d+\.\d\d \(n=2\)(\*\*)?"          # ** marks the best
        assert re.search(rf"^\| {m} \| 0, 1 \| {stat} \| {stat} \|", md, re.M), m
        assert re.search(rf"^\| {m} \| \d", md.split("## Diagnostics (pre-trained")[1], re.M), m
    # pre-training of the killed cell continued from its checkpoint, not from scratch
    resumed = (sweep["dir"] / KILLED / "logs" / "pretrain.log").read_text()
    at = re.findall(r"resumed from step_\d+ at step (\d+)", resumed)
    assert len(at) == 1 and 4 <= int(at[0]) < 16, resumed[-2000:]
    assert re.search(rf"{KILLED}: pre-training started 2 times .*submission 1 \(submit.*\| submission 2 \(resume.*before it: pretrain (CANCELLED|STOPPED), knn NEVER STARTS", md)
    assert "n too small for p < 0.05" in md
    # the claims, read from MLflow: knn's final top-1 and block 2's attention distance, 2 seeds each
    claims = [line for line in md.split("## Claims")[1].split("\n## ")[0].splitlines() if line.startswith("| lut.")]
    assert len(claims) == 2 and all("(n=2)" in line and "no data" not in line for line in claims), claims
    assert all(re.search(r"\| (holds|not shown at this n|contradicted) \(", line) for line in claims), claims
    html = sweep["html"].read_text()
    for figure in ("train/loss", "train/lr", "train/img_per_s", "pretrain/val/rankme", "pretrain/val/pairwise_cosine",
                   "solid: pre-trained", "singular value spectrum",
                   "CKA with the baseline per layer"):
        assert f"alt='{figure}" in html, figure
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", html)       # nothing from the network
    artifacts = [f.path for f in client.list_artifacts(tracking["run_id"], "report")]
    assert sorted(artifacts) == ["report/report.html", "report/report.md"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium (Debian package) is not installed")
def test_report_renders_in_headless_chromium(sweep, tmp_path):
    """Every table and figure rendered, no image broken, no request left the machine."""
    html = sweep["html"]
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=5000"]
    dom = subprocess.run([*base, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'data-rendered="([^"]+)"', dom.stdout)
    assert found, dom.stderr[-2000:]
    rendered = json.loads(found.group(1).replace("&quot;", '"'))
    text = html.read_text()
    assert rendered == {"tables": text.count("<table>"), "images": text.count("<img "), "broken": 0}
    assert rendered["tables"] >= 5 and rendered["images"] >= 8     # methods, differences, encoders,
    # reproducibility, diagnostics; curves, diagnostics per layer, spectrum, CKA
    shot = tmp_path / "report.png"
    subprocess.run([*base, "--window-size=1400,3000", f"--screenshot={shot}", html.as_uri()],
                   capture_output=True, timeout=120, check=True)
    import numpy as np
    from PIL import Image
    image = Image.open(shot).convert("L")
    assert image.size == (1400, 3000)
    assert len(np.unique(np.asarray(image))) > 50      # tables and plots, not a blank page
