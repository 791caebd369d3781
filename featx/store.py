"""The feature cache: one self-describing HDF5 file (the only module that imports h5py).

Layout (all readable with plain h5py):
    /features        (N, D) float32 or float16   pooled backbone features, rows sorted by path
    /features_flip   (N, D) like /features        optional (`extract --flip`): the same images
                                                  mirrored left-right, row for row
    /labels          (N,)   int32                 index into /class_names
    /class_names     (C,)   str
    /paths           (N,)   str                   relative to the data folder
    /splits          (N,)   str                   "train", "validation" or "test"
    /file_size       (N,)   int64                 the per-file key: size, mtime and content hash
    /file_mtime_ns   (N,)   int64
    /file_sha256     (N,)   str
    /rejected/{paths,reasons,file_size,file_mtime_ns}   files that could not be decoded
    attrs: format="featx-cache", format_version, fingerprint (JSON), data_dir, layout,
           val_split, seed, created, updated

Crash safety: the cache is never modified in place. A new version is assembled in memory, written
to a temporary file with plain file writes (a full disk is then an ordinary OSError, never a crash
inside HDF5), fsynced and moved over the old one with os.replace, so a killed run leaves the
previous, complete cache. Numeric datasets carry HDF5 Fletcher-32 checksums: a flipped bit is a
one-line error, not silent garbage. Finished batches of a running extraction are journalled as
small .npz files in `<cache>.parts/` (each written atomically, each validated before reuse); the
next run reuses them instead of recomputing. One writer at a time: `writer_lock` holds
`<cache>.lock`; readers never wait, since the file they open is always complete.
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featx.errors import FeatxError
from featx.files import replaced_atomically, write_text_atomic

FORMAT = "featx-cache"
FORMAT_VERSION = 1
_STR = h5py.string_dtype()
FLIP_DATASET = "features_flip"
FLIP_TRANSFORM = "the resized image mirrored left-right (width axis reversed) before the backbone"


@dataclass
class Rows:
    """Per-image rows; the same columns in the cache and in a journal part."""

    paths: list[str] = field(default_factory=list)
    file_size: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    file_mtime_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    file_sha256: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Cache:
    fingerprint: dict
    class_names: list[str]
    features: np.ndarray  # (N, D)
    labels: np.ndarray  # (N,) int32
    splits: np.ndarray  # (N,) str
    rows: Rows
    rejected: Rows = field(default_factory=Rows)
    rejected_reasons: list[str] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)
    features_flip: np.ndarray | None = None  # (N, D): the mirror images, row for row; optional

    @property
    def flip(self) -> bool:
        """Whether the cache holds the mirror images' features too (`extract --flip`)."""
        return self.features_flip is not None

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


def _check_format(f: h5py.File, path: Path) -> None:
    if f.attrs.get("format") != FORMAT:
        raise FeatxError(
            f"'{path}' is not a featx cache (no format='{FORMAT}' attribute). "
            "Create one with `featx extract DATA_DIR --cache PATH`."
        )
    version = int(f.attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise FeatxError(
            f"'{path}' is a featx cache of format version {version}, this featx reads version "
            f"{FORMAT_VERSION}. Re-run `featx extract` with --overwrite, or use the featx "
            "version that made it."
        )


def _open(path: str | Path) -> tuple[h5py.File, Path]:
    path = Path(path)
    if not path.is_file():
        raise FeatxError(f"Cache not found: '{path}'. Create it with `featx extract DATA_DIR`.")
    try:
        return h5py.File(path, "r"), path
    except OSError as e:
        raise FeatxError(f"'{path}' is not a readable HDF5 file ({e}).") from None


def damaged(path: Path, e: Exception) -> FeatxError:
    """The one message for a cache that cannot be read back (checksum error, truncation)."""
    return FeatxError(
        f"The cache '{path}' is damaged and cannot be read ({e}). Rebuild it: run `featx "
        "extract DATA_DIR --cache` on it again with --overwrite."
    )


def _strs(ds) -> list[str]:
    return list(ds.asstr()[()]) if len(ds) else []


def _read_rows(g) -> Rows:
    return Rows(
        _strs(g["paths"]),
        g["file_size"][()].astype(np.int64),
        g["file_mtime_ns"][()].astype(np.int64),
        _strs(g["file_sha256"]) if "file_sha256" in g else [],
    )


def read_cache(path: str | Path) -> Cache:
    """Load a whole cache into memory (3,000 images x 1,280 float32 = 15 MB)."""
    f, path = _open(path)
    with f:
        _check_format(f, path)
        try:
            rej = f["rejected"]
            cache = Cache(
                fingerprint=json.loads(f.attrs["fingerprint"]),
                class_names=_strs(f["class_names"]),
                features=f["features"][()],
                labels=f["labels"][()].astype(np.int32),
                splits=np.array(_strs(f["splits"]), dtype=object),
                rows=_read_rows(f),
                rejected=_read_rows(rej),
                rejected_reasons=_strs(rej["reasons"]),
                attrs={k: _attr(v) for k, v in f.attrs.items() if k != "fingerprint"},
                features_flip=f[FLIP_DATASET][()] if FLIP_DATASET in f else None,
            )
        except (OSError, KeyError, ValueError) as e:  # a checksum error is an OSError
            raise damaged(path, e) from None
    # Caches written before checksums existed: non-finite features are damage too.
    if cache.features.size and not np.isfinite(cache.features).all():
        raise damaged(path, ValueError("non-finite feature values"))
    return cache


def is_featx_cache(path: str | Path) -> bool:
    """Whether `path` is provably a featx cache (an HDF5 file with featx's format attribute),
    even one too damaged to read: only such a file may be replaced by `--overwrite`."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except Exception:
        return False


def read_fingerprint(path: str | Path) -> dict:
    f, path = _open(path)
    with f:
        _check_format(f, path)
        return json.loads(f.attrs["fingerprint"])


def _attr(v):
    return v.item() if isinstance(v, np.generic) else v


# Fletcher-32 on every numeric dataset: HDF5 verifies it on each read (strings cannot carry one).
_CHECKED = {"fletcher32": True}


def _write_rows(g, rows: Rows) -> None:
    g.create_dataset("paths", data=np.array(rows.paths, dtype=object), dtype=_STR)
    g.create_dataset("file_size", data=np.asarray(rows.file_size, np.int64), **_CHECKED)
    g.create_dataset("file_mtime_ns", data=np.asarray(rows.file_mtime_ns, np.int64), **_CHECKED)
    g.create_dataset("file_sha256", data=np.array(rows.file_sha256, dtype=object), dtype=_STR)


def _image(cache: Cache) -> bytes:
    """The HDF5 file of `cache`, built in memory: a failing disk cannot hit HDF5 mid-write."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["fingerprint"] = json.dumps(cache.fingerprint, sort_keys=True)
        for k, v in cache.attrs.items():
            if k not in ("format", "format_version", "updated") and v is not None:
                f.attrs[k] = v
        f.attrs.setdefault("created", now)
        f.attrs["updated"] = now
        f.create_dataset("class_names", data=np.array(cache.class_names, dtype=object), dtype=_STR)
        f.create_dataset("features", data=cache.features, **_CHECKED)
        if cache.features_flip is not None:
            flip = f.create_dataset(FLIP_DATASET, data=cache.features_flip, **_CHECKED)
            flip.attrs["transform"] = FLIP_TRANSFORM
        f.create_dataset("labels", data=np.asarray(cache.labels, np.int32), **_CHECKED)
        f.create_dataset("splits", data=np.array(list(cache.splits), dtype=object), dtype=_STR)
        _write_rows(f, cache.rows)
        rej = f.create_group("rejected")
        _write_rows(rej, cache.rejected)
        rej.create_dataset(
            "reasons", data=np.array(cache.rejected_reasons, dtype=object), dtype=_STR
        )
    return buffer.getvalue()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or unknown): leave its files alone
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID*` files beside `path` left by killed runs whose PID is gone.

    Only featx's own pattern, only for a dead process on this machine: anything else stays."""
    removed = []
    prefix = f".{path.name}.tmp-"
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in candidates:
        pid = p.name[len(prefix) :].split(".")[0] if p.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def write_cache(path: str | Path, cache: Cache) -> None:
    """Write `cache` to `path` atomically (temporary file, fsync, os.replace).

    A full disk raises OSError (ENOSPC) with the temporary file removed and the old cache intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _image(cache)
    try:
        with replaced_atomically(path) as tmp:
            tmp.write_bytes(data)
    except OSError as e:  # ENOSPC, EFBIG, EDQUOT: name the cache, not a nameless write
        raise OSError(e.errno, e.strerror, str(path)) from None


# --- one writer per cache ------------------------------------------------------------------------


def lock_path(cache_path: str | Path) -> Path:
    cache_path = Path(cache_path)
    return cache_path.with_name(cache_path.name + ".lock")


@contextmanager
def writer_lock(cache_path: str | Path):
    """Hold `<cache>.lock` while writing; a second writer is refused in one line naming the first.

    filelock (a well-kept cross-platform library) does the locking; the holder writes its pid,
    host and start time into the lock file so that the refusal can say who holds it. Readers
    never take this lock."""
    from filelock import FileLock, Timeout

    cache_path = Path(cache_path)
    path = lock_path(cache_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = path.read_text().strip() or "another process"
        except OSError:
            holder = "another process"
        raise FeatxError(
            f"Another featx extract ({holder}) is writing '{cache_path}'. Wait for it to finish, "
            "or pass --cache OTHER.h5."
        ) from None
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(path, "r+") as fh:
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
        yield
    finally:
        lock.release()


def info(path: str | Path) -> dict:
    """What a cache holds: counts per split and class, fingerprint, rejected files."""
    cache = read_cache(path)
    return {
        "path": str(path),
        "images": len(cache.paths),
        "feature_dim": int(cache.features.shape[1]) if cache.features.ndim == 2 else 0,
        "dtype": str(cache.features.dtype),
        "flip": cache.features_flip is not None,
        "class_names": cache.class_names,
        "counts": cache.counts(),
        "rejected": [
            {"path": p, "reason": r} for p, r in zip(cache.rejected.paths, cache.rejected_reasons)
        ],
        "fingerprint": cache.fingerprint,
        **{
            k: cache.attrs.get(k)
            for k in ("data_dir", "layout", "val_split", "seed", "created", "updated")
        },
    }


# --- the journal of finished batches -----------------------------------------------------------


class Journal:
    """Finished batches of an interrupted extraction, in `<cache>.parts/`.

    Each part is one .npz written under a temporary name and renamed, so a part is complete or
    absent; each is validated before reuse (columns of one length, feature width and dtype,
    finite values) and a bad one is redone, never trusted. `meta.json` holds the fingerprint key;
    parts made with another backbone are discarded. The folder carries a marker file: featx
    only ever deletes its own files (`part-*.npz`, their temporaries, `meta.json`, the marker) from
    a folder with that marker, and refuses to use a folder of that name that it did not make.
    """

    MARKER = ".featx-journal"
    _OWN = ("part-*.npz", ".part-*.npz.tmp-*", "meta.json", ".meta.json.tmp-*")

    def __init__(
        self, cache_path: str | Path, fingerprint_key: str, feature_dim: int | None = None
    ):
        cache_path = Path(cache_path)
        self.folder = cache_path.with_name(cache_path.name + ".parts")
        self.key = fingerprint_key
        self.feature_dim = feature_dim  # expected width of the features; None: not checked
        self.check_owned()

    def check_owned(self) -> None:
        """Refuse a `<cache>.parts` that exists and is not featx's journal: it is the user's."""
        if self.folder.exists() and not (self.folder / self.MARKER).is_file():
            raise FeatxError(
                f"'{self.folder}' exists and was not made by featx, which keeps the journal of a "
                "running extraction there. Move or rename it, or pass --cache OTHER.h5."
            )

    def _valid_part(self, z) -> bool:
        n, r = len(z["paths"]), len(z["rejected_paths"])
        feats = z["features"]
        if feats.ndim != 2 or feats.shape[0] != n or feats.dtype not in (np.float32, np.float16):
            return False
        if n and self.feature_dim is not None and feats.shape[1] != self.feature_dim:
            return False
        columns = [("file_size", n), ("file_mtime_ns", n), ("file_sha256", n)]
        columns += [("rejected_size", r), ("rejected_mtime_ns", r), ("rejected_reasons", r)]
        return all(z[k].shape == (m,) for k, m in columns) and bool(np.isfinite(feats).all())

    def load(self) -> tuple[dict[str, tuple], dict[str, tuple]]:
        """Previously finished work: ({path: (size, mtime_ns, sha256, feature)},
        {path: (size, mtime_ns, reason)}) for rejected files."""
        done: dict[str, tuple] = {}
        rejected: dict[str, tuple] = {}
        meta = self.folder / "meta.json"
        try:
            if json.loads(meta.read_text())["key"] != self.key:
                self.clear()
                return done, rejected
        except (OSError, ValueError, KeyError, TypeError):
            return done, rejected
        for part in sorted(self.folder.glob("part-*.npz")):
            try:
                with np.load(part, allow_pickle=False) as z:
                    if not self._valid_part(z):
                        raise ValueError("invalid part")
                    for i, p in enumerate(z["paths"]):
                        done[str(p)] = (
                            int(z["file_size"][i]),
                            int(z["file_mtime_ns"][i]),
                            str(z["file_sha256"][i]),
                            z["features"][i],
                        )
                    for i, p in enumerate(z["rejected_paths"]):
                        rejected[str(p)] = (
                            int(z["rejected_size"][i]),
                            int(z["rejected_mtime_ns"][i]),
                            str(z["rejected_reasons"][i]),
                        )
            except Exception:  # an unreadable or invalid part is redone, never trusted
                part.unlink(missing_ok=True)
                continue
        return done, rejected

    def start(self) -> None:
        self.check_owned()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / self.MARKER).touch()
        for p in self.folder.glob(".part-*.npz.tmp-*"):  # half-written parts of killed runs
            p.unlink(missing_ok=True)
        meta = self.folder / "meta.json"
        try:
            if json.loads(meta.read_text())["key"] == self.key:
                return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        write_text_atomic(meta, json.dumps({"key": self.key}))

    def write(self, index: int, rows: Rows, features: np.ndarray, rejected: Rows, reasons) -> None:
        final = self.folder / f"part-{os.getpid()}-{index:06d}.npz"
        try:
            with replaced_atomically(final) as tmp, open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    paths=np.array(rows.paths, dtype=str),
                    file_size=np.asarray(rows.file_size, np.int64),
                    file_mtime_ns=np.asarray(rows.file_mtime_ns, np.int64),
                    file_sha256=np.array(rows.file_sha256, dtype=str),
                    features=features,
                    rejected_paths=np.array(rejected.paths, dtype=str),
                    rejected_size=np.asarray(rejected.file_size, np.int64),
                    rejected_mtime_ns=np.asarray(rejected.file_mtime_ns, np.int64),
                    rejected_reasons=np.array(list(reasons), dtype=str),
                )
        except OSError as e:  # a full disk: name the journal, not a nameless write
            raise OSError(e.errno, e.strerror, str(final)) from None

    def clear(self) -> None:
        """Delete featx's own files and then the folder, if nothing else is left in it."""
        if not (self.folder / self.MARKER).is_file():
            return
        for pattern in self._OWN:
            for p in self.folder.glob(pattern):
                if p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)
        (self.folder / self.MARKER).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise
