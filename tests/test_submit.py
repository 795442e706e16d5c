"""jobs/submit.py before anything runs: dry-run output and validation, the partition's limits,
the run directory (resolved, claimed atomically, private), and a submission whose later sbatch
fails. Whatever queues, cancels or reads jobs runs against the real local SLURM cluster (the
``slurm_cluster`` fixture); faults of the SLURM commands are injected outside the project's code
(tests/faults/slurm_faults.py: an sbatch that fails one call, a controller that is not there).
The parsing of ``scontrol``/``sinfo`` is tested on their text (this machine's cluster and a
GPU cluster, as they print themselves), and paper-scale plans from the functions a dry run
prints them with: no partition of a 2-node CPU cluster takes them, and none should."""
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ended_state, placeholder_data, queued_since, squeue_ids, submit
from faults.slurm_faults import (
    TIMEOUT,
    failing_sbatch,
    sbatch_calls,
    unreachable_controller,
)

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


def test_dry_run_lists_one_job_per_evals_entry(tmp_path, slurm_cluster):
    before = squeue_ids()
    r = submit("--method", "mae", "--preset", "smoke", "--nodes", "2", "--dry-run",
               "--set", f"runs_root={tmp_path}", "--set", "evals=[knn,linear_probe:cub,segmentation:ade20k]")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("#!/bin/bash") == 4
    assert "linear_probe:cub" in r.stdout and "segmentation:ade20k" in r.stdout
    assert r.stdout.count("#SBATCH --dependency='afterok:<pretrain job id>'") == 3
    assert "note:" not in r.stderr                     # the real partition answered, and takes it
    assert not queued_since(before) and list(tmp_path.iterdir()) == []


def plan_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        if len(cells) == 7 and cells[1].endswith(":main"):
            rows[cells[0]] = cells
    return rows


def planned(*argv: str) -> tuple[dict[str, list[str]], list[str]]:
    """The plan table's rows and the sbatch scripts that ``jobs/submit.py <argv> --dry-run``
    prints, from the functions it builds them with (its config, ``build_plan``,
    ``format_plan``, ``Launcher.sbatch_script``), for plans no partition of this machine's
    cluster takes (8 nodes x 8 GPUs): a dry run refuses them there, as it should."""
    from hpc_mim.config import load_config
    from jobs.launcher import Launcher
    from jobs.plan import build_plan, format_plan
    from jobs.submit import dry_run_dependency, flag_overrides, parse_args
    args = parse_args(list(argv))
    cfg = load_config(args.method, args.preset, args.config, args.set + flag_overrides(args))
    plan = build_plan(cfg, "/runs/paper")
    launcher = Launcher("slurm", Path("/runs/paper/jobs"), cfg.cluster.partition)
    return plan_rows(format_plan(plan)), [launcher.sbatch_script(s, dry_run_dependency(s)) for s in plan]


def test_evaluation_resources_default_to_the_paper_protocol_scale_and_are_validated():
    from hpc_mim.config import ConfigError
    every = "evals=[knn, linear_probe, finetune, segmentation, detection]"
    rows, scripts = planned("--method", "mae", "--nodes", "8", "--gpus-per-node", "8",
                            "--set", every, "--set", "eval.detection.time_min=900")
    # fine-tuning and detection on as many GPUs as pre-training; segmentation (batch 16 = 2 per
    # GPU) and the frozen-feature evaluations on one node of 8
    want = {"pretrain": "8 x 8", "finetune": "8 x 8", "detection": "8 x 8", "segmentation": "1 x 8",
            "knn": "1 x 8", "linear_probe": "1 x 8"}
    assert {k: v[2] for k, v in rows.items()} == want, rows
    assert all(v[4] == "8" for v in rows.values())                     # GPUs per node
    assert rows["detection"][5] == "900 min" and rows["finetune"][5] == "60 min"
    assert sum(s.count("#SBATCH --nodes=8") for s in scripts) == 3
    assert sum("#SBATCH --gpus-per-node=8" in s for s in scripts) == 6

    tiny, _ = planned("--method", "mae", "--preset", "fmnist_tiny", "--nodes", "2",
                      "--set", "train.micro_batch_size=128", "--set", every)
    assert {k: v[2] for k, v in tiny.items() if k != "pretrain"} == \
        {k: "1 x 1" for k in want if k != "pretrain"}                   # a preset: one process each

    with pytest.raises(ConfigError, match="eval.segmentation.batch_size: 12 does not divide over 1 node"
                                          r"\(s\) x 8 task\(s\)"):
        planned("--method", "mae", "--nodes", "8", "--gpus-per-node", "8", "--set", every,
                "--set", "eval.segmentation.batch_size=12")


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


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``jobs/submit.py <argv>`` in this process (the code path of the command; no interpreter
    start per call): exit code, stdout, stderr."""
    from jobs import submit as submit_module
    code = submit_module.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_multi_node_slurm_submission_with_a_file_store_is_refused_before_anything_is_created(
        tmp_path, capsys, slurm_cluster):
    """Several nodes writing one sqlite/file store on a shared file system corrupt it: a
    multi-node SLURM submission (pre-training, or an evaluation, on > 1 node) with a file store
    is refused with exit code 2 and how to run a server, on --dry-run too; one node, --cluster
    local/debug, a server URI, or tracking.allow_file_store=true pass (the real 2-node
    partition takes all of these plans)."""
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
        code, out, err = run_main(capsys, *base, *args)
        assert code == 2, (case, code, out[-500:], err[-500:])
        assert err.startswith("error: tracking.uri:"), (case, err)
        for words in REFUSAL:
            assert words in err, (case, words, err)
        assert "#!/bin/bash" not in out, case                       # no plan, no sbatch script
        if case == "finetune on 2 nodes":
            assert "(finetune on 2 nodes)" in err
    assert list(tmp_path.iterdir()) == []                           # nothing created

    passes = {
        "opted in": ("--nodes", "2", "--set", "tracking.allow_file_store=true"),
        "a server": ("--nodes", "2", "--tracking-uri", "http://127.0.0.1:5000"),
        "one node": (),
        "the smoke preset (local test cluster)": ("--preset", "smoke", "--nodes", "2"),
    }
    for case, args in passes.items():
        code, out, err = run_main(capsys, *base, *args)
        assert code == 0 and "#!/bin/bash" in out and "note:" not in err, (case, err[-800:])
    for cluster in ("local", "debug"):                               # one machine
        code, _, err = run_main(capsys, "--method", "mae", "--cluster", cluster, "--dry-run", "--nodes", "2",
                                "--set", f"runs_root={tmp_path}")
        assert code == 0, (cluster, err[-800:])


def test_refused_submission_queues_nothing_and_writes_no_store(tmp_path, monkeypatch, capsys, slurm_cluster):
    """Without --dry-run: the refusal comes after the real partition's check and before the run
    directory, the MLflow store and sbatch (the launcher is replaced by one that fails the test
    if asked to queue; the real queue gains nothing)."""
    from jobs import launcher
    from jobs import submit as submit_module

    def queue(*args, **kwargs):
        raise AssertionError("a job was queued")
    monkeypatch.setattr(launcher.Launcher, "submit_plan", queue)
    monkeypatch.setattr(launcher.Launcher, "submit_array", queue)
    before = squeue_ids()
    code = submit_module.main(["--method", "mae", "--cluster", "slurm", "--nodes", "2", "--set",
                               f"runs_root={tmp_path}", "--set", "name=wide"])
    err = capsys.readouterr().err
    assert code == 2 and "--set tracking.allow_file_store=true" in err, err
    assert list(tmp_path.iterdir()) == [] and not queued_since(before)


# ------------------------------------------------------------------ the partition's limits

# ``scontrol -a -o show partition`` and ``sinfo -a -h -o "%P|%D|%G"`` as a GPU cluster prints them:
# ``gpu`` (default; 12 nodes with 8 A100s, 4 with 4; MaxNodes=8, MaxTime=7 days) and ``cpu``
GPU_CLUSTER = (
    "PartitionName=gpu AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES "
    "QoS=N/A DefaultTime=01:00:00 DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO "
    "MaxNodes=8 MaxTime=7-00:00:00 MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=gpu[001-016] "
    "PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE "
    "PreemptMode=OFF State=UP TotalCPUs=2048 TotalNodes=16 SelectTypeParameters=NONE "
    "JobDefaults=(null) DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED "
    "TRES=cpu=2048,mem=16000G,node=16,billing=2048,gres/gpu=112\n"
    "PartitionName=cpu AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=NO "
    "QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO "
    "MaxNodes=UNLIMITED MaxTime=01:00:00 MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=cpu[1-2] "
    "PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE "
    "PreemptMode=OFF State=UP TotalCPUs=64 TotalNodes=2 SelectTypeParameters=NONE JobDefaults=(null) "
    "DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=64,mem=256000M,node=2,billing=64\n")
GPU_SINFO = "gpu*|12|gpu:a100:8(S:0-1)\ngpu*|4|gpu:a100:4(S:0)\ncpu|2|(null)\n"

# this machine's test cluster (scripts/local_slurm.sh start 2 4) as it prints itself; the test
# below checks that the real commands still print this
LOCAL_CLUSTER = (
    "PartitionName=debug AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES "
    "QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO "
    "MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=node[1-2] "
    "PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE "
    "PreemptMode=OFF State=UP TotalCPUs=8 TotalNodes=2 SelectTypeParameters=NONE JobDefaults=(null) "
    "DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=8,mem=16000M,node=2,billing=8\n"
    "PartitionName=second AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=NO "
    "QoS=N/A DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO "
    "MaxNodes=UNLIMITED MaxTime=01:00:00 MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=node[1-2] "
    "PriorityJobFactor=1 PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE "
    "PreemptMode=OFF State=UP TotalCPUs=8 TotalNodes=2 SelectTypeParameters=NONE JobDefaults=(null) "
    "DefMemPerNode=UNLIMITED MaxMemPerNode=UNLIMITED TRES=cpu=8,mem=16000M,node=2,billing=8\n")
LOCAL_SINFO = "debug*|2|(null)\nsecond|2|(null)\n"


def partitions(text: str = GPU_CLUSTER, sinfo: str | None = GPU_SINFO) -> dict:
    from jobs.partition import read_partitions
    return read_partitions(text, sinfo)


def test_partition_limits_are_read_from_scontrol_and_sinfo():
    from jobs.partition import gpus_in, parse_minutes
    debug, second = partitions(LOCAL_CLUSTER, LOCAL_SINFO).values()     # this machine's test cluster
    assert (debug.name, debug.default, debug.total_nodes, debug.max_nodes, debug.max_minutes) == \
        ("debug", True, 2, None, None)
    assert debug.gres == [(2, "(null)")] and debug.nodes_with(1) == 0
    assert (second.name, second.default, second.max_minutes) == ("second", False, 60)
    gpu = partitions()
    assert [(p.name, p.default) for p in gpu.values()] == [("gpu", True), ("cpu", False)]
    assert (gpu["gpu"].total_nodes, gpu["gpu"].max_nodes, gpu["gpu"].max_minutes) == (16, 8, 7 * 24 * 60)
    assert (gpu["gpu"].nodes_with(8), gpu["gpu"].nodes_with(4), gpu["cpu"].max_minutes) == (12, 16, 60)
    assert partitions(GPU_CLUSTER, None)["gpu"].gres == []             # sinfo failed: GPUs unknown
    # sbatch(1)'s time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; no limit
    times = {"UNLIMITED": None, "infinite": None, "45": 45, "45:30": 45.5, "01:30:00": 90,
             "1-12": 36 * 60, "1-12:30": 36 * 60 + 30, "2-00:00:00": 2880}
    assert {t: parse_minutes(t) for t in times} == times
    gres = {"gpu:8": 8, "gpu:a100:8(S:0-1)": 8, "gpu:a100:4,gpu:v100:2(S:0)": 6, "(null)": 0,
            "gpu:a100": 1, "gpu:tesla:2(S:0-1),mps:400": 2}
    assert {g: gpus_in(g) for g in gres} == gres


def test_the_local_cluster_prints_its_partitions_as_recorded(slurm_cluster):
    """The real ``scontrol``/``sinfo`` of this machine's cluster read as the recorded text does:
    the parser tests stand on what SLURM prints."""
    from jobs.partition import SCONTROL, SINFO, query
    shown = subprocess.run(SCONTROL, capture_output=True, text=True, check=True).stdout
    listed = subprocess.run(SINFO, capture_output=True, text=True, check=True).stdout
    assert query() == partitions(LOCAL_CLUSTER, LOCAL_SINFO), shown + listed


def test_a_job_that_can_never_start_is_refused_naming_the_key_and_what_the_partition_offers():
    from hpc_mim.config import ConfigError, load_config
    from jobs.partition import check, problems
    from jobs.plan import JobSpec, build_plan

    def refusal(overrides: list[str], parts: dict, partition: str | None = None) -> str | None:
        cfg = load_config("mae", None, [], overrides)
        try:
            check(cfg, build_plan(cfg, "/runs/x"), parts, partition)
        except ConfigError as e:
            return str(e)
        return None

    gpu, local = partitions(), partitions(LOCAL_CLUSTER, LOCAL_SINFO)
    # the case: --nodes 8 on the 2-node cluster
    assert refusal(["cluster.nodes=8"], local) == (
        "cluster.nodes: 8 nodes for pretrain, but partition debug has 2 nodes (TotalNodes=2); "
        "the job would pend forever")
    eight = ["cluster.nodes=8", "cluster.gpus_per_node=8", "cluster.tasks_per_node=8", "cluster.time_min=10080"]
    cpu = ("cluster.partition=cpu", "cluster.time_min=60")
    cases = {
        ("cluster.nodes=16", "cluster.time_min=60"):
            "cluster.nodes: 16 nodes for pretrain, but partition gpu allows at most 8 nodes per job "
            "(MaxNodes=8, TotalNodes=16)",
        ("cluster.nodes=4", "cluster.gpus_per_node=16", "cluster.tasks_per_node=16", "cluster.time_min=60"):
            "cluster.gpus_per_node: 16 GPUs per node for pretrain, but the nodes of partition gpu have at "
            "most 8 (Gres: 12 x gpu:a100:8(S:0-1), 4 x gpu:a100:4(S:0))",
        (*eight, "cluster.time_min=10081"):
            "cluster.time_min: 10081 min for pretrain, but partition gpu allows at most 10080 min "
            "(MaxTime=7-00:00:00)",
        (*cpu, "cluster.gpus_per_node=1"):
            "cluster.gpus_per_node: 1 GPUs per node for pretrain, but the nodes of partition cpu have none "
            "(Gres: 2 x (null))",
        (*cpu, "eval.knn.time_min=90"):
            "eval.knn.time_min: 90 min for knn, but partition cpu allows at most 60 min (MaxTime=01:00:00)",
        (*cpu, "cluster.eval_time_min=61"): "cluster.eval_time_min: 61 min for knn",
        (*cpu, "evals=[knn, finetune]", "eval.finetune.nodes=4"):
            "eval.finetune.nodes: 4 nodes for finetune, but partition cpu has 2 nodes (TotalNodes=2)",
        ("cluster.partition=a100",):
            "cluster.partition: 'a100' is not a partition of this cluster; choose one of: gpu (default), cpu",
    }
    for overrides, message in cases.items():
        got = refusal(list(overrides), gpu)
        assert got is not None and got.startswith(message), (overrides, got)
    assert refusal(eight, gpu) is None                                     # fits, to the minute
    assert refusal(eight, gpu, partition="cpu,gpu") is None               # fits one of a list
    assert refusal(eight, gpu, partition="cpu").startswith("cluster.nodes: 8 nodes for pretrain, but "
                                                           "partition cpu has 2 nodes")
    # more nodes with that many GPUs than the partition has, though MaxNodes would allow them
    roomy = partitions(GPU_CLUSTER.replace("MaxNodes=8", "MaxNodes=UNLIMITED"))
    keys = {"nodes": "cluster.nodes", "gpus": "cluster.gpus_per_node", "time": "cluster.time_min"}
    assert problems(roomy["gpu"], JobSpec("pretrain", "m:f", {}, nodes=14, gpus_per_node=8), keys) == [
        ("cluster.nodes: 14 nodes with 8 GPUs each for pretrain, but partition gpu has 12 such nodes "
         "(Gres: 12 x gpu:a100:8(S:0-1), 4 x gpu:a100:4(S:0))")]


def test_the_partition_check_comes_before_anything_on_dry_run_too(tmp_path, capsys, slurm_cluster):
    """Against the real 2-node cluster (``debug``, the default, no time limit; ``second``, 60
    min; MAE's pre-training asks for 3 days unless ``--time``): exit 2 naming the key and what
    the partition offers, no plan, nothing created or queued; a plan that fits prints with no
    note."""
    before = squeue_ids()
    runs = tmp_path / "runs"
    cases = {
        ("--method", "noised_mim", "--nodes", "8"):
            "error: cluster.nodes: 8 nodes for pretrain, but partition debug has 2 nodes (TotalNodes=2)",
        ("--method", "mae", "--partition", "gpu"):
            "error: cluster.partition: 'gpu' is not a partition of this cluster; choose one of: debug "
            "(default), second",
        ("--method", "mae", "--partition", "second", "--time", "61"):
            "error: cluster.time_min: 61 min for pretrain, but partition second allows at most 60 min "
            "(MaxTime=01:00:00)",
        ("--method", "mae", "--partition", "second", "--time", "60", "--set", "evals=[knn]",
         "--set", "eval.knn.time_min=90"):
            "error: eval.knn.time_min: 90 min for knn, but partition second allows at most 60 min",
    }
    for args, message in cases.items():
        code, out, err = run_main(capsys, *args, "--dry-run", "--set", f"runs_root={runs}")
        assert code == 2 and err.startswith(message), (args, err)
        assert "#SBATCH" not in out
    code, out, err = run_main(capsys, "--method", "mae", "--partition", "second", "--time", "60", "--dry-run",
                              "--set", f"runs_root={runs}")
    assert code == 0 and "#SBATCH --partition=second" in out and "note:" not in err, err
    assert not runs.exists() and not queued_since(before)


def test_an_unreachable_controller_is_a_note_on_a_dry_run_and_an_error_on_a_submission(
        tmp_path, monkeypatch, capsys):
    """slurmctld down (``SLURM_CONF`` names a controller that is not there; the cluster of the
    other tests is not involved): ``scontrol`` retries for ~9 s, a dry run waits at most
    ``DRY_RUN_TIMEOUT_S`` (shortened to 1 s here), then prints its plan and a note; a
    submission is refused, exit 2, nothing created."""
    from jobs import partition
    assert partition.DRY_RUN_TIMEOUT_S < 9           # below scontrol's own retries
    monkeypatch.setattr(partition, "DRY_RUN_TIMEOUT_S", 1.0)
    monkeypatch.setenv("SLURM_CONF", str(unreachable_controller(tmp_path / "down")))
    runs = tmp_path / "runs"
    started = time.monotonic()
    code, out, err = run_main(capsys, "--method", "mae", "--cluster", "slurm", "--dry-run",
                              "--set", f"runs_root={runs}")
    # bounded by the 1 s wait, not scontrol's ~9 s of retries (7 s: room for a loaded machine)
    assert code == 0 and "#SBATCH" in out and time.monotonic() - started < 7, err
    assert ("note: the partition's limits were not checked: the SLURM controller did not answer "
            "(scontrol did not answer within 1 s)") in err
    # the same controller, but scontrol gives up at once (MessageTimeout=1): its own words
    monkeypatch.setenv("SLURM_CONF", str(unreachable_controller(tmp_path / "down_fast", message_timeout=1)))
    code, out, err = run_main(capsys, "--method", "mae", "--cluster", "slurm", "--set", f"runs_root={runs}")
    assert code == 2 and err.startswith(
        "error: cluster.partition: cannot check the partition's limits before queueing: the SLURM controller "
        "did not answer (scontrol show partition: slurm_load_partitions error: Unable to contact slurm "
        "controller (connect failure)); nothing was queued"), err
    assert not runs.exists()


def test_more_nodes_than_the_partition_has_is_refused_before_queueing(tmp_path, slurm_cluster):
    """The issue's case on the real 2-node cluster: it queued an 8-node job that pended forever."""
    before = squeue_ids()
    r = submit("--method", "noised_mim", "--nodes", "8", "--set", f"runs_root={tmp_path}")
    assert r.returncode == 2, r.stdout[-500:] + r.stderr[-500:]
    assert r.stderr.startswith("error: cluster.nodes: 8 nodes") and "2 nodes" in r.stderr, r.stderr
    assert not queued_since(before) and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ run directories

def test_a_run_directory_is_resolved_checked_and_claimed_atomically(tmp_path):
    from hpc_mim.config import ConfigError
    from hpc_mim.rundir import claim, run_dir_path, umask
    root = tmp_path / "runs"
    existing = root / "existing"
    existing.mkdir(parents=True)
    (existing / "config.yaml").write_text("the existing run's")
    assert run_dir_path(root, "new") == root.resolve() / "new"
    # zz/../existing resolves to the existing run (the OS cannot resolve '..' after a folder that
    # does not exist, so an exists() check before resolving passed it)
    for name in ("zz/../existing", "/abs/path", "../../x", "a/b", "..", ".", "", "x\ny"):
        with pytest.raises(ConfigError, match="^name: "):
            run_dir_path(root, name)
    with pytest.raises(ConfigError, match="^runs_root: .*control character"):
        run_dir_path(tmp_path / "a\nb", "x")
    # two submissions racing for one name: the first claims it, the second is refused
    with umask(0):            # whatever the caller's umask, the folder is its owner's only
        first = claim(root / "race")
        with pytest.raises(ConfigError, match="^name: .*race already exists"):
            claim(root / "race")
        assert claim(root / "race", unique=True) == root / "race-2"      # a default name: the next one
        shared = claim(root / "shared", share_with_group=True)
    assert stat.S_IMODE(first.stat().st_mode) == 0o700 and stat.S_IMODE(shared.stat().st_mode) == 0o750
    with pytest.raises(ConfigError, match="already exists"):
        claim(existing)
    assert (existing / "config.yaml").read_text() == "the existing run's"


def test_a_name_that_resolves_to_another_run_touches_nothing(tmp_path, capsys):
    from jobs import submit as submit_module
    runs = tmp_path / "runs"
    (runs / "existing").mkdir(parents=True)
    (runs / "existing" / "config.yaml").write_text("the existing run's")
    data = placeholder_data(tmp_path / "data")
    for name in ("zz/../existing", str(runs / "existing"), "../runs/existing"):
        code = submit_module.main(["--method", "mae", "--preset", "smoke", "--cluster", "local",
                                   "--set", f"runs_root={runs}", "--set", f"data.root={data}", "--set", f"name={name}"])
        assert code == 2 and "name: " in capsys.readouterr().err, name
    assert [p.name for p in runs.iterdir()] == ["existing"]
    assert [p.name for p in (runs / "existing").iterdir()] == ["config.yaml"]
    assert (runs / "existing" / "config.yaml").read_text() == "the existing run's"


def test_no_value_with_a_control_character_reaches_a_batch_script(tmp_path):
    from hpc_mim.config import ConfigError
    from jobs.launcher import Launcher
    from jobs.plan import JobSpec
    spec = JobSpec("pretrain", "m:f", {})
    assert "#SBATCH --partition=gpu\n" in Launcher("slurm", tmp_path, "gpu").sbatch_script(spec)
    for launcher, kwargs, key in ((Launcher("slurm", tmp_path, "gpu\nrm -rf ~"), {}, "cluster.partition"),
                                  (Launcher("slurm", tmp_path), {"partition": "a\rb"}, "cluster.partition"),
                                  (Launcher("slurm", tmp_path), {"job_name": "x\ny"}, "job name"),
                                  (Launcher("slurm", tmp_path / "r\n#SBATCH --x"), {}, "run directory")):
        with pytest.raises(ConfigError, match=f"^{key}: .*control character"):
            launcher.sbatch_script(spec, **kwargs)


# ------------------------------------------------------------------ an sbatch that fails part way

def test_a_failed_sbatch_cancels_what_was_queued_marks_the_run_failed_and_keeps_it_private(
        tmp_path, monkeypatch, capsys, mlflow_uri, slurm_cluster):
    """On the real cluster, the second sbatch failing as it does when slurmctld times out (fault
    injection: tests/faults/slurm_faults.py): the pre-training job queued by the first is
    recorded, cancelled at once (scontrol: CANCELLED) and its record says so, the MLflow run is
    FAILED, exit 2, nothing stays queued. The run directory and everything made in it are the
    owner's only (the caller's umask is 022). A second submission under that name is refused
    before any sbatch and changes nothing."""
    from mlflow.tracking import MlflowClient

    from jobs import submit as submit_module
    shims = failing_sbatch(tmp_path / "bin", fail=(2,))
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    before = squeue_ids()
    runs = tmp_path / "runs"
    args = ["--method", "mae", "--preset", "smoke", "--cluster", "slurm", "--set", f"runs_root={runs}",
            "--set", f"data.root={placeholder_data(tmp_path / 'data')}", "--set", "evals=[knn]",
            "--set", "name=partial", "--set", f"tracking.uri={mlflow_uri}"]
    old = os.umask(0o022)
    try:
        code = submit_module.main(args)
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    run_dir = runs / "partial"
    index = json.loads((run_dir / "jobs" / "jobs.json").read_text())
    job = index["pretrain"]["job_id"]
    assert code == 2 and job and index["knn"]["job_id"] is None, err
    assert (f"error: sbatch of knn failed: {TIMEOUT}; cancelled the jobs queued before it ({job}): "
            "nothing of it stays queued") in err
    assert sbatch_calls(shims) == 2
    assert ended_state(job) == "CANCELLED" and not queued_since(before)
    record = json.loads((run_dir / "jobs" / "pretrain.status.json").read_text())
    assert record["state"] == "CANCELLED" and "sbatch of knn failed" in record["error"]
    tracking = json.loads((run_dir / "tracking.json").read_text())
    assert MlflowClient(tracking["uri"]).get_run(tracking["run_id"]).info.status == "FAILED"
    assert f"MLflow run(s) {tracking['run_id']} marked FAILED" in err
    # private: folders 0700, files 0600 (the artifacts next to the runs too), and the batch
    # script SLURM holds runs the job under the same umask
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    made = [p for p in runs.rglob("*") if not p.is_symlink()]
    assert len(made) > 10 and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in made), \
        [(str(p), oct(p.stat().st_mode)) for p in made if p.stat().st_mode & 0o077]
    script = subprocess.run(["scontrol", "write", "batch_script", job, "-"], capture_output=True, text=True,
                            check=False)
    assert "umask 0077\nexport SLURM_UMASK=0077\n" in script.stdout, script.stdout + script.stderr

    assert "CANCELLED" in run_main(capsys, "--status", str(run_dir))[1]
    mtimes = {p: p.stat().st_mtime_ns for p in runs.rglob("*")}
    assert submit_module.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*")} == mtimes
    assert sbatch_calls(shims) == 2 and not queued_since(before)
