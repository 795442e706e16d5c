"""jobs/submit.py before anything runs: dry-run output and validation, against real SLURM."""
from pathlib import Path

from conftest import queued_since, squeue_ids, submit


def test_dry_run_prints_plan_and_sbatch_scripts_and_queues_nothing(tmp_path, slurm_cluster):
    before = squeue_ids()
    r = submit("--method", "mae", "--nodes", "2", "--dry-run", "--set", f"runs_root={tmp_path}",
               "--set", "name=dry")
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
               "--set", f"runs_root={tmp_path}", "--set", every, "--set", "eval.detection.time_min=900")
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
                  "--set", f"runs_root={tmp_path}", "--set", every)
    assert {k: v[2] for k, v in plan_rows(tiny.stdout).items() if k != "pretrain"} == \
        {k: "1 x 1" for k in want if k != "pretrain"}                   # a preset: one process each

    bad = submit("--method", "mae", "--nodes", "8", "--gpus-per-node", "8", "--dry-run",
                 "--set", f"runs_root={tmp_path}", "--set", every, "--set", "eval.segmentation.batch_size=12")
    assert bad.returncode == 2
    assert "eval.segmentation.batch_size: 12 does not divide over 1 node(s) x 8 task(s)" in bad.stderr
