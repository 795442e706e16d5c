"""Frozen features for kNN, the linear probe and the few-shot probe: extracted once per encoder
by all of the job's ranks (each a 1/world shard of the split, on its GPU when it has one),
gathered, and cached in run/evals/features/ so the evaluations, and a requeued job, reuse them.
An evaluation reads only the splits it needs (LatentMIM's kNN: the validation split alone).

The cache key holds every input the features depend on (``cache_key``): the encoder's identity
(the exported file's digest, or the architecture and seed of the random-init encoder), the
dataset file's identity (its manifest's sha256 with its size, mtime and inode: a re-converted
split is another file), the split, the normalisation (``data.normalize: symmetric`` changes
the dataset's mean/std), the eval crop ratio, the image size, the number of samples and what
is read out (pooling, and whether before the final LayerNorm: LatentMIM's kNN reads it there).
The file name shows the readable part, ``<encoder>-<digest>-<dataset>-<split>-<readout>-<size>
px-<samples>.pt``; the digest covers the rest. A file is written under a temporary name
(``.<name>.tmp-<host>-<pid>``) and renamed into place; temporaries a killed job left behind are
removed when a job next opens the cache (hpc_mim/tempfiles.py: a dead pid on this host, or
older than this job and idle).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from evaluation.common import EvalContext, encoder_for
from hpc_mim.config import Config
from hpc_mim.data.ffcv_io import build_loader, iterate
from hpc_mim.datasets import file_identity
from hpc_mim.rundir import RunDir
from hpc_mim.tempfiles import remove_stale, temp_name


@torch.no_grad()
def extract_features(encoders: dict[str, torch.nn.Module | None], path: str, cfg: Config,
                     info: dict[str, Any], pooling: str, max_samples: int, device: torch.device,
                     rank: int = 0, world: int = 1, final_norm: bool = True
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Features (N, D) and labels (N,) of a split, on ``device``, for several encoders in one
    pass over the data (center crop, no augmentation). An encoder of None means the raw
    normalised pixels. ``final_norm=False``: pooled before the encoder's final LayerNorm. This
    rank reads samples rank, rank + world, ...; the shards are then gathered into the split's
    order on every rank."""
    loader = build_loader(path, cfg.eval.batch_size, cfg.model.img_size, info["mean"], info["std"],
                          train=False, eval_crop_ratio=info.get("eval_crop_ratio", 1.0),
                          num_workers=cfg.data.num_workers, max_samples=max_samples, device=device,
                          shard=(rank, world))
    for encoder in encoders.values():
        if encoder is not None:
            encoder.to(device).eval()
    feats: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    labels = []
    progress = Progress(f"features {Path(path).name}", len(loader), world) if rank == 0 else None
    for i, batch in enumerate(iterate(loader)):
        x = batch["image"].to(device)
        for name, encoder in encoders.items():
            f = x.flatten(1) if encoder is None else encoder.pooled(x, pooling, final_norm)
            # clone: FFCV recycles its batch buffers, so a kept view would be overwritten
            feats[name].append(f.float().clone())
        labels.append(batch["label"].to(device).clone())
        if progress:
            progress.update(i + 1, len(x))
    y = gather_shards(torch.cat(labels), world)
    return {name: (gather_shards(torch.cat(f), world), y) for name, f in feats.items()}


class Progress:
    """Rank 0's ``[eval] <what>: i/N batches ... eta`` line every ``every_s`` seconds while
    features are extracted (the job's log; ``make demo`` shows it, jobs/follow.py). Only the
    host clock is read: no device sync."""

    def __init__(self, what: str, batches: int, world: int, every_s: float = 15.0) -> None:
        self.what, self.batches, self.world, self.every_s = what, batches, world, every_s
        self.start = self.shown = time.monotonic()
        self.images = 0

    def update(self, done: int, images: int) -> None:
        self.images += images * self.world          # every rank reads a batch of the same size
        now = time.monotonic()
        if now - self.shown < self.every_s or done >= self.batches:
            return
        self.shown = now
        rate = self.images / (now - self.start)
        eta = (self.batches - done) * (now - self.start) / done / 60
        print(f"[eval] {self.what}: {done}/{self.batches} batches, {rate:.0f} img/s eta {eta:.1f} min",
              flush=True)


def gather_shards(local: torch.Tensor, world: int) -> torch.Tensor:
    """Rows r, r + world, r + 2 world, ... held by rank r -> all rows in order, on every rank.
    Shards differ in length by at most one: each is padded to the longest for the all-gather."""
    if world == 1:
        return local
    sizes = [torch.zeros((), dtype=torch.long, device=local.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(len(local), device=local.device))
    longest = max(int(s) for s in sizes)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = local.new_empty((sum(int(s) for s in sizes), *local.shape[1:]))
    for r, (part, size) in enumerate(zip(parts, sizes)):
        out[r::world] = part[:int(size)]
    return out


def cache_key(encoder: str, info: dict[str, Any], split: str, dataset_file: str, img_size: int,
              pooling: str, final_norm: bool, max_samples: int) -> str:
    """The cache file's name (without ``.pt``) for the features of ``split`` of dataset ``info``
    read by ``encoder`` (``encoder_key``). ``dataset_file``: the split file's identity
    (hpc_mim.datasets.file_identity). Everything ``extract_features`` reads goes in: the
    loader's mean/std (the normalisation) and eval crop ratio, the image size, the sample
    count; the batch size and the number of ranks do not change the features."""
    kind, _, _ = encoder.partition("-")          # pretrained, random_init, pixels
    inputs = {"encoder": encoder, "dataset": info["name"], "split": split, "file": dataset_file,
              "mean": [float(v) for v in info["mean"]], "std": [float(v) for v in info["std"]],
              "eval_crop_ratio": float(info.get("eval_crop_ratio", 1.0)), "img_size": img_size,
              "pooling": pooling, "final_norm": final_norm, "max_samples": max_samples}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
    readout = pooling if final_norm else f"{pooling}-prenorm"
    return f"{kind}-{digest}-{info['name']}-{split}-{readout}-{img_size}px-{max_samples or 'all'}"


def dataset_file_identity(path: str) -> str:
    """``file_identity`` of a split file, or "missing": rank 0 must reach the broadcast that
    follows (the loader then names the missing file on every rank, rather than rank 0 alone
    raising while the others wait in the collective)."""
    try:
        return file_identity(Path(path))
    except OSError:
        return "missing"


def encoder_key(run: RunDir, cfg: Config, baseline: str) -> str:
    """What identifies an encoder's features: the exported file's content, or for the
    random-init baseline the architecture and the seed it is drawn with."""
    if baseline == "pixels":
        return "pixels"
    source = run.encoder.read_bytes() if run.encoder.is_file() else repr(cfg.model).encode()
    if baseline == "random_init":
        blob = torch.load(run.encoder, weights_only=True)["model"] if run.encoder.is_file() else cfg.model
        source = f"{blob!r}-seed{cfg.train.seed}".encode()
    return f"{baseline or 'pretrained'}-{hashlib.sha256(source).hexdigest()[:12]}"


# How long a rank waits for a cache file that rank 0 has seen to become readable here too: on
# a shared filesystem another node may still answer from its cache of the directory (NFS
# keeps one up to acdirmax, 60 s by default) that the file is not there.
VISIBLE_WAIT_S = 60.0


def agree_flags(flags: list[bool], device: torch.device, src: int | None = 0) -> list[bool]:
    """``flags`` as every rank of the group sees them: rank ``src``'s (a broadcast), or with
    ``src=None`` true where any rank's is (an all-reduce MAX). One int tensor on ``device``:
    NCCL reduces only tensors on the rank's GPU."""
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    if t.numel():
        if src is None:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        else:
            dist.broadcast(t, src=src)
    return [bool(v) for v in t.tolist()]


def read_cached(path: Path, wait_s: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features, labels) of a cache file, or None: if it stays invisible from this node for
    ``wait_s``, or cannot be read (the caller then extracts, with every rank, rather than let
    this rank alone raise while the others wait in a collective). Files are written under a
    temporary name and renamed into place (``os.replace``), so a file found is a whole one."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return torch.load(path, weights_only=True)
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(1.0, wait_s))
        except Exception as e:  # noqa: BLE001 - unpickling fails in many types
            print(f"[eval] cannot read cached features {path} ({type(e).__name__}: {e}); "
                  "extracting them again", flush=True)
            return None


def cached_features(ctx: EvalContext, baselines: list[str], split: str, pooling: str,
                    max_samples: int, final_norm: bool = True
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Features of one split per encoder, on this rank's device: from the cache, or extracted
    by every rank and written by rank 0 (atomically: a concurrent job sees all or nothing).

    Every rank must take the same branch for every encoder: extraction runs collectives
    (``gather_shards``), loading none. The kNN and linear-probe jobs of a run share the cache
    and may run at once, so a file can appear between two ranks' looks at the directory; each
    rank deciding for itself could then extract on one rank and load on another: unmatched
    all-gathers, a hang until the collective timeout. So rank 0 decides what is there (a
    complete file: see ``read_cached``), the others follow; a rank that cannot read a file rank
    0 saw (``VISIBLE_WAIT_S``) makes every rank extract that encoder again, together."""
    run, cfg, info, proc = ctx.run, ctx.cfg, ctx.info, ctx.proc
    encoders = {b: encoder_key(run, cfg, b) for b in baselines}    # hashes encoder.pt once
    folder = run.evals / "features"
    # rank 0's view of the dataset file, for all: a node whose NFS attribute cache still shows
    # the file before a re-conversion would otherwise look for another name
    seen = [dataset_file_identity(info[split]) if proc.env.is_main else None]
    dist.broadcast_object_list(seen, src=0)
    if proc.env.is_main:
        for stale in remove_stale(folder):          # left by a killed job
            print(f"[eval] removed {stale}, a temporary a killed job left", flush=True)

    def path(baseline: str) -> Path:
        key = cache_key(encoders[baseline], info, split, seen[0], cfg.model.img_size, pooling,
                        final_norm, max_samples)
        return folder / f"{key}.pt"

    # rank 0's look at the cache; the broadcast also orders it before any write of rank 0's
    cached = agree_flags([proc.env.is_main and path(b).is_file() for b in baselines], proc.device)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for b, there in zip(baselines, cached):
        if there and (found := read_cached(path(b), VISIBLE_WAIT_S)) is not None:
            out[b] = found
    unread = agree_flags([b not in out for b in baselines], proc.device, src=None)
    missing = [b for b, u in zip(baselines, unread) if u]
    if missing:
        read_here = set(out)
        models = {b: encoder_for(run, cfg, b) for b in missing}
        out.update(extract_features(models, info[split], cfg, info, pooling, max_samples,
                                    proc.device, proc.env.rank, proc.env.world_size, final_norm))
        if proc.env.is_main:
            for b in missing:
                if b in read_here:           # fine here, only another node could not see it
                    continue
                f, y = out[b]
                path(b).parent.mkdir(parents=True, exist_ok=True)
                tmp = temp_name(path(b))
                try:
                    torch.save((f.cpu(), y.cpu()), tmp)
                    os.replace(tmp, path(b))
                finally:
                    tmp.unlink(missing_ok=True)
    return {b: (out[b][0].to(proc.device), out[b][1].to(proc.device)) for b in baselines}


# compute(ctx, baseline, train_f, train_y, val_f, val_y, num_classes) -> metrics
Compute = Callable[..., dict[str, float]]


def readout(section: Any) -> tuple[str, bool]:
    """(pooling, final_norm) an evaluation section reads: its ``features()`` where it has one
    (a protocol may fix them: LatentMIM's kNN), else its ``pooling`` after the final norm."""
    features = getattr(section, "features", None)
    return features() if features is not None else (section.pooling, True)


def frozen(compute: Compute, needs_train: Callable[[Any], bool] = lambda section: True
           ) -> Callable[[EvalContext], Iterator[tuple[str, dict[str, float]]]]:
    """A body for frozen-feature evaluations: features of every encoder (cached, or from one
    sharded pass over the data), then ``compute`` per encoder on the job's device (the kNN
    similarity matrix and the probe's training are GPU work). Where ``needs_train(section)``
    is false the training split is not read and ``compute`` gets None for its features."""
    def body(ctx: EvalContext) -> Iterator[tuple[str, dict[str, float]]]:
        if not ctx.baselines:
            return
        s, start = ctx.section, time.time()
        pooling, final_norm = readout(s)
        # the same decision on every rank (the section is the same): extraction is collective
        train = cached_features(ctx, ctx.baselines, "train", pooling, s.max_train_samples, final_norm) \
            if needs_train(s) else {b: (None, None) for b in ctx.baselines}
        val = cached_features(ctx, ctx.baselines, "val", pooling, 0, final_norm)
        shapes = ", ".join(f"{b or 'pretrained'} "
                           f"{tuple(train[b][0].shape) if train[b][0] is not None else 'no train split'}"
                           for b in ctx.baselines)
        if ctx.proc.env.is_main:
            print(f"[eval] train features {shapes}; {len(val[ctx.baselines[0]][1])} val, "
                  f"{ctx.proc.env.world_size} rank(s), {time.time() - start:.1f}s", flush=True)
        for b in ctx.baselines:
            yield b, compute(ctx, b, *train[b], *val[b], ctx.info["num_classes"])
    return body
