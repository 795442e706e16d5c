"""Sweep enumeration, the short form, sweep-file errors, and the arrays (no scheduler needed)."""
from __future__ import annotations

import pytest

from hpc_mim.config import ConfigError, load_config
from jobs.plan import build_plan
from jobs.sweep import enumerate_cells, from_cli, load_sweep_file, split_top_level, SweepSpec
from jobs.sweep_arrays import plan_arrays
from conftest import submit


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


def test_dry_run_lists_cells_arrays_and_array_scripts(tmp_path):
    r = submit("--method", "mae,lut", "--seeds", "0,1", "--preset", "smoke", "--dry-run",
               "--set", f"runs_root={tmp_path}", "--sweep-name", "dry", "--set", "evals=[knn]")
    assert r.returncode == 0, r.stderr
    for cell in ("mae-seed0", "mae-seed1", "lut-seed0", "lut-seed1"):
        assert f"{cell} " in r.stdout
    assert "#SBATCH --array=0-3%4" in r.stdout and "#SBATCH --dependency='aftercorr:<array 0>'" in r.stdout
    assert "#SBATCH --job-name=dry-knn" in r.stdout
    assert not (tmp_path / "dry").exists()


def test_sweep_to_slurm_with_a_file_store_is_refused_unless_opted_in(tmp_path):
    """A sweep's cells run side by side on several nodes: with a file-based MLflow store
    (here the default sqlite) a SLURM submission is refused, exit code 2, before anything is
    created or queued (--dry-run shows the same error); the sweep file's or the command line's
    ``tracking.allow_file_store=true``, a server URI, or --cluster local let it through."""
    runs = tmp_path / "runs"
    sweep = tmp_path / "wide.yaml"
    sweep.write_text('name: wide\nmethods: [mae, lut]\nseeds: [0, 1]\nset: ["evals=[knn]"]\n')
    for extra in (("--dry-run",), ()):       # without --dry-run it stops before the data check
        r = submit("--sweep", str(sweep), "--cluster", "slurm", *extra, "--set", f"runs_root={runs}")
        assert r.returncode == 2, (extra, r.stdout[-500:], r.stderr[-500:])
        assert r.stderr.startswith("error: tracking.uri:") and "a sweep of 4 cells" in r.stderr, r.stderr
        for words in ("mlflow server --backend-store-uri", "--set tracking.uri=http://<server host>:5000",
                      "--set tracking.allow_file_store=true"):
            assert words in r.stderr, (words, r.stderr)
        assert "#SBATCH" not in r.stdout and "cell(s)" not in r.stdout
    short = submit("--method", "mae,lut", "--cluster", "slurm", "--dry-run", "--set", f"runs_root={runs}",
                   "--sweep-name", "short")
    assert short.returncode == 2 and "a sweep of 2 cells" in short.stderr, short.stderr
    assert not runs.exists()                 # no sweep folder, no store

    opted = tmp_path / "opted.yaml"
    opted.write_text(sweep.read_text().replace('set: ["evals=[knn]"]',
                                               'set: ["evals=[knn]", tracking.allow_file_store=true]'))
    for args in (("--sweep", str(opted), "--cluster", "slurm"),
                 ("--sweep", str(sweep), "--cluster", "slurm", "--set", "tracking.allow_file_store=true"),
                 ("--sweep", str(sweep), "--cluster", "slurm", "--tracking-uri", "http://127.0.0.1:5000"),
                 ("--sweep", str(sweep), "--cluster", "local")):
        r = submit(*args, "--dry-run", "--set", f"runs_root={runs}")
        assert r.returncode == 0 and "4 cell(s)" in r.stdout, (args, r.stderr[-800:])
    assert not runs.exists()
