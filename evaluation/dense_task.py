"""What the trained dense evaluations (segmentation, detection) share as tasks of the one
training loop: batches of a map-style dataset whose order and augmentation are functions of
(seed, epoch, sample) (hpc_mim/data/dense.py), so a resumed job sees exactly the batches an
uninterrupted one would; each rank takes its slice of every global batch, and its shard of
the validation set for inference.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from evaluation.common import EvalContext
from hpc_mim.data.dense import SeededSamples, draw_seed, shard_batches
from hpc_mim.distributed.preemption import ignore_in_worker
from hpc_mim.train.loop import Budget, Task


class DenseTask(Task):
    """A model trained on ``train_set`` in global batches of ``section.batch_size``."""

    def __init__(self, ctx: EvalContext, train_set: Dataset, collate: Callable | None = None) -> None:
        s, env = ctx.section, ctx.proc.env
        self.ctx, self.device = ctx, ctx.device
        self.rank, self.world = env.rank, env.world_size
        self.micro = s.batch_size // self.world
        self.samples_set = SeededSamples(train_set, ctx.cfg.train.seed)
        self.collate, self.workers = collate, ctx.cfg.data.num_workers
        if len(train_set) < s.batch_size:
            raise ValueError(f"{len(train_set)} training images are fewer than one batch of "
                             f"{s.batch_size} (eval.{self.name}.batch_size)")

    def micro_batches_per_epoch(self) -> int:
        return len(self.samples_set) // (self.micro * self.world)

    def batches(self, epoch: int, skip: int) -> Iterable[Any]:
        keys = shard_batches(len(self.samples_set), self.micro, self.rank, self.world,
                             self.ctx.cfg.train.seed, epoch)[skip:]
        # its own generator: the workers' base seed would otherwise be a draw from the global
        # one, at a point of its stream that differs when a resumed job starts mid-epoch
        generator = torch.Generator().manual_seed(draw_seed(self.ctx.cfg.train.seed, epoch, self.rank))
        return DataLoader(self.samples_set, batch_sampler=keys, collate_fn=self.collate,
                          num_workers=self.workers, worker_init_fn=ignore_in_worker,
                          generator=generator, pin_memory=self.device.type == "cuda")

    def my_shard(self, n: int) -> range:
        """This rank's validation samples: rank, rank + world, ..."""
        return range(self.rank, n, self.world)

    def budget(self) -> Budget:
        s = self.ctx.section
        return Budget(s.batch_size, self.micro, steps=s.steps, precision=s.precision,
                      zero_stage=s.zero_stage, clip_grad=s.clip_grad, log_every=s.log_every,
                      checkpoint_every=s.checkpoint_every, keep_last=self.ctx.cfg.checkpoint.keep_last,
                      eval_every=s.eval_every)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch on ``device``, asynchronously from pinned memory where it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
