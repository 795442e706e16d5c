"""The pre-training loop. It owns DeepSpeed (through hpc_mim.distributed.deepspeed) and MLflow
(through hpc_mim.tracking); the method only maps a batch to a dict of losses.

Schedule (MAE, arXiv 2111.06377 App. A.1): lr = blr * batch_size / 256 (or LUT's
blr * sqrt(batch_size) / 4), linear warmup, then half-cosine to the floor, updated every optimizer
step (timm's CosineLRScheduler). After every optimizer step the method's ``on_optimizer_step``
hook runs (EMA teachers), over whole tensors even under ZeRO-3.

On a GPU node (read as an 8-node run executes it): each task drives its own GPU
(``training_device``); ``precision: bf16`` is autocast with fp32 weights, teachers, gradients
and export (hpc_mim/distributed/deepspeed.py); loss terms are summed on the device in fp32 and
every tensor handed to a collective lives there; the host waits for the device once per
optimizer step (``agree``) and once per ``log_every`` (``log_metrics``), never per micro-batch.

Nothing lost: checkpoints every ``checkpoint.every_steps`` and at each epoch's end hold the
weights, optimizer, EMA teachers, the data position (epoch, micro-batch) and every rank's RNG
states (CPU, numpy, python, and the CUDA generator that draws masks and noise on a GPU); data
order and crops are functions of (seed, epoch), so a resumed run continues exactly as an
uninterrupted one would (bit-identical on CPU in fp32 at the same world size). A stop
signal (hpc_mim/distributed/preemption.py) ends the run after the current step with a
checkpoint; a non-finite loss stops it before anything is saved.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from hpc_mim.config import Config
from hpc_mim.data.ffcv_io import build_loader, iterate
from hpc_mim.distributed import deepspeed as ds
from hpc_mim.distributed.env import DistEnv, detect, set_threads, training_device
from hpc_mim.distributed.preemption import STOP, Preempted
from hpc_mim.methods import build_method
from hpc_mim.models.vit import save_encoder
from hpc_mim.rundir import RunDir
from hpc_mim.tracking import MLflowLogger
from hpc_mim.train.checkpoint import CheckpointManager


def rng_state(device: torch.device) -> dict:
    """Every generator a step draws from on this rank: masks and noise come from the CUDA
    generator when training on a GPU, so a resume must restore that one too."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda":
        if "cuda" not in state:
            raise RuntimeError("the checkpoint holds no CUDA generator state (written by a CPU "
                               "run?): masks after the resume would differ from an uninterrupted run")
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    def __init__(self, cfg: Config, run: RunDir, env: DistEnv | None = None,
                 logger: MLflowLogger | None = None) -> None:
        """``logger``: rank 0's MLflow run (None on the other ranks)."""
        self.cfg, self.run, self.logger = cfg, run, logger
        self.env = env or detect()
        self.threads = set_threads(self.env)
        self.device = training_device(self.env)
        ds.init_distributed(self.env, self.device, cfg.cluster.rendezvous_timeout_s,
                            cfg.cluster.collective_timeout_s)
        seed = cfg.train.seed * 1000 + self.env.rank   # masks differ between ranks
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

        t = cfg.train
        self.method = build_method(cfg.model, cfg.method).to(self.device)
        self.lr = t.peak_lr()
        groups = param_groups_weight_decay(self.method, t.weight_decay)  # no decay on norms/biases
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=tuple(t.betas))
        self.engine = ds.initialize(self.method, self.optimizer, t, self.env.world_size)
        self.term_names = ("loss", *self.method.terms)

        info = cfg.dataset_info()
        self.loader = build_loader(
            info["train"], t.micro_batch_size, self.method.input_size, info["mean"], info["std"],
            train=True, seed=t.seed, crop_scale=cfg.data.crop_scale, hflip=cfg.data.hflip,
            train_crop=cfg.data.crop, crop_padding=cfg.data.crop_padding,
            num_workers=cfg.data.num_workers, distributed=self.env.world_size > 1,
            max_samples=cfg.data.max_train_samples, device=self.device,
            extra_views=self.method.extra_views)
        self.accum = t.accumulation(self.env.world_size)
        self.steps_per_epoch = len(self.loader) // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"{info['train']}: {len(self.loader)} micro-batches per rank per epoch "
                             f"is fewer than one optimizer step ({self.accum}); lower train.batch_size")
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)
        warmup = int(t.warmup_epochs * self.steps_per_epoch)
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=max(1, self.total_steps - warmup), lr_min=t.floor_lr(),
            warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)

        self.ckpt = CheckpointManager(run.checkpoints, cfg.checkpoint.keep_last,
                                      self.env.is_main, barrier=dist.barrier)
        run.logs.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        epoch, skip, step = self.resume()
        t = self.cfg.train
        self.last_metrics: dict[str, float] = {}
        self.log(f"start: {self.cfg.method.name}, {self.total_steps} steps ({self.steps_per_epoch}/epoch, batch {t.batch_size}"
                 f" = {t.micro_batch_size} x {self.env.world_size} ranks x {self.accum} accum), "
                 f"ZeRO-{t.zero_stage} {t.precision}, lr {self.lr:.3g}, {self.threads} threads/rank")
        per_epoch = self.steps_per_epoch * self.accum          # micro-batches; the rest is dropped
        with STOP.polled():
            self.loop(epoch, skip, step, per_epoch)
        self.export()
        return self.last_metrics

    def loop(self, epoch: int, skip: int, step: int, per_epoch: int) -> None:
        """Host syncs: one per optimizer step (``agree``: stop signal and finiteness, which
        every rank must know before it may save) and one per ``log_every`` (the loss terms).
        Loss terms are summed on the device in fp32 in between."""
        t = self.cfg.train
        zeros = lambda: torch.zeros(len(self.term_names), device=self.device)  # noqa: E731
        window_sum, step_sum = zeros(), zeros()      # loss terms summed over the window / step
        tic, seen, window = time.time(), 0, 0
        while step < self.total_steps:
            done = skip                          # resumed mid-epoch: same order, done ones skipped
            for micro, batch in enumerate(iterate(self.loader, epoch, skip=skip), start=skip):
                if micro >= per_epoch or step >= self.total_steps:
                    break
                self.scheduler.step_update(step)
                # already on the device (FFCV's ToDevice); fp32: the engine autocasts when bf16
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                out = self.engine(batch)
                self.engine.backward(out["loss"])
                self.engine.step()
                step_sum += torch.stack([out[n].detach().float() for n in self.term_names]) / self.accum
                seen += batch["image"].shape[0] * self.env.world_size
                done = micro + 1                 # micro-batches of this epoch done
                if done % self.accum:
                    continue
                step, window = step + 1, window + 1
                self.after_step(step)
                signal_name, finite = self.agree(step_sum[0])
                if not finite:                   # before any save: the last checkpoint stays good
                    terms = dict(zip(self.term_names, step_sum.tolist()))
                    message = (f"non-finite loss at step {step} (epoch {epoch}); terms on rank "
                               f"{self.env.rank}: " + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                               + f"; the last good checkpoint is {self.ckpt.latest()}")
                    self.log(f"STOPPED: {message}")
                    raise FloatingPointError(message)
                window_sum += step_sum
                step_sum.zero_()
                if step % t.log_every == 0 or step == self.total_steps:
                    self.last_metrics = self.log_metrics(window_sum, window, step, epoch,
                                                         seen / (time.time() - tic))
                    window_sum, tic, seen, window = zeros(), time.time(), 0, 0
                at_end = done >= per_epoch       # the save after the loop covers an epoch's end
                saved = step % self.cfg.checkpoint.every_steps == 0 and not at_end and step < self.total_steps
                if saved:
                    self.save(epoch, done, step)
                if signal_name and step < self.total_steps:     # at the very end: just finish
                    if not saved:
                        self.save(*((epoch + 1, 0) if at_end else (epoch, done)), step)
                    self.log(f"{signal_name} at step {step}: checkpoint saved, stopping")
                    raise Preempted(signal_name, step)
            epoch, skip = (epoch + 1, 0) if done >= per_epoch else (epoch, done)
            self.save(epoch, skip, step)         # epoch boundary, or where max_steps stopped us

    # ------------------------------------------------------------------ pieces
    def agree(self, loss: torch.Tensor) -> tuple[str | None, bool]:
        """After each step, all ranks agree on (the stop signal any rank received, whether every
        rank's loss was finite): they must save or stop together. USR2 wins over TERM: after it
        the job must requeue itself. ``loss`` stays on the device; reading the reduced pair is
        the step's one host sync."""
        codes = ("", "SIGTERM", "SIGUSR2")
        # new_full is a fill kernel; torch.tensor(x, device=cuda) would be a blocking copy
        signal_code = loss.new_full((), float(codes.index(STOP.received or "")))
        flags = torch.stack([signal_code, (~torch.isfinite(loss)).float()])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        code, nonfinite = flags.tolist()
        return codes[int(code)] or None, not nonfinite

    def after_step(self, step: int) -> None:
        """The method's hook (EMA teachers) on gathered parameters, with progress in [0, 1]."""
        read, write = self.method.ema_parameters()
        with ds.gathered(self.engine, read, write):
            self.method.on_optimizer_step(step / self.total_steps)

    def log(self, message: str) -> None:
        """Progress line on stdout and in run/logs/pretrain.log (an MLflow artifact at the end)."""
        if self.env.is_main:
            line = f"[pretrain] {message}"
            print(line, flush=True)
            with open(self.run.pretrain_log, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def log_metrics(self, sums: torch.Tensor, window: int, step: int, epoch: int,
                    img_s: float) -> dict[str, float]:
        """Mean of each loss term (``sums``: fp32 on the training device, one per
        ``term_names``) over the last ``window`` steps and all ranks, to MLflow."""
        sums = sums.clone()
        dist.all_reduce(sums)                    # every rank logs at the same steps
        values = (sums / (self.env.world_size * window)).tolist()
        metrics = {f"train/{k}": v for k, v in zip(self.term_names, values)}
        metrics.update({"train/lr": self.optimizer.param_groups[0]["lr"], "train/epoch": epoch,
                        "train/img_per_s": img_s})
        if self.logger:
            self.logger.log_metrics(metrics, step)
            eta = (self.total_steps - step) * self.cfg.train.batch_size / max(img_s, 1e-9)
            self.log(f"epoch {epoch} step {step}/{self.total_steps} loss {metrics['train/loss']:.4f} "
                     f"lr {metrics['train/lr']:.3g} {img_s:.0f} img/s eta {eta / 60:.1f} min")
        return metrics

    def save(self, epoch: int, micro: int, step: int) -> None:
        state = {"epoch": epoch, "micro": micro, "step": step}

        def save_fn(folder: Path, tag: str) -> None:
            ds.save_checkpoint(self.engine, folder, tag, state)
            torch.save(rng_state(self.device), folder / tag / f"rng_rank{self.env.rank}.pt")

        if self.logger:      # first: a published checkpoint implies its steps' metrics were
            self.logger.flush()  # sent (or spooled); a kill in between only repeats a few steps
        tag = self.ckpt.save(step, save_fn)
        self.log(f"checkpoint {tag} (epoch {epoch}, micro-batch {micro})")

    def resume(self) -> tuple[int, int, int]:
        def load_fn(folder: Path, tag: str) -> dict:
            state = ds.load_checkpoint(self.engine, folder, tag)
            rng = folder / tag / f"rng_rank{self.env.rank}.pt"
            if rng.is_file():
                set_rng_state(torch.load(rng, weights_only=False), self.device)
            return state

        state = self.ckpt.load(load_fn)
        if not state:
            return 0, 0, 0
        self.log(f"resumed from {self.ckpt.latest()} at step {state['step']} "
                 f"(epoch {state['epoch']}, micro-batch {state['micro']})")
        return state["epoch"], state["micro"], state["step"]

    def export(self) -> None:
        sd = ds.module_state_dict(self.engine, self.engine.module.encoder)
        if self.env.is_main:
            save_encoder(self.engine.module.encoder, self.run.encoder, sd)
            self.log(f"exported encoder to {self.run.encoder}")
        dist.barrier()
