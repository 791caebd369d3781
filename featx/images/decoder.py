"""Decode any image file robustly to an RGB array of the backbone's input size.

No TensorFlow: extract, finetune and predict all decode through `load_image` (or
`load_for_cache`), so every stage sees exactly the same pixels. A pixel budget bounds what
the decoding threads (or processes) hold at once."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featx import config
from featx.files import is_url
from featx.images import finder, remote


@functools.cache
def _register_heif() -> None:
    """HEIC/HEIF (iPhone photos) through pillow-heif's Pillow plugin, registered when the first
    such file comes: its import is a fifth of a one-image predict's start-up. Pillow reads AVIF
    itself (>= 11.3)."""
    import pillow_heif

    pillow_heif.register_heif_opener()


def _formats(data: bytes) -> tuple[str, ...]:
    """config.IMAGE_FORMATS for these bytes: HEIF only for an ISO media file (an "ftyp" box at
    byte 4, as HEIF/HEIC and AVIF have), registered then; the others never need the plugin."""
    if data[4:8] == b"ftyp":
        _register_heif()
        return config.IMAGE_FORMATS
    return tuple(f for f in config.IMAGE_FORMATS if f != "HEIF")


def open_image(source) -> Image.Image:
    """Image.open of a path or a binary file object with featx's formats only (none that runs an
    external helper: an EPS file would run Ghostscript), HEIF registered when it is one. For
    every reader of image files: extraction, the report's and the audit's thumbnails."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            head = f.read(8)
    else:
        start = source.tell()
        head = source.read(8)
        source.seek(start)
    return Image.open(source, formats=_formats(head))


# featx applies its own pixel limit (below) and reports it per file; Pillow's warning would only
# be noise on stderr.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; alpha is composited on config.BACKGROUND.

    Integer gray modes (I;16*, and I, which is how 16-bit PNG/TIFF files arrive) are taken as
    16-bit, 0..65535 -> 0..255, whatever values one image happens to hold; F is taken as 0..255.
    A transparent colour (PNG tRNS, GIF) counts as alpha, in L and RGB images as in palette ones.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        # 16-bit range to 8-bit: 65535 -> 255, 32896 -> 128. A float TIFF may hold NaN or
        # infinities: black and white, without a numpy warning.
        a = a / 257.0 if img.mode != "F" else np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*config.BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return img


class _PixelBudget:
    """Bounds the pixels being decoded at once by all threads together: a few huge images (a
    9400x9400 PNG is 265 MB decoded) wait for each other instead of adding up; small ones never
    wait. One image larger than the budget still decodes, alone. Decoding processes share one
    (images.decoding): a multiprocessing Condition and a shared counter (anything with .value)."""

    def __init__(self, pixels: int, cond=None, counter=None):
        self.limit = pixels
        self._cond = cond if cond is not None else threading.Condition()
        self._counter = counter if counter is not None else _Counter()

    @property
    def used(self) -> int:
        return self._counter.value

    def acquire(self, pixels: int) -> None:
        with self._cond:
            while self.used and self.used + pixels > self.limit:
                self._cond.wait()
            self._counter.value += pixels

    def release(self, pixels: int) -> None:
        with self._cond:
            self._counter.value -= pixels
            self._cond.notify_all()


@dataclass
class _Counter:
    value: int = 0


_PIXEL_BUDGET = _PixelBudget(config.DECODE_PIXEL_BUDGET)


# Pillow allocates pixels in blocks of 16 MB by default, under glibc's largest mmap threshold
# (32 MB), so the blocks of a freed huge image stay in each decoding thread's heap: eight
# 9400x9400 PNGs kept 1.3 GB resident even one at a time. Larger blocks are mmapped and given
# back to the system when freed (459 MB); decoding speed of ordinary photos is unchanged.
Image.core.set_block_size(config.PILLOW_BLOCK_SIZE)


def decode_image(
    data: bytes,
    image_size: int = config.IMAGE_SIZE,
    max_pixels: int = config.MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decode image bytes to a (image_size, image_size, 3) uint8 RGB array.

    The format comes from the content, not the file name. Animated GIFs and multi-page TIFFs give
    their first frame; the EXIF orientation is applied; large JPEGs are decoded at a reduced scale
    (DCT scaling) when that still leaves at least `image_size` pixels on each side.
    Raises ValueError with a short reason when the bytes are no usable image.
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    fmt = "unknown"
    try:
        img = open_image(io.BytesIO(data))
        fmt = img.format or fmt
        width, height = img.size
        if width * height > max_pixels:
            raise _Rejected(
                f"too many pixels (decompression-bomb guard): {width}x{height} > {max_pixels}"
            )
        if img.format == "JPEG":
            img.draft(img.mode, (image_size, image_size))
        pixels = img.size[0] * img.size[1]  # after draft: what will really be decoded
        _PIXEL_BUDGET.acquire(pixels)
        try:
            img.load()  # truncation is detected here
            ImageOps.exif_transpose(img, in_place=True)  # no copy of a huge image when upright
            img = _to_rgb(img)
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
        finally:
            _PIXEL_BUDGET.release(pixels)
    except Image.DecompressionBombError as e:  # Pillow's own limit, 2x its MAX_IMAGE_PIXELS
        raise ValueError(f"too many pixels (decompression-bomb guard): {e}") from None
    except UnidentifiedImageError:
        raise ValueError("not an image (format not recognised)") from None
    except _Rejected:
        raise
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, ValueError (HEIF), ...
        raise ValueError(f"corrupt or truncated image ({fmt}): {one_line(e)}") from None


class _Rejected(ValueError):
    """featx's own reason for rejecting a file, passed on as it is."""


def one_line(error: Exception) -> str:
    """An exception's text as one line of a reason (pillow-heif's end in a newline)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def to_input(img: Image.Image, image_size: int = config.IMAGE_SIZE,
             max_pixels: int = config.MAX_IMAGE_PIXELS) -> np.ndarray:  # fmt: skip
    """An image already decoded (a caller's PIL image) as `decode_image` makes one: EXIF orientation
    applied, RGB (alpha on white), resized to (image_size, image_size). The image is not changed.

    A file featx opens itself may be decoded at reduced scale (JPEG DCT scaling) before the
    resize; an image already decoded is resized from its full pixels, so a JPEG given as a PIL
    image can differ from the same file given as a path by a few grey levels."""
    width, height = img.size
    if width * height > max_pixels:
        raise ValueError(
            f"too many pixels (decompression-bomb guard): {width}x{height} > {max_pixels}"
        )
    img = _to_rgb(ImageOps.exif_transpose(img))  # both return new images: the caller's stays
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def from_array(array: np.ndarray, image_size: int = config.IMAGE_SIZE) -> np.ndarray:
    """An HxWx3 (RGB), HxWx4 (RGBA) or HxW (grey) uint8 array as the backbone's input; one of
    exactly (image_size, image_size, 3) is used as it is."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise ValueError(
            f"an image array must hold uint8 pixels (0-255), got {a.dtype}; convert it with "
            "np.clip(a, 0, 255).astype(np.uint8)"
        )
    if a.shape == (image_size, image_size, 3):
        return a
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4)):
        return to_input(Image.fromarray(np.ascontiguousarray(a)), image_size)
    raise ValueError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {a.shape}")


def load_for_cache(path: str | Path, image_size: int, old_sha: str | None = None) -> tuple:
    """Read and decode one file for the cache, never raising for a bad one: ("ok", sha256,
    pixels), ("same", sha256, None) when its content hash is `old_sha` (unchanged: no decoding),
    or ("rejected", reason, None). The one loader of extract and its Ray actors."""
    try:
        data, sha = read_file(path)
    except OSError as e:
        return "rejected", f"unreadable: {e.strerror or e}", None
    except ValueError as e:  # a FIFO, socket or device
        return "rejected", str(e), None
    if old_sha is not None and sha == old_sha:
        return "same", sha, None
    try:
        return "ok", sha, decode_image(data, image_size)
    except Exception as e:  # any decoder failure rejects the file, with its reason
        return "rejected", one_line(e), None


def read_file(path: str | Path) -> tuple[bytes, str]:
    """The file's bytes and their sha256 (the content key that detects real changes).

    Opened non-blocking and checked before reading: a FIFO, socket or device raises ValueError
    instead of blocking forever, and so does a file over config.MAX_FILE_BYTES (read no further
    than that, even when it grows while being read). OSError (permission, I/O) passes through:
    it may be transient.
    A URL is read from its object store (featx.images.remote), by whoever calls this: the
    decoding worker or Ray actor, never a driver for it.
    """
    if is_url(path):
        data = remote.read(str(path))
        if len(data) > config.MAX_FILE_BYTES:
            raise ValueError(_too_large(len(data)))
        return data, hashlib.sha256(data).hexdigest()
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        kind = finder.special_kind(st.st_mode)
        if kind:
            raise ValueError(f"not a regular file ({kind})")
        if st.st_size > config.MAX_FILE_BYTES:
            raise ValueError(_too_large(st.st_size))
        data = fh.read(config.MAX_FILE_BYTES + 1)  # a file growing while read stops at the cap
    if len(data) > config.MAX_FILE_BYTES:
        raise ValueError(_too_large(len(data), "or more "))
    return data, hashlib.sha256(data).hexdigest()


def _too_large(size: int, more: str = "") -> str:
    limit = config.MAX_FILE_BYTES
    return (
        f"too large for an image file ({size / 2**20:,.0f} MiB {more}> {limit / 2**20:,.0f} MiB, "
        "config.MAX_FILE_BYTES); not read"
    )


def load_image(
    path: str | Path,
    image_size: int = config.IMAGE_SIZE,
    max_pixels: int = config.MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decode one file to a (image_size, image_size, 3) uint8 RGB array (see `decode_image`).

    The file is only read, never written.
    """
    return decode_image(read_file(path)[0], image_size, max_pixels)
