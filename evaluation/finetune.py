"""End-to-end fine-tuning, MAE's recipe (He et al. arXiv 2111.06377 App. A.3,
facebookresearch/mae:main_finetune.py), on DeepSpeed like pre-training.

Model: MAE's models_vit.py: the encoder (stochastic depth ``drop_path``); by default the mean
of the last block's patch tokens (MAE's ``global_pool``, the encoder's final norm dropped) ->
``fc_norm`` LayerNorm -> Linear (weights trunc-normal std 2e-5); ``pooling: cls``: final norm ->
cls token -> Linear. Data: RandomResizedCrop (0.08-1) + flip (FFCV), timm's RandAugment
``rand-m9-mstd0.5-inc1`` (``auto_augment``; batched on the device, PIL's ops exactly:
hpc_mim/data/randaugment_timm.py; ``tv-rand-n2-m9`` = torchvision's, the project's earlier
choice), random erasing (timm),
mixup / cutmix with label smoothing (timm's Mixup + SoftTargetCrossEntropy). Optimiser: AdamW
(0.9, 0.999), layer-wise lr decay (timm), lr = blr * batch / 256, linear warmup then cosine to
``min_lr`` (timm, per step). Metrics: top-1 / top-5 on the centre-cropped validation split
(each rank its shard), every ``eval_every`` steps and at the end. ``precision: bf16`` is
autocast as in pre-training (hpc_mim/distributed/deepspeed.py): fp32 weights, bf16 matmuls,
fp32 loss. Trained by the one training loop (checkpoints, exact resume, NaN stop) on all of
the job's ranks, as many as pre-training by default (``eval.finetune.nodes``).

    python -m evaluation.finetune --run-dir runs/<name> [--dataset cub] [--set KEY=VALUE] [--baseline random_init]
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler
import torch.distributed as dist
from torch import nn

from evaluation.common import EvalContext, encoder_for, parse_args, run_eval
from evaluation.layer_decay import EncoderModel
from hpc_mim.data.ffcv_io import build_loader, iterate
from hpc_mim.data.views import rand_augment
from hpc_mim.train.loop import Budget, Task


class Classifier(EncoderModel):
    """Images (B, 3, H, W) -> logits (B, num_classes), pooled as MAE's fine-tuning model
    (facebookresearch/mae:models_vit.py):

    - ``mean`` (MAE's ``global_pool``, its default): the mean of the last block's patch tokens
      -> ``fc_norm`` -> head. The encoder's final ``norm`` is not used, so it is replaced by
      ``nn.Identity`` here, as MAE deletes it (``del self.norm``): an unused parameter would
      get no gradient, which DeepSpeed's ZeRO stages and its gradient clipping would have to
      tolerate, and would sit in the optimizer with weight decay.
    - ``cls``: the encoder's final ``norm`` -> the cls token(s) (their mean for several) ->
      head, with no ``fc_norm``.

    (Until issue 28 both went norm -> pool -> fc_norm: a second LayerNorm on the mean.)"""

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str) -> None:
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        if pooling == "mean":
            encoder.norm = nn.Identity()                  # MAE: ``del self.norm``
            self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.encoder.pooled(x, self.pooling, final_norm=self.pooling != "mean")  # (B, D)
        return self.head(self.fc_norm(pooled))


class FinetuneTask(Task):
    """The classifier trained on the .beton training split with MAE's augmentation."""
    name = "finetune"

    def __init__(self, ctx: EvalContext, model: Classifier) -> None:
        s, info, cfg, env = ctx.section, ctx.info, ctx.cfg, ctx.proc.env
        self.s, self.info, self.device = s, info, ctx.device
        self.model = model.to(self.device)
        self.batch = s.batch_size
        self.micro = s.micro_batch_size or s.batch_size // env.world_size
        self.lr = s.peak_lr()              # blr * batch / 256 (eval.finetune.protocol lut: sqrt)
        self.optimizer = torch.optim.AdamW(model.param_groups(s.weight_decay, s.layer_decay),
                                           lr=self.lr, betas=(0.9, 0.999), fused=True)
        img_size = model.encoder.config["img_size"]
        self.loader = build_loader(info["train"], self.micro, img_size, info["mean"], info["std"],
                                   train=True, seed=cfg.train.seed, crop_scale=(0.08, 1.0), hflip=True,
                                   num_workers=cfg.data.num_workers, distributed=env.world_size > 1,
                                   max_samples=s.max_train_samples, device=self.device)
        # each rank scores samples rank, rank + world, ...; the counts are summed over ranks
        self.val = build_loader(info["val"], cfg.eval.batch_size, img_size, info["mean"], info["std"],
                                train=False, eval_crop_ratio=info.get("eval_crop_ratio", 1.0),
                                num_workers=cfg.data.num_workers, device=self.device,
                                shard=(env.rank, env.world_size))
        self.mixup = Mixup(mixup_alpha=s.mixup, cutmix_alpha=s.cutmix, label_smoothing=s.smoothing,
                           num_classes=info["num_classes"]) if s.mixup > 0 or s.cutmix > 0 else None
        self.criterion = SoftTargetCrossEntropy() if self.mixup else LabelSmoothingCrossEntropy(s.smoothing)
        self.erase = RandomErasing(s.reprob, mode="pixel", device=self.device.type) if s.reprob > 0 else None

    def micro_batches_per_epoch(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, skip: int) -> Iterable[dict[str, torch.Tensor]]:
        return iterate(self.loader, epoch, skip=skip)

    def scheduler(self, optimizer, total_steps: int, steps_per_epoch: int) -> CosineLRScheduler:
        warmup = min(int(self.s.warmup_epochs * steps_per_epoch), total_steps)
        return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup), lr_min=self.s.min_lr,
                                 warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True,
                                 t_in_epochs=False)

    def forward(self, engine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """RandAugment, erasing and mixup on the device (from this rank's generator, which
        every checkpoint saves), then the loss in fp32 (bf16 logits under autocast).
        RandAugment is timm's ``auto_augment`` policy, batched (hpc_mim/data/randaugment_timm.py):
        each image draws its own ops, coins, magnitudes and signs, with whole-batch ops and no
        host sync on this thread."""
        x, y = batch["image"], batch["label"]
        if self.s.auto_augment:
            x = rand_augment(x, self.info["mean"], self.info["std"], self.s.auto_augment)
        x = self.erase(x) if self.erase else x
        x, y = self.mixup(x, y) if self.mixup else (x, y)
        return {"loss": self.criterion(engine(x).float(), y)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1 / top-5 (%) on the centre-cropped validation split."""
        model.eval()
        counts = torch.zeros(3, device=self.device)               # top-1 hits, top-5 hits, n
        for batch in iterate(self.val):
            logits = model(batch["image"])
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            y = batch["label"]
            counts += torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(dim=1).sum(),
                                   y.new_full((), y.numel())]).float()      # a fill, not a copy
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        hits1, hits5, n = counts.tolist()
        return {"top1": 100 * hits1 / n, "top5": 100 * hits5 / n}


def body(ctx: EvalContext) -> Iterator[tuple[str, dict[str, float]]]:
    s, cfg = ctx.section, ctx.cfg
    for b in ctx.baselines:
        encoder = encoder_for(ctx.run, cfg, b, drop_path=s.drop_path)
        ctx.seed()                                   # same head on every rank and per encoder
        task = FinetuneTask(ctx, Classifier(encoder, ctx.info["num_classes"], s.pooling))
        ctx.seed(rank_offset=True)                   # augmentation and drop path per rank
        budget = Budget(s.batch_size, task.micro, epochs=s.epochs, max_steps=s.max_steps,
                        precision=s.precision, zero_stage=s.zero_stage, clip_grad=s.clip_grad,
                        log_every=s.log_every, checkpoint_every=s.checkpoint_every,
                        keep_last=cfg.checkpoint.keep_last, eval_every=s.eval_every)
        yield b, ctx.fit(b, task, budget)


def main(run_dir: str, dataset: str = "", baseline: str | None = None, label: str = "",
         overrides: list[str] = ()) -> dict[str, dict[str, float]]:
    return run_eval(run_dir, "finetune", body, dataset, baseline, label, pixels=False,
                    overrides=overrides)


if __name__ == "__main__":
    args = parse_args(__doc__)
    main(args.run_dir, args.dataset, args.baseline, overrides=args.set)
