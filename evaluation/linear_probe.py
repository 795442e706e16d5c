"""Linear probing of frozen features (the MAE protocol, He et al. arXiv 2111.06377 App. A.2).

Head: BatchNorm1d(affine=False, eps=1e-6) + Linear (weights trunc-normal std 0.01), trained with
LARS (timm), lr = blr * batch / 256, weight decay 0, linear warmup then cosine. The encoder is
frozen, so features are extracted once (center crop, no augmentation) and the head trains on
them in memory, as dinov2's linear eval does: the MAE recipe's per-epoch random crops through the
frozen encoder would cost one encoder pass per epoch for a small gain.

    python -m evaluation.linear_probe --run-dir runs/<name> [--dataset NAME] [--set KEY=VALUE] [--baseline random_init|pixels]
"""
from __future__ import annotations

import torch
from timm.optim import Lars
from timm.scheduler import CosineLRScheduler
from torch import nn

from evaluation.common import frozen, parse_args, run_eval


def linear_head(dim: int, num_classes: int) -> nn.Module:
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def train_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor,
                val_y: torch.Tensor, num_classes: int, lp, seed: int = 0) -> dict[str, float]:
    """Train the head on (N, D) features; top-1/top-5 (%) on the validation features."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = linear_head(train_f.shape[1], num_classes).to(train_f.device)   # where the features are
    batch = min(lp.batch_size, train_f.shape[0])
    steps_per_epoch = train_f.shape[0] // batch
    total = lp.epochs * steps_per_epoch
    warmup = lp.warmup_epochs * steps_per_epoch
    opt = Lars(head.parameters(), lr=lp.blr * batch / 256, momentum=0.9, weight_decay=lp.weight_decay)
    sched = CosineLRScheduler(opt, t_initial=max(1, total - warmup), warmup_t=warmup,
                              warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    loss_fn = nn.CrossEntropyLoss()
    step = 0
    for _ in range(lp.epochs):
        head.train()
        order = torch.randperm(train_f.shape[0], generator=g).to(train_f.device)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            sched.step_update(step)
            loss = loss_fn(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        logits = head(val_f)
    top5 = logits.topk(min(5, num_classes), dim=1).indices
    return {"top1": (top5[:, 0] == val_y).float().mean().item() * 100,
            "top5": (top5 == val_y[:, None]).any(dim=1).float().mean().item() * 100,
            "train_loss": loss.item()}


def main(run_dir: str, dataset: str = "", baseline: str | None = None, label: str = "",
         overrides: list[str] = ()) -> dict[str, dict[str, float]]:
    return run_eval(run_dir, "linear_probe", frozen(train_probe), dataset, baseline, label,
                    overrides=overrides)


if __name__ == "__main__":
    args = parse_args(__doc__)
    main(args.run_dir, args.dataset, args.baseline, overrides=args.set)
