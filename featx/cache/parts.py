"""The feature part files of a cache (format 2) and the journal of a running extraction.

A part is one immutable HDF5 file, `<cache>.parts/features-<id>.h5`, of at most
config.PART_ROWS images: /features (n, D) (and /features_flip), their paths and file keys, and the
rejected files of the batches it gathers. It is built in memory and written under a temporary
name, fsynced and renamed, so it is complete or absent. The main file (store.py) names the parts
it uses, by a path relative to its own folder, with the random id each part carries: a part that
is missing or was replaced is found before any feature is read.

The journal of a running extraction lives in the same folder: the batches finished since its last
write (at most config.JOURNAL_SECONDS ago) are one small `part-PID-NNNNNN.npz`, and every
config.PART_ROWS images the batches are gathered into one part file and deleted, so the folder
holds at most N / PART_MIN_ROWS parts plus one part's worth of batches. When that many rows are
waiting and the part has no batch yet (a fast pipeline), they are written as a part at once. A
part that no main file names yet is journal: the next run reuses it, and the run that commits
deletes every part its main file does not name. featx deletes only its own files, and only in a
folder that carries its marker.
"""

from __future__ import annotations

import errno
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featx import config
from featx.errors import FeatxError
from featx.files import is_url, replaced_atomically, temporary_glob, write_text_atomic
from featx.images import remote

PART_FORMAT = "featx-part"
FLIP_DATASET = "features_flip"
FLIP_TRANSFORM = "the resized image mirrored left-right (width axis reversed) before the backbone"
_STR = h5py.string_dtype()
_CHECKED = {"fletcher32": True}  # HDF5 verifies a Fletcher-32 checksum on every read
_CHUNK_BYTES = 512 * 1024


@dataclass
class Rows:
    """Per-image rows; the same columns in the cache, in a part and in a journalled batch, but
    for the file's ctime and inode, which only the main file records (empty elsewhere, and in a
    cache made before they were: `identified` is False then)."""

    paths: list[str] = field(default_factory=list)
    file_size: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    file_mtime_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    file_sha256: list[str] = field(default_factory=list)
    file_ctime_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    file_inode: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def identified(self) -> bool:
        """Whether every row has its ctime and inode (a cache made since they are recorded)."""
        return len(self.file_ctime_ns) == len(self.paths) == len(self.file_inode)


@dataclass
class Sources:
    """Where the features of each row of a cache are: source file `row_source[i]` (a path relative
    to `base`, the main file's folder), row `row_index[i]` of its /features (and /features_flip).
    A format-1 cache is its own single source."""

    base: Path
    names: list[str]
    ids: list[str]  # the id each part carries; "" for a format-1 cache (checked by its format)
    sizes: np.ndarray  # (P,) rows in each source
    row_source: np.ndarray  # (N,) int32
    row_index: np.ndarray  # (N,) int64
    dim: int
    dtype: str
    flip: bool

    def blocks(self) -> np.ndarray:
        """(B, 3) int64 [source, first row, count]: maximal runs of consecutive rows of one
        source, in row order. What the main file stores, and the mappings of its /features."""
        n = len(self.row_source)
        if n == 0:
            return np.zeros((0, 3), np.int64)
        src, idx = self.row_source.astype(np.int64), self.row_index.astype(np.int64)
        breaks = np.flatnonzero((src[1:] != src[:-1]) | (idx[1:] != idx[:-1] + 1)) + 1
        starts = np.concatenate([[0], breaks])
        counts = np.diff(np.concatenate([starts, [n]]))
        return np.stack([src[starts], idx[starts], counts], axis=1)

    @staticmethod
    def expand(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row_source, row_index) from blocks (the inverse of `blocks`)."""
        counts = blocks[:, 2] if len(blocks) else np.zeros(0, np.int64)
        row_source = np.repeat(blocks[:, 0], counts).astype(np.int32)
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return row_source, (np.repeat(blocks[:, 1], counts) + offsets).astype(np.int64)


def damaged(path: Path, e: Exception) -> FeatxError:
    """The one message for a cache that cannot be read back (checksum error, truncation)."""
    return FeatxError(
        f"The cache '{path}' is damaged and cannot be read ({e}). Rebuild it: run `featx "
        "extract DATA_DIR --cache` on it again with --overwrite."
    )


def source_error(cache_path: Path, name: str, why: str) -> FeatxError:
    return FeatxError(
        f"The cache '{cache_path}' needs its part file '{name}', which {why}. Keep the cache "
        f"with its '{Path(name).parent}' folder (copy or move both), or rebuild it: run `featx "
        "extract DATA_DIR --cache` on it again with --overwrite."
    )


def check_sources(cache_path: Path, sources: Sources, *, read: bool = False) -> None:
    """Every part exists and is the one the main file names (id, rows, width); with `read`, every
    feature is read once (checksums, finite values), a part at a time. A missing part would read
    as fill values through the HDF5 virtual dataset: featx refuses instead, naming it."""
    used = set(np.unique(sources.row_source).tolist())
    for s, name in enumerate(sources.names):
        if s not in used and not read:
            continue
        path = sources.base / name
        if not path.is_file():
            raise source_error(cache_path, name, "is missing")
        try:
            with h5py.File(path, "r") as f:
                ok = "features" in f and f["features"].ndim == 2
                if sources.ids[s]:
                    ok = ok and f.attrs.get("id") == sources.ids[s]
                ok = ok and f["features"].shape[1] == sources.dim
                if not ok:
                    raise source_error(cache_path, name, "is another file than the one it wrote")
                if read:
                    names = ["features"] + ([FLIP_DATASET] if sources.flip else [])
                    for ds in (f[k] for k in names):
                        for lo in range(0, ds.shape[0], config.PART_ROWS):
                            if not np.isfinite(ds[lo : lo + config.PART_ROWS]).all():
                                raise ValueError("non-finite feature values")
        except FeatxError:
            raise
        except (OSError, KeyError, ValueError) as e:  # a checksum error is an OSError
            raise damaged(cache_path, e) from None


def _take(ds, idx: np.ndarray, out: np.ndarray, where: np.ndarray) -> None:
    """out[where] = ds[idx] for any order of idx, reading windows of at most PART_ROWS rows."""
    order = np.argsort(idx, kind="stable")
    s = idx[order]
    i = 0
    while i < len(s):
        j = int(np.searchsorted(s, s[i] + config.PART_ROWS, "left"))
        block = ds[int(s[i]) : int(s[j - 1]) + 1]
        out[where[order[i:j]]] = block[s[i:j] - s[i]]
        i = j


def gather(sources: Sources, rows: np.ndarray, dataset: str = "features", dtype=None):
    """The features of `rows` (indices into the cache's rows), read from their sources."""
    dtype = dtype or sources.dtype
    out = np.empty((len(rows), sources.dim), dtype)
    src, idx = sources.row_source[rows], sources.row_index[rows]
    for s in np.unique(src):
        where = np.flatnonzero(src == s)
        with h5py.File(sources.base / sources.names[s], "r") as f:
            _take(f[dataset], idx[where], out, where)
    return out


# --- writing parts -------------------------------------------------------------------------------


def write_rows(g, rows: Rows) -> None:
    g.create_dataset("paths", data=np.array(rows.paths, dtype=object), dtype=_STR)
    g.create_dataset("file_size", data=np.asarray(rows.file_size, np.int64), **_CHECKED)
    g.create_dataset("file_mtime_ns", data=np.asarray(rows.file_mtime_ns, np.int64), **_CHECKED)
    # Fixed-length: 64 bytes a row, where a variable-length string costs ~100 in HDF5's heap.
    g.create_dataset("file_sha256", data=np.array(rows.file_sha256, dtype="S64"), **_CHECKED)


def create_features(g, name: str, data: np.ndarray):
    if not len(data):  # a checksum needs chunks, which need rows
        return g.create_dataset(name, data=data)
    # Chunks of whole rows, ~0.5 MB (under HDF5's 1 MB chunk cache, so reading row by row does
    # not read a chunk again for each row): h5py's own guess, (128, 80) for 1,280 float32 columns,
    # made the checksummed write 1.6x slower.
    rows = max(1, min(len(data), _CHUNK_BYTES // max(1, data.shape[1] * data.itemsize)))
    return g.create_dataset(name, data=data, chunks=(rows, data.shape[1]), **_CHECKED)


def part_image(key: str, rows: Rows, features, flip_features, rejected: Rows, reasons, id_: str):
    """The bytes of one part file, built in memory: a full disk fails in a plain write."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.attrs["format"] = PART_FORMAT
        f.attrs["id"] = id_
        f.attrs["key"] = key
        create_features(f, "features", features)
        if flip_features is not None:
            create_features(f, FLIP_DATASET, flip_features).attrs["transform"] = FLIP_TRANSFORM
        write_rows(f, rows)
        g = f.create_group("rejected")
        write_rows(g, rejected)
        g.create_dataset("reasons", data=np.array(list(reasons), dtype=object), dtype=_STR)
    return buffer.getvalue()


def new_id() -> str:
    """A new part's random id (its file name holds the first 16 hex digits)."""
    return uuid.uuid4().hex


def part_name(id_: str) -> str:
    return f"features-{id_[:16]}.h5"


def write_part(folder: Path | str, key: str, rows: Rows, features, flip_features, rejected=None,
               reasons=(), id_: str | None = None) -> tuple[str, str]:  # fmt: skip
    """Write one part into `folder` atomically; returns (file name, id). A URL `folder` (Ray's
    actors on nodes that share no disk) gets the part in one PUT, which is atomic too."""
    id_ = id_ or new_id()
    data = part_image(key, rows, features, flip_features, rejected or Rows(), reasons, id_)
    if is_url(folder):
        remote.write(remote.join(str(folder), part_name(id_)), data)
        return part_name(id_), id_
    final = Path(folder) / part_name(id_)
    try:
        with replaced_atomically(final) as tmp:
            tmp.write_bytes(data)
    except OSError as e:  # a full disk: name the file, not a nameless write
        raise OSError(e.errno, e.strerror, str(final)) from None
    return final.name, id_


# --- the journal ---------------------------------------------------------------------------------


class Journal:
    """The parts folder `<cache>.parts/` and the journal of an interrupted extraction in it.

    Batches (.npz) and uncommitted parts are validated before reuse (columns of one length,
    feature width and dtype, finite values) and a bad one is redone, never trusted. `meta.json`
    holds the fingerprint key of the batches; parts carry their own. The folder carries a marker
    file: featx only ever deletes its own files from a folder with that marker, and refuses to use
    a folder of that name that it did not make.
    """

    MARKER = config.JOURNAL_MARKER
    _OWN = ("part-*.npz", temporary_glob("part-*.npz"), "meta.json", temporary_glob("meta.json"))
    _PARTS = ("features-*.h5", temporary_glob("features-*.h5"))
    _HALF_WRITTEN = (temporary_glob("part-*.npz"), temporary_glob("features-*.h5"))

    def __init__(
        self, cache_path: str | Path, fingerprint_key: str, feature_dim: int | None = None
    ):
        cache_path = Path(cache_path)
        self.folder = cache_path.with_name(cache_path.name + ".parts")
        self.key = fingerprint_key
        self.feature_dim = feature_dim  # expected width of the features; None: not checked
        self.batches: list[Path] = []  # the .npz batches load() reused
        # uncommitted parts (name relative to the cache's folder -> rows, id): reused or new
        self.sizes: dict[str, int] = {}
        self.ids: dict[str, str] = {}
        self.check_owned()

    def relative(self, name: str) -> str:
        """A part's name as the main file records it: relative to the cache's folder."""
        return f"{self.folder.name}/{name}"

    def check_owned(self) -> None:
        """Refuse a `<cache>.parts` that exists and is not featx's journal: it is the user's."""
        if self.folder.exists() and not (self.folder / self.MARKER).is_file():
            raise FeatxError(
                f"'{self.folder}' exists and was not made by featx, which keeps the journal of a "
                "running extraction there. Move or rename it, or pass --cache OTHER.h5."
            )

    def _valid_batch(self, z) -> bool:
        n, r = len(z["paths"]), len(z["rejected_paths"])
        feats = z["features"]
        if feats.ndim != 2 or feats.shape[0] != n or feats.dtype not in (np.float32, np.float16):
            return False
        if n and self.feature_dim is not None and feats.shape[1] != self.feature_dim:
            return False
        columns = [("file_size", n), ("file_mtime_ns", n), ("file_sha256", n)]
        columns += [("rejected_size", r), ("rejected_mtime_ns", r), ("rejected_reasons", r)]
        return all(z[k].shape == (m,) for k, m in columns) and bool(np.isfinite(feats).all())

    def _key_matches(self) -> bool:
        try:
            return json.loads((self.folder / "meta.json").read_text())["key"] == self.key
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def load(self, committed=()) -> tuple[dict[str, tuple], dict[str, tuple]]:
        """Previously finished work: ({path: (size, mtime_ns, sha256, ref)}, {path: (size,
        mtime_ns, reason)}) for rejected files. `ref` is (part name relative to the cache's
        folder, row) for rows in uncommitted parts, the feature itself for journalled batches.
        `committed`: the parts the cache names (never touched here)."""
        done: dict[str, tuple] = {}
        rejected: dict[str, tuple] = {}
        self.batches = []
        if not (self.folder / self.MARKER).is_file():
            return done, rejected
        committed = set(committed)
        for part in sorted(self.folder.glob("features-*.h5")):
            name = self.relative(part.name)
            if name in committed:
                continue
            try:
                self._load_part(part, name, done, rejected)
            except Exception:  # another backbone, unreadable or invalid: redone, never trusted
                part.unlink(missing_ok=True)
        if not self._key_matches():
            self._remove(("part-*.npz", "meta.json"))
            return done, rejected
        for batch in sorted(self.folder.glob("part-*.npz")):
            try:
                with np.load(batch, allow_pickle=False) as z:
                    if not self._valid_batch(z):
                        raise ValueError("invalid batch")
                    for i, p in enumerate(z["paths"]):
                        done[str(p)] = (
                            int(z["file_size"][i]),
                            int(z["file_mtime_ns"][i]),
                            str(z["file_sha256"][i]),
                            z["features"][i],
                        )
                    _rejected_rows(z, rejected)
                self.batches.append(batch)
            except Exception:
                batch.unlink(missing_ok=True)
        return done, rejected

    def _load_part(self, part: Path, name: str, done: dict, rejected: dict) -> None:
        with h5py.File(part, "r") as f:
            if f.attrs.get("format") != PART_FORMAT or f.attrs.get("key") != self.key:
                raise ValueError("another backbone's part")
            feats, n = f["features"], len(f["paths"])
            width = self.feature_dim // (2 if FLIP_DATASET in f else 1) if self.feature_dim else 0
            if feats.shape[0] != n or (n and width and feats.shape[1] != width):
                raise ValueError("invalid part")
            for k in ["features"] + ([FLIP_DATASET] if FLIP_DATASET in f else []):
                if f[k].shape != feats.shape or not np.isfinite(f[k][()]).all():
                    raise ValueError("invalid part")
            paths = f["paths"].asstr()[()] if n else []
            sizes, mtimes = f["file_size"][()], f["file_mtime_ns"][()]
            shas = f["file_sha256"].asstr()[()] if n else []
            for i, p in enumerate(paths):
                done[p] = (int(sizes[i]), int(mtimes[i]), shas[i], (name, i))
            self.sizes[name], self.ids[name] = n, str(f.attrs["id"])
            g = f["rejected"]
            if len(g["paths"]):
                z = {
                    "rejected_paths": g["paths"].asstr()[()],
                    "rejected_size": g["file_size"][()],
                    "rejected_mtime_ns": g["file_mtime_ns"][()],
                    "rejected_reasons": g["reasons"].asstr()[()],
                }
                _rejected_rows(z, rejected)

    def start(self) -> None:
        self.check_owned()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / self.MARKER).touch()
        self._remove(self._HALF_WRITTEN)  # half-written by killed runs
        if not self._key_matches():
            write_text_atomic(self.folder / "meta.json", json.dumps({"key": self.key}))

    def write(self, index: int, rows: Rows, features: np.ndarray, rejected: Rows, reasons) -> Path:
        """Finished batches (`index`: the last one's), as one .npz."""
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
        return final

    def _remove(self, patterns) -> None:
        for pattern in patterns:
            for p in self.folder.glob(pattern):
                if p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)

    def clear(self, keep=()) -> None:
        """Delete featx's own files except the parts named in `keep` (relative to the cache's
        folder: the parts the cache uses), then the marker and the folder if nothing is kept."""
        if not (self.folder / self.MARKER).is_file():
            return
        self._remove(self._OWN)
        keep = set(keep)
        for p in self.folder.glob("*features-*.h5*"):
            own = any(p.match(pattern) for pattern in self._PARTS)
            if own and self.relative(p.name) not in keep and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
        if any(self.relative(p.name) in keep for p in self.folder.glob("features-*.h5")):
            return
        (self.folder / self.MARKER).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise


def _rejected_rows(z, rejected: dict) -> None:
    for i, p in enumerate(z["rejected_paths"]):
        rejected[str(p)] = (
            int(z["rejected_size"][i]),
            int(z["rejected_mtime_ns"][i]),
            str(z["rejected_reasons"][i]),
        )
