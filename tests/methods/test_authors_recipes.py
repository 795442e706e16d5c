"""The authors' pre-training recipes the method configs follow (issue 28), checked where the
trainer applies them: the optimizer's groups, the scheduler's lr at every step and the tensors
the loader hands the method. References: yibingwei-1/LatentMIM (main_lmim.py, util/lr_sched.py)
and philippe-eecs/small-vision (big_vision/configs/ae_i1k.py, models/ae.py)."""
import math
from types import SimpleNamespace

import pytest
import torch

from hpc_mim.config import load_config
from hpc_mim.train.trainer import PretrainTask


def authors_lr(epoch: float, lr: float, min_lr_frac: float, warmup_epochs: float, epochs: float) -> float:
    """yibingwei-1/LatentMIM:util/lr_sched.py ``adjust_learning_rate``, transcribed; ``epoch`` is
    fractional (main_lmim.py passes it / len(loader) + epoch at every step)."""
    min_lr = lr * min_lr_frac
    if epoch < warmup_epochs:
        return min_lr + (lr - min_lr) * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs)
                                                          / (epochs - warmup_epochs)))


def lrs_of(cfg, steps_per_epoch: int = 10) -> list[float]:
    """The lr of the first group at every optimizer step, as the training loop sets it."""
    total = int(cfg.train.epochs * steps_per_epoch)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.train.peak_lr())
    sched = PretrainTask.scheduler(SimpleNamespace(cfg=cfg), opt, total, steps_per_epoch)
    out = []
    for step in range(total):
        sched.step_update(step)                        # what TrainLoop.loop does before each step
        out.append(opt.param_groups[0]["lr"])
    return out


def test_latent_mim_schedule_is_the_authors_warmup_from_a_quarter_of_lr_then_cosine():
    cfg = load_config("latent_mim", "smoke")          # 2 epochs, 0.5 of warm-up
    t, spe = cfg.train, 10
    got = lrs_of(cfg, spe)
    assert math.isclose(got[0], 0.25 * t.peak_lr(), rel_tol=1e-9)         # the first step's lr
    for step, lr in enumerate(got):
        ref = authors_lr(step / spe, t.peak_lr(), 0.25, t.warmup_epochs, t.epochs)
        assert math.isclose(lr, ref, rel_tol=1e-9), (step, lr, ref)


def test_mae_warmup_still_starts_at_zero():
    cfg = load_config("mae", "smoke")
    assert lrs_of(cfg)[0] == 0.0
    assert lrs_of(load_config("mae", "smoke", overrides=["train.min_lr_ratio=0.25"]))[0] == 0.0


def groups_by_decay(task) -> tuple[list[str], list[str]]:
    """(decayed, not decayed) parameter names, read from the optimizer's groups."""
    names = {id(p): n for n, p in task.model.named_parameters()}
    decayed, free = [], []
    for g in task.optimizer.param_groups:
        (decayed if g["weight_decay"] > 0 else free).extend(names[id(p)] for p in g["params"])
    return sorted(decayed), sorted(free)


def task_for(method: str, data_root, *overrides: str) -> PretrainTask:
    cfg = load_config(method, "smoke", overrides=[f"data.root={data_root}", *overrides])
    return PretrainTask(cfg, 1, torch.device("cpu"))


def test_latent_mim_gives_no_weight_decay_to_embed_parameters(data_root):
    """main_lmim.py: timm's param_groups_weight_decay with no_weight_decay_list = every name
    holding 'bias', 'norm' or 'embed' (timm adds every tensor of ndim <= 1)."""
    task = task_for("latent_mim", data_root)
    decayed, free = groups_by_decay(task)
    trainable = [(n, p) for n, p in task.model.named_parameters() if p.requires_grad]
    expected = sorted(n for n, p in trainable
                      if p.ndim <= 1 or n.endswith(".bias") or any(s in n for s in ("bias", "norm", "embed")))
    assert free == expected
    assert sorted(decayed + free) == sorted(n for n, _ in trainable)
    assert {"encoder.patch_embed.proj.weight", "decoder.embed.weight"} <= set(free)
    assert "decoder.cls_token" in decayed and "encoder.blocks.0.attn.qkv.weight" in decayed


def test_umd_trains_on_the_authors_crops_pixels_and_learned_positions(data_root, monkeypatch):
    """ae_i1k.py: inception crop of area (0.8, 1) | flip | value_range(-1, 1); models/ae.py:
    learned position embeddings in the encoder and the decoder; no decay on cls / mask token."""
    from hpc_mim.train import trainer
    calls = []
    real = trainer.build_loader
    monkeypatch.setattr(trainer, "build_loader", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    task = task_for("umd", data_root)
    (args, kwargs), (val_args, val_kwargs) = calls        # the training split; the collapse images
    assert list(kwargs["crop_scale"]) == [0.8, 1.0]
    assert args[3] == [0.5] * 3 and args[4] == [0.5] * 3                 # (x / 255 - 0.5) / 0.5
    assert val_kwargs["train"] is False and val_args[3] == [0.5] * 3 and val_args[4] == [0.5] * 3
    seen = []
    task.model.encoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    batch = next(iter(task.batches(0, 0)))
    task.model(batch)
    clean = seen[0]                                    # the clean half: the loader's pixels
    assert clean.min() >= -1 - 1e-5 and clean.max() <= 1 + 1e-5
    assert clean.min() < -0.99 and clean.max() > 0.9   # Fashion-MNIST: black 0 -> -1, white -> ~1
    assert task.model.encoder.pos_embed_learned is not None
    assert task.model.decoder.pos_embed_learned is not None
    decayed, free = groups_by_decay(task)
    assert {"encoder.cls_token", "decoder.mask_token"} <= set(free)
    assert "encoder.pos_embed_learned" in decayed      # the authors decay pos_embedding too


def test_umd_evaluations_read_the_encoder_with_the_same_pixels():
    """Every evaluation of a run builds its loaders from the run's config (Config.dataset_info):
    a UMD run's kNN, probes and dense tasks feed [-1, 1] pixels; MAE's the dataset's mean/std."""
    umd, mae = load_config("umd", "smoke"), load_config("mae", "smoke")
    for name in ("fmnist", "fmnist_scenes_ade", "fmnist_scenes_coco"):
        info = umd.dataset_info(name)
        assert info["mean"] == [0.5] * len(info["mean"]) and info["std"] == [0.5] * len(info["std"])
    assert mae.dataset_info("fmnist")["mean"] == [0.2860] * 3


@pytest.mark.parametrize("method", ["latent_mim"])          # umd passes too (~30 s more)
def test_the_recipes_resume_exactly(tmp_path, data_root, method):
    """The per-cell grid offsets (new draws) come from the seeded generator the checkpoints
    save, and the floor warm-up is a function of the step: 8 steps in one go, then the same run
    restarted from its step-4 checkpoint, give the same encoder bit for bit."""
    import shutil

    from test_checkpoint import encoder_weights, make_run, pretrain
    run, _, _ = make_run(tmp_path, [f"data.root={data_root}", "train.epochs=1",   # 8 steps
                                    "checkpoint.every_steps=4", "train.log_every=4"], method=method)
    assert pretrain(run).returncode == 0
    reference = encoder_weights(run)
    shutil.rmtree(run.checkpoints / "step_00000008")
    (run.checkpoints / "latest").write_text("step_00000004")
    run.encoder.unlink()
    again = pretrain(run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step_00000004 at step 4" in again.stdout
    mine = encoder_weights(run)
    assert all(torch.equal(mine[k], reference[k]) for k in reference)
