"""Bounded disk: the frozen-feature cache is keyed by everything the features depend on (a
changed normalisation or a re-converted dataset is a miss, not stale features) and drops the
temporaries of killed writers; a finished evaluation's checkpoints are removed once its metrics
are recorded, and re-running it still reports them."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import submitted_run
from data_prep.fashion_mnist import convert

SOURCE = Path("/usr/share/datasets/fashion-mnist")
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530          # configs/datasets.yaml


def one_process(monkeypatch):
    from hpc_mim.distributed.env import DistEnv, free_port
    from hpc_mim.train.process import join
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)   # join() exports them: not into later tests' jobs
    return join(env=DistEnv(master_port=free_port()))


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def test_feature_cache_misses_on_normalize_and_reconversion_and_drops_dead_temporaries(tmp_path, monkeypatch):
    from evaluation.common import EvalContext
    from evaluation.features import cached_features
    from hpc_mim.config import load_config
    from hpc_mim.rundir import RunDir
    data = tmp_path / "data"
    convert(SOURCE, data / "fmnist", limit=64)
    proc = one_process(monkeypatch)
    run = RunDir(tmp_path / "run").create()
    cache = run.evals / "features"
    cache.mkdir(parents=True)
    killed = cache / f".pixels-x-fmnist-val-mean-28px-all.pt.tmp-{socket.gethostname()}-{dead_pid()}"
    older = cache / ".pixels-y-fmnist-val-mean-28px-all.pt.tmp4242"     # before hosts were named
    for tmp in (killed, older):
        tmp.write_bytes(b"half a file")
    os.utime(older, (time.time() - 3600, time.time() - 3600))

    def features(*overrides: str) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = load_config("mae", "smoke", overrides=[f"data.root={data}", *overrides])
        ctx = EvalContext(run, cfg, None, cfg.dataset_info("fmnist"), "knn", proc, ["pixels"], {}, {})
        return cached_features(ctx, ["pixels"], "val", "mean", 0)["pixels"]

    f, y = features()
    assert f.shape == (64, 28 * 28 * 3) and not killed.exists() and not older.exists()
    # the same images in [-1, 1] (UMD's symmetric normalisation), not the cached features
    symmetric, _ = features("data.normalize=symmetric")
    assert torch.allclose(symmetric, (f * FMNIST_STD + FMNIST_MEAN - 0.5) / 0.5, atol=1e-5)
    assert len(list(cache.glob("*.pt"))) == 2
    again, _ = features()                                        # a hit: the same file
    assert torch.equal(again, f) and len(list(cache.glob("*.pt"))) == 2
    # the split re-converted (48 images now): read again, not the 64 cached rows
    convert(SOURCE, data / "fmnist", limit=48)
    f48, y48 = features()
    assert f48.shape[0] == 48 and torch.equal(f48, f[:48]) and torch.equal(y48, y[:48])
    assert len(list(cache.glob("*.pt"))) == 3
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def tiny_run(tmp_path: Path, data_root: Path, overrides: list[str]):
    """A run directory as jobs/submit.py leaves it (config, MLflow parent run), no encoder.pt:
    the evaluations read the random-init encoder of the smoke preset."""
    from hpc_mim.config import load_config
    cfg = load_config("mae", "smoke", overrides=[f"data.root={data_root}", "eval.baselines=[]", *overrides])
    return submitted_run(tmp_path, cfg)[0]


def test_a_finished_evaluation_leaves_no_checkpoints_and_a_rerun_reports_its_metrics(
        tmp_path, data_root, monkeypatch, capsys):
    from evaluation import linear_probe
    one_process(monkeypatch)
    run = tiny_run(tmp_path, data_root, [
        "eval.linear_probe.epochs=1", "eval.linear_probe.warmup_epochs=0",
        "eval.linear_probe.batch_size=64", "eval.linear_probe.max_train_samples=128"])
    first = linear_probe.main(str(run.root), baseline="random_init")["random_init"]
    (state,) = (run.evals / "state").glob("linear_probe[[]random_init]-*")
    assert not (state / "checkpoints").exists(), sorted(p.name for p in state.rglob("*"))
    record = json.loads((state / "child.json").read_text())
    assert record["finished"] and record["metrics"] == first
    assert json.loads((run.evals / "linear_probe[random_init].json").read_text()) == first
    printed = capsys.readouterr().out
    assert f"removed {state / 'checkpoints'}" in printed
    # run again: the recorded metrics, nothing trained again
    again = linear_probe.main(str(run.root), baseline="random_init")["random_init"]
    assert again == first
    assert f"[eval] linear_probe[random_init]: finished before this start, metrics in {state / 'child.json'}" \
        in capsys.readouterr().out


def test_prune_keeps_unfinished_and_kept_checkpoints(tmp_path):
    from evaluation.common import prune
    for name, record, keep, gone in (("running", {"finished": False}, False, False),
                                     ("kept", {"finished": True, "metrics": {"top1": 1.0}}, True, False),
                                     ("done", {"finished": True, "metrics": {"top1": 1.0}}, False, True)):
        state = tmp_path / name
        (state / "checkpoints" / "step_00000002").mkdir(parents=True)
        (state / "child.json").write_text(json.dumps({"run_id": "r", **record}))
        prune(state, keep)
        assert (state / "checkpoints").exists() != gone, name
        assert (state / "child.json").is_file()


@pytest.mark.parametrize("value", ["true", "false"])
def test_keep_checkpoints_is_a_config_key(value):
    from hpc_mim.config import load_config
    assert load_config("mae", "smoke", overrides=[f"eval.keep_checkpoints={value}"]).eval.keep_checkpoints \
        == (value == "true")
