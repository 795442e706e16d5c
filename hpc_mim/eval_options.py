"""Evaluation options: one dataclass per evaluation (a section of ``eval:``), defaults = the
papers' ViT-B protocols; presets shrink them.

Which evaluations run after pre-training, and on which datasets, is the top-level ``evals:``
list of the config: ``name`` (the section's own ``dataset``; "" = the pre-training dataset) or
``name:dataset`` for any dataset of the right kind in configs/datasets.yaml, e.g.

    evals: [knn, linear_probe, linear_probe:cub, finetune, segmentation:ade20k, detection:coco]

Every numeric option has its range in its class's ``RANGES`` table (inherited tables add up),
checked as values are read (hpc_mim/config_checks.py). Torch-free, so the login-node CLI
validates them before anything is queued.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from hpc_mim.config_checks import COUNT_MAX, LAYERS_MAX, MINUTES_MAX, PIXELS_MAX, WIDTH_MAX, Range
from hpc_mim.config_error import ConfigError
from hpc_mim.data.augment_policy import parse_auto_augment

# the kind of dataset each evaluation reads (hpc_mim/datasets.py)
EVAL_KINDS = {"knn": "classification", "linear_probe": "classification",
              "fewshot": "classification", "finetune": "classification", "segmentation": "segmentation",
              "detection": "detection", "diagnostics": "classification"}


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"eval.{key}: {message}")


def _check_factors(key: str, factors: list[float]) -> None:
    """Four pyramid levels, finest first, each a power of two of the token grid."""
    ok = len(factors) == 4 and all(f > 0 and math.log2(f).is_integer() for f in factors) \
        and list(factors) == sorted(factors, reverse=True)
    _check(ok, key, f"{factors}: give four powers of two, finest first, e.g. [4, 2, 1, 0.5]")


def _check_pooling(section: str, pooling: str) -> None:
    _check(pooling in ("cls", "mean"), f"{section}.pooling", f"{pooling!r}; choose cls or mean")


@dataclass
class Resources:
    """The evaluation job's share of the cluster. 0 (or -1 for GPUs) = as pre-training
    (``cluster.nodes``, ``cluster.gpus_per_node``, ``cluster.tasks_per_node``,
    ``cluster.eval_time_min``); one task per GPU on a GPU cluster."""
    nodes: int = 1
    gpus_per_node: int = -1
    tasks_per_node: int = 0
    time_min: int = 0
    RANGES: ClassVar[dict[str, Range]] = {
        "nodes": ("[0, 65536]", "0 = as pre-training"), "gpus_per_node": ("[-1, 1024]", "-1 = as pre-training"),
        "tasks_per_node": ("[0, 1024]", "0 = as pre-training"),
        "time_min": (f"[0, {MINUTES_MAX}]", "SLURM minutes, at most a year; 0 = cluster.eval_time_min")}

    def resources(self, cluster) -> tuple[int, int, int, int]:
        """(nodes, tasks per node, GPUs per node, minutes) with the defaults resolved."""
        gpus = cluster.gpus_per_node if self.gpus_per_node < 0 else self.gpus_per_node
        tasks = self.tasks_per_node or (gpus if gpus else cluster.tasks_per_node)
        return (self.nodes or cluster.nodes, tasks, gpus, self.time_min or cluster.eval_time_min)

    def check_resources(self, key: str, cluster) -> int:
        """The job's world size, after checking that its batches divide over it."""
        for name in ("nodes", "tasks_per_node", "time_min"):
            _check(getattr(self, name) >= 0, f"{key}.{name}", "must be >= 0 (0: as pre-training)")
        nodes, tasks, gpus, _ = self.resources(cluster)
        _check(not gpus or tasks == gpus, f"{key}.tasks_per_node",
               f"{tasks} tasks for {gpus} GPUs per node: one task per GPU")
        world = nodes * tasks
        if not isinstance(self, Trained):     # the probe rounds its batch to the world size
            return world
        batch, micro = self.batch_size, self.micro_batch(world)
        _check(batch % (micro * world) == 0 and micro > 0, f"{key}.batch_size",
               f"{batch} does not divide over {nodes} node(s) x {tasks} task(s)"
               + (f" x micro batch {micro}" if getattr(self, "micro_batch_size", 0) else "")
               + f"; set eval.{key}.batch_size, .nodes or .tasks_per_node")
        return world

    def micro_batch(self, world: int) -> int:
        """Images per process and step on ``world`` processes: ``micro_batch_size`` where the
        job has one, else the batch spread over the processes (the rest is accumulation)."""
        return getattr(self, "micro_batch_size", 0) or max(1, self.batch_size // world)


@dataclass
class Trained(Resources):
    """How a trained evaluation is logged and checkpointed by the one training loop."""
    log_every: int = 50                 # optimizer steps between loss points
    checkpoint_every: int = 1000        # steps between checkpoints (and on a stop signal, at the end)
    eval_every: int = 0                 # steps between evaluations (the curve); 0 = at the end only
    precision: str = "bf16"             # the papers trained with AMP; bf16 = autocast, fp32 weights
    zero_stage: int = 2
    clip_grad: float = 0.0
    RANGES: ClassVar[dict[str, Range]] = {
        "log_every": f"[1, {COUNT_MAX}]", "checkpoint_every": f"[1, {COUNT_MAX}]",
        "eval_every": (f"[0, {COUNT_MAX}]", "0 = at the end only"), "zero_stage": "[0, 2]",
        "clip_grad": ("[0, inf)", "0 = no clipping")}

    def check_trained(self, key: str) -> None:
        _check(self.precision in ("fp32", "bf16"), f"{key}.precision", "choose fp32 or bf16")
        _check(self.zero_stage in (0, 1, 2), f"{key}.zero_stage",
               f"{self.zero_stage}; choose 0-2 (every rank's inference runs its own shard of "
               "the validation set, which ZeRO-3's gathers would have to match batch for batch)")
        for name in ("log_every", "checkpoint_every"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(self.eval_every >= 0, f"{key}.eval_every", "must be >= 0")


KNN_PROTOCOLS = ("dino", "latentmim")


@dataclass
class KNNConfig(Resources):
    """kNN classification on frozen features (evaluation/knn.py), by ``protocol``:
    dino: DINO's weighted kNN, train -> val: L2-normalised features, votes weighted by
    exp(sim / T) (metrics ``top1``, ``knn_top1_k<k>``); latentmim: LatentMIM's 1-NN leave-one-out
    within the validation set on the mean of the patch tokens before the final norm
    (yibingwei-1/LatentMIM:util/misc.py ``eval_knn``; metric ``loo_top1``; ``ks``,
    ``temperature``, ``pooling`` and ``max_train_samples`` do not apply)."""
    dataset: str = ""
    protocol: str = "dino"              # dino | latentmim
    ks: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    pooling: str = "cls"                # cls | mean
    max_train_samples: int = 0
    RANGES: ClassVar[dict[str, Range]] = {
        "ks": f"[1, {COUNT_MAX}]", "temperature": ("(0, inf)", "votes are weighted by exp(sim / T)"),
        "max_train_samples": (f"[0, {COUNT_MAX}]", "0 = all")}

    def features(self) -> tuple[str, bool]:
        """(pooling, final_norm) of the features this protocol reads."""
        return ("mean", False) if self.protocol == "latentmim" else (self.pooling, True)

    def validate(self) -> None:
        _check_pooling("knn", self.pooling)
        _check(self.protocol in KNN_PROTOCOLS, "knn.protocol",
               f"{self.protocol!r}; choose from {list(KNN_PROTOCOLS)}")
        _check(self.protocol != "dino" or bool(self.ks), "knn.ks", "give one or more k")


@dataclass
class FewshotConfig(Resources):
    """UMD's few-shot probe (philippe-eecs/small-vision: big_vision/evaluators/fewshot_lsr.py,
    configs/common_fewshot.py): ``shots`` training images per class, closed-form ridge
    regression on the whitened frozen features to +-1 one-hot targets, accuracy on the whole
    validation split, averaged over ``draws`` seeded draws of the shots (evaluation/fewshot.py)."""
    dataset: str = ""
    shots: list[int] = field(default_factory=lambda: [100])   # the first is the headline ``top1``
    l2_reg: float = 1024.0              # the authors' fixed ridge strength (not tuned)
    draws: int = 1                      # the authors log one draw (seed 0); draw d uses seed d
    pooling: str = "cls"                # UMD's pre_logits: the mean of its cls tokens, final norm
    max_train_samples: int = 0          # the pool the shots are drawn from (0 = the whole split)
    RANGES: ClassVar[dict[str, Range]] = {
        "shots": f"[1, {COUNT_MAX}]", "l2_reg": "(0, inf)", "draws": "[1, 10000]",
        "max_train_samples": (f"[0, {COUNT_MAX}]", "0 = all")}

    def features(self) -> tuple[str, bool]:
        return self.pooling, True

    def validate(self) -> None:
        _check_pooling("fewshot", self.pooling)
        _check(bool(self.shots) and all(n >= 1 for n in self.shots), "fewshot.shots",
               f"{self.shots}: give one or more counts >= 1")
        _check(self.l2_reg > 0, "fewshot.l2_reg", "must be > 0")
        _check(self.draws >= 1, "fewshot.draws", "must be >= 1")


@dataclass
class LinearProbeConfig(Resources):
    """MAE's linear probe: BatchNorm1d(affine=False) + Linear on frozen features, MAE's LARS
    (evaluation/lars.py; trust ratio on the weight even at weight decay 0)."""
    dataset: str = ""
    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 16384
    blr: float = 0.1                    # lr = blr * batch_size / 256
    weight_decay: float = 0.0
    pooling: str = "cls"
    max_train_samples: int = 0
    RANGES: ClassVar[dict[str, Range]] = {
        "epochs": "[1, 1000000]", "warmup_epochs": "[0, 1000000]", "batch_size": f"[1, {COUNT_MAX}]",
        "blr": "(0, inf)", "weight_decay": "[0, inf)", "max_train_samples": (f"[0, {COUNT_MAX}]", "0 = all")}

    def validate(self) -> None:
        _check_pooling("linear_probe", self.pooling)


FINETUNE_PROTOCOLS = ("mae", "lut")
# LUT's recipe where it departs from MAE's (naver-ai/lut: docs/FINETUNE.md, ViT-B: blr 1e-3,
# layer decay 0.75; main_finetune.py: lr = blr * sqrt(batch) / 8); the rest is MAE's
LUT_FINETUNE = {"blr": 1e-3, "layer_decay": 0.75}


@dataclass
class FinetuneConfig(Trained):
    """MAE's end-to-end fine-tuning (arXiv 2111.06377 App. A.3, ViT-B values), on DeepSpeed;
    on as many GPUs as pre-training (MAE: 1024 = 32 per GPU x 32)."""
    nodes: int = 0
    dataset: str = ""
    # mae: the recipe every method is compared under; lut: LUT's own (LUT_FINETUNE and its
    # square-root lr scaling), to reproduce its 84.2: a value left at MAE's default takes LUT's
    protocol: str = "mae"
    epochs: int = 100
    warmup_epochs: float = 5
    batch_size: int = 1024              # global; lr = blr * batch_size / 256
    micro_batch_size: int = 0           # per process (0 = batch / world); the rest is accumulation
    blr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    mixup: float = 0.8                  # Beta(alpha, alpha) mixing; 0 disables
    cutmix: float = 1.0
    smoothing: float = 0.1              # label smoothing
    # timm's RandAugment string (MAE: rand-m9-mstd0.5-inc1; keys m n p mstd mmax inc), or
    # tv-rand-n2-m9 for torchvision's RandAugment(2, 9) (before issue 28); "" disables
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25                # random erasing probability
    pooling: str = "mean"               # MAE fine-tunes on the average of the patch tokens
    max_train_samples: int = 0
    max_steps: int = 0                  # > 0 stops early (tests)
    RANGES: ClassVar[dict[str, Range]] = {
        "epochs": "[1, 1000000]", "warmup_epochs": "[0, 1000000]", "batch_size": f"[1, {COUNT_MAX}]",
        "micro_batch_size": (f"[0, {COUNT_MAX}]", "0 = batch / world"), "blr": "(0, inf)",
        "min_lr": "[0, inf)", "weight_decay": "[0, inf)", "layer_decay": "(0, 1]",
        "drop_path": ("[0, 1)", "a probability; 1 drops every residual branch"),
        "mixup": ("[0, inf)", "a Beta(alpha, alpha) parameter; 0 disables"),
        "cutmix": ("[0, inf)", "a Beta(alpha, alpha) parameter; 0 disables"),
        "smoothing": ("[0, 1)", "label smoothing"), "reprob": ("[0, 1]", "a probability"),
        "max_train_samples": (f"[0, {COUNT_MAX}]", "0 = all"), "max_steps": (f"[0, {COUNT_MAX}]", "0 = all")}

    def peak_lr(self) -> float:
        """MAE scales the base lr linearly with the batch (blr * batch / 256,
        facebookresearch/mae:main_finetune.py); LUT by its square root (blr * sqrt(batch) / 8,
        naver-ai/lut:main_finetune.py)."""
        if self.protocol == "lut":
            return self.blr * math.sqrt(self.batch_size) / 8
        return self.blr * self.batch_size / 256

    def validate(self) -> None:
        _check(self.protocol in FINETUNE_PROTOCOLS, "finetune.protocol",
               f"{self.protocol!r}; choose from {list(FINETUNE_PROTOCOLS)}")
        if self.protocol == "lut":          # resolved here, so the run's config.yaml shows them
            for key, value in LUT_FINETUNE.items():
                if getattr(self, key) == getattr(FinetuneConfig, key):
                    setattr(self, key, value)
        _check_pooling("finetune", self.pooling)
        self.check_trained("finetune")
        _check(not self.micro_batch_size or self.batch_size % self.micro_batch_size == 0,
               "finetune.batch_size", f"{self.batch_size} is not a multiple of "
               f"eval.finetune.micro_batch_size={self.micro_batch_size}")
        _check(0 < self.layer_decay <= 1, "finetune.layer_decay", "must be in (0, 1]")
        try:
            parse_auto_augment(self.auto_augment)
        except ValueError as e:
            raise ConfigError(f"eval.finetune.auto_augment: {e}") from None


@dataclass
class SegmentationConfig(Trained):
    """UperNet on four ViT blocks (mmsegmentation's MAE ADE20K setup,
    configs/mae/upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py with configs/_base_/models/
    upernet_mae.py and configs/_base_/datasets/ade20k.py; MAE arXiv 2111.06377 App. A.4): 160k
    iterations of batch 16, AdamW lr 1e-4, layer decay 0.65, 1500 warmup iterations then poly,
    512 crops; the auxiliary FCN head on the third neck map (loss weight 0.4), the photometric
    distortion and crops with at most 75% of one class in training; BEiT's relative position
    bias (zero-initialised) in the encoder. Each can be turned off (toy presets)."""
    dataset: str = "ade20k"
    steps: int = 160000
    warmup_steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    channels: int = 768                 # UperNet width
    blocks: list[int] = field(default_factory=list)  # [] = [3, 5, 7, 11] scaled to the depth
    rescales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])  # x the token grid
    scale: int = 512                    # resize bounds: short side, long side 4x (mmseg's (2048, 512))
    crop_size: int = 512                # training crops and sliding-window size
    stride: int = 341                   # sliding-window stride
    max_val_samples: int = 0
    aux_weight: float = 0.4             # auxiliary FCN head's loss weight; 0 = no auxiliary head
    aux_channels: int = 256             # its width
    photometric: bool = True            # mmseg's PhotoMetricDistortion in training
    cat_max_ratio: float = 0.75         # crops redrawn while one class covers this much; 1 = off
    rel_pos: bool = True                # BEiT's relative position bias table on the crop's grid
    RANGES: ClassVar[dict[str, Range]] = {
        "steps": f"[1, {COUNT_MAX}]", "warmup_steps": f"[0, {COUNT_MAX}]", "batch_size": f"[1, {COUNT_MAX}]",
        "lr": "(0, inf)", "weight_decay": "[0, inf)", "layer_decay": "(0, 1]",
        "drop_path": ("[0, 1)", "a probability; 1 drops every residual branch"),
        "channels": f"[1, {WIDTH_MAX}]", "blocks": (f"[0, {LAYERS_MAX})", "block indices"),
        "rescales": "(0, inf)", "scale": f"[1, {PIXELS_MAX}]", "crop_size": f"[1, {PIXELS_MAX}]",
        "stride": f"[1, {PIXELS_MAX}]", "max_val_samples": (f"[0, {COUNT_MAX}]", "0 = all"),
        "aux_weight": ("[0, inf)", "0 = no auxiliary head"), "aux_channels": f"[1, {WIDTH_MAX}]",
        "cat_max_ratio": ("(0, 1]", "1 = off")}

    def validate(self) -> None:
        self.check_trained("segmentation")
        _check(self.aux_weight >= 0, "segmentation.aux_weight", "must be >= 0")
        _check(0 < self.cat_max_ratio <= 1, "segmentation.cat_max_ratio", "must be in (0, 1]")
        _check_factors("segmentation.rescales", self.rescales)
        _check(0 < self.stride <= self.crop_size, "segmentation.stride", "must be in (0, crop_size]")
        _check(not self.blocks or len(self.blocks) == 4, "segmentation.blocks", "give four block indices")


@dataclass
class DetectionConfig(Trained):
    """ViTDet (arXiv 2203.16527): simple feature pyramid from the last block, Mask R-CNN;
    ViT-B COCO values (batch 64 on 64 GPUs, AdamW lr 1e-4, wd 0.1, layer decay 0.7, 1024 px,
    14 x 14 windowed attention with global attention in 4 evenly spaced blocks), ViTDet's
    heads (2-conv RPN, 4-conv + 1-fc box head and mask head with LayerNorm), large-scale jitter
    (scale 0.1-2.0, ``image_size`` crop) and decomposed relative positions in the attention
    (detectron2 projects/ViTDet mask_rcnn_vitdet_b_100ep.py), detectron2's L1 box losses and
    ROIAlignV2. Departures, each an option: ``heads: torchvision`` (torchvision's default
    heads), ``lsj: false`` (flip only, every image resized to ``image_size``), ``rel_pos:
    false``, ``box_loss: smooth_l1`` and ``roi_align: v1`` (torchvision's)."""
    nodes: int = 0
    dataset: str = "coco"
    steps: int = 184375
    warmup_steps: int = 250
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.1
    layer_decay: float = 0.7
    drop_path: float = 0.1
    image_size: int = 1024              # longest side; batches padded to this square (square_pad)
    scale_factors: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])  # x token grid
    fpn_channels: int = 256             # pyramid, box head convs and mask head width
    box_head_dim: int = 1024            # the box head's fc width (ViTDet's fc_dims [1024])
    heads: str = "vitdet"               # vitdet (paper) | torchvision (default heads, departure)
    lsj: bool = True                    # ViTDet's large-scale jitter in training
    lsj_scale: list[float] = field(default_factory=lambda: [0.1, 2.0])   # x image_size
    rel_pos: bool = True                # decomposed relative positions (ViTDet use_rel_pos)
    box_loss: str = "l1"                # l1 (detectron2, smooth_l1_beta 0) | smooth_l1 (torchvision, beta 1/9)
    roi_align: str = "v2"               # v2 (ROIAlignV2: aligned, adaptive) | v1 (torchvision: sampling 2)
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # per level
    rois_per_image: int = 512
    # RPN proposals kept before / after NMS, training and test, and detections per image:
    # torchvision's defaults for ~1024 px COCO images; a 64 px scene with a few objects needs
    # a tenth of them
    proposals_train: list[int] = field(default_factory=lambda: [2000, 2000])
    proposals_test: list[int] = field(default_factory=lambda: [1000, 1000])
    detections_per_image: int = 100
    attention: str = "window"           # window: ViTDet's windows + global_blocks | global: every block
    window_size: int = 14               # tokens per window side
    global_blocks: list[int] = field(default_factory=list)  # [] = 4 evenly spaced (ViT-B: 2, 5, 8, 11)
    max_val_samples: int = 0
    RANGES: ClassVar[dict[str, Range]] = {
        "steps": f"[1, {COUNT_MAX}]", "warmup_steps": f"[0, {COUNT_MAX}]", "batch_size": f"[1, {COUNT_MAX}]",
        "lr": "(0, inf)", "weight_decay": "[0, inf)", "layer_decay": "(0, 1]",
        "drop_path": ("[0, 1)", "a probability; 1 drops every residual branch"),
        "image_size": f"[32, {PIXELS_MAX}]", "scale_factors": "(0, inf)", "fpn_channels": f"[1, {WIDTH_MAX}]",
        "box_head_dim": f"[1, {WIDTH_MAX}]", "lsj_scale": "(0, inf)", "anchor_sizes": f"[1, {PIXELS_MAX}]",
        "rois_per_image": f"[1, {COUNT_MAX}]", "proposals_train": f"[1, {COUNT_MAX}]",
        "proposals_test": f"[1, {COUNT_MAX}]", "detections_per_image": f"[1, {COUNT_MAX}]",
        "window_size": f"[1, {LAYERS_MAX}]", "global_blocks": (f"[0, {LAYERS_MAX})", "block indices"),
        "max_val_samples": (f"[0, {COUNT_MAX}]", "0 = all")}

    def validate(self) -> None:
        self.check_trained("detection")
        _check(self.attention in ("window", "global"), "detection.attention",
               f"{self.attention!r}; choose window or global")
        _check(self.window_size >= 1, "detection.window_size", "must be >= 1")
        _check(len(self.anchor_sizes) == 5, "detection.anchor_sizes",
               "one size per pyramid level: the four scale_factors levels and the pooled one")
        _check_factors("detection.scale_factors", self.scale_factors)
        for key in ("proposals_train", "proposals_test"):
            v = getattr(self, key)
            _check(len(v) == 2 and 0 < v[1] <= v[0], f"detection.{key}",
                   f"{v}: [kept before NMS, kept after NMS], 0 < after <= before")
        _check(self.detections_per_image >= 1, "detection.detections_per_image", "must be >= 1")
        _check(self.image_size % 32 == 0, "detection.image_size", "must be a multiple of 32")
        _check(self.heads in ("vitdet", "torchvision"), "detection.heads",
               f"{self.heads!r}; choose vitdet or torchvision")
        _check(self.box_loss in ("l1", "smooth_l1"), "detection.box_loss",
               f"{self.box_loss!r}; choose l1 or smooth_l1")
        _check(self.roi_align in ("v2", "v1"), "detection.roi_align",
               f"{self.roi_align!r}; choose v2 or v1")
        _check(len(self.lsj_scale) == 2 and 0 < self.lsj_scale[0] <= self.lsj_scale[1],
               "detection.lsj_scale", f"{self.lsj_scale}: [min, max], 0 < min <= max")


@dataclass
class DiagnosticsConfig(Resources):
    """Per-layer representation measures of the pre-trained and the random-init encoder on a
    fixed set of validation images (evaluation/diagnostics.py)."""
    dataset: str = ""
    num_images: int = 512               # the first N validation images, the same for every run
    pooling: str = "cls"                # the representation whose spectrum and RankMe are reported
    RANGES: ClassVar[dict[str, Range]] = {"num_images": (f"[4, {COUNT_MAX}]", "debiased CKA needs 4")}

    def validate(self) -> None:
        _check_pooling("diagnostics", self.pooling)
        _check(self.num_images >= 4, "diagnostics.num_images", "must be >= 4 (debiased CKA)")


@dataclass
class EvalConfig:
    batch_size: int = 256               # feature extraction / inference batch
    baselines: list[str] = field(default_factory=list)  # also evaluate: random_init, pixels
    # a finished evaluation's DeepSpeed checkpoints are removed once its metrics are recorded
    # (evaluation/common.py); true keeps them (to compare final weights, as the preemption tests do)
    keep_checkpoints: bool = False
    knn: KNNConfig = field(default_factory=KNNConfig)
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    RANGES: ClassVar[dict[str, Range]] = {"batch_size": f"[1, {COUNT_MAX}]"}

    def validate(self) -> None:
        for name in EVAL_KINDS:
            getattr(self, name).validate()
        for name in self.baselines:
            _check(name in ("random_init", "pixels"), "baselines",
                   f"unknown baseline {name!r}; choose from ['pixels', 'random_init']")


def parse_entry(entry: str) -> tuple[str, str]:
    """``"linear_probe:cub"`` -> ("linear_probe", "cub"); ``"knn"`` -> ("knn", "")."""
    name, _, dataset = entry.partition(":")
    if name not in EVAL_KINDS:
        raise ConfigError(f"evals: unknown evaluation {name!r} in {entry!r}; choose from "
                          f"{sorted(EVAL_KINDS)}")
    return name, dataset
