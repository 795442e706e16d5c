"""Random-resized-crop + flip decoding whose randomness is a pure function of
(seed, epoch, stream, sample index), and an epoch order that can start mid-epoch.

Why: FFCV's ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip`` draw from the
random state of whichever numba thread decodes a sample, so a sample's crop depends on thread
scheduling and on how many batches were decoded before it. A resumed run (which starts
mid-epoch) would then train on other crops than the uninterrupted run, and the final weights
would differ. Here every sample reseeds the random state of the thread decoding it (numba keeps
one per thread) from its key before drawing, so crops and flips are the same with or without
JIT, with any number of workers, and after a resume. The epoch is read once per batch from
Python (``objmode``), so a new epoch needs no recompilation.

Only this module and ffcv_io.py import ffcv.
"""
from __future__ import annotations

import itertools
import warnings
from typing import Callable, Sequence

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler
from numba import objmode
from numba.core.errors import NumbaWarning

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


class SeededRandomResizedCrop(ResizedCropRGBImageDecoder):
    """RandomResizedCrop (torchvision's parameters: ``scale`` of the area, ``ratio``) then a
    horizontal flip with p = 0.5 (``flip``), to (H, W, 3) uint8. ``stream`` separates the
    draws of several views decoded from the same sample."""

    def __init__(self, output_size: tuple[int, int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True, seed: int = 0,
                 stream: int = 0) -> None:
        super().__init__(output_size)
        self.scale, self.ratio = np.array(scale, dtype=np.float64), np.array(ratio, dtype=np.float64)
        self.flip, self.seed, self.stream = flip, int(seed), int(stream)
        self.token = next(_TOKENS)
        _EPOCHS[self.token] = 0

    def set_epoch(self, epoch: int) -> None:
        _EPOCHS[self.token] = int(epoch)

    @property
    def get_crop_generator(self) -> Callable:
        return get_random_crop

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        get_crop_c, mix = Compiler.compile(get_random_crop), Compiler.compile(_mix)
        scale, ratio, flip, token, stream = self.scale, self.ratio, self.flip, self.token, self.stream
        base = _mix(0, self.seed)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            with objmode(epoch="int64"):
                epoch = _epoch_of(token)
            key = mix(mix(base, epoch), stream)
            for k in my_range(len(batch_indices)):
                source_ix = batch_indices[k]
                np.random.seed(mix(key, np.int64(source_ix)))    # this thread, this sample
                field = metadata[source_ix]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    image = temp_storage[k]
                    imdecode_c(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = image.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                i, j, h, w = get_crop_c(height, width, scale, ratio)
                resize_crop_c(image, i, i + h, j, j + w, destination[k])
                if flip and np.random.rand() < 0.5:
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
