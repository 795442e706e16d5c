"""FFCV ``.beton`` writing and loading (the only module that imports ffcv).

Loaders yield ``{"image": float (B, 3, S, S) normalised, "label": long (B,)}``, plus one
normalised view per name in ``extra_views`` (hpc_mim/data/views.py): the same images decoded
again with their own crop and flip, then that view's recipe. Sample order is a pure function of
(seed, epoch) (FFCV's RANDOM order; DistributedSampler semantics when distributed), and so is
every crop and flip (seeded_crop.py): resuming by (epoch, micro-batch) sees exactly the batches
an uninterrupted run would have seen.

Pitfall (libffcv/ffcv#396): on CPU, putting NormalizeImage after ToTensor/ToTorchImage makes the
loader spin forever in ``Graph.group_operations``, so every JIT op stays before ``ToTensor``.
Set ``HPC_MIM_FFCV_JIT=0`` to skip numba compilation (10-20 s per loader; useful in tests).
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.pipeline_spec import PipelineSpec
from ffcv.reader import Reader
from ffcv.transforms import NormalizeImage, Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.writer import DatasetWriter

from hpc_mim.data.seeded_crop import SeededRandomResizedCrop, SkippableOrder
from hpc_mim.data.views import check_views, finish_view

if os.environ.get("HPC_MIM_FFCV_JIT", "1") == "0":
    Compiler.set_enabled(False)


def write_beton(path: str, dataset: Any, max_resolution: int | None = None, mode: str = "raw",
                jpeg_quality: int = 90, num_workers: int = 2) -> None:
    """Write ``dataset[i] -> (HWC uint8 RGB array or PIL image, int label)`` to ``path``.

    ``mode``: ``raw`` (bit-exact, larger) or ``jpg`` (lossy, ~3x faster to read at ImageNet
    scale). Small pages keep tiny datasets small (the 8 MiB default pads every file).
    """
    if mode not in ("raw", "jpg"):
        raise ValueError(f"mode must be 'raw' or 'jpg', got {mode!r}")
    fields = {"image": RGBImageField(write_mode=mode, max_resolution=max_resolution,
                                     jpeg_quality=jpeg_quality),
              "label": IntField()}
    writer = DatasetWriter(path, fields, page_size=1 << 21, num_workers=num_workers)
    writer.from_indexed_dataset(dataset, chunksize=256)


def _image_pipeline(decoder, mean: Sequence[float], std: Sequence[float],
                    device: torch.device) -> list:
    ops = [decoder, NormalizeImage(np.array(mean) * 255, np.array(std) * 255, np.float32),
            ToTensor()]
    if device.type == "cuda":
        ops.append(ToDevice(device, non_blocking=True))
    return ops + [ToTorchImage()]


def build_loader(path: str, batch_size: int, img_size: int, mean: Sequence[float],
                 std: Sequence[float], train: bool, seed: int = 0,
                 crop_scale: Sequence[float] = (0.2, 1.0), hflip: bool = True,
                 eval_crop_ratio: float = 1.0, num_workers: int = 2, distributed: bool = False,
                 max_samples: int = 0, device: torch.device | str = "cpu",
                 extra_views: Sequence[str] = ()) -> Loader:
    """A train loader (random order, RandomResizedCrop + flip, drop_last) or an eval loader
    (sequential, center crop). ``distributed`` shards with torch.distributed's rank/world."""
    check_views(extra_views)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file not found: {path} (convert it with data_prep/)")
    device = torch.device(device)
    if train:      # stream 0; extra views 1, 2, ...: independent crops of the same sample
        decoder = SeededRandomResizedCrop((img_size, img_size), crop_scale, flip=hflip, seed=seed)
    else:
        decoder = CenterCropRGBImageDecoder((img_size, img_size), ratio=eval_crop_ratio)
    label_ops = [IntDecoder(), ToTensor(), Squeeze()]
    if device.type == "cuda":
        label_ops.append(ToDevice(device, non_blocking=True))
    indices = None
    if max_samples:
        indices = np.arange(min(max_samples, num_samples(path)))
    pipelines = {"image": _image_pipeline(decoder, mean, std, device), "label": label_ops}
    decoders = [decoder] if train else []
    for stream, name in enumerate(extra_views, start=1):   # the same field decoded again
        decoders.append(SeededRandomResizedCrop((img_size, img_size), crop_scale, flip=hflip,
                                                seed=seed, stream=stream))
        ops = [ToTensor()] + ([ToDevice(device, non_blocking=True)] if device.type == "cuda" else [])
        pipelines[name] = PipelineSpec("image", decoder=decoders[-1], transforms=ops + [ToTorchImage()])
    loader = Loader(path, batch_size=batch_size, num_workers=num_workers,
                    order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
                    drop_last=train, distributed=distributed, seed=seed, indices=indices,
                    os_cache=True, pipelines=pipelines)
    loader.hpc_views = (tuple(extra_views), tuple(mean), tuple(std))
    loader.hpc_decoders = decoders
    loader.traversal_order = SkippableOrder(loader.traversal_order)
    return loader


def iterate(loader: Loader, epoch: int | None = None,
            skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Batches as dicts. ``epoch`` pins the (seed, epoch) order and crops, e.g. when resuming;
    ``skip``: start after that many batches of this rank (they are not even decoded).

    The tensors live in FFCV's recycled buffers: use them before the next batch, or clone.
    """
    if epoch is not None:
        loader.next_epoch = epoch
    for decoder in getattr(loader, "hpc_decoders", ()):
        decoder.set_epoch(loader.next_epoch)
    loader.traversal_order.skip = skip * loader.batch_size
    views, mean, std = getattr(loader, "hpc_views", ((), (), ()))
    for image, label, *extra in loader:                # pipeline order: fields, then views
        batch = {"image": image.contiguous(), "label": label.long()}
        for name, raw in zip(views, extra):
            batch[name] = finish_view(name, raw, mean, std)
        yield batch


def num_samples(path: str) -> int:
    return Reader(path).num_samples
