"""Sweep enumeration, the short form, sweep-file errors, the arrays (each cell on its own
partition), and a sweep whose second array fails to queue, then resumed. The plans and arrays
are pure functions (no scheduler); what a dry run checks and what is queued, cancelled and
resumed runs against the real local SLURM cluster (``slurm_cluster``: partitions ``debug``, the
default, and ``second``), with one failing sbatch injected outside the project's code
(tests/faults/slurm_faults.py)."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess

import pytest
from conftest import ended_state, placeholder_data, queued_since, squeue_ids, submit
from faults.slurm_faults import TIMEOUT, failing_sbatch, sbatch_calls

from hpc_mim.config import ConfigError, load_config
from jobs.plan import build_plan
from jobs.sweep import (
    SweepSpec,
    enumerate_cells,
    from_cli,
    load_sweep_file,
    split_top_level,
)
from jobs.sweep_arrays import plan_arrays


def test_short_form_sweeps_methods_seeds_and_comma_values_but_not_lists():
    spec = from_cli("mae,noised_mim", "0,1,2", ["method.noised_mim.noise_block=0,2",
                                                "eval.knn.ks=[5, 20]", "train.epochs=3"], "smoke", [])
    assert spec.methods == ["mae", "noised_mim"] and spec.seeds == [0, 1, 2]
    assert spec.grid == {"method.noised_mim.noise_block": [0, 2]}
    assert spec.set == ["eval.knn.ks=[5, 20]", "train.epochs=3"]
    cells = enumerate_cells(spec)
    assert len(cells) == 2 * 2 * 3
    assert cells[0].id == "mae-noise_block0-seed0" and cells[-1].id == "noised_mim-noise_block2-seed2"
    assert cells[-1].overrides() == ["method.noised_mim.noise_block=2", "train.seed=2"]
    # stable: the same sweep enumerates the same ids in the same order
    assert [c.id for c in enumerate_cells(spec)] == [c.id for c in cells]
    assert from_cli("mae", None, ["train.epochs=3"], None, []) is None        # one run, no sweep
    assert split_top_level("[1, 2],{a: 1, b: 2}, x") == ["[1, 2]", "{a: 1, b: 2}", "x"]


def test_seed_is_the_runs_train_seed():
    (cell,) = enumerate_cells(SweepSpec("s", ["mae"], [7]))
    cfg = load_config("mae", "smoke", [], cell.overrides())
    assert cfg.train.seed == 7


def test_sweep_file_errors_name_the_file_and_key(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("methods: [mae]\nseed: [0, 1]\n")
    with pytest.raises(ConfigError, match=rf"{f}: unknown key 'seed'"):
        load_sweep_file(f)
    f.write_text("methods: mae\n")
    with pytest.raises(ConfigError, match=rf"{f}: methods must be a list"):
        load_sweep_file(f)
    f.write_text("methods: [mae]\ngrid: {train.epochs: []}\n")
    with pytest.raises(ConfigError, match="train.epochs needs a non-empty list"):
        load_sweep_file(f)
    f.write_text("name: a b\nmethods: [mae]\n")
    with pytest.raises(ConfigError, match="sweep name 'a b'"):
        load_sweep_file(f)
    with pytest.raises(ConfigError, match="no such file"):
        load_sweep_file(tmp_path / "missing.yaml")
    for seeds in ("[[1]]", "[x]", "[-1]", "[true]", f"[{2 ** 32}]"):    # a TypeError or worse before
        f.write_text(f"methods: [mae]\nseeds: {seeds}\n")
        with pytest.raises(ConfigError, match="sweep seeds: .* is not a seed"):
            load_sweep_file(f)
    f.write_bytes(b"methods: [mae]\nname: caf\xe9\n")                   # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match=rf"--sweep {f}: cannot be read as UTF-8"):
        load_sweep_file(f)


def test_bad_cell_is_refused_before_anything_is_created(tmp_path):
    r = submit("--method", "mae,nope", "--seeds", "0,1", "--preset", "smoke", "--cluster", "local",
               "--set", f"runs_root={tmp_path}", "--sweep-name", "bad")
    assert r.returncode == 2 and "cell nope-seed0:" in r.stderr and "nope" in r.stderr
    assert not (tmp_path / "bad").exists()


def plans(n: int, evals: str = "[knn, linear_probe]") -> dict:
    cfg = load_config("mae", "smoke", [], [f"evals={evals}"])
    return {f"c{i}": build_plan(cfg, f"/runs/c{i}") for i in range(n)}


def test_arrays_chunk_under_max_array_size_and_pair_evaluations_with_their_pretraining():
    arrays = plan_arrays(plans(7), "", max_size=3)
    assert [(a.job, a.cells) for a in arrays[:3]] == [("pretrain", ["c0", "c1", "c2"]),
                                                       ("knn", ["c0", "c1", "c2"]),
                                                       ("linear_probe", ["c0", "c1", "c2"])]
    assert [len(a.cells) for a in arrays] == [3, 3, 3, 3, 3, 3, 1, 1, 1]
    for a in arrays:         # each evaluation array after the pre-training array of its chunk
        if a.job == "pretrain":
            assert a.after is None
        else:
            assert arrays[a.after].job == "pretrain" and arrays[a.after].cells == a.cells
    assert [s.kwargs["run_dir"] for s in arrays[4].specs] == ["/runs/c3", "/runs/c4", "/runs/c5"]


def test_cells_with_other_resources_get_their_own_arrays():
    mixed = {**plans(2), **{f"d{i}": p for i, p in enumerate(plans(2, "[knn]").values())}}
    arrays = plan_arrays(mixed, "", max_size=100)
    assert [(a.job, a.cells) for a in arrays] == [("pretrain", ["c0", "c1"]), ("knn", ["c0", "c1"]),
                                                   ("linear_probe", ["c0", "c1"]),
                                                   ("pretrain", ["d0", "d1"]), ("knn", ["d0", "d1"])]


def test_dry_run_lists_cells_arrays_and_array_scripts(tmp_path, slurm_cluster):
    before = squeue_ids()
    r = submit("--method", "mae,lut", "--seeds", "0,1", "--preset", "smoke", "--dry-run",
               "--set", f"runs_root={tmp_path}", "--sweep-name", "dry", "--set", "evals=[knn]")
    assert r.returncode == 0, r.stderr
    for cell in ("mae-seed0", "mae-seed1", "lut-seed0", "lut-seed1"):
        assert f"{cell} " in r.stdout
    assert "#SBATCH --array=0-3%4" in r.stdout and "#SBATCH --dependency='aftercorr:<array 0>'" in r.stdout
    assert "#SBATCH --job-name=dry-knn" in r.stdout
    assert "note:" not in r.stderr                     # the real partition answered, and takes it
    assert not (tmp_path / "dry").exists() and not queued_since(before)


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``jobs/submit.py <argv>`` in this process: exit code, stdout, stderr."""
    from jobs import submit as submit_module
    code = submit_module.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sweep_to_slurm_with_a_file_store_is_refused_unless_opted_in(tmp_path, capsys, slurm_cluster):
    """A sweep's cells run side by side on several nodes: with a file-based MLflow store
    (here the default sqlite) a SLURM submission is refused, exit code 2, before anything is
    created or queued (--dry-run shows the same error); the sweep file's or the command line's
    ``tracking.allow_file_store=true``, a server URI, or --cluster local let it through."""
    before = squeue_ids()
    runs = tmp_path / "runs"
    sweep = tmp_path / "wide.yaml"
    sweep.write_text('name: wide\nmethods: [mae, lut]\nseeds: [0, 1]\nset: ["evals=[knn]"]\n')
    for extra in (("--dry-run",), ()):       # without --dry-run it stops before the data check
        code, out, err = run_main(capsys, "--sweep", str(sweep), "--cluster", "slurm", *extra,
                                  "--set", f"runs_root={runs}")
        assert code == 2, (extra, out[-500:], err[-500:])
        assert err.startswith("error: tracking.uri:") and "a sweep of 4 cells" in err, err
        for words in ("mlflow server --backend-store-uri", "--set tracking.uri=http://<server host>:5000",
                      "--set tracking.allow_file_store=true"):
            assert words in err, (words, err)
        assert "#SBATCH" not in out and "cell(s)" not in out
    code, _, err = run_main(capsys, "--method", "mae,lut", "--cluster", "slurm", "--dry-run",
                            "--set", f"runs_root={runs}", "--sweep-name", "short")
    assert code == 2 and "a sweep of 2 cells" in err, err
    assert not runs.exists()                 # no sweep folder, no store

    opted = tmp_path / "opted.yaml"
    opted.write_text(sweep.read_text().replace('set: ["evals=[knn]"]',
                                               'set: ["evals=[knn]", tracking.allow_file_store=true]'))
    for args in (("--sweep", str(opted), "--cluster", "slurm"),
                 ("--sweep", str(sweep), "--cluster", "slurm", "--set", "tracking.allow_file_store=true"),
                 ("--sweep", str(sweep), "--cluster", "slurm", "--tracking-uri", "http://127.0.0.1:5000"),
                 ("--sweep", str(sweep), "--cluster", "local")):
        code, out, err = run_main(capsys, *args, "--dry-run", "--set", f"runs_root={runs}")
        assert code == 0 and "4 cell(s)" in out and "note:" not in err, (args, err[-800:])
    assert not runs.exists() and not queued_since(before)


# ------------------------------------------------------------------ cell ids are folder names

def test_a_method_name_cannot_reach_a_path(tmp_path):
    """A sweep file's method ``../../x`` became the cell id ``../../x-seed0`` and so the run
    directory ``<runs_root>/<sweep>/../../x-seed0``."""
    f = tmp_path / "evil.yaml"
    f.write_text("methods: [mae, ../../x]\n")
    with pytest.raises(ConfigError, match=re.escape(f"{f}: sweep methods: '../../x' is not a method name")):
        load_sweep_file(f)
    with pytest.raises(ConfigError, match="sweep methods: '../methods/mae'"):    # a real file, by a path
        from_cli("mae,../methods/mae", None, [], None, [])
    with pytest.raises(ConfigError, match="cell id 'mae-xa+-seed0' is not a folder name of at most 128"):
        enumerate_cells(SweepSpec("s", ["mae"], [0], grid={"x": ["a" * 200]}))
    with pytest.raises(ConfigError, match=re.escape("sweep name 'a\\nb'")):   # a newline in --sweep-name
        from_cli("mae,lut", None, [], None, [], name="a\nb")


# ------------------------------------------------------------------ a grid over the partition

def test_cells_on_other_partitions_get_their_own_arrays():
    arrays = plan_arrays(plans(4), {"c0": "gpu", "c1": "cpu", "c2": "gpu", "c3": "cpu"}, max_size=100)
    assert [(a.job, a.cells, a.partition) for a in arrays] == [
        ("pretrain", ["c0", "c2"], "gpu"), ("knn", ["c0", "c2"], "gpu"), ("linear_probe", ["c0", "c2"], "gpu"),
        ("pretrain", ["c1", "c3"], "cpu"), ("knn", ["c1", "c3"], "cpu"), ("linear_probe", ["c1", "c3"], "cpu")]
    assert [a.after for a in arrays] == [None, 0, 0, None, 3, 3]


def test_a_grid_over_the_partition_puts_each_cell_on_its_own(tmp_path, slurm_cluster):
    """On the real cluster's two partitions: each cell's arrays name its own, and each cell is
    checked against its own (``second`` allows 60 min)."""
    r = submit("--method", "mae", "--seeds", "0,1", "--preset", "smoke", "--dry-run", "--sweep-name", "parts",
               "--set", f"runs_root={tmp_path}", "--set", "evals=[knn]", "--set", "cluster.partition=debug,second",
               "--set", "cluster.time_min=61")
    assert r.returncode == 2 and r.stderr.startswith(
        "error: cell mae-partitionsecond-seed0: cluster.time_min: 61 min for pretrain, but partition second "
        "allows at most 60 min"), r.stderr
    r = submit("--method", "mae", "--seeds", "0,1", "--preset", "smoke", "--dry-run", "--sweep-name", "parts",
               "--set", f"runs_root={tmp_path}", "--set", "evals=[knn]", "--set", "cluster.partition=debug,second")
    assert r.returncode == 0 and "note:" not in r.stderr, r.stderr
    scripts = r.stdout.split("# ---- sbatch script of array")[1:]
    assert [re.search(r"#SBATCH --partition=(\w+)", s).group(1) for s in scripts] == \
        ["debug", "debug", "second", "second"]
    assert all("#SBATCH --array=0-1%2" in s for s in scripts)
    assert not (tmp_path / "parts").exists()


# ------------------------------------------------------------------ an array that fails to queue

def scontrol_job(job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                           check=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", shown))


def test_a_failed_array_is_cancelled_and_resume_queues_each_cell_once_on_its_own_partition(
        tmp_path, monkeypatch, capsys, mlflow_uri, slurm_cluster):
    """On the real cluster, the second sbatch (the debug cell's evaluation array) failing as it
    does when slurmctld times out (fault injection): the array queued before it is recorded and
    cancelled, the cells' MLflow runs marked FAILED, exit 2. ``--resume`` then queues each cell
    once, no orphan beside it, each on its own partition; its jobs are cancelled at once (their
    data is a placeholder: nothing here trains)."""
    from mlflow.tracking import MlflowClient

    from jobs import submit as submit_module
    shims = failing_sbatch(tmp_path / "bin", fail=(2,))
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    before = squeue_ids()
    runs = tmp_path / "runs"
    code = submit_module.main(["--method", "mae", "--seeds", "0", "--preset", "smoke", "--cluster", "slurm",
                               "--sweep-name", "parts", "--set", f"runs_root={runs}", "--set", "evals=[knn]",
                               "--set", f"data.root={placeholder_data(tmp_path / 'data')}",
                               "--set", f"tracking.uri={mlflow_uri}", "--set", "cluster.partition=debug,second"])
    err = capsys.readouterr().err
    sweep_dir = runs / "parts"
    record = json.loads((sweep_dir / "sweep.json").read_text())
    (first,) = record["submissions"]
    (array,) = [a["id"] for a in first["arrays"]]
    assert code == 2, err
    assert (f"error: sweep parts: sbatch of array knn of 1 cell(s) failed: {TIMEOUT}; cancelled the jobs "
            f"queued before it ({array}): nothing of it stays queued") in err
    assert "marked FAILED" in err and first["failed"]["cancelled"] == [array] and sbatch_calls(shims) == 2
    debug_cell = sweep_dir / "mae-partitiondebug-seed0" / "jobs"
    assert json.loads((debug_cell / "jobs.json").read_text())["pretrain"]["job_id"] == array   # one task: a plain job
    assert json.loads((debug_cell / "pretrain.status.json").read_text())["state"] == "CANCELLED"
    # cancelled for real; --resume would leave a job alone while it is still COMPLETING
    assert ended_state(array) == "CANCELLED" and not queued_since(before)
    assert stat.S_IMODE(sweep_dir.stat().st_mode) == 0o700
    store = MlflowClient(mlflow_uri)
    for cell in record["cells"].values():
        tracking = json.loads((sweep_dir / cell["run_dir"].rsplit("/", 1)[-1] / "tracking.json").read_text())
        assert store.get_run(tracking["run_id"]).info.status == "FAILED"

    try:
        code = submit_module.main(["--resume", str(sweep_dir)])
    finally:        # nothing of the resumed sweep runs: cancel whatever it queued, at once
        queued = queued_since(before)
        if queued:
            subprocess.run(["scancel", *queued], check=False)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mae-partitiondebug-seed0: resubmitting pretrain, knn (was pretrain CANCELLED)" in out
    assert "mae-partitionsecond-seed0: resubmitting pretrain, knn (was never queued)" in out
    second = json.loads((sweep_dir / "sweep.json").read_text())["submissions"][1]
    assert [(a["job"], a["cells"], a["partition"]) for a in second["arrays"]] == [
        ("pretrain", ["mae-partitiondebug-seed0"], "debug"), ("knn", ["mae-partitiondebug-seed0"], "debug"),
        ("pretrain", ["mae-partitionsecond-seed0"], "second"), ("knn", ["mae-partitionsecond-seed0"], "second")]
    # SLURM's own record: each array on its cell's partition, the evaluation after its pre-training
    assert [scontrol_job(a["id"])["Partition"] for a in second["arrays"]] == ["debug", "debug", "second", "second"]
    assert scontrol_job(second["arrays"][1]["id"])["Dependency"].startswith(f"aftercorr:{second['arrays'][0]['id']}")
    assert queued == {a["id"] for a in second["arrays"]}                 # no orphan beside them
    assert json.loads((debug_cell / "jobs.json").read_text())["knn"]["job_id"] == second["arrays"][1]["id"]
    assert sbatch_calls(shims) == 6
