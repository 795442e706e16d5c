"""End to end: jobs/submit.py -> pre-training (DeepSpeed ZeRO-2, 2 processes over gloo) ->
chained kNN and linear-probe jobs -> MLflow parent + child runs. On the real local SLURM
cluster (2 pretend nodes, one task each) and with --cluster local."""
import json
import re
import shutil
import subprocess
import sys
import time

import pytest
import timm
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, submit
from hpc_mim.config import load_config
from hpc_mim.methods import REGISTRY, build_method
from hpc_mim.models.vit import load_encoder


def scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                         check=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def check_mlflow(run_dir, evals=("knn", "linear_probe"), method="mae"):
    tracking = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(tracking["uri"])
    parent = client.get_run(tracking["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["method.name"] == method and parent.data.params["train.zero_stage"] == "2"
    assert len(client.get_metric_history(parent.info.run_id, "train/loss")) >= 4
    # what reproduces it: code version, the resolved config, the dataset's manifest digest
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert parent.data.tags["git_commit"] == head.stdout.strip()
    assert parent.data.tags["git_dirty"] in ("true", "false")
    assert "config.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    experiment = client.get_experiment(tracking["experiment_id"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"   # model training
    (data,) = parent.inputs.dataset_inputs
    assert data.dataset.name == "fmnist" and len(data.dataset.digest) == 16
    assert json.loads(data.dataset.profile)["manifest_sha256"].startswith(data.dataset.digest)
    cfg = load_config(method, "smoke")
    for term in build_method(cfg.model, cfg.method).terms:     # every named loss term is logged
        assert client.get_metric_history(parent.info.run_id, f"train/{term}"), term
    check_timm_export(run_dir, parent, client)
    children = client.search_runs([tracking["experiment_id"]],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == sorted(evals)
    for child in children:
        assert child.info.status == "FINISHED"
        assert 10.0 <= child.data.metrics["top1"] <= 100.0     # 10 classes: chance is 10%
    return by_name


def check_timm_export(run_dir, parent, client):
    """Pre-training wrote the encoder in timm's format beside encoder.pt and logged both; timm
    loads it (as the README says) and gives encoder.pt's tokens; its config names the run's code
    version, dataset digest and the steps trained."""
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id, "timm")) == \
        ["timm/config.json", "timm/model.safetensors"]
    assert "encoder.pt" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    meta = json.loads((run_dir / "timm" / "config.json").read_text())["hpc_mim"]
    (data,) = parent.inputs.dataset_inputs
    assert meta["git_commit"] == parent.data.tags["git_commit"]
    assert meta["dataset_sha256"] == json.loads(data.dataset.profile)["manifest_sha256"]
    steps = client.get_metric_history(parent.info.run_id, "train/loss")
    assert meta["trained_steps"] == max(m.step for m in steps)
    encoder = load_encoder(run_dir / "encoder.pt").eval()
    model = timm.create_model(f"local-dir:{run_dir / 'timm'}", pretrained=True, num_classes=0).eval()
    size = encoder.config["img_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model.forward_features(x) - encoder(x)).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def five_pipelines(tmp_path_factory, slurm_cluster, data_root) -> dict[str, dict]:
    """Every method's pipeline submitted at once (they are independent; four 2-node
    pre-trainings fit the pretend nodes side by side), each with what SLURM showed right after
    its submission, then waited for together. method -> ids, run_dir, submitted, states."""
    root = tmp_path_factory.mktemp("pipelines")
    runs: dict[str, dict] = {}
    for method in sorted(REGISTRY):
        r = submit("--method", method, "--preset", "smoke", "--nodes", "2", "--cluster", "slurm",
                   "--set", f"data.root={data_root}", "--set", f"runs_root={root / method}",
                   "--set", "name=e2e")
        ids = dict(re.findall(r"queued (\w+)\s+job (\d+)", r.stdout))
        shown = {name: scontrol(job) for name, job in ids.items()} if r.returncode == 0 else {}
        runs[method] = {"submit": r, "ids": ids, "shown": shown, "run_dir": root / method / "e2e"}
    for run in runs.values():
        run["states"] = wait_for(run["ids"]) if run["ids"] else {}
    return runs


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_slurm_two_nodes_zero2_then_chained_evals(five_pipelines, method):
    run = five_pipelines[method]
    assert run["submit"].returncode == 0, run["submit"].stderr
    ids, shown = run["ids"], run["shown"]
    assert set(ids) == {"pretrain", "knn", "linear_probe"}
    pre = ids["pretrain"]
    # the evaluations waited on pre-training in the scheduler itself (as shown at submission)
    for name in ("knn", "linear_probe"):
        info = shown[name]
        assert info["Dependency"].startswith(f"afterok:{pre}"), info["Dependency"]
        assert info["JobState"] in ("PENDING", "COMPLETED", "RUNNING")
        if shown["pretrain"]["JobState"] in ("PENDING", "RUNNING"):
            assert info["JobState"] == "PENDING" and info["Reason"] == "Dependency"
    pre_info = shown["pretrain"]
    assert pre_info["NumNodes"].split("-")[0] == "2" and pre_info["NumTasks"] == "2"  # "2-2" while pending

    run_dir = run["run_dir"]
    logs = "\n".join(p.read_text() for p in (run_dir / "jobs").rglob("*_log.*"))
    assert run["states"] == {"pretrain": "COMPLETED", "knn": "COMPLETED", "linear_probe": "COMPLETED"}, logs[-4000:]
    # evaluations started only after pre-training ended
    starts = {n: scontrol(i)["StartTime"] for n, i in ids.items()}
    assert starts["knn"] >= scontrol(pre)["EndTime"] and starts["linear_probe"] >= scontrol(pre)["EndTime"]
    # two processes, ZeRO-2, gloo; both ranks ran (one log per task)
    assert "batch 64 = 32 x 2 ranks x 1 accum), ZeRO-2 fp32" in logs
    assert len(list((run_dir / "jobs" / "pretrain").rglob("*_1_log.out"))) == 1
    assert (run_dir / "encoder.pt").is_file() and (run_dir / "checkpoints" / "latest").is_file()
    assert f"start: {method}," in logs
    check_mlflow(run_dir, method=method)


ALL_EVALS = ("knn", "linear_probe", "finetune", "segmentation", "detection")


def wait_for(ids: dict[str, str], timeout: float = 600) -> dict[str, str]:
    deadline = time.time() + timeout
    while True:
        states = {n: scontrol(i)["JobState"] for n, i in ids.items()}
        if all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states.values()) \
                or time.time() > deadline:
            return states
        time.sleep(1)


def test_slurm_all_five_evaluations_chained_and_one_failure_stops_no_other(tmp_path, slurm_cluster, data_root):
    data = tmp_path / "data"                          # a private copy: the test breaks one file
    shutil.copytree(data_root, data)
    r = submit("--method", "mae", "--preset", "smoke", "--nodes", "2", "--cluster", "slurm",
               "--set", f"data.root={data}", "--set", f"runs_root={tmp_path}", "--set", "name=all",
               "--set", f"evals=[{','.join(ALL_EVALS)}]")
    assert r.returncode == 0, r.stderr
    ids = dict(re.findall(r"queued (\w+)\s+job (\d+)", r.stdout))
    assert set(ids) == {"pretrain", *ALL_EVALS}
    for name in ALL_EVALS:                            # each waits on pre-training only
        assert scontrol(ids[name])["Dependency"].startswith(f"afterok:{ids['pretrain']}")
    # the COCO validation file is corrupted after submission: detection fails in its job
    (data / "fmnist_scenes" / "coco" / "annotations" / "instances_val2017.json").write_text("{truncated")
    states = wait_for(ids)
    run_dir = tmp_path / "all"
    logs = "\n".join(p.read_text() for p in (run_dir / "jobs").rglob("*_log.*"))
    assert states == {"pretrain": "COMPLETED", "knn": "COMPLETED", "linear_probe": "COMPLETED",
                      "finetune": "COMPLETED", "segmentation": "COMPLETED", "detection": "FAILED"}, logs[-5000:]

    tracking = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(tracking["uri"])
    children = {c.info.run_name: c for c in client.search_runs(
        [tracking["experiment_id"]], f"tags.mlflow.parentRunId = '{tracking['run_id']}'")}
    assert sorted(children) == sorted(ALL_EVALS)
    for name, metric in (("knn", "top1"), ("linear_probe", "top1"), ("finetune", "top1"),
                         ("segmentation", "miou")):
        assert children[name].info.status == "FINISHED" and metric in children[name].data.metrics, name
    assert 0 <= children["segmentation"].data.metrics["pixel_acc"] <= 100
    assert children["finetune"].data.metrics["top5"] >= children["finetune"].data.metrics["top1"]
    failed = children["detection"]
    assert failed.info.status == "FAILED" and "JSONDecodeError" in failed.data.tags["error"]

    status = submit("--status", str(run_dir))
    assert status.returncode == 1, status.stdout + status.stderr
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
    assert re.search(r"detection\s+\d+\s+FAILED\s+detection FAILED\s+JSONDecodeError", rows["detection"])
    for name in ("pretrain", *ALL_EVALS[:-1]):
        assert re.search(rf"{name}\s+{ids[name]}\s+COMPLETED\s+\S*\s*FINISHED", rows[name]), rows[name]


def test_local_cluster_pipeline(tmp_path, data_root):
    r = submit("--method", "mae", "--preset", "smoke", "--cluster", "local", "--tasks-per-node", "2",
               "--set", f"data.root={data_root}", "--set", f"runs_root={tmp_path}", "--set", "name=loc",
               "--set", "eval.baselines=[pixels]")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"knn\s+ok", r.stdout) and re.search(r"linear_probe\s+ok", r.stdout)
    # each job's progress as it ran, from its log (jobs/follow.py), between its "running" line
    # and the next; not the libraries' lines, not the checkpoints
    shown = r.stdout.split("running pretrain", 1)[1].split("running knn", 1)[0]
    assert re.search(r"\n  \[pretrain\] start: mae, ", shown), shown
    assert re.search(r"\n  \[pretrain\] epoch \d+ step (\d+)/\1 loss [\d.]+ .* eta 0.0 min\n", shown), shown
    assert "exported encoder to" in shown and "checkpoint step_" not in shown and "[INFO]" not in shown
    probe = r.stdout.split("running linear_probe", 1)[1]
    assert re.search(r"\n  \[eval\] linear_probe: .*top1=", probe), probe
    # where to see the runs: the MLflow page that opens on the runs table, not the GenAI pages
    experiment = json.loads((tmp_path / "loc" / "tracking.json").read_text())["experiment_id"]
    assert (f"runs in MLflow: mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db, then "
            f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning") in r.stdout
    run_dir = tmp_path / "loc"
    children = check_mlflow(run_dir, evals=("knn", "linear_probe", "knn[pixels]", "linear_probe[pixels]"))
    assert children["knn[pixels]"].data.tags["baseline"] == "pixels"
    assert json.loads((run_dir / "evals" / "knn.json").read_text())["top1"] > 0
    report = subprocess.run([sys.executable, "-m", "evaluation.report", "--run-dir", str(run_dir)],
                            capture_output=True, text=True)
    assert report.returncode == 0 and "pretrained" in report.stdout and "pixels" in report.stdout
    check_stages(run_dir)


def check_stages(run_dir):
    """Where the time went: every job's wall time, its recorded stages, logged to MLflow."""
    out = subprocess.run([sys.executable, "-m", "jobs.stages", str(run_dir), "--extra", "data conversion=7",
                          "--log-mlflow", "--json", str(run_dir / "stages.json")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((run_dir / "stages.json").read_text())
    jobs = {r["job"]: r["seconds"] for r in rows if not r["stage"]}
    assert set(jobs) == {"data conversion", "pretrain", "knn", "linear_probe"} and jobs["data conversion"] == 7
    stages = {(r["job"], r["stage"]): r["seconds"] for r in rows if r["stage"]}
    assert {("pretrain", "training loop"), ("pretrain", "export"), ("knn", "pretrained"),
            ("knn", "pixels"), ("linear_probe", "pixels")} <= set(stages)
    for job in ("pretrain", "knn", "linear_probe"):        # the stages fit inside the job's wall time
        inner = sum(s for (j, _), s in stages.items() if j == job)
        assert 0 < inner <= jobs[job] + 0.5, (job, inner, jobs[job])
    tracking = json.loads((run_dir / "tracking.json").read_text())
    metrics = MlflowClient(tracking["uri"]).get_run(tracking["run_id"]).data.metrics
    assert metrics["time/pretrain/training_loop_s"] == pytest.approx(stages[("pretrain", "training loop")])
    assert metrics["time/total_s"] == pytest.approx(sum(jobs.values()))


def test_local_failed_pretraining_starts_no_evaluation(tmp_path, data_root):
    # 16 images cannot fill one batch of 64: pre-training fails in the job, after submission
    r = submit("--method", "mae", "--preset", "smoke", "--cluster", "local",
               "--set", f"data.root={data_root}", "--set", f"runs_root={tmp_path}", "--set", "name=bad",
               "--set", "data.max_train_samples=16")
    assert r.returncode == 1
    assert re.search(r"pretrain\s+FAILED: .*fewer than one optimizer step", r.stdout), r.stdout[-2000:]
    assert re.search(r"knn\s+not started: pretrain did not succeed", r.stdout)
    assert not (tmp_path / "bad" / "evals" / "knn.json").exists()
    tracking = json.loads((tmp_path / "bad" / "tracking.json").read_text())
    parent = MlflowClient(tracking["uri"]).get_run(tracking["run_id"])
    assert parent.info.status == "FAILED" and "fewer than one optimizer step" in parent.data.tags["error"]


def test_slurm_nan_loss_stops_keeps_last_good_checkpoint_and_no_evaluation_starts(tmp_path, slurm_cluster, data_root):
    """An absurd learning rate makes the loss NaN at step 3: the job fails (no requeue), the
    message names the step and the loss terms, step 2's checkpoint is still ``latest`` and
    loads, the MLflow run is FAILED, and the chained evaluations never start."""
    from hpc_mim.distributed.deepspeed import consolidated_state_dict

    r = submit("--method", "mae", "--preset", "smoke", "--nodes", "2", "--cluster", "slurm",
               "--set", f"data.root={data_root}", "--set", f"runs_root={tmp_path}", "--set", "name=nan",
               "--set", "train.blr=1e30", "--set", "checkpoint.every_steps=1")
    assert r.returncode == 0, r.stderr
    ids = dict(re.findall(r"queued (\w+)\s+job (\d+)", r.stdout))
    deadline = time.time() + 300
    while scontrol(ids["pretrain"])["JobState"] != "FAILED":
        assert time.time() < deadline, scontrol(ids["pretrain"])
        time.sleep(2)
    run_dir = tmp_path / "nan"
    message = "non-finite loss at step 3 (epoch 0); terms on rank 0: loss=nan"
    assert message in (run_dir / "logs" / "pretrain.log").read_text()
    assert scontrol(ids["pretrain"])["Restarts"] == "0"              # a NaN is not requeued
    latest = (run_dir / "checkpoints" / "latest").read_text()
    assert latest == "step_00000002"
    assert consolidated_state_dict(run_dir / "checkpoints", latest)   # loads
    for name in ("knn", "linear_probe"):
        # slurmctld marks a dependency unsatisfiable on its next scheduling pass, not at once
        deadline = time.time() + 120
        while (info := scontrol(ids[name]))["Reason"] == "Dependency" and time.time() < deadline:
            time.sleep(2)
        assert info["JobState"] == "PENDING" and info["Reason"] == "DependencyNeverSatisfied", info
    # --status while they are still queued: the scheduler's reason, told plainly
    status = submit("--status", str(run_dir))
    rows = {line.split()[0]: line for line in status.stdout.splitlines() if line.strip()}
    for name in ("knn", "linear_probe"):
        assert "NEVER STARTS" in rows[name] and "pretrain did not succeed" in rows[name], status.stdout
    for name in ("knn", "linear_probe"):
        subprocess.run(["scancel", ids[name]], check=True)

    tracking = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(tracking["uri"])
    parent = client.get_run(tracking["run_id"])
    assert parent.info.status == "FAILED" and message in parent.data.tags["error"]
    assert not client.search_runs([tracking["experiment_id"]],
                                  f"tags.mlflow.parentRunId = '{tracking['run_id']}'")
    status = submit("--status", str(run_dir))
    assert status.returncode == 1 and "FloatingPointError: non-finite loss at step 3" in status.stdout


def eval_run(root, name: str, data_root):
    """A run directory without pre-training (enough for the random-init baseline)."""
    from hpc_mim import tracking
    from hpc_mim.config import save_config
    from hpc_mim.rundir import RunDir
    cfg = load_config("mae", "smoke", overrides=[f"data.root={data_root}"])
    run = RunDir(root / name).create()
    save_config(cfg, run.config)
    uri = tracking.default_uri(root)
    exp = tracking.ensure_experiment(uri, "test")
    parent = tracking.MLflowLogger.create_run(uri, exp, name)
    run.write_tracking({"uri": uri, "experiment_id": exp, "run_id": parent.run_id})
    return run


def test_random_init_baseline_is_computed_once_per_key(tmp_path, data_root):
    def knn(run, *sets):
        r = subprocess.run([sys.executable, "-m", "evaluation.knn", "--run-dir", str(run.root),
                            "--baseline", "random_init", *[a for s in sets for a in ("--set", s)]],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    def child(run):
        tracking = run.read_tracking()
        (c,) = MlflowClient(tracking["uri"]).search_runs(
            [tracking["experiment_id"]], f"tags.mlflow.parentRunId = '{tracking['run_id']}'")
        return c

    a, b = eval_run(tmp_path, "a", data_root), eval_run(tmp_path, "b", data_root)
    assert "reused" not in knn(a)
    (entry,) = (tmp_path / ".baseline_cache").glob("knn-*.json")
    assert json.loads(entry.read_text())["run_dir"] == str(a.root)
    assert "reused_from" not in child(a).data.tags
    out = knn(b)                                          # same architecture, settings, seed
    assert f"reused from {a.root}" in out
    reused = child(b)
    assert reused.data.tags["reused_from"].startswith(str(a.root)) and reused.info.status == "FINISHED"
    assert reused.data.metrics == child(a).data.metrics
    assert json.loads((b.evals / "knn[random_init].json").read_text()) == \
        json.loads((a.evals / "knn[random_init].json").read_text())
    (line,) = b.read_stages()
    assert line["stage"] == "random_init" and line["reused_from"].startswith(str(a.root))
    # another setting is another key: computed, not reused
    c = eval_run(tmp_path, "c", data_root)
    assert "reused" not in knn(c, "eval.knn.ks=[5]")
    assert len(list((tmp_path / ".baseline_cache").glob("knn-*.json"))) == 2
