"""Find images in a folder layout, assign splits, and decode files robustly to RGB arrays.

This module needs no TensorFlow: extract, finetune and predict all decode through `load_image`,
so every stage sees exactly the same pixels.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from featx import config
from featx.errors import FeatxError

# HEIC/HEIF (iPhone photos) through pillow-heif's Pillow plugin; Pillow reads AVIF itself (>= 11.3).
pillow_heif.register_heif_opener()

# featx applies its own pixel limit (below) and reports it per file; Pillow's warning would only
# be noise on stderr.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageFile:
    """One candidate image found in the data folder."""

    path: str  # relative to the data folder, with forward slashes
    class_name: str
    split: str | None  # from the folder layout; None when featx must assign it


@dataclass
class Listing:
    layout: str  # "splits" (DATA/train/CLASS/...) or "flat" (DATA/CLASS/...)
    files: list[ImageFile]
    class_names: list[str]
    empty_classes: list[str]


def _visible(entry: os.DirEntry | Path) -> bool:
    return not entry.name.startswith(".") and not entry.name.startswith("__")


def _files_under(folder: Path) -> list[Path]:
    """Every non-hidden file below `folder`, recursively, skipping hidden folders.

    Symlinked folders are followed, each real folder once (a link back to a parent would loop).
    """
    found = []
    seen = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.startswith("__"))
        found.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return found


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))


def find_images(data_dir: str | Path) -> Listing:
    """List the images in `data_dir` and their classes.

    Two layouts are understood:
      DATA/{train,validation|val,test}/CLASS/*  -> those splits are kept;
      DATA/CLASS/*                              -> split later by `assign_splits`.
    Any non-hidden file is a candidate: formats are detected from content when decoding, and a
    file that is no image is rejected then, with its reason.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FeatxError(f"Data folder not found: '{data_dir}'. Pass a folder of class folders.")
    top = _subfolders(root)
    split_dirs = [p for p in top if p.name.lower() in config.SPLIT_FOLDER_NAMES]
    if split_dirs:
        others = [p.name for p in top if p not in split_dirs]
        if others:
            raise FeatxError(
                f"'{root}' mixes split folders ({', '.join(p.name for p in split_dirs)}) with "
                f"other folders ({', '.join(others)}). Put every class folder inside train/ "
                "(and validation/, test/), or use a flat layout DATA/CLASS/*."
            )
        splits = Counter(config.SPLIT_FOLDER_NAMES[p.name.lower()] for p in split_dirs)
        if any(n > 1 for n in splits.values()):
            raise FeatxError(f"'{root}' has both val/ and validation/ folders; keep one of them.")
        if "train" not in splits:
            raise FeatxError(f"'{root}' has split folders but no train/ folder; add train/CLASS/*.")
        layout = "splits"
        class_dirs = [
            (config.SPLIT_FOLDER_NAMES[s.name.lower()], c)
            for s in split_dirs
            for c in _subfolders(s)
        ]
    else:
        layout = "flat"
        class_dirs = [(None, c) for c in top]

    files: list[ImageFile] = []
    per_class: Counter = Counter()
    all_classes = set()
    for split, class_dir in class_dirs:
        all_classes.add(class_dir.name)
        for f in _files_under(class_dir):
            rel = f.relative_to(root).as_posix()
            files.append(ImageFile(rel, class_dir.name, split))
            per_class[class_dir.name] += 1
    class_names = sorted(c for c in all_classes if per_class[c] > 0)
    empty = sorted(c for c in all_classes if per_class[c] == 0)
    if len(class_names) < 2:
        raise FeatxError(
            f"Found {len(class_names)} class folder(s) with files in '{root}' "
            f"({', '.join(class_names) or 'none'}); a classifier needs at least 2. "
            "Expected DATA/CLASS/image.jpg or DATA/train/CLASS/image.jpg."
        )
    files.sort(key=lambda f: f.path)
    return Listing(layout, files, class_names, empty)


def _rank(seed: int, path: str) -> str:
    # A per-file pseudo-random key: the split of a file never depends on which other files exist.
    return hashlib.sha1(f"{seed}:{path}".encode()).hexdigest()


def assign_splits(
    files: list[ImageFile],
    existing: dict[str, str],
    val_split: float = config.VAL_SPLIT,
    seed: int = config.SEED,
) -> dict[str, str]:
    """Return {path: split} for every file.

    Files whose split comes from the layout keep it; files in `existing` (recorded in the cache)
    keep theirs, so splits are stable when images are added. The rest (flat layout, or train/
    without validation/) are split per class: enough of them go to validation to bring each
    class's validation share to `val_split`, chosen by a seeded hash of the path.
    """
    if not 0.0 <= val_split < 1.0:
        raise FeatxError(f"val_split must be in [0, 1), got {val_split}.")
    result: dict[str, str] = {}
    pending: dict[str, list[str]] = {}  # class -> paths still to split
    has_validation = any(f.split == "validation" for f in files)
    for f in files:
        if f.split is not None and (f.split != "train" or has_validation):
            result[f.path] = f.split
        elif f.path in existing and existing[f.path] in ("train", "validation"):
            result[f.path] = existing[f.path]
        else:
            pending.setdefault(f.class_name, []).append(f.path)
    if not pending:
        return result
    carved = Counter()  # validation images already carved per class
    total = Counter()
    for f in files:
        if f.split is None or (f.split == "train" and not has_validation):
            total[f.class_name] += 1
            if result.get(f.path) == "validation":
                carved[f.class_name] += 1
    for class_name, paths in pending.items():
        n = total[class_name]
        target = round(n * val_split)
        if val_split > 0 and n >= 2:
            target = max(1, min(target, n - 1))  # keep at least one image on each side
        need = max(0, target - carved[class_name])
        for i, path in enumerate(sorted(paths, key=lambda p: _rank(seed, p))):
            result[path] = "validation" if i < need else "train"
    return result


# --- decoding ----------------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; alpha is composited on config.BACKGROUND.

    Integer gray modes (I;16*, and I, which is how 16-bit PNG/TIFF files arrive) are taken as
    16-bit, 0..65535 -> 0..255, whatever values one image happens to hold; F is taken as 0..255.
    A transparent colour (PNG tRNS, GIF) counts as alpha, in L and RGB images as in palette ones.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            a = a / 257.0  # 16-bit range to 8-bit: 65535 -> 255, 32896 -> 128
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
        img = Image.open(io.BytesIO(data))
        fmt = img.format or fmt
        width, height = img.size
        if width * height > max_pixels:
            raise ValueError(
                f"too many pixels (decompression-bomb guard): {width}x{height} > {max_pixels}"
            )
        if img.format == "JPEG":
            img.draft(img.mode, (image_size, image_size))
        img = ImageOps.exif_transpose(img)  # loads the pixels: truncation is detected here
        img = _to_rgb(img)
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
    except Image.DecompressionBombError as e:  # Pillow's own limit, 2x its MAX_IMAGE_PIXELS
        raise ValueError(f"too many pixels (decompression-bomb guard): {e}") from None
    except UnidentifiedImageError:
        raise ValueError("not an image (format not recognised)") from None
    except ValueError:
        raise
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ...
        reason = str(e) or type(e).__name__
        raise ValueError(f"corrupt or truncated image ({fmt}): {reason}") from None


def read_file(path: str | Path) -> tuple[bytes, str]:
    """The file's bytes and their sha256 (the content key that detects real changes)."""
    with open(path, "rb") as fh:
        data = fh.read()
    return data, hashlib.sha256(data).hexdigest()


def load_image(
    path: str | Path,
    image_size: int = config.IMAGE_SIZE,
    max_pixels: int = config.MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decode one file to a (image_size, image_size, 3) uint8 RGB array (see `decode_image`).

    The file is only read, never written.
    """
    return decode_image(Path(path).read_bytes(), image_size, max_pixels)
