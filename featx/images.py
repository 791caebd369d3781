"""Find images in a folder layout, assign splits, and decode files robustly to RGB arrays.

This module needs no TensorFlow: extract, finetune and predict all decode through `load_image`,
so every stage sees exactly the same pixels.
"""

from __future__ import annotations

import errno
import hashlib
import io
import operator
import os
import stat
import threading
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    # (path, reason) left out while listing: links back into the folder, broken links, FIFOs, ...
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # `extract --shard`: the other shards' images, counted when a flat folder is split
    others: list[ImageFile] = field(default_factory=list)


_HIDDEN = (".", "__")  # names that start so are not listed
_NAME = operator.attrgetter("name")


def _visible(entry: os.DirEntry | Path) -> bool:
    return not entry.name.startswith(_HIDDEN)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _special_kind(mode: int) -> str | None:
    """'FIFO', 'socket' or 'device' for files that must never be opened (a FIFO blocks forever)."""
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return None


def _plain_file(entry: os.DirEntry) -> bool:
    """A regular file that is no link, as the folder listing says (no system call on Linux)."""
    try:
        return entry.is_file(follow_symlinks=False)  # False for a link, whatever it points to
    except OSError:
        return False


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop: entry() reports it
        return False


class _Walk:
    """A recursive listing below one data folder that never follows a link back into the folder
    (its files are listed where they really are, so a link cannot relabel them) or above it (a
    loop), and never offers a FIFO, socket or device. What it leaves out is kept in `skipped`
    as (path, reason) instead of vanishing silently."""

    def __init__(self, boundary: Path):
        self.boundary = os.path.realpath(boundary)
        self.found: list[str] = []  # str, not Path: a Path per file cost more than listing it
        self.skipped: list[tuple[Path, str]] = []
        self._seen: set[str] = set()

    def _listed_inside(self, real: str) -> bool:
        # A target inside the data folder that the walk lists anyway (no hidden part on the way).
        if not _within(real, self.boundary):
            return False
        rel = os.path.relpath(real, self.boundary)
        return rel == "." or all(_visible(Path(part)) for part in Path(rel).parts)

    def _link_problem(self, path: Path, is_dir: bool) -> str | None:
        real = os.path.realpath(path)
        if is_dir and _within(self.boundary, real):
            return "symbolic link to the data folder or above it (a loop); not followed"
        if self._listed_inside(real):
            where = os.path.relpath(real, self.boundary).replace(os.sep, "/")
            kind = "folder" if is_dir else "file"
            return f"symbolic link to the {kind} '{where}' of the data folder; not followed"
        return None

    def entry(self, path: Path) -> None:
        """Add `path` (a file or a folder) to the listing, or to `skipped` with the reason."""
        try:
            st = os.stat(path)
        except OSError as e:
            if os.path.islink(path):
                reason = "symbolic link loop" if e.errno == errno.ELOOP else "broken symbolic link"
            else:
                reason = f"unreadable: {e.strerror or e}"
            self.skipped.append((path, reason))
            return
        is_dir = stat.S_ISDIR(st.st_mode)
        if os.path.islink(path):
            problem = self._link_problem(path, is_dir)
            if problem:
                self.skipped.append((path, problem))
                return
        if is_dir:
            self.folder(path)
        elif _special_kind(st.st_mode):
            self.skipped.append((path, f"not a regular file ({_special_kind(st.st_mode)})"))
        else:
            self.found.append(str(path))

    def folder(self, folder: Path) -> None:
        real = os.path.realpath(folder)
        if real in self._seen:  # two links to one folder outside the data folder
            self.skipped.append((folder, "folder already listed through another link"))
            return
        self._seen.add(real)
        try:
            with os.scandir(folder) as it:
                entries = [e for e in it if not e.name.startswith(_HIDDEN)]
        except OSError as e:
            self.skipped.append((folder, f"unreadable folder: {e.strerror or e}"))
            return
        # A folder's own files first, then its subfolders, each sorted by name (os.walk's order).
        entries.sort(key=_NAME)
        subfolders = []
        for e in entries:
            if _plain_file(e):  # the common case, known from the listing itself: no stat
                self.found.append(e.path)
            elif _is_dir(e):
                subfolders.append(e)
            else:
                self.entry(Path(e.path))
        for e in subfolders:
            self.entry(Path(e.path))


def walk_files(folder: Path, boundary: Path | None = None) -> tuple[list[Path], list[tuple]]:
    """Every non-hidden regular file below `folder`, recursively, sorted, and [(path, reason)]
    for what was left out: links back into `boundary` (default `folder`) or above it, broken
    links, link loops, FIFOs, sockets, devices and unreadable folders. Links to files and folders
    elsewhere are followed."""
    walk = _Walk(boundary or folder)
    walk.folder(Path(folder))
    return [Path(p) for p in walk.found], walk.skipped


def inside(root: Path, rel: str) -> Path | None:
    """`root / rel` when `rel` (a path stored in a cache) stays inside `root`: relative, with no
    '..' part. Else None: a tampered cache must not make featx read files elsewhere."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or Path(rel).drive:
        return None
    return root / rel


def _subfolders(folder: Path) -> list[Path]:
    with os.scandir(folder) as it:  # no stat per file: the listing knows what is a folder
        return sorted(folder / e.name for e in it if _visible(e) and _is_dir(e))


def _check_not_too_high(root: Path, class_dirs: list[Path]) -> None:
    """A class folder that holds split folders means DATA_DIR is one level too high."""
    for c in class_dirs:
        with os.scandir(c) as it:  # the split names first: a class folder holds many files
            inner = [e for e in it if e.name.lower() in config.SPLIT_FOLDER_NAMES]
        inner = sorted(e.name for e in inner if _is_dir(e))
        if inner:
            raise FeatxError(
                f"'{c}' looks like a data folder, not a class: it holds split folders "
                f"({', '.join(inner)}). Pass '{c}' as DATA_DIR (one level down), or rename them."
            )


def find_images(data_dir: str | Path) -> Listing:
    """List the images in `data_dir` and their classes.

    Two layouts are understood:
      DATA/{train,validation|val,test}/CLASS/*  -> those splits are kept;
      DATA/CLASS/*                              -> split later by `assign_splits`.
    Any non-hidden regular file is a candidate: formats are detected from content when decoding,
    and a file that is no image is rejected then, with its reason. Links back into the data
    folder, broken links, special files and unreadable folders are listed in `skipped`.
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
        _check_not_too_high(root, top)

    files: list[ImageFile] = []
    per_class: Counter = Counter()
    all_classes = set()
    walk = _Walk(root)
    prefix = os.path.join(str(root), "")
    for split, class_dir in class_dirs:
        all_classes.add(class_dir.name)
        before = len(walk.found)
        walk.entry(class_dir)
        name = class_dir.name
        for f in walk.found[before:]:
            rel = f[len(prefix) :] if f.startswith(prefix) else Path(f).relative_to(root).as_posix()
            files.append(ImageFile(rel, name, split))
        per_class[name] += len(walk.found) - before
    class_names = sorted(c for c in all_classes if per_class[c] > 0)
    empty = sorted(c for c in all_classes if per_class[c] == 0)
    if len(class_names) < 2:
        hint = ""
        if len(class_dirs) == 1 and _subfolders(class_dirs[0][1]):
            hint = f" If '{class_dirs[0][1]}' holds the class folders, pass it as DATA_DIR."
        raise FeatxError(
            f"Found {len(class_names)} class folder(s) with files in '{root}' "
            f"({', '.join(class_names) or 'none'}); a classifier needs at least 2. "
            f"Expected DATA/CLASS/image.jpg or DATA/train/CLASS/image.jpg.{hint}"
        )
    if os.sep != "/":
        files = [ImageFile(f.path.replace(os.sep, "/"), f.class_name, f.split) for f in files]
    files.sort(key=lambda f: f.path)
    skipped = sorted((p.relative_to(root).as_posix(), why) for p, why in walk.skipped)
    return Listing(layout, files, class_names, empty, skipped)


def _rank_key(seed: int):
    """A per-file pseudo-random sort key, sha1 of "seed:path": the split of a file never depends
    on which other files exist. One call per path; the digest sorts as its hex digest does."""
    prefix, sha1 = f"{seed}:".encode(), hashlib.sha1
    return lambda path: sha1(prefix + path.encode()).digest()


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
        for i, path in enumerate(sorted(paths, key=_rank_key(seed))):
            result[path] = "validation" if i < need else "train"
    return result


def prefetch(chunks, load, ahead: int = config.PREFETCH_BATCHES, workers: int | None = None):
    """Yield (chunk, [load(item) for item in chunk]) for each chunk, in order, with the next
    `ahead` chunks loading in `workers` threads meanwhile (Pillow releases the GIL while
    decoding). Each chunk is cut into one slice per worker, loaded as one task: a future per
    image cost more Python time than decoding a small image.

    Closing the generator (or Ctrl-C in the consumer) cancels what has not started and returns
    without waiting for the threads, so an interrupted run stops at once."""
    workers = workers or config.decode_workers()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="featx-decode")
    pending: deque = deque()
    chunks = iter(chunks)

    def load_all(items) -> list:
        return [load(item) for item in items]

    def submit() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            step = max(1, -(-len(chunk) // workers))
            slices = [chunk[i : i + step] for i in range(0, len(chunk), step)]
            pending.append((chunk, [pool.submit(load_all, part) for part in slices]))

    try:
        for _ in range(max(1, ahead)):
            submit()
        while pending:
            chunk, futures = pending.popleft()
            submit()
            yield chunk, [r for f in futures for r in f.result()]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


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


class _PixelBudget:
    """Bounds the pixels being decoded at once by all threads together: a few huge images (a
    9400x9400 PNG is 265 MB decoded) wait for each other instead of adding up; small ones never
    wait. One image larger than the budget still decodes, alone. Decoding processes share one
    (featx.decoding): a multiprocessing Condition and a shared counter (anything with .value)."""

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
        img = Image.open(io.BytesIO(data))
        fmt = img.format or fmt
        width, height = img.size
        if width * height > max_pixels:
            raise ValueError(
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
    except ValueError:
        raise
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ...
        reason = str(e) or type(e).__name__
        raise ValueError(f"corrupt or truncated image ({fmt}): {reason}") from None


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
        return "rejected", str(e) or type(e).__name__, None


def read_file(path: str | Path) -> tuple[bytes, str]:
    """The file's bytes and their sha256 (the content key that detects real changes).

    Opened non-blocking and checked before reading: a FIFO, socket or device raises ValueError
    instead of blocking forever. OSError (permission, I/O) passes through: it may be transient.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb") as fh:
        kind = _special_kind(os.fstat(fd).st_mode)
        if kind:
            raise ValueError(f"not a regular file ({kind})")
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
    return decode_image(read_file(path)[0], image_size, max_pixels)
