"""FFCV ``.beton`` writing (with ffcv_io.py, the only modules that import ffcv).

FFCV's ``DatasetWriter`` waits forever for samples when one of its worker processes dies (an
exception in a worker, e.g. "Tried allocating N but page size is P" for a sample larger than a
page, or a worker killed by the OOM killer). ``write_beton`` runs FFCV's own worker under a
guard that reports the failing sample to the parent, and a watcher that interrupts the wait:
the conversion ends with the file named instead of hanging. ``page_size_for`` picks a page
that holds the largest sample in the first place.
"""
from __future__ import annotations

import _thread
import functools
import multiprocessing
import os
import queue
import threading
from typing import Any

from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter, worker_job_indexed_dataset
from ffcv.writer import chunks as ffcv_chunks

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


def _watch(errors, done: threading.Event, failure: list[str]) -> None:
    """Until ``done``: on a worker's error message, or a worker killed without one (OOM
    killer), record why and interrupt the main thread's wait."""
    workers: set = set()
    while not done.is_set():
        workers.update(multiprocessing.active_children())
        try:
            failure.append(errors.get(timeout=0.2))
        except queue.Empty:
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if not dead:
                continue
            failure.append(f"writer worker {dead[0].pid} died (exit code {dead[0].exitcode})")
        _thread.interrupt_main()
        return


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
    writer = DatasetWriter(path, fields, page_size=page_size, num_workers=num_workers)
    errors = multiprocessing.Queue()
    done, failure = threading.Event(), []
    watcher = threading.Thread(target=_watch, args=(errors, done, failure), daemon=True)
    watcher.start()
    try:
        work = list(enumerate(range(len(dataset))))      # (destination, source) as FFCV's own
        writer._write_common(len(work), ffcv_chunks(work, 256),
                             functools.partial(_guarded_worker, errors), (dataset,))
    except KeyboardInterrupt:
        if not failure:
            raise
        for worker in multiprocessing.active_children():
            worker.kill()
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()
        os.remove(path)
        raise BetonWriteError(f"{path}: writing failed at {failure[0]}") from None
    finally:
        done.set()
        watcher.join()
