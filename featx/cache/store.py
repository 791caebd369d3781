"""The feature cache: a small HDF5 main file and its part files (store.py and parts.py are the
only modules that import h5py).

Layout of the main file, format 2 (all readable with plain h5py, rows sorted by path):
    /features        (N, D) float32 or float16   an HDF5 virtual dataset over the part files
    /features_flip   (N, D) like /features        optional (`extract --flip`): the same images
                                                  mirrored left-right, row for row
    /labels          (N,)   int32                 index into /class_names
    /class_names     (C,)   str
    /paths           (N,)   str                   relative to the data folder
    /splits          (N,)   str                   "train", "validation" or "test"
    /file_size       (N,)   int64                 the per-file key: size, mtime and content hash
    /file_mtime_ns   (N,)   int64
    /file_sha256     (N,)   str
    /file_ctime_ns   (N,)   int64                 optional (added by the next extract): a change
    /file_inode      (N,)   uint64                of either makes extract hash the file again
    /rejected/{paths,reasons,file_size,file_mtime_ns}   files that could not be decoded
    /sources/{names,ids,rows}   the part files (paths relative to this file's folder), their ids
                                and row counts
    /blocks          (B, 3) int64                 [source, first row, count]: which rows of which
                                                  part are rows of /features, in order
    attrs: format="featx-cache", format_version, fingerprint (JSON), data_dir, layout,
           val_split, seed, feature_dim, feature_dtype, created, updated
Format 1 held /features itself, without /sources and /blocks; it is read, and the next extract
upgrades it.

Crash safety: nothing is modified in place. Part files are immutable (see parts.py); the main file
is rebuilt in memory, written to a temporary file with plain file writes (a full disk is then an
ordinary OSError, never a crash inside HDF5), fsynced and moved over the old one with os.replace,
so a killed run leaves the previous, complete cache. Numeric datasets carry HDF5 Fletcher-32
checksums: a flipped bit is a one-line error, not silent garbage. One writer at a time:
`writer_lock` holds `<cache>.lock`; readers never wait, since the file they open is complete.
"""

from __future__ import annotations

import json
import os
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featx import config
from featx.backbone import mobilenet
from featx.cache import parts, remote_cache
from featx.cache.parts import FLIP_DATASET, FLIP_TRANSFORM, Journal, Rows, Sources, damaged  # noqa: F401
from featx.errors import FeatxError, not_found
from featx.files import dead_temporaries, exclusive_lock, is_url, replaced_atomically
from featx.images import finder

FORMAT = "featx-cache"


FORMAT_VERSION = 2


READS = (1, 2)  # the format versions this featx reads; extract upgrades 1 to 2


_STR = h5py.string_dtype()


@dataclass
class Cache:
    fingerprint: dict
    class_names: list[str]
    features: np.ndarray | None  # (N, D); None when read without features
    labels: np.ndarray  # (N,) int32
    splits: np.ndarray  # (N,) str
    rows: Rows
    rejected: Rows = field(default_factory=Rows)
    rejected_reasons: list[str] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    features_flip: np.ndarray | None = None  # (N, D): the mirror images, row for row; optional
    sources: Sources | None = None  # where the features are stored (caches read from disk)

    @property
    def flip(self) -> bool:
        """Whether the cache holds the mirror images' features too (`extract --flip`)."""
        if self.features is None and self.sources is not None:
            return self.sources.flip
        return self.features_flip is not None

    @property
    def feature_dim(self) -> int:
        if self.features is None:
            return self.sources.dim if self.sources is not None else 0
        return int(self.features.shape[1]) if self.features.ndim == 2 else 0

    @property
    def feature_dtype(self) -> str:
        if self.features is None:
            return self.sources.dtype if self.sources is not None else config.FEATURE_DTYPE
        return str(self.features.dtype)

    @property
    def paths(self) -> list[str]:
        return self.rows.paths

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of one split; empty arrays if the split is absent."""
        mask = self.splits == name
        return self.features[mask], self.labels[mask]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: n}} for the splits present."""
        out: dict[str, dict[str, int]] = {}
        for s in ("train", "validation", "test"):
            mask = self.splits == s
            if mask.any():
                per = np.bincount(self.labels[mask], minlength=len(self.class_names))
                out[s] = {c: int(n) for c, n in zip(self.class_names, per)}
        return out


def _check_format(f: h5py.File, path: Path) -> int:
    if f.attrs.get("format") != FORMAT:
        raise FeatxError(
            f"'{path}' is not a featx cache (no format='{FORMAT}' attribute). "
            "Create one with `featx extract DATA_DIR --cache PATH`."
        )
    try:
        version = int(f.attrs.get("format_version", -1))
    except (TypeError, ValueError):
        raise damaged(path, ValueError(f"format_version {f.attrs['format_version']!r}")) from None
    if version not in READS:
        raise FeatxError(
            f"'{path}' is a featx cache of format version {version}, this featx reads versions "
            f"{' and '.join(map(str, READS))}. Re-run `featx extract` with --overwrite, or use "
            "the featx version that made it."
        )
    return version


def real_path(path: str | Path) -> Path:
    """The cache's own file when `path` is a symbolic link to it (`L/c.h5 -> ../real/c.h5`): its
    parts and its lock are beside that file, and a rewrite replaces that file, never the link."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _not_a_file(path: Path) -> FeatxError:
    """A --cache that exists but is no regular file (opening a FIFO would block forever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return not_found("cache", path)
    kind = finder.special_kind(mode) or ("folder" if stat.S_ISDIR(mode) else "special file")
    return FeatxError(
        f"'{path}' is a {kind}, not a featx cache. Pass the .h5 file `featx extract` wrote, or a "
        "new path for `featx extract --cache`."
    )


def check_not_foreign(path: str | Path) -> None:
    """Before extract makes anything beside `path` (its lock, its parts): an existing `path` that
    is not a featx cache (a FIFO, a folder, another program's HDF5 file) is refused in one line,
    leaving no `.lock` beside it."""
    path = Path(path)
    if not os.path.lexists(path) or is_featx_cache(path):
        return
    f, path = _open(path)  # raises for what is no HDF5 file
    with f:
        _check_format(f, path)  # raises: not featx's format


def _open(path: str | Path) -> tuple[h5py.File, Path]:
    path = real_path(path)
    if not path.is_file():
        raise _not_a_file(path)
    try:
        return h5py.File(path, "r"), path
    except OSError as e:
        raise FeatxError(f"'{path}' is not a readable HDF5 file ({e}).") from None


def _strs(ds) -> list[str]:
    return list(ds.asstr()[()]) if len(ds) else []


def _read_rows(g) -> Rows:
    rows = Rows(
        _strs(g["paths"]),
        g["file_size"][()].astype(np.int64),
        g["file_mtime_ns"][()].astype(np.int64),
        _strs(g["file_sha256"]) if "file_sha256" in g else [],
    )
    if "file_ctime_ns" in g and "file_inode" in g:
        rows.file_ctime_ns = g["file_ctime_ns"][()].astype(np.int64)
        rows.file_inode = g["file_inode"][()].astype(np.uint64)
    return rows


def _sources(f: h5py.File, path: Path, version: int) -> Sources:
    ds = f["features"]
    n = len(f["labels"])
    if version == 1:  # the file is its own single source
        names, ids, sizes = [path.name], [""], np.array([ds.shape[0]], np.int64)
        row_source, row_index = np.zeros(n, np.int32), np.arange(n, dtype=np.int64)
    else:
        g = f["sources"]
        names, ids, sizes = _strs(g["names"]), _strs(g["ids"]), g["rows"][()].astype(np.int64)
        row_source, row_index = Sources.expand(f["blocks"][()].astype(np.int64))
    if len(row_source) != n:
        raise ValueError(f"{len(row_source)} feature rows for {n} images")
    dim = int(f.attrs.get("feature_dim", ds.shape[1] if ds.ndim == 2 else 0))
    dtype = str(f.attrs.get("feature_dtype", ds.dtype))
    return Sources(
        path.parent, names, ids, sizes, row_source, row_index, dim, dtype, FLIP_DATASET in f
    )


def read_cache(path: str | Path, features: bool = True) -> Cache:
    """Load a cache into memory (3,000 images x 1,280 float32 = 15 MB of features).

    features=False reads everything but the features (paths, labels, splits, file keys, where the
    features are): what info, finetune, export and extract need; `Cache.sources` says where they
    are. Every part file is checked (present, the one the cache names) either way.

    Readers take no lock: a writer may commit a new main file, and delete the parts it no longer
    names, while this reads. A read that fails once the main file was replaced is done again on
    the new one (config.CACHE_READ_TRIES in all); under an unchanged main file it fails at once.
    A URL is read through its local copy (cache.remote_cache)."""
    if is_url(path):
        path = remote_cache.local_copy(str(path))
    for tries_left in range(config.CACHE_READ_TRIES - 1, -1, -1):
        before = _identity(path)
        try:
            return _read_once(path, features)
        except FeatxError:
            if not tries_left or before is None or _identity(path) == before:
                raise


def _identity(path: str | Path) -> tuple | None:
    """What changes when a writer commits a new main file (os.replace: another inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size


def _read_once(path: str | Path, features: bool) -> Cache:
    f, path = _open(path)
    with f:
        version = _check_format(f, path)
        try:
            rej = f["rejected"]
            cache = Cache(
                fingerprint=json.loads(f.attrs["fingerprint"]),
                class_names=_strs(f["class_names"]),
                features=None,
                labels=f["labels"][()].astype(np.int32),
                splits=np.array(_strs(f["splits"]), dtype=object),
                rows=_read_rows(f),
                rejected=_read_rows(rej),
                rejected_reasons=_strs(rej["reasons"]),
                attrs={k: _attr(v) for k, v in f.attrs.items() if k != "fingerprint"},
                sources=_sources(f, path, version),
            )
            _check_structure(cache)
        except (OSError, KeyError, ValueError) as e:  # a checksum error is an OSError
            raise damaged(path, e) from None
    parts.check_sources(path, cache.sources)
    if features:
        load_features(path, cache)
    return cache


def _check_structure(cache: Cache) -> None:
    """What every command takes for granted of a cache, checked once on open: a crafted or
    damaged one is a one-line error naming it (read_cache), not a traceback in a later step."""
    if not isinstance(cache.fingerprint, dict):
        raise ValueError(f"its fingerprint is a {type(cache.fingerprint).__name__}, not a dict")
    n, classes = len(cache.labels), len(cache.class_names)
    if len(cache.splits) != n or len(cache.rows) != n or len(cache.rows.file_size) != n:
        raise ValueError(f"{n} labels for {len(cache.rows)} paths and {len(cache.splits)} splits")
    if n and (cache.labels.min() < 0 or cache.labels.max() >= classes):
        bad = int(cache.labels.min() if cache.labels.min() < 0 else cache.labels.max())
        raise ValueError(f"label {bad} is not an index of its {classes} class names")
    if len(cache.rejected_reasons) != len(cache.rejected):
        raise ValueError("rejected files and reasons differ in number")
    src = cache.sources
    if not len(src.names) == len(src.ids) == len(src.sizes):
        raise ValueError("its source names, ids and row counts differ in number")
    if n:
        if src.row_source.min() < 0 or src.row_source.max() >= len(src.names):
            raise ValueError("a block names a part that is not among its sources")
        if src.row_index.min() < 0 or (src.row_index >= src.sizes[src.row_source]).any():
            raise ValueError("a block's rows are out of range of its part")


def load_features(path: Path, cache: Cache) -> None:
    """Fill cache.features (and features_flip) from its sources."""
    src, rows = cache.sources, np.arange(len(cache.paths))
    try:
        cache.features = parts.gather(src, rows)
        cache.features_flip = parts.gather(src, rows, FLIP_DATASET) if src.flip else None
    except (OSError, KeyError, ValueError) as e:  # a checksum error is an OSError
        raise damaged(path, e) from None
    for x in (cache.features, cache.features_flip):  # caches made before checksums existed
        if x is not None and x.size and not np.isfinite(x).all():
            raise damaged(path, ValueError("non-finite feature values"))


def is_featx_cache(path: str | Path) -> bool:
    """Whether `path` is provably a featx cache (an HDF5 file with featx's format attribute),
    even one too damaged to read: only such a file may be replaced by `--overwrite`."""
    if not Path(path).is_file():  # a FIFO would block HDF5's open forever
        return False
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except Exception:
        return False


def _attr(v):
    return v.item() if isinstance(v, np.generic) else v


_CHECKED = {"fletcher32": True}  # HDF5 verifies it on each read (strings cannot carry one)


_write_rows = parts.write_rows


def _virtual(f, name: str, src: Sources, blocks: np.ndarray) -> h5py.Dataset:
    """/features (or /features_flip) as a virtual dataset: one mapping per block. A missing part
    reads as NaN in plain h5py (featx itself checks every part first)."""
    n = len(src.row_source)
    if n == 0:
        return f.create_dataset(name, shape=(0, src.dim), dtype=src.dtype)
    layout = h5py.VirtualLayout((n, src.dim), src.dtype)
    vsources = {}
    at = 0
    for s, first, count in blocks.tolist():
        if s not in vsources:
            shape = (int(src.sizes[s]), src.dim)
            vsources[s] = h5py.VirtualSource(src.names[s], name, shape=shape, dtype=src.dtype)
        layout[at : at + count] = vsources[s][first : first + count]
        at += count
    return f.create_virtual_dataset(name, layout, fillvalue=np.nan)


def _image(cache: Cache, src: Sources) -> bytes:
    """The main file of `cache`, built in memory: a failing disk cannot hit HDF5 mid-write."""
    import io

    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["fingerprint"] = json.dumps(cache.fingerprint, sort_keys=True)
        skip = ("format", "format_version", "updated", "feature_dim", "feature_dtype")
        for k, v in cache.attrs.items():
            if k not in skip and v is not None:
                f.attrs[k] = v
        f.attrs["feature_dim"] = src.dim
        f.attrs["feature_dtype"] = src.dtype
        f.attrs.setdefault("created", now)
        f.attrs["updated"] = now
        f.create_dataset("class_names", data=np.array(cache.class_names, dtype=object), dtype=_STR)
        blocks = src.blocks()
        _virtual(f, "features", src, blocks)
        if src.flip:
            _virtual(f, FLIP_DATASET, src, blocks).attrs["transform"] = FLIP_TRANSFORM
        f.create_dataset("labels", data=np.asarray(cache.labels, np.int32), **_CHECKED)
        splits = np.array([str(x).encode() for x in cache.splits], dtype="S10")
        f.create_dataset("splits", data=splits, **_CHECKED)  # fixed-length: small, checksummed
        _write_rows(f, cache.rows)
        if cache.rows.identified:
            f.create_dataset("file_ctime_ns", data=cache.rows.file_ctime_ns, **_CHECKED)
            f.create_dataset("file_inode", data=cache.rows.file_inode, **_CHECKED)
        rej = f.create_group("rejected")
        _write_rows(rej, cache.rejected)
        rej.create_dataset(
            "reasons", data=np.array(cache.rejected_reasons, dtype=object), dtype=_STR
        )
        g = f.create_group("sources")
        g.create_dataset("names", data=np.array(src.names, dtype=object), dtype=_STR)
        g.create_dataset("ids", data=np.array(src.ids, dtype=object), dtype=_STR)
        g.create_dataset("rows", data=np.asarray(src.sizes, np.int64), **_CHECKED)
        f.create_dataset("blocks", data=blocks, **(_CHECKED if len(blocks) else {}))
    return buffer.getvalue()


def write_main(path: str | Path, cache: Cache, src: Sources) -> None:
    """Write the main file of `cache`, whose features are in `src` (parts already written),
    atomically (temporary file, fsync, os.replace). Only the sources rows use are named.

    A full disk raises OSError (ENOSPC) with the temporary file removed and the old cache intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # np.unique would import numpy.ma (7-20 ms, once per process) for what bincount does here
    used = np.flatnonzero(np.bincount(src.row_source, minlength=len(src.names)))
    renumber = np.full(len(src.names), -1, np.int32)
    renumber[used] = np.arange(len(used), dtype=np.int32)
    src = Sources(
        src.base, [src.names[s] for s in used], [src.ids[s] for s in used], src.sizes[used],
        renumber[src.row_source], src.row_index, src.dim, src.dtype, src.flip,
    )  # fmt: skip
    data = _image(cache, src)
    try:
        with replaced_atomically(path) as tmp:
            tmp.write_bytes(data)
    except OSError as e:  # ENOSPC, EFBIG, EDQUOT: name the cache, not a nameless write
        raise OSError(e.errno, e.strerror, str(path)) from None


def write_cache(path: str | Path, cache: Cache) -> None:
    """Write `cache`, features in memory, to `path`: its features as parts in `<path>.parts/`,
    then the main file atomically; parts of the previous version there are deleted after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    journal = Journal(path, "write_cache")
    journal.start()
    feats, flip = cache.features, cache.features_flip
    n, dim = feats.shape[0], feats.shape[1] if feats.ndim == 2 else 0
    names, ids, sizes = [], [], []
    row_source, row_index = np.zeros(n, np.int32), np.zeros(n, np.int64)
    for lo in range(0, n, config.PART_ROWS):
        hi = min(n, lo + config.PART_ROWS)
        r = cache.rows
        rows = Rows(r.paths[lo:hi], r.file_size[lo:hi], r.file_mtime_ns[lo:hi],
                    list(r.file_sha256[lo:hi]))  # fmt: skip
        mirrored = None if flip is None else flip[lo:hi]
        name, id_ = parts.write_part(journal.folder, "write_cache", rows, feats[lo:hi], mirrored)
        row_source[lo:hi], row_index[lo:hi] = len(names), np.arange(hi - lo)
        names.append(journal.relative(name))
        ids.append(id_)
        sizes.append(hi - lo)
    src = Sources(path.parent, names, ids, np.array(sizes, np.int64), row_source, row_index,
                  dim, str(feats.dtype), flip is not None)  # fmt: skip
    write_main(path, cache, src)
    journal.clear(keep=names)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID*` files beside `path` left by killed runs whose PID is gone.

    Only featx's own pattern, only for a dead process on this machine: anything else stays."""
    removed = [p for p in dead_temporaries(path) if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def lock_path(cache_path: str | Path) -> Path:
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.name + ".lock")


@contextmanager
def writer_lock(cache_path: str | Path):
    """Hold `<cache>.lock` while writing; a second writer is refused in one line naming the first.

    See files.exclusive_lock; readers never take this lock."""
    cache_path = Path(cache_path)
    refusal = (
        f"Another featx extract ({{holder}}) is writing '{cache_path}'. Wait for it to finish, "
        "or pass --cache OTHER.h5."
    )
    with exclusive_lock(lock_path(cache_path), refusal):
        yield


def compatible_or_none(old, fp: dict, cache_path: Path, overwrite: bool):
    """`old` when its features are comparable with `fp`'s; None when they are not and overwrite
    is set; else a FeatxError naming every difference."""
    if old is None:
        return None
    try:
        mobilenet.check_compatible(
            old.fingerprint,
            fp,
            f"The cache '{cache_path}'",
            "Pass --overwrite to rebuild it, or --cache NEW.h5 to keep both.",
        )
    except FeatxError:
        if overwrite:
            return None
        raise
    return old


def read_previous(cache_path: Path, overwrite: bool):
    """The existing cache without its features (extract refers to them, never loads them), or
    None when there is none. Every part is checked and its features read once, a part at a time
    (checksums), so that no damaged feature is carried into the new cache. With overwrite, a featx
    cache that cannot be read (damaged, a part missing, another format version) is rebuilt rather
    than refused; a file that is not provably a featx cache is never replaced."""
    if not cache_path.exists():
        return None
    try:
        cache = read_cache(cache_path, features=False)
        parts.check_sources(cache_path, cache.sources, read=True)
        return cache
    except FeatxError:
        if overwrite and is_featx_cache(cache_path):
            return None
        raise
