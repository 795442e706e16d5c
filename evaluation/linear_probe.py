"""Linear probing of frozen features (the MAE protocol, He et al. arXiv 2111.06377 App. A.2).

Head: BatchNorm1d(affine=False, eps=1e-6) + Linear (weights trunc-normal std 0.01), trained with
MAE's LARS (evaluation/lars.py, facebookresearch/mae:util/lars.py: the weight's step scaled by
0.001 ||p|| / ||g + wd p||, the bias plain SGD + momentum), lr = blr * batch / 256, weight decay
0, linear warmup then cosine. (Until issue 28 this was ``timm.optim.Lars``, which with weight
decay 0 never applies its trust ratio: plain SGD with momentum at lr 6.4 for batch 16384.) The encoder is
frozen, so features are extracted once (center crop, no augmentation; evaluation/features.py)
and the head trains on them in memory, as dinov2's linear eval does: the MAE recipe's per-epoch
random crops through the frozen encoder would cost one encoder pass per epoch for a small gain.
The head trains through the one training loop (checkpoints, resume, NaN stop): each of the
job's ranks takes its slice of every global batch; ZeRO stage 0, because LARS scales each
parameter by its own norm, which ZeRO's flattened partitions would mix.

    python -m evaluation.linear_probe --run-dir runs/<name> [--dataset NAME] [--set KEY=VALUE] [--baseline random_init|pixels]
"""
from __future__ import annotations

from typing import Iterator

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from evaluation.common import EvalContext, parse_args, run_eval
from evaluation.features import frozen
from evaluation.lars import LARS
from hpc_mim.train.loop import Budget, Task


def linear_head(dim: int, num_classes: int) -> nn.Module:
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


class ProbeTask(Task):
    """Features (N, D) in memory -> logits (B, num_classes) of the head."""
    name = "linear_probe"

    def __init__(self, train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor,
                 val_y: torch.Tensor, num_classes: int, lp, batch: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        self.train_f, self.train_y, self.val_f, self.val_y = train_f, train_y, val_f, val_y
        self.lp, self.batch, self.seed, self.rank, self.micro = lp, batch, seed, rank, batch // world
        self.num_classes = num_classes
        self.model = linear_head(train_f.shape[1], num_classes).to(train_f.device)  # where the features are
        self.optimizer = LARS(self.model.parameters(), lr=lp.blr * batch / 256, momentum=0.9,
                              weight_decay=lp.weight_decay)
        self.loss_fn = nn.CrossEntropyLoss()

    def micro_batches_per_epoch(self) -> int:
        return len(self.train_f) // self.batch

    def batches(self, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Global batch i of the epoch's permutation (a function of seed and epoch); this rank
        takes its slice of it."""
        order = torch.randperm(len(self.train_f), generator=torch.Generator().manual_seed(
            self.seed * 1000 + epoch)).to(self.train_f.device)
        for i in range(skip, self.micro_batches_per_epoch()):
            start = i * self.batch + self.rank * self.micro
            idx = order[start:start + self.micro]
            yield self.train_f[idx], self.train_y[idx]

    def scheduler(self, optimizer, total_steps: int, steps_per_epoch: int) -> CosineLRScheduler:
        warmup = self.lp.warmup_epochs * steps_per_epoch
        return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup), warmup_t=warmup,
                                 warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)

    def forward(self, engine, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": self.loss_fn(engine(x), y)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1 / top-5 (%) on the validation features (every rank holds all of them)."""
        model.eval()
        top5 = model(self.val_f).topk(min(5, self.num_classes), dim=1).indices
        y = self.val_y
        return {"top1": (top5[:, 0] == y).float().mean().item() * 100,
                "top5": (top5 == y[:, None]).any(dim=1).float().mean().item() * 100}


def compute(ctx: EvalContext, baseline: str, train_f, train_y, val_f, val_y,
            num_classes: int) -> dict[str, float]:
    lp, world = ctx.section, ctx.proc.env.world_size
    batch = min(lp.batch_size, len(train_f)) // world * world
    ctx.seed()                                          # the same head on every rank
    task = ProbeTask(train_f, train_y, val_f, val_y, num_classes, lp, batch, ctx.cfg.train.seed,
                     ctx.proc.env.rank, world)
    steps_per_epoch = len(train_f) // batch
    budget = Budget(batch, batch // world, epochs=lp.epochs, zero_stage=0,
                    log_every=steps_per_epoch, checkpoint_every=steps_per_epoch)  # a small head: each epoch
    return ctx.fit(baseline, task, budget)


def main(run_dir: str, dataset: str = "", baseline: str | None = None, label: str = "",
         overrides: list[str] = ()) -> dict[str, dict[str, float]]:
    return run_eval(run_dir, "linear_probe", frozen(compute), dataset, baseline, label,
                    overrides=overrides)


if __name__ == "__main__":
    args = parse_args(__doc__)
    main(args.run_dir, args.dataset, args.baseline, overrides=args.set)
