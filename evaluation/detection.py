"""Object detection / instance segmentation transfer: ViTDet (Li et al. arXiv 2203.16527), as
facebookresearch/detectron2 projects/ViTDet configs/COCO/mask_rcnn_vitdet_b_100ep.py runs it.

The backbone runs ViTDet's attention: 14 x 14 token windows, global attention in 4 evenly
spaced blocks (``attention: global`` keeps every block global, as pre-trained), with ViTDet's
decomposed relative positions added to every block's logits, zero-initialised (``rel_pos``;
hpc_mim/models/relpos.py: windowed blocks' tables sized by the window, global ones' by the
``image_size`` grid). The last block's map is rescaled by ``scale_factors`` (ViTDet's x4, x2,
x1, x0.5: strides 4-32 for ViT-B/16) plus a pooled level by the simple feature pyramid
(evaluation/dense_heads.py), and the pyramid feeds torchvision's Mask R-CNN (Faster R-CNN when
the annotations have no masks) with ViTDet's heads (evaluation/vitdet_heads.py: 2-conv RPN
head, 4-conv + 1-fc box head and 4-conv mask head with LayerNorm; ``heads: torchvision`` keeps
torchvision's defaults), detectron2's ROIAlignV2 pooling (aligned, adaptive sampling; 7 x 7 boxes,
14 x 14 masks; ``roi_align: v1`` = torchvision's) and L1 box losses (evaluation/vitdet_losses.py:
RPN and Fast R-CNN, normalised as detectron2; ``box_loss: smooth_l1`` = torchvision's, beta
1/9). Training images: flip + large-scale jitter (hpc_mim/data/lsj.py: scale
0.1-2.0 of ``image_size``, ``image_size`` crop; ``lsj: false`` resizes every image to
``image_size`` instead); evaluation images: longest side resized to ``image_size`` (torchvision's
transform, which also normalises). Every batch is padded to an ``image_size`` square after
normalisation (ViTDet's ``square_pad``). Training: AdamW (0.9, 0.999) with layer-wise lr decay
(the relative position tables in their block's layer), linear warmup, lr x0.1 at 88.9% and
96.3% of the steps (ViTDet's schedule, timm's MultiStepLRScheduler). Metrics: COCO box AP /
AP50 / AP75 and mask AP from pycocotools, every ``eval_every`` iterations and at the end
(``val/box_ap`` ...: the curve): each rank detects on its shard of the validation images, rank
0 gathers the results, runs COCOeval once and broadcasts the metrics. Trained by the one
training loop (checkpoints, exact resume, NaN stop) on all of the job's ranks.

Not reproduced from detectron2: its pixel-space polygon masks (masks here are rasterised at
load).

Precision: with ``precision: bf16`` the loop runs the forward under bf16 autocast, and only the
backbone (ViT + simple feature pyramid) follows it; its maps are cast to fp32 and the R-CNN
(anchors, RPN head, box coding, proposals, RoIAlign, box / mask heads, postprocessing) runs in
fp32 with autocast off. torchvision's AnchorGenerator and BoxCoder take the feature maps' dtype,
and bf16's 8-bit mantissa puts box coordinates on a 4-8 px grid at 512-1024 px. detectron2
(ViTDet's code) also keeps this arithmetic in float under AMP: fp32 anchor buffers, and
``Box2BoxTransform.apply_deltas`` casts the deltas to float. Its heads' convs and linears run in
bf16 there; here they are fp32 too (the simplest correct split; on GPUs cuDNN convolutions use
TF32 by default, and the heads are a small part of the compute next to the ViT).

    python -m evaluation.detection --run-dir runs/<name> [--dataset coco] [--set KEY=VALUE] [--baseline random_init]
"""
from __future__ import annotations

import contextlib
import copy
import io
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from timm.scheduler import MultiStepLRScheduler
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import box_convert

from evaluation import vitdet_heads as heads
from evaluation import vitdet_losses
from evaluation.common import EvalContext, encoder_for, parse_args, run_eval
from evaluation.dense_heads import SimpleFeaturePyramid
from evaluation.dense_task import DenseTask, to_device
from evaluation.layer_decay import EncoderModel
from hpc_mim.data.dense import coco_detection, coco_of, collate_pairs, has_masks, num_categories
from hpc_mim.models.relpos import add_relative_position, set_grid
from hpc_mim.models.windows import evenly_spaced, vitdet_features


class ViTDetBackbone(nn.Module):
    """Images (B, 3, H, W) -> OrderedDict of fp32 pyramid maps (torchvision's backbone contract).
    ``window`` > 0: ViTDet's windowed attention with global attention in ``global_blocks``
    (hpc_mim/models/windows.py); 0: every block global, cls token kept, as pre-trained.

    ``autocast``: the (enabled, dtype) it computes under, set by ``Detector.forward`` from the
    caller's autocast (which the detector turns off for the R-CNN around this backbone)."""

    def __init__(self, encoder: nn.Module, out_channels: int, factors: list[float],
                 window: int = 0, global_blocks: list[int] = (), rel_pos_grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.encoder, self.window, self.global_blocks = encoder, window, list(global_blocks)
        self.rel_pos = rel_pos_grid is not None
        if self.rel_pos:        # ViTDet's use_rel_pos: zero tables, windowed blocks by the window
            add_relative_position(encoder, "decomposed", rel_pos_grid, window, self.global_blocks)
        self.pyramid = SimpleFeaturePyramid(encoder.embed_dim, out_channels, factors)
        self.out_channels = out_channels
        self.autocast: tuple[bool, torch.dtype] = (False, torch.bfloat16)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        enabled, dtype = self.autocast
        if self.rel_pos:        # the square-padded batch: image_size / patch (a no-op then)
            set_grid(self.encoder, self.encoder.grid_of(x.shape[-2:]))
        with torch.autocast(x.device.type, dtype, enabled=enabled):
            if self.window:
                maps = self.pyramid(vitdet_features(self.encoder, x, self.window, self.global_blocks))
            else:
                maps = self.pyramid(self.encoder.forward_intermediates(x, [self.encoder.depth - 1])[0])
        # fp32 for the R-CNN: anchors, box coding and RoIAlign take the maps' dtype
        return OrderedDict((k, v.float()) for k, v in maps.items())


class Detector(EncoderModel):
    """torchvision's two-stage detector on the ViTDet backbone; ``forward`` is the detector's
    (a loss dict in training, per-image predictions in eval mode), fp32 outside the backbone
    whatever the caller's autocast (see the module docstring)."""
    encoder_prefix = "rcnn.backbone.encoder."

    def __init__(self, encoder: nn.Module, num_classes: int, s, mean, std, masks: bool) -> None:
        super().__init__()
        anchors = AnchorGenerator(tuple((a,) for a in s.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
        c, kind = s.fpn_channels, s.heads
        patch = encoder.patch_size
        scales = [f / patch for f in s.scale_factors]           # 1 / stride of levels "0".."3"
        kwargs: dict[str, Any] = dict(
            num_classes=None, min_size=s.image_size, max_size=s.image_size,
            image_mean=list(mean), image_std=list(std), rpn_anchor_generator=anchors,
            rpn_head=heads.rpn_head(kind, c, anchors.num_anchors_per_location()[0]),
            box_roi_pool=heads.roi_pool(s.roi_align, 7, scales),
            box_head=heads.box_head(kind, c, s.box_head_dim),
            box_predictor=heads.box_predictor(kind, s.box_head_dim, num_classes),
            box_batch_size_per_image=s.rois_per_image, box_detections_per_img=s.detections_per_image,
            rpn_pre_nms_top_n_train=s.proposals_train[0], rpn_post_nms_top_n_train=s.proposals_train[1],
            rpn_pre_nms_top_n_test=s.proposals_test[0], rpn_post_nms_top_n_test=s.proposals_test[1],
            # ViTDet's square_pad: every batch padded to image_size x image_size (after
            # normalisation, with zeros), so the global blocks' grid is the same for all
            size_divisible=s.image_size,
            # large-scale jitter has sized the training images already (<= image_size)
            _skip_resize=s.lsj)
        if masks:
            kwargs.update(mask_roi_pool=heads.roi_pool(s.roi_align, 14, scales),
                          mask_head=heads.mask_head(kind, c),
                          mask_predictor=heads.mask_predictor(kind, c, num_classes))
        detector = MaskRCNN if masks else FasterRCNN
        window = s.window_size if s.attention == "window" else 0
        backbone = ViTDetBackbone(encoder, c, s.scale_factors, window,
                                  s.global_blocks or evenly_spaced(encoder.depth),
                                  (s.image_size // patch,) * 2 if s.rel_pos else None)
        self.rcnn = detector(backbone, **kwargs)
        if s.box_loss == "l1":
            vitdet_losses.use_l1_box_losses(self.rcnn)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        # torchvision's GeneralizedRCNN calls the backbone between its transform and its RPN:
        # autocast is off around all of it, and back on (the caller's) inside the backbone
        device = images[0].device.type
        self.rcnn.backbone.autocast = (torch.is_autocast_enabled(device),
                                       torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            return self.rcnn(images, targets)


def to_coco_results(image_id: int, output: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One image's predictions in COCO's results format (bbox xywh, RLE masks thresholded at 0.5)."""
    boxes = box_convert(output["boxes"], "xyxy", "xywh").tolist()
    results = [{"image_id": image_id, "category_id": int(c), "bbox": [round(v, 2) for v in b],
                "score": float(s)}
               for b, c, s in zip(boxes, output["labels"], output["scores"])]
    if "masks" in output:
        binary = (output["masks"][:, 0] > 0.5).numpy().astype(np.uint8)        # (N, H, W)
        for r, m in zip(results, binary):
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            r["segmentation"] = rle
    return results


def coco_metrics(coco_gt: COCO, results: list[dict[str, Any]], iou_types: list[str],
                 image_ids: list[int] | None = None) -> dict[str, float]:
    """COCO AP, AP50, AP75 (%) per IoU type ("bbox", "segm"); 0 when nothing was predicted."""
    names = {"bbox": "box", "segm": "mask"}
    out = {}
    for iou_type in iou_types:
        key = names[iou_type]
        if not results:
            out.update({f"{key}_ap": 0.0, f"{key}_ap50": 0.0, f"{key}_ap75": 0.0})
            continue
        # COCOeval rewrites the ground truth's polygons as RLE in place: evaluate on a copy, so
        # the dataset still reads (the next encoder's evaluation, the next IoU type)
        gt = copy.deepcopy(coco_gt)
        with contextlib.redirect_stdout(io.StringIO()):              # pycocotools prints a lot
            evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        ap, ap50, ap75 = (max(0.0, float(v)) * 100 for v in evaluator.stats[:3])   # -1 = no GT
        out.update({f"{key}_ap": ap, f"{key}_ap50": ap50, f"{key}_ap75": ap75})
    return out


class DetectionTask(DenseTask):
    """torchvision's two-stage detector on the ViTDet backbone; COCO AP by pycocotools."""
    name = "detection"

    def __init__(self, ctx: EvalContext, encoder: nn.Module, train_set, val_set, masks: bool) -> None:
        super().__init__(ctx, train_set, collate_pairs)
        s, info = ctx.section, ctx.info
        self.val_set, self.masks, self.coco = val_set, masks, coco_of(val_set)
        self.terms = ("classifier", "box_reg", "objectness", "rpn_box_reg") + (("mask",) if masks else ())
        self.model = Detector(encoder, num_categories(self.coco), s, info["mean"], info["std"],
                              masks).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.param_groups(s.weight_decay, s.layer_decay),
                                           lr=s.lr, betas=(0.9, 0.999), fused=True)

    def scheduler(self, optimizer, total_steps: int, steps_per_epoch: int) -> MultiStepLRScheduler:
        s = self.ctx.section
        return MultiStepLRScheduler(optimizer, decay_t=[int(total_steps * 0.889), int(total_steps * 0.963)],
                                    decay_rate=0.1, warmup_t=s.warmup_steps,
                                    warmup_lr_init=s.lr * 1e-3, t_in_epochs=False)

    def forward(self, engine, batch) -> dict[str, torch.Tensor]:
        images, targets = to_device(batch, self.device)
        losses = engine(images, [{k: v for k, v in t.items() if k != "image_id"} for t in targets])
        terms = {k.removeprefix("loss_"): v.float() for k, v in losses.items()}
        return {"loss": sum(terms.values()), **terms}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Each rank detects on its shard of the validation images (in training-sized batches:
        a Mask R-CNN keeps ~1000 proposals per image); rank 0 gathers and scores all of them
        (COCOeval once, not once per rank) and broadcasts the metrics, so every rank returns
        the same. Over NCCL, ``gather_object`` / ``broadcast_object_list`` move the pickled
        objects through tensors on the current CUDA device: ``training_device``
        (hpc_mim/distributed/env.py) has set it to the rank's own GPU."""
        model.eval()
        results: list[dict[str, Any]] = []
        image_ids: list[int] = []
        shard = Subset(self.val_set, list(self.my_shard(len(self.val_set))))
        for images, targets in DataLoader(shard, self.micro, collate_fn=collate_pairs):
            outputs = model([im.to(self.device) for im in images])
            for target, output in zip(targets, outputs):
                image_ids.append(int(target["image_id"]))
                results += to_coco_results(image_ids[-1], {k: v.float().cpu() for k, v in output.items()})
        iou_types = ["bbox", "segm"] if self.masks else ["bbox"]
        if self.world == 1:
            return coco_metrics(self.coco, results, iou_types, sorted(image_ids))
        gathered: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object((results, image_ids), gathered, dst=0)
        # rank 0's metrics, or its error as text: the other ranks must not wait in the
        # broadcast (until the collective timeout) for a rank 0 that raised
        outcome: list[dict[str, float] | str | None] = [None]
        error: Exception | None = None
        if self.rank == 0:
            try:
                outcome[0] = coco_metrics(self.coco, [r for rs, _ in gathered for r in rs], iou_types,
                                          sorted(i for _, ids in gathered for i in ids))
            except Exception as e:                  # noqa: BLE001 - raised again below
                error, outcome[0] = e, f"{type(e).__name__}: {e}"
        dist.broadcast_object_list(outcome, src=0)
        if error is not None:
            raise error
        if isinstance(outcome[0], str):
            raise RuntimeError(f"rank 0's COCO evaluation failed: {outcome[0]}")
        return outcome[0]


def body(ctx: EvalContext) -> Iterator[tuple[str, dict[str, float]]]:
    s, info = ctx.section, ctx.info
    if info.get("format") != "coco":
        raise ValueError(f"detection reads the COCO layout; {info['name']} is {info.get('format')!r}")
    lsj = (s.image_size, *s.lsj_scale) if s.lsj else None
    train_set = coco_detection(info["root"], "train", train=True, lsj=lsj)
    val_set = coco_detection(info["root"], "val", train=False, max_samples=s.max_val_samples)
    masks = has_masks(coco_of(train_set))
    if ctx.proc.env.is_main:
        print(f"[detection] {info['name']}: {len(train_set)} train / {len(val_set)} val images, "
              f"{len(coco_of(val_set).getCatIds())} categories, {'Mask' if masks else 'Faster'} "
              f"R-CNN ({s.heads} heads), {s.attention} attention, rel_pos {s.rel_pos}, "
              f"lsj {s.lsj_scale if s.lsj else 'off'}", flush=True)
    for b in ctx.baselines:
        encoder = encoder_for(ctx.run, ctx.cfg, b, drop_path=s.drop_path)
        ctx.seed()                                   # same heads on every rank and per encoder
        task = DetectionTask(ctx, encoder, train_set, val_set, masks)
        ctx.seed(rank_offset=True)                   # proposal sampling, drop path per rank
        yield b, ctx.fit(b, task, task.budget())


def main(run_dir: str, dataset: str = "", baseline: str | None = None, label: str = "",
         overrides: list[str] = ()) -> dict[str, dict[str, float]]:
    return run_eval(run_dir, "detection", body, dataset, baseline, label, pixels=False,
                    overrides=overrides)


if __name__ == "__main__":
    args = parse_args(__doc__)
    main(args.run_dir, args.dataset, args.baseline, overrides=args.set)
