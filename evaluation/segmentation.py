"""Semantic segmentation transfer: UperNet on four blocks of the encoder, mmsegmentation's MAE
ADE20K protocol (open-mmlab/mmsegmentation: configs/mae/upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py,
configs/_base_/models/upernet_mae.py, configs/_base_/datasets/ade20k.py; MAE arXiv 2111.06377
Sec. 5 and App. A.4, which follows BEiT's segmentation code; UperNet arXiv 1807.10221).

Blocks [3, 5, 7, 11] of a ViT-B (proportional for other depths; ``eval.segmentation.blocks``)
are rescaled by x4, x2, x1, x0.5 (``rescales``; strides 4-32 for ViT-B/16) and fused by
UperNet, whose BatchNorms are synchronised across all ranks in training (mmsegmentation's
``norm_cfg=dict(type='SyncBN')``; evaluation/dense_heads.py), so its statistics are those of the
global batch and every rank evaluates with the same running statistics; the finest logits are
upsampled to the input. In training an auxiliary FCN head on the third neck map (mmseg's
``auxiliary_head``: ``in_index=2``, 256 channels, one conv, SyncBN, dropout 0.1) adds its loss
x ``aux_weight`` (0.4); it is not used at inference. Each head's loss is mmseg's
CrossEntropyLoss: per-pixel cross-entropy at the label's size, label 255 contributing 0, averaged
over all pixels of the micro-batch (its ``avg_non_ignore=False``, the default of the mmseg the
BEiT / MAE runs used), not over the labelled ones. The encoder's attention gets BEiT's relative
position bias table, zero-initialised (``rel_pos``; mmseg's ``MAE`` backbone,
hpc_mim/models/relpos.py), on the crop's token grid: training crops are padded to the crop and
the sliding windows are crop-sized, so the grid is fixed. Training data: mmseg's pipeline
(hpc_mim/data/seg_transforms.py: keep-ratio resize within (4 x scale, scale) x U(0.5, 2),
``crop_size`` crops with ``cat_max_ratio``, flips, ``photometric`` distortion, padding with
ignore after normalisation); AdamW (0.9, 0.999) with layer-wise lr decay, linear warmup then
poly (power 1) decay to 0 (timm's PolyLRScheduler). Inference: sliding ``crop_size`` windows
with ``stride`` over the image rescaled within (4 x scale, scale), logits averaged where
windows overlap, then resized to the label's size. Metrics: mIoU (mean over classes with a
non-empty union, as mmsegmentation), per-class IoU, pixel accuracy, mean class accuracy; every
``eval_every`` iterations and at the end (``val/miou`` ... : the curve). Trained by the one
training loop (checkpoints, exact resume after a requeue, NaN stop) on all of the job's ranks,
each taking its slice of every batch and its shard of the validation images. Departures kept:
windows of an image smaller than the crop are zero-padded (mmseg feeds them unpadded), and
mmseg's MAE backbone's layer scale (``init_values=1.0``, learnable) is not added.

    python -m evaluation.segmentation --run-dir runs/<name> [--dataset ade20k] [--set KEY=VALUE] [--baseline random_init]
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.scheduler import PolyLRScheduler
from torch import nn

from evaluation.common import EvalContext, encoder_for, parse_args, run_eval
from evaluation.dense_heads import FCNHead, UperNetHead, default_blocks
from evaluation.dense_task import DenseTask, to_device
from evaluation.layer_decay import EncoderModel
from hpc_mim.data.dense import ADE20K, IGNORE, segmentation_transform
from hpc_mim.models.relpos import add_relative_position

AUX_INDEX = 2                   # mmseg's auxiliary_head in_index: the third neck map (x1 for ViT-B)


class Segmenter(EncoderModel):
    """Images (B, 3, H, W) -> class logits (B, K, H, W); with ``aux=True`` (training) the pair
    (logits, auxiliary logits (B, K, H, W) or None without an auxiliary head)."""

    def __init__(self, encoder: nn.Module, num_classes: int, channels: int, blocks: list[int],
                 rescales: list[float] = (4.0, 2.0, 1.0, 0.5), aux_channels: int = 0) -> None:
        super().__init__()
        self.encoder, self.blocks = encoder, blocks
        self.head = UperNetHead(encoder.embed_dim, channels, num_classes, rescales)
        self.aux_head = FCNHead(encoder.embed_dim, aux_channels, num_classes) if aux_channels else None

    def forward(self, x: torch.Tensor, aux: bool = False):
        maps = self.head.pyramid(self.encoder.forward_intermediates(x, self.blocks))
        logits = F.interpolate(self.head.decode(maps), x.shape[-2:], mode="bilinear", align_corners=False)
        if not aux:
            return logits
        if self.aux_head is None:
            return logits, None
        aux_logits = self.aux_head(maps[AUX_INDEX])
        return logits, F.interpolate(aux_logits, x.shape[-2:], mode="bilinear", align_corners=False)


def pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mmseg's CrossEntropyLoss (mmseg/models/losses/cross_entropy_loss.py, avg_non_ignore
    False): logits (B, K, H, W), target (B, H, W) -> the fp32 mean over all B*H*W pixels of the
    per-pixel cross-entropy, ignored pixels counting 0."""
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="none").mean()


def segmentation_loss(logits: torch.Tensor, aux_logits: torch.Tensor | None, target: torch.Tensor,
                      aux_weight: float) -> dict[str, torch.Tensor]:
    """``{"loss": decode + aux_weight * aux, "decode", "aux"}`` (mmseg's decode.loss_ce and
    aux.loss_ce, the latter already weighted there; logged unweighted here)."""
    decode = pixel_cross_entropy(logits, target)
    if aux_logits is None:
        return {"loss": decode, "decode": decode}
    aux = pixel_cross_entropy(aux_logits, target)
    return {"loss": decode + aux_weight * aux, "decode": decode, "aux": aux}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts, rows = true class, columns = predicted; ignored pixels left out."""
    keep = target != IGNORE
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def segmentation_metrics(conf: torch.Tensor) -> dict[str, float]:
    """mIoU, pixel accuracy, mean class accuracy (%) and IoU per class from a confusion matrix."""
    conf = conf.double()
    hit = conf.diag()
    union = conf.sum(0) + conf.sum(1) - hit
    iou = hit / union                                  # NaN for a class absent from both
    acc = hit / conf.sum(1)
    out = {"miou": iou.nanmean().item() * 100, "pixel_acc": (hit.sum() / conf.sum()).item() * 100,
           "macc": acc.nanmean().item() * 100}
    out.update({f"iou/{c}": v * 100 for c, v in enumerate(iou.tolist()) if not math.isnan(v)})
    return out


@torch.no_grad()
def slide_logits(model: nn.Module, image: torch.Tensor, num_classes: int, crop: int,
                 stride: int) -> torch.Tensor:
    """Logits (1, K, H, W) of one image (1, 3, H, W) from overlapping crop x crop windows
    (the last row / column aligned to the border; windows padded when the image is smaller)."""
    h, w = image.shape[-2:]
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r, c in itertools.product(range(rows), range(cols)):
        y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
        boxes.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))
    windows = torch.cat([F.pad(image[..., y1:y2, x1:x2], (0, crop - (x2 - x1), 0, crop - (y2 - y1)))
                         for y1, x1, y2, x2 in boxes])
    out = model(windows)                                                 # (n, K, crop, crop)
    logits = image.new_zeros(1, num_classes, h, w)
    count = image.new_zeros(1, 1, h, w)
    for (y1, x1, y2, x2), o in zip(boxes, out):
        logits[..., y1:y2, x1:x2] += o[:, :y2 - y1, :x2 - x1]
        count[..., y1:y2, x1:x2] += 1
    return logits / count


class SegmentationTask(DenseTask):
    """UperNet on the encoder, trained on ADE20K-layout crops; mIoU by sliding windows."""
    name = "segmentation"

    def __init__(self, ctx: EvalContext, encoder: nn.Module, train_set: ADE20K, val_set: ADE20K) -> None:
        super().__init__(ctx, train_set)
        s, self.val_set = ctx.section, val_set
        self.num_classes = ctx.info["num_classes"]
        self.aux_weight = s.aux_weight
        self.terms = ("decode", "aux") if s.aux_weight else ("decode",)
        if s.rel_pos:                  # before the optimizer is built: the tables are parameters
            grid = encoder.grid_of((s.crop_size, s.crop_size))
            add_relative_position(encoder, "table", grid)
        self.model = Segmenter(encoder, self.num_classes, s.channels,
                               s.blocks or default_blocks(encoder.depth), s.rescales,
                               aux_channels=s.aux_channels if s.aux_weight else 0).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.param_groups(s.weight_decay, s.layer_decay),
                                           lr=s.lr, betas=(0.9, 0.999), fused=True)

    def scheduler(self, optimizer, total_steps: int, steps_per_epoch: int) -> PolyLRScheduler:
        s = self.ctx.section
        return PolyLRScheduler(optimizer, t_initial=max(1, total_steps - s.warmup_steps), power=1.0,
                               lr_min=0.0, warmup_t=s.warmup_steps, warmup_lr_init=s.lr * 1e-6,
                               warmup_prefix=True, t_in_epochs=False)

    def forward(self, engine, batch) -> dict[str, torch.Tensor]:
        x, y = to_device(batch, self.device)
        logits, aux_logits = engine(x, aux=True)
        return segmentation_loss(logits, aux_logits, y, self.aux_weight)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Each rank segments its shard of the validation images; the confusion matrices are
        summed over ranks (one all-reduce), so every rank returns the same metrics."""
        model.eval()
        s, k = self.ctx.section, self.num_classes
        conf = torch.zeros(k, k, dtype=torch.long, device=self.device)
        for i in self.my_shard(len(self.val_set)):
            image, label = self.val_set[i]
            logits = slide_logits(model, image[None].to(self.device), k, s.crop_size, s.stride)
            logits = F.interpolate(logits.float(), label.shape[-2:], mode="bilinear", align_corners=False)
            conf += confusion_matrix(logits.argmax(1)[0], label.to(self.device), k)
        if self.world > 1:
            dist.all_reduce(conf)
        return segmentation_metrics(conf.cpu())


def body(ctx: EvalContext) -> Iterator[tuple[str, dict[str, float]]]:
    s, info = ctx.section, ctx.info
    if info.get("format") != "ade20k":
        raise ValueError(f"segmentation reads the ADE20K layout; {info['name']} is {info.get('format')!r}")
    train_set = ADE20K(info["root"], "train",
                       segmentation_transform(True, s.scale, s.crop_size, info["mean"], info["std"],
                                              s.photometric, s.cat_max_ratio))
    val_set = ADE20K(info["root"], "val",
                     segmentation_transform(False, s.scale, s.crop_size, info["mean"], info["std"]),
                     max_samples=s.max_val_samples)
    if ctx.proc.env.is_main:
        print(f"[segmentation] {info['name']}: {len(train_set)} train / {len(val_set)} val images, "
              f"{info['num_classes']} classes", flush=True)
    for b in ctx.baselines:
        encoder = encoder_for(ctx.run, ctx.cfg, b, drop_path=s.drop_path)
        ctx.seed()                                   # same head on every rank and per encoder
        task = SegmentationTask(ctx, encoder, train_set, val_set)
        ctx.seed(rank_offset=True)                   # drop path differs between ranks
        yield b, ctx.fit(b, task, task.budget())


def main(run_dir: str, dataset: str = "", baseline: str | None = None, label: str = "",
         overrides: list[str] = ()) -> dict[str, dict[str, float]]:
    return run_eval(run_dir, "segmentation", body, dataset, baseline, label, pixels=False,
                    overrides=overrides)


if __name__ == "__main__":
    args = parse_args(__doc__)
    main(args.run_dir, args.dataset, args.baseline, overrides=args.set)
