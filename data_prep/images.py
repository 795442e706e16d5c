"""Reading real-world image files: what can be converted to RGB uint8, and why the rest cannot.

Scraped and user-collected datasets hold broken files: zero bytes, a wrong extension, a
download cut short, CMYK or 16-bit scans, icons of a few pixels, panoramas of hundreds of
megapixels. ``check`` opens and fully decodes one file and returns why it must be skipped (or
None); ``load_rgb`` converts any mode PIL reads to (H, W, 3) uint8 (16-bit and float images
are rescaled, not clipped; CMYK goes through PIL's conversion; alpha is dropped).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

MIN_SIZE = 8                       # px: smaller sides carry no usable content at any crop
MAX_PIXELS = Image.MAX_IMAGE_PIXELS * 2   # PIL's own decompression-bomb error threshold


def check(path: Path, min_size: int = MIN_SIZE, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why ``path`` cannot be converted, or None when it can."""
    return inspect(path, min_size, max_pixels)[0]


def inspect(path: Path, min_size: int = MIN_SIZE,
            max_pixels: int = MAX_PIXELS) -> tuple[str | None, tuple[int, int]]:
    """(why ``path`` cannot be converted or None, its (width, height) or (0, 0))."""
    size = (0, 0)
    try:
        if Path(path).stat().st_size == 0:
            return "empty file", size
        with Image.open(path) as img:
            w, h = size = img.size      # from the header: refuse bombs before decoding
            if w * h > max_pixels:
                return f"too large ({w}x{h} > {max_pixels} pixels)", size
            if min(w, h) < min_size:
                return f"too small ({w}x{h}, a side < {min_size} px)", size
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                load_rgb_from(img)      # decode every byte: truncation shows only here
    except UnidentifiedImageError:
        return "not an image PIL can identify (corrupt or wrong extension)", size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        return f"unreadable: {type(e).__name__}: {e}"[:300], size
    return None, size


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return load_rgb_from(img)


def load_rgb_from(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from any PIL mode."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max()), 1.0) if arr.max() > 1 else 1.0
        gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))
