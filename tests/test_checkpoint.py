import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import submitted_run
from hpc_mim.train.checkpoint import CheckpointManager


def make_run(tmp_path: Path, overrides: list[str], method: str = "mae"):
    """A run directory as jobs/submit.py leaves it (config, MLflow parent run, tracking.json)."""
    from hpc_mim.config import load_config
    return submitted_run(tmp_path, load_config(method, "smoke", overrides=overrides))


def pretrain(run, max_steps: int = 0) -> subprocess.CompletedProcess:
    """The pre-training entry point as a single process (no launcher variables); ``max_steps``
    first raises the run's step budget in its config.yaml (to continue a stopped run)."""
    if max_steps:
        blob = yaml.safe_load(run.config.read_text())
        blob["train"]["max_steps"] = max_steps
        run.config.write_text(yaml.safe_dump(blob))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    return subprocess.run([sys.executable, "-m", "hpc_mim.train.pretrain", "--run-dir", str(run.root)],
                          capture_output=True, text=True, env=env, timeout=300)


def torch_save_fn(state):
    def save(folder: Path, tag: str) -> None:
        (folder / tag).mkdir()
        torch.save(state, folder / tag / "state.pt")
    return save


def load_fn(folder: Path, tag: str):
    return torch.load(folder / tag / "state.pt")


def test_round_trip_and_keep_last(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.load(load_fn) is None
    for step in (10, 20, 30):
        mgr.save(step, torch_save_fn({"step": step, "w": torch.full((3,), float(step))}))
    assert (tmp_path / "latest").read_text() == "step_00000030"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000020", "step_00000030"]
    state = mgr.load(load_fn)
    assert state["step"] == 30 and torch.equal(state["w"], torch.full((3,), 30.0))


def test_crash_during_write_keeps_previous_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(5, torch_save_fn({"step": 5}))

    def crashing(folder: Path, tag: str) -> None:
        (folder / tag).mkdir()
        (folder / tag / "half.pt").write_bytes(b"\x00" * 10)
        raise OSError("node died mid-write")

    with pytest.raises(OSError):
        mgr.save(10, crashing)
    assert mgr.latest() == "step_00000005" and mgr.load(load_fn)["step"] == 5
    mgr.save(15, torch_save_fn({"step": 15}))          # the stale .tmp is cleaned up
    assert not list(tmp_path.glob("*.tmp"))
    assert mgr.load(load_fn)["step"] == 15


def test_pretrain_resumes_from_latest_checkpoint(tmp_path, data_root):
    """Real DeepSpeed (ZeRO-2, one process): stop after 6 steps, then continue to 12. The RNG
    files hold tensors and numbers only: ``weights_only=True`` loads them (tests/test_rng_state.py:
    the rest)."""
    from mlflow.tracking import MlflowClient

    run, uri, run_id = make_run(tmp_path, [f"data.root={data_root}", "train.max_steps=6",
                                           "checkpoint.every_steps=4", "train.epochs=3"])
    first = pretrain(run)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run.checkpoints / "latest").read_text() == "step_00000006"
    rng = torch.load(run.checkpoints / "step_00000006" / "rng_rank0.pt", weights_only=True)
    assert rng["torch"].dtype == torch.uint8 and rng["numpy"]["keys"].shape == (624,)
    second = pretrain(run, max_steps=12)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step_00000006 at step 6" in second.stdout
    assert (run.checkpoints / "latest").read_text() == "step_00000012"
    assert run.encoder.is_file()
    # metrics continue in the same MLflow run
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [2, 4, 6, 8, 10, 12]
    # the collapse curves (hpc_mim/train/collapse.py): every log_every steps and at each end
    for key, low, high in (("val/rankme", 1.0, 32.0), ("val/pairwise_cosine", -1.0, 1.0)):
        points = MlflowClient(uri).get_metric_history(run_id, key)
        assert sorted(m.step for m in points) == [2, 4, 6, 8, 10, 12], key
        assert all(low <= m.value <= high for m in points), (key, [m.value for m in points])


@pytest.mark.parametrize("stage", [0, 3])
def test_exported_encoder_is_complete_for_zero_stages(tmp_path, data_root, stage):
    """ZeRO-3 partitions parameters: the export must gather them (an ungathered copy is empty)."""
    from hpc_mim.models import load_encoder

    run, _, _ = make_run(tmp_path, [f"data.root={data_root}", "train.max_steps=2",
                                    f"train.zero_stage={stage}"])
    r = pretrain(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"ZeRO-{stage}" in r.stdout
    encoder = load_encoder(run.encoder)                  # strict: every shape must match
    x = torch.randn(2, 3, 28, 28)
    assert encoder(x).shape == (2, 50, 32)
    # the same gathered weights for timm (hpc_mim/export.py), and how long pre-training ran
    import timm
    model = timm.create_model(f"local-dir:{run.timm}", pretrained=True, num_classes=0).eval()
    with torch.no_grad():
        assert (model.forward_features(x) - encoder.eval()(x)).abs().max() <= 1e-5
    assert torch.load(run.encoder, weights_only=True)["trained"]["steps"] == 2


def test_a_failed_timm_export_leaves_pretraining_and_its_evaluations_alone(tmp_path, data_root):
    """The evaluations need encoder.pt only: a timm export that raises is logged and tagged,
    and the job still ends FINISHED with encoder.pt written (python -m jobs.export redoes it)."""
    from mlflow.tracking import MlflowClient

    run, uri, run_id = make_run(tmp_path, [f"data.root={data_root}", "train.max_steps=2"])
    broken = textwrap.dedent(f"""
        from hpc_mim.train import pretrain, trainer
        def export_timm(root):
            raise RuntimeError("timm says no")
        trainer.export_timm = export_timm
        pretrain.main({str(run.root)!r})
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    r = subprocess.run([sys.executable, "-c", broken], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the timm export failed (RuntimeError: timm says no); redo it with python -m jobs.export" in r.stdout
    assert run.encoder.is_file() and not run.timm.exists()
    info = MlflowClient(uri).get_run(run_id)
    assert info.info.status == "FINISHED"
    assert info.data.tags["timm_export_error"] == "RuntimeError: timm says no"


@pytest.mark.parametrize("stage", [2, 3])
def test_ema_teacher_is_checkpointed_restored_and_exact_under_zero(tmp_path, data_root, stage):
    """LUT's teacher, read back from the checkpoints of a run that was stopped at step 2 and
    resumed: teacher(3) = m * teacher(2) + (1 - m) * student(3) with m of the cosine schedule at
    step 3 of 4. Under ZeRO-3 this needs the gathered update, and the resume must have restored
    the teacher (a fresh one would be the initial weights)."""
    from hpc_mim.distributed.deepspeed import consolidated_state_dict
    from hpc_mim.methods.ema import cosine_momentum

    run, _, _ = make_run(tmp_path, [f"data.root={data_root}", "train.max_steps=2", "checkpoint.every_steps=1",
                                    "checkpoint.keep_last=3", f"train.zero_stage={stage}",
                                    "method.lut.momentum=0.5",
                                    # ZeRO-3 leaves tensors under 1e5 elements whole: 192 wide
                                    # makes the blocks' weights (192 x 576, 192 x 768) partitioned
                                    "model.embed_dim=192", "model.num_heads=3"], method="lut")
    assert pretrain(run).returncode == 0
    r = pretrain(run, max_steps=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step_00000002 at step 2" in r.stdout
    two, three = (consolidated_state_dict(run.checkpoints, f"step_0000000{s}") for s in (2, 3))
    m = cosine_momentum(0.5, 3 / 4)
    teacher = [k for k in three if k.startswith("teacher.copies.encoder.") and k.endswith("weight")]
    assert teacher
    for key in teacher:
        student = three[key.replace("teacher.copies.", "")]
        assert torch.allclose(three[key], m * two[key] + (1 - m) * student, atol=1e-6), key
    moved = max((three[k] - two[k]).abs().max().item() for k in teacher)
    assert moved > 1e-4                          # the update did something


def start_pretrain(run) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    return subprocess.Popen([sys.executable, "-m", "hpc_mim.train.pretrain", "--run-dir", str(run.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_step(run, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until rank 0's progress log shows ``step`` (or the process ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if run.pretrain_log.is_file() and f" step {step}/" in run.pretrain_log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached: {proc.poll()=}")


def encoder_weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run.encoder, weights_only=False)["state_dict"]


EXACT = ["train.epochs=3", "train.log_every=1", "checkpoint.every_steps=5", "data.num_workers=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root):
    """The uninterrupted run (3 epochs x 8 steps) the interrupted ones must reproduce."""
    ref, _, _ = make_run(tmp_path_factory.mktemp("reference"), [f"data.root={data_root}", *EXACT])
    assert pretrain(ref).returncode == 0
    return ref


# SIGUSR2 only: SIGTERM takes the same path (hpc_mim/distributed/preemption.py), and
# test_preemption.py stops real SLURM jobs with both and checks the same weights
@pytest.mark.parametrize("sig", [signal.SIGUSR2])
def test_stop_signal_checkpoints_and_resume_is_bit_identical(tmp_path, data_root, reference, sig):
    """Stopped by a scheduler signal mid-epoch, run again: the same final weights, bit for bit,
    as an uninterrupted run, and one MLflow run with every step logged exactly once."""
    from mlflow.tracking import MlflowClient

    ref = reference
    run, uri, run_id = make_run(tmp_path / "cut", [f"data.root={data_root}", *EXACT])
    proc = start_pretrain(run)
    wait_for_step(run, 7, proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:]
    stopped = re.search(rf"{sig.name} at step (\d+): checkpoint saved, stopping", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert 7 <= step < 24 and (run.checkpoints / "latest").read_text() == f"step_{step:08d}"
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "KILLED"
    assert f"stopped by {sig.name} at step {step}" in client.get_run(run_id).data.tags["stopped"]

    second = pretrain(run)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from step_{step:08d} at step {step}" in second.stdout
    mine, reference = encoder_weights(run), encoder_weights(ref)
    assert all(torch.equal(mine[k], reference[k]) for k in reference)
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.data.tags["restarts"] == "1"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 25))          # 3 epochs x 8 steps, each once


def test_resume_without_exact_data_position_would_differ(tmp_path, data_root, reference):
    """The check above can fail: resuming one micro-batch later in the data gives other weights."""
    ref = reference
    run, _, _ = make_run(tmp_path / "cut", [f"data.root={data_root}", *EXACT])
    proc = start_pretrain(run)
    wait_for_step(run, 6, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    tag = (run.checkpoints / "latest").read_text()
    client_state = run.checkpoints / tag / "mp_rank_00_model_states.pt"
    blob = torch.load(client_state, weights_only=False)
    blob["micro"] += 1                                   # skip one micro-batch too many
    torch.save(blob, client_state)
    assert pretrain(run).returncode == 0
    mine, reference = encoder_weights(run), encoder_weights(ref)
    assert not all(torch.equal(mine[k], reference[k]) for k in reference)


def test_kill_during_checkpoint_write_leaves_a_loadable_latest(tmp_path, data_root):
    """SIGKILL in the middle of writing step 8's checkpoint (shards written, not yet published):
    ``latest`` still names step 4, which loads, and the run resumes from it."""
    from hpc_mim.distributed.deepspeed import consolidated_state_dict

    run, _, _ = make_run(tmp_path, [f"data.root={data_root}", *EXACT, "checkpoint.every_steps=4"])
    crash = textwrap.dedent(f"""
        import os, signal, sys
        from hpc_mim.distributed import deepspeed as ds
        from hpc_mim.train import pretrain
        real = ds.save_checkpoint
        def save_then_die(engine, folder, tag, state):
            real(engine, folder, tag, state)
            if tag.startswith("step_00000008"):       # half-way: shards on disk, nothing published
                os.kill(os.getpid(), signal.SIGKILL)
        ds.save_checkpoint = save_then_die
        pretrain.main({str(run.root)!r})
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    r = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert (run.checkpoints / "step_00000008.tmp").is_dir()          # the interrupted write
    assert (run.checkpoints / "latest").read_text() == "step_00000004"
    assert consolidated_state_dict(run.checkpoints, "step_00000004")  # loads
    again = pretrain(run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step_00000004 at step 4" in again.stdout
    assert not list(run.checkpoints.glob("*.tmp"))


KILL_AT_EACH_POINT = """
import os, shutil, signal, sys
from pathlib import Path
import torch
from hpc_mim.train import checkpoint as ck
point, folder = int(sys.argv[1]), Path(sys.argv[2])
count = [0]
def deadly(real):
    def wrapped(*args, **kwargs):
        if count[0] == point:
            os.kill(os.getpid(), signal.SIGKILL)   # dies before this filesystem change
        count[0] += 1
        return real(*args, **kwargs)
    return wrapped
ck.fsync_path = deadly(ck.fsync_path)
ck.atomic_write_text = deadly(ck.atomic_write_text)
ck.shutil.rmtree = deadly(shutil.rmtree)
Path.rename = deadly(Path.rename)
def save(folder, tag):
    (folder / tag).mkdir()
    torch.save({"step": 7, "version": "new"}, folder / tag / "state.pt")
ck.CheckpointManager(folder, keep_last=1).save(7, save)
print("completed")
"""


def test_resaving_a_step_leaves_a_loadable_latest_whatever_point_a_kill_hits(tmp_path):
    """A job resumed exactly at step_7 and stopped before its next step saves step 7 again.
    SIGKILL before each filesystem change of that save (rename, fsync, pointer, pruning) must
    leave ``latest`` naming a complete checkpoint of step 7 (the old one deleted first, as
    before, left it naming nothing)."""
    import shutil as sh
    point, versions = 0, set()
    while True:
        folder = tmp_path / f"kill{point}"
        mgr = CheckpointManager(folder, keep_last=1)
        mgr.save(7, torch_save_fn({"step": 7, "version": "old"}))
        r = subprocess.run([sys.executable, "-c", KILL_AT_EACH_POINT, str(point), str(folder)],
                           capture_output=True, text=True, timeout=120)
        state = mgr.load(load_fn)
        assert state is not None and state["step"] == 7, (point, r.stderr[-500:], list(folder.iterdir()))
        versions.add(state["version"])
        if "completed" in r.stdout:
            break
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        point += 1
        sh.rmtree(folder)
    assert point >= 3 and versions == {"old", "new"}         # several points, both outcomes
    assert mgr.latest() == "step_00000007-1"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000007-1"]  # old pruned
    mgr.save(7, torch_save_fn({"step": 7, "version": "newer"}))   # and again: a free name
    assert mgr.latest() == "step_00000007" and mgr.load(load_fn)["version"] == "newer"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_00000007"]


def test_checkpoints_follow_the_schedule_and_not_every_epoch_end(tmp_path, data_root):
    """Saves come every ``checkpoint.every_steps`` and at the end, never at each epoch's end as
    well (an ImageNet epoch is 10-30 s on 64 GPUs); a resume mid-epoch is exact anyway."""
    run, _, _ = make_run(tmp_path, [f"data.root={data_root}", "train.epochs=3",
                                    "checkpoint.every_steps=5", "train.log_every=100"])
    done = pretrain(run)
    assert done.returncode == 0, done.stderr[-3000:]
    total, per_epoch = map(int, re.search(r"start: .*?(\d+) steps \((\d+)/epoch", done.stdout).groups())
    assert total == 3 * per_epoch and per_epoch % 5, done.stdout     # epoch ends off the schedule
    saved = [int(s) for s in re.findall(r"checkpoint step_(\d+)", done.stdout)]
    assert saved == sorted({*range(5, total + 1, 5), total}), (saved, per_epoch)


def test_each_rank_fsyncs_only_the_checkpoint_files_it_wrote(tmp_path, monkeypatch):
    """Two ranks share a checkpoint folder (DeepSpeed's ZeRO shards, our RNG files): each
    flushes its own files, rank 0 also the shared ones and the folders; together, everything
    once."""
    import hpc_mim.train.checkpoint as ck
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
             "rng_rank0.pt", "rng_rank1.pt"]

    def save(folder: Path, tag: str) -> None:            # what both ranks' writes leave there
        (folder / tag).mkdir(exist_ok=True)
        for name in names:
            (folder / tag / name).write_bytes(b"x")

    synced: dict[int, list[str]] = {}
    for rank in (1, 0):                                   # rank 1 first: it does not publish
        calls: list[str] = []
        monkeypatch.setattr(ck, "fsync_path", lambda p, calls=calls: calls.append(Path(p).name))
        ck.CheckpointManager(tmp_path, is_main=rank == 0, rank=rank).save(3, save)
        synced[rank] = calls
    files = lambda rank: sorted(n for n in synced[rank] if n.endswith(".pt"))  # noqa: E731
    assert files(1) == sorted(["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                               "zero_pp_rank_1_mp_rank_00_model_states.pt", "rng_rank1.pt"])
    assert files(0) == sorted(["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                               "rng_rank0.pt"])
    assert "step_00000003.tmp" in synced[0] and "step_00000003.tmp" not in synced[1]
