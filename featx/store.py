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

Crash safety: the cache is never modified in place. A new version is written to a temporary file
and moved over the old one with os.replace, so a killed run leaves the previous, complete cache.
Finished batches of a running extraction are journalled as small .npz files in `<cache>.parts/`
(each written atomically too); the next run reuses them instead of recomputing.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featx.errors import FeatxError

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
        rej = f["rejected"]
        return Cache(
            fingerprint=json.loads(f.attrs["fingerprint"]),
            class_names=_strs(f["class_names"]),
            features=f["features"][()],
            labels=f["labels"][()].astype(np.int32),
            splits=np.array(_strs(f["splits"]), dtype=object),
            rows=_read_rows(f),
            rejected=_read_rows(rej),
            rejected_reasons=_strs(rej["reasons"]),
            attrs={k: _attr(v) for k, v in f.attrs.items() if k != "fingerprint"},
            features_flip=f["features_flip"][()] if FLIP_DATASET in f else None,
        )


def read_fingerprint(path: str | Path) -> dict:
    f, path = _open(path)
    with f:
        _check_format(f, path)
        return json.loads(f.attrs["fingerprint"])


def _attr(v):
    return v.item() if isinstance(v, np.generic) else v


def _write_rows(g, rows: Rows) -> None:
    g.create_dataset("paths", data=np.array(rows.paths, dtype=object), dtype=_STR)
    g.create_dataset("file_size", data=np.asarray(rows.file_size, np.int64))
    g.create_dataset("file_mtime_ns", data=np.asarray(rows.file_mtime_ns, np.int64))
    g.create_dataset("file_sha256", data=np.array(rows.file_sha256, dtype=object), dtype=_STR)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_cache(path: str | Path, cache: Cache) -> None:
    """Write `cache` to `path` atomically (temporary file, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["fingerprint"] = json.dumps(cache.fingerprint, sort_keys=True)
            for k, v in cache.attrs.items():
                if k not in ("format", "format_version", "updated") and v is not None:
                    f.attrs[k] = v
            f.attrs.setdefault("created", now)
            f.attrs["updated"] = now
            f.create_dataset(
                "class_names", data=np.array(cache.class_names, dtype=object), dtype=_STR
            )
            f.create_dataset("features", data=cache.features)
            if cache.features_flip is not None:
                flip = f.create_dataset(FLIP_DATASET, data=cache.features_flip)
                flip.attrs["transform"] = FLIP_TRANSFORM
            f.create_dataset("labels", data=np.asarray(cache.labels, np.int32))
            f.create_dataset("splits", data=np.array(list(cache.splits), dtype=object), dtype=_STR)
            _write_rows(f, cache.rows)
            rej = f.create_group("rejected")
            _write_rows(rej, cache.rejected)
            rej.create_dataset(
                "reasons", data=np.array(cache.rejected_reasons, dtype=object), dtype=_STR
            )
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


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
        **{k: cache.attrs.get(k) for k in ("data_dir", "layout", "created", "updated")},
    }


# --- the journal of finished batches -----------------------------------------------------------


class Journal:
    """Finished batches of an interrupted extraction, in `<cache>.parts/`.

    Each part is one .npz written under a temporary name and renamed, so a part is complete or
    absent. `meta.json` holds the fingerprint; parts made with another backbone are discarded.
    """

    def __init__(self, cache_path: str | Path, fingerprint_key: str):
        cache_path = Path(cache_path)
        self.folder = cache_path.with_name(cache_path.name + ".parts")
        self.key = fingerprint_key

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
        except (OSError, ValueError, KeyError):
            return done, rejected
        for part in sorted(self.folder.glob("part-*.npz")):
            try:
                with np.load(part, allow_pickle=False) as z:
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
            except Exception:  # an unreadable part is redone, never trusted
                continue
        return done, rejected

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"
        try:
            if json.loads(meta.read_text())["key"] == self.key:
                return
        except (OSError, ValueError, KeyError):
            pass
        tmp = self.folder / "meta.json.tmp"
        tmp.write_text(json.dumps({"key": self.key}))
        os.replace(tmp, meta)

    def write(self, index: int, rows: Rows, features: np.ndarray, rejected: Rows, reasons) -> None:
        final = self.folder / f"part-{os.getpid()}-{index:06d}.npz"
        tmp = self.folder / f".tmp-{final.name}"
        with open(tmp, "wb") as fh:
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
        os.replace(tmp, final)

    def clear(self) -> None:
        if not self.folder.is_dir():
            return
        for p in self.folder.iterdir():
            if p.is_file():
                p.unlink()
        self.folder.rmdir()
