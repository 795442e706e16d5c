"""FFCV ``.beton`` writing and loading (the only module that imports ffcv).

Loaders yield ``{"image": float32 (B, 3, S, S) normalised, "label": long (B,)}``, plus one
normalised view per name in ``extra_views`` (hpc_mim/data/views.py): the same images decoded
again with their own crop and flip, then that view's recipe. Sample order is a pure function of
(seed, epoch) (FFCV's RANDOM order; DistributedSampler semantics when distributed), and so is
every crop and flip (SeededRandomResizedCrop): resuming by (epoch, micro-batch) sees exactly the
batches an uninterrupted run would have seen.

Why: FFCV's ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip`` draw from the
random state of whichever numba thread decodes a sample, so a sample's crop depends on thread
scheduling and on how many batches were decoded before it. A resumed run (which starts
mid-epoch) would then train on other crops than the uninterrupted run, and the final weights
would differ. Here every sample reseeds the random state of the thread decoding it (numba keeps
one per thread) from its key before drawing, so crops and flips are the same with or without
JIT, with any number of workers, and after a resume. The epoch is read once per batch from
Python (``objmode``), so a new epoch needs no recompilation.

Pitfall (libffcv/ffcv#396): on CPU, putting NormalizeImage after ToTensor/ToTorchImage makes the
loader spin forever in ``Graph.group_operations``, so every JIT op stays before ``ToTensor``.
Set ``HPC_MIM_FFCV_JIT=0`` to skip numba compilation (10-20 s per loader; useful in tests). The
decoders then run as Python in FFCV's loader thread, and draw from a generator of that thread's
own (``rng``): reseeding NumPy's global one there would also reseed the one the training thread
draws from (timm's Mixup), so a run would not even repeat itself.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import threading
import warnings
from typing import Any, Callable, Iterator, Sequence

import numba.typed
import numpy as np
import torch
from tqdm import tqdm

# ffcv/fields/rgb_image.py keeps a two-entry table ({"jpg": 0, "raw": 1}) in an untyped numba
# Dict built at import, and reads it only from Python; numba compiles the typed dict's methods
# for it, 2.5-4 s in every process that imports ffcv (each rank of each job). A plain dict does
# the same job, so it stands in for numba's Dict during the import only.
_numba_dict, numba.typed.Dict = numba.typed.Dict, dict
try:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.loader import Loader, OrderOption
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.pipeline_spec import PipelineSpec
    from ffcv.reader import Reader
    from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
    from ffcv.writer import DatasetWriter, worker_job_indexed_dataset
    from ffcv.writer import chunks as ffcv_chunks
finally:
    numba.typed.Dict = _numba_dict
from numba import objmode
from numba.core.errors import NumbaWarning

from hpc_mim.data.views import check_views, finish_view, normalize_uint8


class ThreadRandom(threading.local):
    """The few ``np.random`` functions the decoders use, on a legacy generator of the calling
    thread's own: what numba gives each thread when the decoders are compiled, so the draws
    are the same either way (MT19937, same seeding)."""

    def __init__(self) -> None:
        self.state = np.random.RandomState()

    def seed(self, seed: int) -> None:
        self.state.seed(seed)

    def rand(self) -> float:
        return self.state.random_sample()

    def uniform(self, low: float, high: float) -> float:
        return self.state.uniform(low, high)

    def randint(self, low: int, high: int) -> int:
        return self.state.randint(low, high)


if os.environ.get("HPC_MIM_FFCV_JIT", "1") == "0":
    Compiler.set_enabled(False)
    rng: Any = ThreadRandom()
else:
    rng = np.random                   # numba keeps one generator per thread


# ------------------------------------------------------------------ seeded crops, resumable order

# the objmode block only reads one int per batch; holding the GIL for it is harmless
warnings.filterwarnings("ignore", message="Code running in object mode", category=NumbaWarning)

_EPOCHS: dict[int, int] = {}          # decoder token -> epoch being decoded
_TOKENS = itertools.count()
_PRIME = 4294967291                   # largest prime < 2**32: keeps np.random.seed's range


def _epoch_of(token: int) -> int:
    return _EPOCHS.get(token, 0)


def _mix(h: int, x: int) -> int:
    """One step of a multiplicative hash kept below 2**32 (no int64 overflow under numba, so
    the JIT and the interpreter give the same seeds)."""
    return (h * 1000003 + x % _PRIME) % _PRIME


def sample_seed(seed: int, epoch: int, stream: int, index: int) -> int:
    """The seed a sample's crop and flip are drawn from (also used by the tests)."""
    return _mix(_mix(_mix(_mix(0, seed), epoch), stream), index)


def pad_crop_window(height: int, width: int, size: int, padding: int):
    """torchvision's Resize(size) (short side to ``size``, the long one truncated) then
    RandomCrop(size, padding, padding_mode="reflect"), drawn from ``rng``: (resized h, w,
    rows, cols), rows/cols (size,) indexing the resized image, reflected at its borders (the
    edge pixel is not repeated: -1 -> 1, n -> n - 2). Numba-compilable."""
    if height <= width:
        rh, rw = size, max(size, int(size * width / height))
    else:
        rh, rw = max(size, int(size * height / width)), size
    top = rng.randint(0, rh + 2 * padding - size + 1)
    left = rng.randint(0, rw + 2 * padding - size + 1)
    rows = np.abs(np.arange(size) + top - padding)
    cols = np.abs(np.arange(size) + left - padding)
    rows = np.where(rows >= rh, 2 * (rh - 1) - rows, rows)
    cols = np.where(cols >= rw, 2 * (rw - 1) - cols, cols)
    return rh, rw, rows, cols


def resized_crop_window(height: int, width: int, scale: np.ndarray, ratio: np.ndarray):
    """torchvision's RandomResizedCrop window (top, left, h, w), drawn from ``rng``: up to 10
    tries of an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio`` that
    fit the image, else the whole image clamped to ``ratio``, centred. Numba-compilable.
    Written here because torchvision's draws from torch and FFCV's ``get_random_crop`` from
    numpy's global generator, which the interpreted decoders must leave alone."""
    area = height * width
    log_low, log_high = np.log(ratio[0]), np.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = np.exp(rng.uniform(log_low, log_high))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h + 1), rng.randint(0, width - w + 1), h, w
    w, h = width, height
    if width / height < ratio[0]:
        h = int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w = int(round(height * ratio[1]))
    return (height - h) // 2, (width - w) // 2, h, w


class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """RandomResizedCrop (torchvision's parameters: ``scale`` of the area, ``ratio``) then a
    horizontal flip with p = 0.5 (``flip``), to (H, W, 3) uint8. ``stream`` separates the
    draws of several views decoded from the same sample. ``style="pad"``: instead of the
    random resized crop, Resize(short side) + RandomCrop(padding, reflect) (LUT's views)."""

    def __init__(self, output_size: tuple[int, int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True, seed: int = 0,
                 stream: int = 0, style: str = "resized", padding: int = 4) -> None:
        super().__init__(output_size)
        if style not in ("resized", "pad") or padding < 0:
            raise ValueError(f"crop style {style!r} with padding {padding}: 'resized', or 'pad' with padding >= 0")
        self.scale, self.ratio = np.array(scale, dtype=np.float64), np.array(ratio, dtype=np.float64)
        self.flip, self.seed, self.stream = flip, int(seed), int(stream)
        self.pad, self.padding = style == "pad", int(padding)
        self.token = next(_TOKENS)
        _EPOCHS[self.token] = 0

    def set_epoch(self, epoch: int) -> None:
        _EPOCHS[self.token] = int(epoch)

    @property
    def get_crop_generator(self) -> Callable:
        return resized_crop_window

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        get_crop_c, mix = Compiler.compile(resized_crop_window), Compiler.compile(_mix)
        pad_window_c = Compiler.compile(pad_crop_window)
        scale, ratio, flip, token, stream = self.scale, self.ratio, self.flip, self.token, self.stream
        pad, padding, size = self.pad, self.padding, self.output_size[0]
        base = _mix(0, self.seed)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            with objmode(epoch="int64"):
                epoch = _epoch_of(token)
            key = mix(mix(base, epoch), stream)
            for k in my_range(len(batch_indices)):
                source_ix = batch_indices[k]
                rng.seed(mix(key, np.int64(source_ix)))    # this thread, this sample
                field = metadata[source_ix]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    image = temp_storage[k]
                    imdecode_c(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = image.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                if pad:        # whole image resized, then a reflect-padded window of it
                    rh, rw, rows, cols = pad_window_c(height, width, size, padding)
                    resized = np.empty((rh, rw, 3), dtype=np.uint8)
                    resize_crop_c(image, 0, height, 0, width, resized)
                    destination[k] = resized[rows][:, cols]
                else:
                    i, j, h, w = get_crop_c(height, width, scale, ratio)
                    resize_crop_c(image, i, i + h, j, j + w, destination[k])
                if flip and rng.rand() < 0.5:
                    destination[k] = destination[k][:, ::-1].copy()
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SkippableOrder:
    """Wraps a loader's traversal order: the next epoch starts ``skip`` samples in (whole
    batches of this rank), so a resumed run neither decodes nor sees the batches already done."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.skip = 0

    def sample_order(self, epoch: int) -> np.ndarray:
        order = self.inner.sample_order(epoch)
        skip, self.skip = self.skip, 0            # applies to one epoch only
        return order[skip:]


# ------------------------------------------------------------------ writing and loading

# ------------------------------------------------------------------ writing
# FFCV's DatasetWriter waits forever when one of its workers dies (an exception such as "Tried
# allocating N but page size is P", or the OOM killer): write_beton runs FFCV's own worker under
# a guard that reports the failing sample, and waits for the workers watching them.

MIN_PAGE = 1 << 21                    # 2 MiB: small pages keep tiny datasets small


class BetonWriteError(ValueError):
    """A writer worker failed (or died): the conversion stops, naming the sample."""


def page_size_for(width: int, height: int, mode: str, max_resolution: int | None) -> int:
    """The smallest power-of-two FFCV page (>= 2 MiB) that holds a (width x height) image
    once FFCV has resized it to ``max_resolution``: its raw bytes (+ 64 KiB for a JPEG's
    headers; at quality 90 even pure noise encodes to about half of raw). FFCV cannot store a
    sample larger than a page; its worker then dies ("Tried allocating N but page size is P"),
    which ``write_beton`` turns into an error naming the file."""
    ratio = max_resolution / max(width, height) if max_resolution else 1.0
    if ratio < 1:                              # as ffcv.fields.rgb_image.resizer
        width, height = int(ratio * width), int(ratio * height)
    raw = width * height * 3
    need = raw if mode == "raw" else raw + (1 << 16)
    page = MIN_PAGE
    while page < need:
        page *= 2
    return page


class _Tracked:
    """The dataset as a writer worker sees it: remembers the index being written."""

    def __init__(self, dataset: Any) -> None:
        self.dataset, self.current = dataset, -1

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        self.current = int(i)
        return self.dataset[i]


def _guarded_worker(errors, *args) -> None:
    """FFCV's own worker, with its failure sent to the parent (which otherwise waits forever
    for samples that never come) before the worker dies."""
    *ffcv_args, dataset = args
    tracked = _Tracked(dataset)
    try:
        worker_job_indexed_dataset(*ffcv_args, tracked)
    except BaseException as e:
        describe = getattr(dataset, "describe", str)
        errors.put(f"sample {tracked.current} ({describe(tracked.current)}): "
                   f"{type(e).__name__}: {e}"[:2000])
        raise


def _failure(errors, workers: list) -> str | None:
    """Why the write failed: a worker's message, or a worker killed without one (OOM killer)."""
    try:
        return errors.get_nowait()
    except queue.Empty:
        dead = [w for w in workers if w.exitcode not in (None, 0)]
        if not dead:
            return None
        try:            # a worker that failed with a message can exit before the queue's
            return errors.get(timeout=2.0)           # feeder thread delivered it
        except queue.Empty:
            return f"writer worker {dead[0].pid} died (exit code {dead[0].exitcode})"


def _write_samples(writer: DatasetWriter, dataset: Any) -> None:
    """What FFCV's ``DatasetWriter._write_common`` does (workers write chunks of samples into
    their pages; the parent then writes the allocation table), except that the parent's wait
    looks at the workers every 0.1 s and raises ``BetonWriteError`` as soon as one failed:
    FFCV's own wait has no way out, and interrupting it from another thread (a signal, or
    ``_thread.interrupt_main``) left CI runs hung now and then."""
    work = list(enumerate(range(len(dataset))))          # (destination, source) as FFCV's own
    writer.num_samples = len(work)
    writer.prepare()
    todo, allocations, errors = multiprocessing.Queue(), multiprocessing.Queue(), multiprocessing.Queue()
    for chunk in ffcv_chunks(work, 256):
        todo.put(chunk)
    for _ in range(writer.num_workers):
        todo.put(None)                                   # one "no more work" per worker
    written = multiprocessing.Value("Q", 0)
    allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
    args = (errors, todo, writer.metadata_sm, writer.metadata_type, writer.fields, allocator,
            written, allocations, dataset)
    workers = [multiprocessing.Process(target=_guarded_worker, args=args) for _ in range(writer.num_workers)]
    for w in workers:
        w.start()
    tables: list = []
    try:
        with tqdm(total=len(work), desc=os.path.basename(writer.fname), mininterval=5) as progress:
            while len(tables) < len(workers):            # each worker's table comes last
                if (failure := _failure(errors, workers)) is not None:
                    raise BetonWriteError(f"{writer.fname}: writing failed at {failure}")
                try:
                    tables.append(allocations.get(timeout=0.1))
                except queue.Empty:
                    pass
                progress.update(written.value - progress.n)
    except BaseException:
        for w in workers:
            w.kill()
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()
        os.remove(writer.fname)
        raise
    for w in workers:
        w.join()
    writer.finalize([a for table in tables for a in table])
    writer.metadata_sm.close()
    writer.metadata_sm.unlink()


def write_beton(path: str, dataset: Any, max_resolution: int | None = None, mode: str = "raw",
                jpeg_quality: int = 90, num_workers: int = 2, page_size: int = MIN_PAGE) -> None:
    """Write ``dataset[i] -> (HWC uint8 RGB array or PIL image, int label)`` to ``path``.

    ``mode``: ``raw`` (bit-exact, larger) or ``jpg`` (lossy, ~3x faster to read at ImageNet
    scale). ``page_size``: a power of two >= every encoded sample (``page_size_for``). If a
    writer worker fails or dies, the partial file is removed and ``BetonWriteError`` names the
    sample (``dataset.describe(i)`` when the dataset has it) -- FFCV itself would wait forever.
    """
    if mode not in ("raw", "jpg"):
        raise ValueError(f"mode must be 'raw' or 'jpg', got {mode!r}")
    fields = {"image": RGBImageField(write_mode=mode, max_resolution=max_resolution,
                                     jpeg_quality=jpeg_quality),
              "label": IntField()}
    _write_samples(DatasetWriter(path, fields, page_size=page_size, num_workers=num_workers), dataset)


def _image_pipeline(decoder, flips: list, mean: Sequence[float], std: Sequence[float],
                    device: torch.device) -> list:
    """Decode -> (flip) -> (B, 3, S, S) on ``device``: normalised float32 on the CPU, uint8
    on a GPU, where ``iterate`` normalises it (``normalizes_in_torch``).

    On a GPU the batch crosses PCIe as uint8 (4x fewer bytes than float32; FFCV's own ImageNet
    example does the same), asynchronously (``non_blocking``), and is normalised there in torch:
    FFCV's NormalizeImage on a GPU tensor compiles a cupy kernel (ffcv/transforms/normalize.py
    imports cupy in ``generate_code_gpu``), and cupy is no dependency of this project. On the
    CPU NormalizeImage must come before ToTensor (libffcv/ffcv#396: it hangs after it)."""
    if normalizes_in_torch(device):
        return [decoder, *flips, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()]
    normalize = NormalizeImage(np.array(mean) * 255, np.array(std) * 255, np.float32)
    return [decoder, *flips, normalize, ToTensor(), ToTorchImage()]


def normalizes_in_torch(device: torch.device) -> bool:
    """Whether the loader for ``device`` yields uint8 images that ``iterate`` normalises."""
    return device.type == "cuda"


def build_loader(path: str, batch_size: int, img_size: int, mean: Sequence[float],
                 std: Sequence[float], train: bool, seed: int = 0,
                 crop_scale: Sequence[float] = (0.2, 1.0), hflip: bool = True,
                 eval_crop_ratio: float = 1.0, num_workers: int = 2, distributed: bool = False,
                 max_samples: int = 0, device: torch.device | str = "cpu",
                 extra_views: Sequence[str] = (), crop: str = "seeded", train_crop: str = "resized",
                 crop_padding: int = 4, shard: tuple[int, int] = (0, 1)) -> Loader:
    """A train loader (random order, RandomResizedCrop + flip, drop_last) or an eval loader
    (sequential, center crop). ``distributed`` shards with torch.distributed's rank/world.
    ``crop="stock"``: FFCV's own crop and flip decoders instead of the seeded ones (not exactly
    resumable; benchmarks/loader_throughput.py measures what the seeding costs).
    ``train_crop="pad"``: every train view is Resize + RandomCrop(``crop_padding``, reflect)
    + flip instead of RandomResizedCrop (LUT's recipe). ``shard=(rank, world)``: an eval
    loader reading samples rank, rank + world, ... (no padding, unlike FFCV's distributed
    sequential order, which repeats samples to even the shards out)."""
    check_views(extra_views)
    if crop not in ("seeded", "stock") or (crop == "stock" and (extra_views or train_crop != "resized")):
        raise ValueError(f"crop={crop!r}: 'seeded', or 'stock' without extra views and resized crops")
    style = dict(style=train_crop, padding=crop_padding)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file not found: {path} (convert it with data_prep/)")
    device = torch.device(device)
    flips = []
    if train and crop == "stock":
        decoder = RandomResizedCropRGBImageDecoder((img_size, img_size), scale=tuple(crop_scale))
        flips = [RandomHorizontalFlip()] if hflip else []
    elif train:    # stream 0; extra views 1, 2, ...: independent crops of the same sample
        decoder = SeededRandomResizedCrop((img_size, img_size), crop_scale, flip=hflip, seed=seed, **style)
    else:
        decoder = CenterCropRGBImageDecoder((img_size, img_size), ratio=eval_crop_ratio)
    label_ops = [IntDecoder(), ToTensor(), Squeeze()]
    if device.type == "cuda":
        label_ops.append(ToDevice(device, non_blocking=True))
    indices = None
    rank, world = shard
    if max_samples or world > 1:
        n = num_samples(path)           # an int: numpy's uint64 count would make arange float64
        indices = np.arange(min(max_samples, n) if max_samples else n)[rank::world]
    pipelines = {"image": _image_pipeline(decoder, flips, mean, std, device), "label": label_ops}
    decoders = [decoder] if train and crop == "seeded" else []
    for stream, name in enumerate(extra_views, start=1):   # the same field decoded again
        decoders.append(SeededRandomResizedCrop((img_size, img_size), crop_scale, flip=hflip,
                                                seed=seed, stream=stream, **style))
        ops = [ToTensor()] + ([ToDevice(device, non_blocking=True)] if device.type == "cuda" else [])
        pipelines[name] = PipelineSpec("image", decoder=decoders[-1], transforms=ops + [ToTorchImage()])
    loader = Loader(path, batch_size=batch_size, num_workers=num_workers,
                    order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
                    drop_last=train, distributed=distributed, seed=seed, indices=indices,
                    os_cache=True, pipelines=pipelines)
    loader.hpc_views = (tuple(extra_views), tuple(mean), tuple(std))
    loader.hpc_normalize = normalizes_in_torch(device)    # uint8 "image": iterate normalises it
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
    normalize = getattr(loader, "hpc_normalize", False)
    for image, label, *extra in loader:                # pipeline order: fields, then views
        if normalize:      # uint8 on the GPU -> float32, on the device (stats cached there)
            image = normalize_uint8(image, mean, std)
        # channels-last as FFCV gives it: the patch embedding takes it without a copy
        batch = {"image": image, "label": label.long()}
        for name, raw in zip(views, extra):
            batch[name] = finish_view(name, raw, mean, std)
        yield batch


def num_samples(path: str) -> int:
    return int(Reader(path).num_samples)
