"""jobs/submit.py before anything runs: dry-run output and validation, against real SLURM."""
from pathlib import Path

from conftest import queued_since, squeue_ids, submit

# Multi-node dry runs on this machine (--cluster auto is slurm where sbatch is on PATH) with the
# default sqlite store: these tests look at the plan, so they opt in to the file store that
# jobs/submit.py otherwise refuses for a multi-node SLURM submission (the preset smoke opts in too).
ONE_MACHINE = ("--set", "tracking.allow_file_store=true")


def test_dry_run_prints_plan_and_sbatch_scripts_and_queues_nothing(tmp_path, slurm_cluster):
    before = squeue_ids()
    r = submit("--method", "mae", "--nodes", "2", "--dry-run", "--set", f"runs_root={tmp_path}",
               "--set", "name=dry", *ONE_MACHINE)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "pretrain" in out and "knn" in out and "linear_probe" in out
    assert "2 x 1" in out                                    # nodes x tasks of pre-training
    assert out.count("#!/bin/bash") == 3                     # one sbatch script per job
    assert "#SBATCH --nodes=2" in out
    assert out.count("#SBATCH --dependency='afterok:<pretrain job id>'") == 2
    assert "#SBATCH --signal=USR2@" in out                   # submitit's pre-timeout warning
    assert not (tmp_path / "dry").exists() and not (tmp_path / "mlflow.db").exists()
    assert not queued_since(before)


def test_bad_config_fails_before_anything_is_queued(tmp_path, slurm_cluster, data_root):
    before = squeue_ids()
    cases = {                       # override -> what the one-line error must say
        "train.epochz=3": "unknown config key 'train.epochz' (--set train.epochz=3); did you mean 'train.epochs'?",
        "train.epochs=three": "train.epochs: expected int, got 'three'",
        "method.mask_ratio=1.0": "method.mask_ratio: 1.0 must be in [0, 1)",
        "train.micro_batch_size=48": "train.batch_size: 64 is not a multiple of train.micro_batch_size=48",
        "cluster.tasks_per_node=3": "not divisible by train.micro_batch_size x world size = 32 x 6",
        "evals=[knn, segmentaton]": "segmentaton",
        "runs_root=/proc/hpc_mim_runs": "runs_root: /proc/hpc_mim_runs is not writable",
        f"runs_root={tmp_path / 'a_file' / 'runs'}": "is not a folder",
        "tracking.uri=http://127.0.0.1:9": "tracking.uri: cannot create the MLflow run at http://127.0.0.1:9",
    }
    (tmp_path / "a_file").write_text("")
    for override, message in cases.items():
        r = submit("--method", "mae", "--preset", "smoke", "--nodes", "2", "--cluster", "slurm",
                   "--set", f"data.root={data_root}", "--set", f"runs_root={tmp_path}", "--set", override)
        assert r.returncode == 2 and message in r.stderr, (override, r.stderr)
        assert not queued_since(before), override
    r = submit("--method", "mae", "--preset", "smoke", "--cluster", "slurm",
               "--set", f"data.root={tmp_path / 'nowhere'}", "--set", f"runs_root={tmp_path}")
    assert r.returncode == 2 and "nowhere/fmnist/train.beton not found" in r.stderr
    assert "data_prep.fashion_mnist" in r.stderr             # says how to make it
    assert not queued_since(before)
    assert [p.name for p in Path(tmp_path).iterdir()] == ["a_file"]     # nothing created


def test_missing_evaluation_dataset_is_named_before_anything_is_queued(tmp_path, slurm_cluster, data_root):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(data_root / "fmnist", data / "fmnist")       # no composed scenes here
    before = squeue_ids()
    r = submit("--method", "mae", "--preset", "smoke", "--cluster", "slurm", "--set", f"data.root={data}",
               "--set", f"runs_root={tmp_path / 'runs'}", "--set", "evals=[knn,segmentation]")
    assert r.returncode == 2
    assert "evals (segmentation)=fmnist_scenes_ade" in r.stderr and "images/training not found" in r.stderr
    assert "data_prep.scenes" in r.stderr                     # says how to make it
    assert not queued_since(before) and not (tmp_path / "runs").exists()


def test_dry_run_lists_one_job_per_evals_entry(tmp_path):
    r = submit("--method", "mae", "--preset", "smoke", "--nodes", "2", "--dry-run",
               "--set", f"runs_root={tmp_path}", "--set", "evals=[knn,linear_probe:cub,segmentation:ade20k]")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("#!/bin/bash") == 4
    assert "linear_probe:cub" in r.stdout and "segmentation:ade20k" in r.stdout
    assert r.stdout.count("#SBATCH --dependency='afterok:<pretrain job id>'") == 3


def plan_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        if len(cells) == 7 and cells[1].endswith(":main"):
            rows[cells[0]] = cells
    return rows


def test_evaluation_resources_default_to_the_paper_protocol_scale_and_are_validated(tmp_path):
    every = "evals=[knn, linear_probe, finetune, segmentation, detection]"
    r = submit("--method", "mae", "--nodes", "8", "--gpus-per-node", "8", "--dry-run",
               "--set", f"runs_root={tmp_path}", "--set", every, "--set", "eval.detection.time_min=900",
               *ONE_MACHINE)
    assert r.returncode == 0, r.stderr
    rows = plan_rows(r.stdout)
    # fine-tuning and detection on as many GPUs as pre-training; segmentation (batch 16 = 2 per
    # GPU) and the frozen-feature evaluations on one node of 8
    want = {"pretrain": "8 x 8", "finetune": "8 x 8", "detection": "8 x 8", "segmentation": "1 x 8",
            "knn": "1 x 8", "linear_probe": "1 x 8"}
    assert {k: v[2] for k, v in rows.items()} == want, r.stdout
    assert all(v[4] == "8" for v in rows.values())                     # GPUs per node
    assert rows["detection"][5] == "900 min" and rows["finetune"][5] == "60 min"
    assert r.stdout.count("#SBATCH --nodes=8") == 3

    tiny = submit("--method", "mae", "--preset", "fmnist_tiny", "--nodes", "2", "--dry-run",
                  "--set", "train.micro_batch_size=128",
                  "--set", f"runs_root={tmp_path}", "--set", every, *ONE_MACHINE)
    assert {k: v[2] for k, v in plan_rows(tiny.stdout).items() if k != "pretrain"} == \
        {k: "1 x 1" for k in want if k != "pretrain"}                   # a preset: one process each

    bad = submit("--method", "mae", "--nodes", "8", "--gpus-per-node", "8", "--dry-run",
                 "--set", f"runs_root={tmp_path}", "--set", every, "--set", "eval.segmentation.batch_size=12",
                 *ONE_MACHINE)
    assert bad.returncode == 2
    assert "eval.segmentation.batch_size: 12 does not divide over 1 node(s) x 8 task(s)" in bad.stderr


# ------------------------------------------------------------------ the MLflow store on a cluster

def test_file_stores_and_servers_are_told_apart():
    from jobs.runs import is_file_store
    for uri in ("", "sqlite:////shared/runs/mlflow.db", "file:///shared/mlruns", "/shared/mlruns", "mlruns"):
        assert is_file_store(uri), uri
    for uri in ("http://mlflow-host:5000", "https://mlflow.example.org", "postgresql://u:p@db/mlflow",
                "mysql://u@db/mlflow", "databricks", "databricks://profile"):
        assert not is_file_store(uri), uri


REFUSAL = ("tracking.uri", "from several nodes at once", "mlflow server --backend-store-uri",
           "--host 0.0.0.0 --port 5000", "--set tracking.uri=http://<server host>:5000",
           "--set tracking.allow_file_store=true")


def test_multi_node_slurm_submission_with_a_file_store_is_refused_before_anything_is_created(tmp_path):
    """Several nodes writing one sqlite/file store on a shared file system corrupt it: a
    multi-node SLURM submission (pre-training, or an evaluation, on > 1 node) with a file store
    is refused with exit code 2 and how to run a server, on --dry-run too; one node, --cluster
    local/debug, a server URI, or tracking.allow_file_store=true pass."""
    base = ("--method", "mae", "--cluster", "slurm", "--dry-run", "--set", f"runs_root={tmp_path}")
    refused = {
        "pretrain on 2 nodes": ("--nodes", "2"),
        "finetune on 2 nodes": ("--set", "evals=[knn, finetune]", "--set", "eval.finetune.nodes=2"),
        "an explicit sqlite uri": ("--nodes", "2", "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"),
        "a file: store": ("--nodes", "2", "--tracking-uri", f"file://{tmp_path}/mlruns"),
        "a plain path": ("--nodes", "2", "--tracking-uri", str(tmp_path / "mlruns")),
        "the key false": ("--preset", "smoke", "--nodes", "2", "--set", "tracking.allow_file_store=false"),
    }
    for case, args in refused.items():
        r = submit(*base, *args)
        assert r.returncode == 2, (case, r.returncode, r.stdout[-500:], r.stderr[-500:])
        assert r.stderr.startswith("error: tracking.uri:"), (case, r.stderr)
        for words in REFUSAL:
            assert words in r.stderr, (case, words, r.stderr)
        assert "#!/bin/bash" not in r.stdout, case                  # no plan, no sbatch script
    assert "(finetune on 2 nodes)" in submit(*base, *refused["finetune on 2 nodes"]).stderr
    assert list(tmp_path.iterdir()) == []                           # nothing created

    passes = {
        "opted in": ("--nodes", "2", "--set", "tracking.allow_file_store=true"),
        "a server": ("--nodes", "2", "--tracking-uri", "http://127.0.0.1:5000"),
        "one node": (),
        "the smoke preset (local test cluster)": ("--preset", "smoke", "--nodes", "2"),
    }
    for case, args in passes.items():
        r = submit(*base, *args)
        assert r.returncode == 0 and "#!/bin/bash" in r.stdout, (case, r.stderr[-800:])
    for cluster in ("local", "debug"):                               # one machine
        r = submit("--method", "mae", "--cluster", cluster, "--dry-run", "--nodes", "2",
                   "--set", f"runs_root={tmp_path}")
        assert r.returncode == 0, (cluster, r.stderr[-800:])


def test_refused_submission_queues_nothing_and_writes_no_store(tmp_path, monkeypatch, capsys):
    """Without --dry-run: the refusal comes before the run directory, the MLflow store and
    sbatch (the launcher is replaced by one that fails the test if asked to queue)."""
    from jobs import launcher, submit as submit_module

    def queue(*args, **kwargs):
        raise AssertionError("a job was queued")
    monkeypatch.setattr(launcher.Launcher, "submit_plan", queue)
    monkeypatch.setattr(launcher.Launcher, "submit_array", queue)
    code = submit_module.main(["--method", "mae", "--cluster", "slurm", "--nodes", "2", "--set",
                               f"runs_root={tmp_path}", "--set", "name=wide"])
    err = capsys.readouterr().err
    assert code == 2 and "--set tracking.allow_file_store=true" in err, err
    assert list(tmp_path.iterdir()) == []
