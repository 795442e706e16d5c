"""Trained evaluations on the one training loop, on the real local SLURM cluster: a fine-tuning
job and a segmentation job, each on 2 pretend nodes, are sent USR2 mid-run (they checkpoint and
requeue themselves) and later ``scontrol requeue``d (SIGTERM: they checkpoint, SLURM requeues);
each resumes from its checkpoint and ends with the weights and metrics of an uninterrupted run
of the same config, logged into the same MLflow child run. Also: a non-finite loss in an
evaluation stops it naming the step and the last good checkpoint."""
import json
import re
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from conftest import PYTHON, REPO, submit
from test_pipeline import scontrol
from test_preemption import wait_until

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
FINETUNE_STEPS, SEG_STEPS, EVAL_EVERY = 96, 90, 40       # 12 epochs x 8 steps; two stops each
SETTINGS = [
    "evals=[finetune, segmentation]", "eval.finetune.nodes=2", "eval.segmentation.nodes=2",
    "eval.finetune.max_steps=0", "eval.finetune.epochs=12", "eval.finetune.max_train_samples=512",
    f"eval.segmentation.steps={SEG_STEPS}",
    "eval.keep_checkpoints=true",        # the final weights are compared from the checkpoints
    *[f"eval.{n}.{k}={v}" for n in ("finetune", "segmentation")
      for k, v in (("log_every", 1), ("checkpoint_every", 25), ("eval_every", EVAL_EVERY))],
]


def launch(root: Path, data_root: Path, name: str) -> tuple[dict[str, str], Path]:
    r = submit("--method", "mae", "--preset", "smoke", "--nodes", "2", "--cluster", "slurm",
               "--set", f"data.root={data_root}", "--set", f"runs_root={root}", "--set", f"name={name}",
               *[a for s in SETTINGS for a in ("--set", s)])
    assert r.returncode == 0, r.stderr
    return dict(re.findall(r"queued (\w+)\s+job (\d+)", r.stdout)), root / name


def logged_step(run_dir: Path, label: str) -> int:
    log = run_dir / "logs" / f"{label}.log"
    steps = re.findall(r" step (\d+)/", log.read_text()) if log.is_file() else []
    return int(steps[-1]) if steps else 0


def interrupt_twice(run_dir: Path, label: str, job: str) -> None:
    """USR2 at step >= 20; once resumed, ``scontrol requeue`` 20 steps later."""
    wait_until(lambda: logged_step(run_dir, label) >= 20, f"{label} step 20", timeout=600)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    log = run_dir / "logs" / f"{label}.log"
    wait_until(lambda: "resumed from" in log.read_text(), f"{label} resumed", timeout=400)
    resumed = int(re.findall(r"resumed from \S+ at step (\d+)", log.read_text())[-1])
    wait_until(lambda: logged_step(run_dir, label) >= resumed + 20, f"{label} step +20", timeout=400)
    subprocess.run(["scontrol", "requeue", job], check=True)


def wait_all(ids: dict[str, str], timeout: float) -> dict[str, str]:
    """Final state of every job; a finished job is not asked again (slurmctld forgets it after
    MinJobAge while the others still run)."""
    final: dict[str, str] = {}
    deadline = time.time() + timeout
    while len(final) < len(ids) and time.time() < deadline:
        for name, job in ids.items():
            if name not in final and (state := scontrol(job)["JobState"]) in TERMINAL:
                final[name] = state
        time.sleep(1)
    return final


def final_weights(run_dir: Path, label: str) -> dict[str, torch.Tensor]:
    from hpc_mim.distributed.deepspeed import consolidated_state_dict
    (state,) = (run_dir / "evals" / "state").glob(f"{label}-*")
    folder = state / "checkpoints"
    return consolidated_state_dict(folder, (folder / "latest").read_text())


def test_requeued_finetune_and_segmentation_resume_to_the_uninterrupted_result(tmp_path, slurm_cluster, data_root):
    # FFCV's decoders interpreted (HPC_MIM_FFCV_JIT=0, conftest): they draw from their loader
    # thread's own generator, not from numpy's global one, which timm's Mixup draws from
    ids, run_dir = launch(tmp_path, data_root, "cut")
    ref_ids, ref_dir = launch(tmp_path, data_root, "ref")
    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(interrupt_twice, run_dir, label, ids[label])
                  for label in ("finetune", "segmentation")]:
            f.result()
    states = wait_all(ids, timeout=900)
    ref_states = wait_all(ref_ids, timeout=900)
    logs = "\n".join(p.read_text() for p in (run_dir / "jobs").rglob("*_log.*"))
    expected = {"pretrain": "COMPLETED", "finetune": "COMPLETED", "segmentation": "COMPLETED"}
    assert states == expected and ref_states == expected, logs[-4000:]

    tracking = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(tracking["uri"])
    for label, steps, metric in (("finetune", FINETUNE_STEPS, "top1"), ("segmentation", SEG_STEPS, "miou")):
        info = scontrol(ids[label])
        assert info["Restarts"] == "2" and info["NumNodes"] == "2", (label, info)
        log = (run_dir / "logs" / f"{label}.log").read_text()
        for signal_name in ("SIGUSR2", "SIGTERM"):
            stopped = re.search(rf"{signal_name} at step (\d+): checkpoint saved", log)
            assert stopped, (label, signal_name, log[-3000:])
            assert f"resumed from step_{int(stopped.group(1)):08d} at step {stopped.group(1)}" in log

        # the same metrics and weights as the uninterrupted run
        mine = json.loads((run_dir / "evals" / f"{label}.json").read_text())
        ref = json.loads((ref_dir / "evals" / f"{label}.json").read_text())
        assert mine == ref and 0 <= mine[metric] <= 100, (label, mine, ref)
        ours, theirs = final_weights(run_dir, label), final_weights(ref_dir, label)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), label

        # one child run, continued across both restarts; every step logged once; the curve
        children = client.search_runs([tracking["experiment_id"]],
                                      f"tags.mlflow.parentRunId = '{tracking['run_id']}' and "
                                      f"tags.job = '{label}'")
        assert len(children) == 1, [c.info.run_name for c in children]
        child = children[0]
        assert child.info.status == "FINISHED" and child.data.tags["restarts"] == "2"
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, steps + 1)), label
        curve = client.get_metric_history(child.info.run_id, f"val/{metric}")
        assert sorted(m.step for m in curve) == list(range(EVAL_EVERY, steps + 1, EVAL_EVERY)) + \
            ([steps] if steps % EVAL_EVERY else []), label
        assert child.data.metrics[metric] == mine[metric]
    assert "requeued job" in logs


NAN_AT_STEP_5 = """
import evaluation.common as common
_fit = common.EvalContext.fit
def fit(self, baseline, task, budget):      # the 5th micro-batch's loss becomes NaN
    forward, calls = task.forward, [0]
    def nan_at_5(engine, batch):
        out = forward(engine, batch)
        calls[0] += 1
        if calls[0] == 5:
            out["loss"] = out["loss"] * float("nan")
        return out
    task.forward = nan_at_5
    return _fit(self, baseline, task, budget)
common.EvalContext.fit = fit
"""


def test_non_finite_loss_in_an_evaluation_names_the_step_and_the_last_good_checkpoint(tmp_path, data_root):
    r = submit("--method", "mae", "--preset", "smoke", "--cluster", "local", "--set", "evals=[knn]",
               "--set", f"data.root={data_root}", "--set", f"runs_root={tmp_path}", "--set", "name=nan")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run_dir = tmp_path / "nan"
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + NAN_AT_STEP_5)
    r = subprocess.run([PYTHON, "-m", "evaluation.segmentation", "--run-dir", str(run_dir),
                        "--set", "eval.segmentation.steps=10", "--set", "eval.segmentation.checkpoint_every=2"],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "inject")})
    assert r.returncode != 0
    (state,) = (run_dir / "evals" / "state").glob("segmentation-*")
    good = state / "checkpoints" / "step_00000004"
    message = "non-finite loss at step 5 (epoch 1)"   # 24 scenes: 3 steps per epoch
    assert message in r.stderr and f"the last good checkpoint is {good}" in r.stderr, r.stderr[-3000:]
    assert (state / "checkpoints" / "latest").read_text() == "step_00000004"
    assert f"[segmentation] STOPPED: {message}" in (run_dir / "logs" / "segmentation.log").read_text()
    tracking = json.loads((run_dir / "tracking.json").read_text())
    client = MlflowClient(tracking["uri"])
    (child,) = client.search_runs([tracking["experiment_id"]], "tags.job = 'segmentation'")
    assert child.info.status == "FAILED" and message in child.data.tags["error"]
    assert not (run_dir / "evals" / "segmentation.json").exists()
