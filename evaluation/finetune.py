"""End-to-end fine-tuning, MAE's recipe (He et al. arXiv 2111.06377 App. A.3,
facebookresearch/mae:main_finetune.py), on DeepSpeed like pre-training.

Model: the encoder (stochastic depth ``drop_path``) -> pooled tokens (mean of the patch tokens
by default, MAE's ``global_pool``) -> LayerNorm -> Linear (weights trunc-normal std 2e-5).
Data: RandomResizedCrop (0.08-1) + flip (FFCV), RandAugment (n, m), random erasing (timm),
mixup / cutmix with label smoothing (timm's Mixup + SoftTargetCrossEntropy). Optimiser: AdamW
(0.9, 0.999), layer-wise lr decay (timm), lr = blr * batch / 256, linear warmup then cosine to
``min_lr`` (timm, per step). Metrics: top-1 / top-5 on the centre-cropped validation split.
``precision: bf16`` is autocast as in pre-training (hpc_mim/distributed/deepspeed.py): fp32
weights, bf16 matmuls, fp32 loss.

    python -m evaluation.finetune --run-dir runs/<name> [--dataset cub] [--set KEY=VALUE] [--baseline random_init]
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler
from torch import nn

from evaluation.common import EvalContext, device, encoder_for, parse_args, run_eval
from evaluation.layer_decay import EncoderModel
from hpc_mim.data.ffcv_io import build_loader, iterate
from hpc_mim.data.views import rand_augment
from hpc_mim.distributed import deepspeed as ds
from hpc_mim.distributed.env import detect
from hpc_mim.tracking import MLflowLogger


class Classifier(EncoderModel):
    """Images (B, 3, H, W) -> logits (B, num_classes)."""

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str) -> None:
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(self.encoder.pooled(x, self.pooling)))


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> dict[str, float]:
    model.eval()
    hits1 = hits5 = n = 0
    for batch in iterate(loader):
        logits = model(batch["image"])
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        y = batch["label"]
        hits1 += (top5[:, 0] == y).sum().item()
        hits5 += (top5 == y[:, None]).any(dim=1).sum().item()
        n += len(y)
    return {"top1": 100 * hits1 / n, "top5": 100 * hits5 / n}


def finetune(model: Classifier, ctx: EvalContext, logger: MLflowLogger) -> dict[str, float]:
    s, info, cfg = ctx.section, ctx.info, ctx.cfg
    env, dev = detect(), device()
    ds.init_distributed(env, dev, cfg.cluster.rendezvous_timeout_s, cfg.cluster.collective_timeout_s)
    img_size = model.encoder.config["img_size"]
    loader = build_loader(info["train"], s.micro_batch_size, img_size, info["mean"], info["std"],
                          train=True, seed=cfg.train.seed, crop_scale=(0.08, 1.0), hflip=True,
                          num_workers=cfg.data.num_workers, distributed=env.world_size > 1,
                          max_samples=s.max_train_samples, device=dev)
    accum = s.accumulation(env.world_size)
    steps_per_epoch = len(loader) // accum
    total = s.max_steps or s.epochs * steps_per_epoch
    warmup = min(int(s.warmup_epochs * steps_per_epoch), total)
    lr = s.blr * s.batch_size / 256
    opt = torch.optim.AdamW(model.param_groups(s.weight_decay, s.layer_decay), lr=lr, betas=(0.9, 0.999))
    engine = ds.initialize(model.to(dev), opt, s, env.world_size)
    sched = CosineLRScheduler(opt, t_initial=max(1, total - warmup), lr_min=s.min_lr, warmup_t=warmup,
                              warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    mixup = Mixup(mixup_alpha=s.mixup, cutmix_alpha=s.cutmix, label_smoothing=s.smoothing,
                  num_classes=info["num_classes"]) if s.mixup > 0 or s.cutmix > 0 else None
    criterion = SoftTargetCrossEntropy() if mixup else LabelSmoothingCrossEntropy(s.smoothing)
    erase = RandomErasing(s.reprob, mode="pixel", device=dev.type) if s.reprob > 0 else None
    print(f"[finetune] {info['name']}: {total} steps of batch {s.batch_size} "
          f"({s.micro_batch_size} x {env.world_size} ranks x {accum} accum), lr {lr:.2e}, "
          f"ZeRO-{s.zero_stage} {s.precision}", flush=True)
    step, start, loss = 0, time.time(), torch.zeros(())
    for epoch in range(s.epochs):
        engine.train()
        for i, batch in enumerate(iterate(loader, epoch)):
            if step >= total or i >= steps_per_epoch * accum:
                break
            x, y = batch["image"], batch["label"]
            if s.randaug_ops:
                x = rand_augment(x, info["mean"], info["std"], s.randaug_ops, s.randaug_magnitude)
            x = erase(x) if erase else x
            x, y = mixup(x, y) if mixup else (x, y)
            if i % accum == 0:
                sched.step_update(step)
            loss = criterion(engine(x).float(), y)       # bf16 logits under autocast: fp32 loss
            engine.backward(loss)
            engine.step()
            if (i + 1) % accum == 0:
                step += 1
        rate = step * s.batch_size / (time.time() - start)
        print(f"[finetune] epoch {epoch + 1}/{s.epochs} step {step} loss {loss.item():.4f} "
              f"{rate:.0f} img/s", flush=True)
        if logger is not None:
            logger.log_metrics({"train/loss": loss.item()}, step=step)
        if step >= total:
            break
    val = build_loader(info["val"], cfg.eval.batch_size, img_size, info["mean"], info["std"], train=False,
                       eval_crop_ratio=info.get("eval_crop_ratio", 1.0),
                       num_workers=cfg.data.num_workers, device=dev)
    with torch.autocast(dev.type, torch.bfloat16, enabled=s.precision == "bf16"):
        return {**accuracy(engine.module, val), "train_loss": loss.item()}


def body(ctx: EvalContext) -> Iterator[tuple[str, dict[str, float]]]:
    for b in ctx.baselines:
        encoder = encoder_for(ctx.run, ctx.cfg, b, drop_path=ctx.section.drop_path)
        torch.manual_seed(ctx.cfg.train.seed)          # same head init per encoder
        model = Classifier(encoder, ctx.info["num_classes"], ctx.section.pooling)
        yield b, finetune(model, ctx, ctx.loggers[b])


def main(run_dir: str, dataset: str = "", baseline: str | None = None, label: str = "",
         overrides: list[str] = ()) -> dict[str, dict[str, float]]:
    return run_eval(run_dir, "finetune", body, dataset, baseline, label, pixels=False,
                    overrides=overrides)


if __name__ == "__main__":
    args = parse_args(__doc__)
    main(args.run_dir, args.dataset, args.baseline, overrides=args.set)
