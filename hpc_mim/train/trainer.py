"""Pre-training as a task of the one training loop (hpc_mim/train/loop.py, which owns
DeepSpeed, checkpoints, exact resume, stop signals, the NaN stop and MLflow); the method only
maps a batch to a dict of losses.

Schedule (MAE, arXiv 2111.06377 App. A.1): lr = blr * batch_size / 256 (or LUT's
blr * sqrt(batch_size) / 4), linear warmup from 0 (or from the floor, ``train.warmup_from_floor``:
LatentMIM's), then half-cosine to the floor, updated every optimizer step (timm's
CosineLRScheduler). AdamW without weight decay on 1-D tensors and biases (timm's rule) and on the
parameters named by ``train.no_weight_decay`` (the authors' lists: LatentMIM's ``embed``, UMD's
cls and mask tokens). After every optimizer step the method's ``on_optimizer_step`` hook runs
(EMA teachers), over whole tensors even under ZeRO-3. Every ``log_every`` steps RankMe and the
pairwise cosine of fixed validation images are logged too (``val/rankme``,
``val/pairwise_cosine``; ``train.collapse_images``, hpc_mim/train/collapse.py).

On a GPU node (read as an 8-node run executes it): each task drives its own GPU
(``training_device``); ``precision: bf16`` is autocast with fp32 weights, teachers, gradients
and export (hpc_mim/distributed/deepspeed.py). Masks and noise are drawn on the device from
each rank's generator (seeded ``seed * 1000 + rank``, saved in every checkpoint); data order
and crops are functions of (seed, epoch) (hpc_mim/data/ffcv_io.py).
"""
from __future__ import annotations

import time
from typing import Any, Iterable

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from hpc_mim.config import Config
from hpc_mim.data.ffcv_io import build_loader, iterate
from hpc_mim.distributed import deepspeed as ds
from hpc_mim.distributed.env import DistEnv
from hpc_mim.export import export_timm
from hpc_mim.methods import build_method
from hpc_mim.models.vit import save_encoder
from hpc_mim.rundir import RunDir
from hpc_mim.tracking import MLflowLogger
from hpc_mim.train.collapse import collapse_measures
from hpc_mim.train.loop import Budget, Task, TrainLoop
from hpc_mim.train.process import join, seed_everything


def no_decay_names(model: torch.nn.Module, substrings: list[str]) -> list[str]:
    """Names of ``model``'s parameters containing any of ``substrings`` (``train.no_weight_decay``).
    With timm's rule (every 1-D tensor and bias) this is the authors' grouping: LatentMIM's
    main_lmim.py exempts names with 'bias', 'norm' or 'embed' (the patch embedding and the decoder's
    input projection); UMD's models/ae.py ``no_decay_list`` its cls tokens and mask embedding."""
    return [n for n, _ in model.named_parameters() if any(s in n for s in substrings)]


class PretrainTask(Task):
    """A method of hpc_mim.methods on the run's .beton training split."""
    name = "pretrain"

    def __init__(self, cfg: Config, world_size: int, device: torch.device) -> None:
        t = cfg.train
        self.cfg, self.device, self.title = cfg, device, cfg.method.name
        self.model = build_method(cfg.model, cfg.method).to(device)
        self.terms = tuple(self.model.terms)
        if t.compile:
            self.title += f" (compiled: {', '.join(self.model.compile_networks(device))})"
        groups = param_groups_weight_decay(self.model, t.weight_decay,
                                           no_weight_decay_list=no_decay_names(self.model, t.no_weight_decay))
        # fused: one kernel over all parameters instead of a Python loop of ~10 ops per tensor
        self.optimizer = torch.optim.AdamW(groups, lr=t.peak_lr(), betas=tuple(t.betas), fused=True)
        info = cfg.dataset_info()
        self.loader = build_loader(
            info["train"], t.micro_batch_size, self.model.input_size, info["mean"], info["std"],
            train=True, seed=t.seed, crop_scale=cfg.data.crop_scale, hflip=cfg.data.hflip,
            train_crop=cfg.data.crop, crop_padding=cfg.data.crop_padding,
            num_workers=cfg.data.num_workers, distributed=world_size > 1,
            max_samples=cfg.data.max_train_samples, device=device,
            extra_views=self.model.extra_views)
        self.collapse_images = self.fixed_val_images(t.collapse_images) if t.collapse_images else None

    def fixed_val_images(self, n: int) -> torch.Tensor:
        """The first ``n`` validation images (N, C, S, S) at the encoder's size, on the device:
        the same on every rank and at every log step (hpc_mim/train/collapse.py)."""
        cfg, info = self.cfg, self.cfg.dataset_info()
        loader = build_loader(info["val"], min(n, cfg.eval.batch_size), cfg.model.img_size, info["mean"],
                              info["std"], train=False, eval_crop_ratio=info.get("eval_crop_ratio", 1.0),
                              num_workers=cfg.data.num_workers, max_samples=n, device=self.device)
        # clone: FFCV recycles its batch buffers
        return torch.cat([batch["image"].float().clone() for batch in iterate(loader)])

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Every ``log_every`` steps (the loop's ``eval_every``): the collapse measures."""
        if self.collapse_images is None:
            return {}
        return collapse_measures(model.encoder, self.collapse_images, self.cfg.eval.batch_size)

    def micro_batches_per_epoch(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, skip: int) -> Iterable[dict[str, torch.Tensor]]:
        return iterate(self.loader, epoch, skip=skip)

    def scheduler(self, optimizer, total_steps: int, steps_per_epoch: int) -> CosineLRScheduler:
        t = self.cfg.train
        warmup = int(t.warmup_epochs * steps_per_epoch)
        start = t.floor_lr() if t.warmup_from_floor else 0.0
        return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup), lr_min=t.floor_lr(),
                                 warmup_t=warmup, warmup_lr_init=start, warmup_prefix=True,
                                 t_in_epochs=False)

    def forward(self, engine, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        # already on the device (FFCV's ToDevice); fp32: the engine autocasts when bf16
        return engine({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})

    def after_step(self, engine, progress: float) -> None:
        """The method's hook (EMA teachers) on gathered parameters."""
        read, write = self.model.ema_parameters()
        with ds.gathered(engine, read, write):
            self.model.on_optimizer_step(progress)


class Trainer(TrainLoop):
    """Pre-training of ``cfg`` into ``run``: the loop over a ``PretrainTask``, then the export."""

    def __init__(self, cfg: Config, run: RunDir, env: DistEnv | None = None,
                 logger: MLflowLogger | None = None) -> None:
        """``logger``: rank 0's MLflow run (None on the other ranks)."""
        self.cfg, self.run = cfg, run
        proc = join(cfg.cluster.rendezvous_timeout_s, cfg.cluster.collective_timeout_s, env)
        seed_everything(cfg.train.seed * 1000 + proc.env.rank)   # masks differ between ranks
        t = cfg.train
        task = PretrainTask(cfg, proc.env.world_size, proc.device)
        budget = Budget(t.batch_size, t.micro_batch_size, epochs=t.epochs, max_steps=t.max_steps,
                        precision=t.precision,
                        zero_stage=t.zero_stage, zero_overlap_comm=t.zero_overlap_comm,
                        zero_bucket_size=t.zero_bucket_size, clip_grad=t.clip_grad, log_every=t.log_every,
                        eval_every=t.log_every if t.collapse_images else 0,
                        checkpoint_every=cfg.checkpoint.every_steps, keep_last=cfg.checkpoint.keep_last,
                        stall_timeout_min=cfg.cluster.stall_timeout_min)
        super().__init__(task, budget, run.checkpoints, proc, logger, run.pretrain_log)

    def fit(self) -> dict[str, float]:
        start = time.time()
        final = super().fit()        # the collapse measures at the last step, or the train metrics
        metrics = {**self.last_metrics, **({f"val/{k}": v for k, v in final.items()}
                                           if final is not self.last_metrics else {})}
        trained = time.time()
        self.export()
        if self.env.is_main:
            self.run.record_stage("pretrain", "training loop", trained - start)
            self.run.record_stage("pretrain", "export", time.time() - trained)
        return metrics

    def export(self) -> None:
        """``encoder.pt`` (what the evaluations load), then the same weights in timm's format
        (``timm/``, hpc_mim/export.py), on rank 0; the other ranks wait at the barrier. A failed
        timm export is logged (and tagged ``timm_export_error``) but does not fail the job: the
        chained evaluations need ``encoder.pt`` only, and ``python -m jobs.export`` can redo it."""
        sd = ds.module_state_dict(self.engine, self.engine.module.encoder)
        if self.env.is_main:
            trained = {"steps": self.total_steps, "epochs": round(self.total_steps / self.steps_per_epoch, 4)}
            save_encoder(self.engine.module.encoder, self.run.encoder, sd, trained)
            self.log(f"exported encoder to {self.run.encoder}")
            try:
                self.log(f"exported it for timm to {export_timm(self.run.root)}/")
            except Exception as e:  # noqa: BLE001 - whatever it was, encoder.pt is written
                error = f"{type(e).__name__}: {str(e)[:500]}"
                self.log(f"the timm export failed ({error}); redo it with python -m jobs.export "
                         f"--run-dir {self.run.root}")
                if self.logger:
                    self.logger.set_tags({"timm_export_error": error})
        torch.distributed.barrier()
