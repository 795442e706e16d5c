"""The one training loop: pre-training and every trained evaluation (fine-tuning, linear probe,
segmentation, detection) run through ``TrainLoop``; each supplies a ``Task`` (its model,
optimizer, lr schedule, data, loss and metrics) and none re-implements the loop.

What the loop owns, identically for all of them:

- DeepSpeed (through hpc_mim.distributed.deepspeed): ZeRO stage, bf16 autocast with fp32
  weights, gradient accumulation, clipping.
- Checkpoints (hpc_mim/train/checkpoint.py: atomic, keep-last-k) every
  ``Budget.checkpoint_every`` steps, on a stop signal and at the end, never more often (an
  ImageNet epoch is 10-30 s on 64 GPUs: a save per epoch would cost more than the training),
  holding the weights, the optimizer, the data position (epoch, micro-batch) and every rank's
  RNG states (CPU, numpy, python, CUDA; as tensors and numbers, loaded with ``weights_only``).
  The tasks' data order and augmentation are functions of (seed, epoch, sample), so a resumed
  run continues exactly as an uninterrupted one would (bit-identical on CPU in fp32 at the
  same world size).
- Stop signals (hpc_mim/distributed/preemption.py): after the current step every rank saves
  and ``Preempted`` is raised, so the job requeues; a non-finite loss stops the run before
  anything is saved, naming the step and the last good checkpoint.
- Metrics: loss terms summed on the device in fp32, one host sync per optimizer step
  (``agree``) and one per ``log_every``; flushed to MLflow before a checkpoint is published.
  With ``eval_every`` the task's evaluation runs every that many steps and at the end
  (``val/<metric>`` at that step: the curve, not only the final figure).
- A progress watchdog (hpc_mim/distributed/watchdog.py) on every rank: no optimizer step for
  ``Budget.stall_timeout_min`` (or 10x the longest step seen) and the job ends with every
  thread's stack in its log, to be requeued once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from hpc_mim.distributed import deepspeed as ds
from hpc_mim.distributed.preemption import STOP, Preempted
from hpc_mim.distributed.watchdog import ProgressWatchdog
from hpc_mim.tracking import MLflowLogger
from hpc_mim.train.checkpoint import CheckpointManager, load_rng, save_rng
from hpc_mim.train.process import Process, rng_state, set_rng_state


@dataclass
class Budget:
    """How long and in what batches a task trains, and how it is checkpointed and logged.
    ``steps`` > 0: exactly that many optimizer steps (the dense protocols count iterations),
    else ``epochs`` x steps per epoch, at most ``max_steps``. DeepSpeed reads ``batch_size``, ``micro_batch_size``,
    ``accumulation``, ``clip_grad``, ``zero_stage``, ``zero_overlap_comm``, ``zero_bucket_size``
    and ``precision``."""
    batch_size: int                     # global, per optimizer step
    micro_batch_size: int               # per process per forward
    epochs: int = 1
    steps: int = 0
    max_steps: int = 0                  # > 0 caps epochs x steps per epoch (quick runs)
    precision: str = "fp32"
    zero_stage: int = 2
    zero_overlap_comm: bool = True      # ZeRO's gradient reduction overlapped with the backward
    zero_bucket_size: int = 25_000_000  # elements per reduce / all-gather bucket (train.zero_*)
    clip_grad: float = 0.0
    log_every: int = 20
    checkpoint_every: int = 500
    keep_last: int = 2
    eval_every: int = 0                 # 0: evaluate at the end only
    stall_timeout_min: float = 20.0     # the watchdog's shortest timeout (cluster.stall_timeout_min)

    def accumulation(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise ValueError(f"batch size {self.batch_size} is not divisible by micro batch x "
                             f"world size = {self.micro_batch_size} x {world_size}")
        return self.batch_size // per_step


class Task:
    """What a training job supplies. Subclasses set ``name``, ``model``, ``optimizer`` (over
    ``model``'s parameters) and ``terms`` (loss terms logged besides ``loss``)."""
    name = "train"
    title = ""                          # what the start line names (e.g. the method)
    terms: tuple[str, ...] = ()
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def micro_batches_per_epoch(self) -> int:
        """This rank's micro-batches in one pass over the data."""
        raise NotImplementedError

    def batches(self, epoch: int, skip: int) -> Iterable[Any]:
        """This rank's micro-batches of ``epoch`` after the first ``skip`` (not even decoded);
        a function of (seed, epoch, rank), so a resumed run sees the same ones."""
        raise NotImplementedError

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int):
        """A timm scheduler, updated per optimizer step (``step_update``)."""
        raise NotImplementedError

    def forward(self, engine, batch: Any) -> dict[str, torch.Tensor]:
        """``{"loss": scalar, **terms}`` of one micro-batch; ``engine(...)`` is the model."""
        raise NotImplementedError

    def samples(self, batch: Any) -> int:
        """Images in a micro-batch (for img/s)."""
        return len(batch["image"]) if isinstance(batch, dict) else len(batch[0])

    def after_step(self, engine, progress: float) -> None:
        """After every optimizer step, progress in (0, 1] (EMA teachers)."""

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of the model as it is (eval mode; every rank calls it)."""
        return {}


class TrainLoop:
    def __init__(self, task: Task, budget: Budget, checkpoints: Path, proc: Process,
                 logger: MLflowLogger | None = None, log_file: Path | None = None) -> None:
        """``logger``: rank 0's MLflow run (None on the other ranks); ``log_file``: where rank 0
        appends its progress lines (besides stdout)."""
        self.task, self.budget, self.proc, self.logger = task, budget, proc, logger
        self.env, self.device = proc.env, proc.device
        self.log_file = log_file
        world = self.env.world_size
        self.engine = ds.initialize(task.model, task.optimizer, budget, world)
        self.optimizer = task.optimizer
        self.term_names = ("loss", *task.terms)
        self.accum = budget.accumulation(world)
        self.steps_per_epoch = task.micro_batches_per_epoch() // self.accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"{task.name}: {task.micro_batches_per_epoch()} micro-batches per rank "
                             f"per epoch is fewer than one optimizer step ({self.accum}); lower the "
                             "batch size")
        self.total_steps = budget.steps or budget.epochs * self.steps_per_epoch
        if budget.max_steps:
            self.total_steps = min(self.total_steps, budget.max_steps)
        self.scheduler = task.scheduler(self.optimizer, self.total_steps, self.steps_per_epoch)
        self.ckpt = CheckpointManager(checkpoints, budget.keep_last, self.env.is_main,
                                      barrier=dist.barrier, rank=self.env.rank)
        self.last_metrics: dict[str, float] = {}      # the last logged training metrics

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, float]:
        """Train to ``total_steps`` (resuming from the latest checkpoint), then evaluate.
        Returns the final evaluation's metrics, or the last logged training metrics."""
        self.last_metrics = {}
        epoch, skip, step = self.resume()
        b = self.budget
        title = f"{self.task.title}, " if self.task.title else ""
        self.log(f"start: {title}{self.total_steps} steps ({self.steps_per_epoch}/epoch, batch {b.batch_size}"
                 f" = {b.micro_batch_size} x {self.env.world_size} ranks x {self.accum} accum), "
                 f"ZeRO-{b.zero_stage} {b.precision}, peak lr {self.peak_lr():.3g}, "
                 f"{self.proc.threads} threads/rank")
        per_epoch = self.steps_per_epoch * self.accum          # micro-batches; the rest is dropped
        with ProgressWatchdog(b.stall_timeout_min * 60, log=self.log) as self.watchdog:
            with STOP.polled():
                self.loop(epoch, skip, step, per_epoch)
            final = self.evaluate(self.total_steps)
        return final or self.last_metrics

    def loop(self, epoch: int, skip: int, step: int, per_epoch: int) -> None:
        """Host syncs: one per optimizer step (``agree``: stop signal and finiteness, which
        every rank must know before it may save) and one per ``log_every`` (the loss terms).
        Loss terms are summed on the device in fp32 in between."""
        b = self.budget
        zeros = lambda: torch.zeros(len(self.term_names), device=self.device)  # noqa: E731
        window_sum, step_sum = zeros(), zeros()      # loss terms summed over the window / step
        tic, seen, window = time.time(), 0, 0
        started = False                          # made an optimizer step in this process
        self.engine.train()
        while step < self.total_steps:
            done = skip                          # resumed mid-epoch: same order, done ones skipped
            for micro, batch in enumerate(self.task.batches(epoch, skip), start=skip):
                if micro >= per_epoch or step >= self.total_steps:
                    break
                self.scheduler.step_update(step)
                out = self.task.forward(self.engine, batch)
                self.engine.backward(out["loss"])
                self.engine.step()
                step_sum += torch.stack([out[n].detach().float() for n in self.term_names]) / self.accum
                seen += self.task.samples(batch) * self.env.world_size
                done = micro + 1                 # micro-batches of this epoch done
                if done % self.accum:
                    continue
                step, window = step + 1, window + 1
                self.task.after_step(self.engine, step / self.total_steps)
                signal_name, finite = self.agree(step_sum[0])
                self.watchdog.beat(step, measure=started)   # the first includes the start-up
                started = True
                if not finite:                   # before any save: the last checkpoint stays good
                    self.stop_non_finite(step, epoch, step_sum)
                window_sum += step_sum
                step_sum.zero_()
                if step % b.log_every == 0 or step == self.total_steps:
                    self.last_metrics = self.log_metrics(window_sum, window, step, epoch,
                                                         seen / (time.time() - tic))
                    window_sum, tic, seen, window = zeros(), time.time(), 0, 0
                if b.eval_every and step % b.eval_every == 0 and step < self.total_steps:
                    self.evaluate(step)          # before the checkpoint: a resume never skips it
                    self.watchdog.beat()
                    tic = time.time()
                # where a resume continues: the next epoch once this one's batches are done
                position = (epoch + 1, 0) if done >= per_epoch else (epoch, done)
                at_end = step >= self.total_steps
                saved = step % b.checkpoint_every == 0 or at_end or bool(signal_name)
                if saved:
                    self.save(*position, step)
                    self.watchdog.beat()
                if signal_name and not at_end:   # at the very end: just finish
                    self.log(f"{signal_name} at step {step}: checkpoint saved, stopping")
                    raise Preempted(signal_name, step)
            epoch, skip = (epoch + 1, 0) if done >= per_epoch else (epoch, done)

    # ------------------------------------------------------------------ pieces
    def peak_lr(self) -> float:
        """The schedule's top lr (timm keeps each group's starting lr as ``initial_lr``)."""
        return max(g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups)

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

    def stop_non_finite(self, step: int, epoch: int, step_sum: torch.Tensor) -> None:
        terms = dict(zip(self.term_names, step_sum.tolist()))
        latest = self.ckpt.latest()
        good = (f"{self.ckpt.folder / latest}" if latest else
                f"none yet in {self.ckpt.folder} (a restart begins at step 0)")
        message = (f"non-finite loss at step {step} (epoch {epoch}); terms on "
                   f"rank {self.env.rank}: " + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                   + f"; the last good checkpoint is {good}")
        self.log(f"STOPPED: {message}")
        raise FloatingPointError(message)

    def evaluate(self, step: int) -> dict[str, float]:
        """The task's metrics at ``step`` (every rank evaluates), logged as ``val/<name>``."""
        start = time.time()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.budget.precision == "bf16"):
            metrics = self.task.evaluate(self.engine.module)
        self.engine.train()
        if metrics:
            if self.logger:
                self.logger.log_metrics({f"val/{k}": v for k, v in metrics.items()}, step)
            shown = {k: v for k, v in metrics.items() if "/" not in k}      # not per-class IoU
            self.log(f"eval at step {step}/{self.total_steps}: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in shown.items())
                     + f" ({time.time() - start:.0f} s)")
        return metrics

    def log(self, message: str) -> None:
        """Progress line of rank 0 on stdout and in ``log_file`` (an MLflow artifact at the end)."""
        if self.env.is_main:
            line = f"[{self.task.name}] {message}"
            print(line, flush=True)
            if self.log_file is not None:
                self.log_file.parent.mkdir(parents=True, exist_ok=True)
                with open(self.log_file, "a") as f:
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
        shown = "".join(f" {k} {v:.3f}" for k, v in zip(self.term_names[1:], values[1:]))
        eta = (self.total_steps - step) * self.budget.batch_size / max(img_s, 1e-9)
        self.log(f"epoch {epoch} step {step}/{self.total_steps} loss {metrics['train/loss']:.4f}"
                 f"{shown} lr {metrics['train/lr']:.3g} {img_s:.0f} img/s eta {eta / 60:.1f} min")
        return metrics

    def save(self, epoch: int, micro: int, step: int) -> None:
        # the last logged metrics too: a job resumed at the very end reports the same train loss
        state = {"epoch": epoch, "micro": micro, "step": step, "last_metrics": self.last_metrics}

        def save_fn(folder: Path, tag: str) -> None:
            ds.save_checkpoint(self.engine, folder, tag, state)
            save_rng(folder / tag / f"rng_rank{self.env.rank}.pt", rng_state(self.device))

        if self.logger:      # first: a published checkpoint implies its steps' metrics were
            self.logger.flush()  # sent (or spooled); a kill in between only repeats a few steps
        tag = self.ckpt.save(step, save_fn)
        self.log(f"checkpoint {tag} (epoch {epoch}, micro-batch {micro})")

    def resume(self) -> tuple[int, int, int]:
        def load_fn(folder: Path, tag: str) -> dict:
            state = ds.load_checkpoint(self.engine, folder, tag)
            rng = folder / tag / f"rng_rank{self.env.rank}.pt"
            if rng.is_file():
                set_rng_state(load_rng(rng), self.device)     # weights_only: nothing in it runs
            return state

        state = self.ckpt.load(load_fn)
        if not state:
            return 0, 0, 0
        self.last_metrics = state.get("last_metrics", {})
        self.log(f"resumed from {self.ckpt.latest()} at step {state['step']} "
                 f"(epoch {state['epoch']}, micro-batch {state['micro']})")
        return state["epoch"], state["micro"], state["step"]
