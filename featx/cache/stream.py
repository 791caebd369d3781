"""How `featx extract` writes features as it goes: finished batches gathered into part files, and
the commit that names them in a new main file (with compaction and the format-1 upgrade).

A row's features are referred to, never carried, once they are on disk: a reference is (source,
row), the source a file named relative to the cache's folder (a part, or a format-1 cache itself).
Only the rows of batches not yet gathered into a part are held in memory (at most
config.PART_ROWS + one batch, and the previous part while it is written), so memory does not
grow with the number of images.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx import config
from featx.cache import parts, store


class PartWriter:
    """Gathers finished batches into part files of at most PART_ROWS rows; `batches` are the
    journal files (.npz) of the rows gathered so far, deleted once their part is written.

    `flip`: rows are [features | mirrored features], split into the part's two datasets."""

    def __init__(self, journal: parts.Journal, dtype: str, flip: bool):
        self.journal, self.dtype, self.flip = journal, dtype, flip
        self._reset()

    def _reset(self) -> None:
        self.rows, self.batches = parts.Rows(), []
        self.rejected, self.reasons = parts.Rows(), []
        self._sizes, self._mtimes = [], []
        # The features of the rows gathered, _buffer[:_filled]: one array a part, filled batch by
        # batch, written as it is (no list of batches concatenated into a second copy).
        self._buffer: np.ndarray | None = None
        self._filled = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, path: str, size: int, mtime_ns: int, sha: str, feature: np.ndarray) -> None:
        self.add_rows(parts.Rows([path], [size], [mtime_ns], [sha]), feature[None])

    def add_rows(self, rows: parts.Rows, features: np.ndarray) -> np.ndarray:
        """A block of rows (a finished batch) with their (n, D) features, which are copied: the
        caller may reuse its array. Returns the copy (kept until the part is written)."""
        self.rows.paths.extend(rows.paths)
        self._sizes.append(np.asarray(rows.file_size, np.int64))
        self._mtimes.append(np.asarray(rows.file_mtime_ns, np.int64))
        self.rows.file_sha256.extend(rows.file_sha256)
        return self._keep(features) if len(rows) else features[:0]

    def _keep(self, features: np.ndarray) -> np.ndarray:
        n, end = len(features), self._filled + len(features)
        old = self._buffer
        dtype = np.result_type(np.float32, features, *(() if old is None else (old,)))
        if old is None or end > len(old) or dtype != old.dtype:
            # PART_ROWS rows and a batch, allocated once a part (np.empty: a page of memory is
            # used once a row is written there); again only if resumed rows exceed it, or to
            # hold a wider dtype (as concatenating the batches would: no value is rounded).
            self._buffer = np.empty((max(end, config.PART_ROWS + n), features.shape[1]), dtype)
            if old is not None:
                self._buffer[: self._filled] = old[: self._filled]
        self._buffer[self._filled : end] = features
        self._filled = end
        return self._buffer[end - n : end]

    def reject(self, rows: parts.Rows, reasons) -> None:
        """A block of rejected rows with their reasons."""
        if not len(rows):
            return
        self.rejected.paths.extend(rows.paths)
        self.rejected.file_size = np.append(self.rejected.file_size, rows.file_size)
        self.rejected.file_mtime_ns = np.append(self.rejected.file_mtime_ns, rows.file_mtime_ns)
        self.rejected.file_sha256.extend("" for _ in rows.paths)
        self.reasons.extend(reasons)

    def flush(self, plan_rows: dict, submit=None):
        """Write the gathered rows as one part, set their plan rows ({path: (size, mtime, sha,
        (part, row))}), and delete the batches it replaces (after the part is on disk: a kill in
        between loses nothing).

        `submit` (an executor's): the writing and deleting are done there and its future is
        returned; the plan rows point at the part at once, so it must finish before a main file
        names them."""
        if not len(self) and not len(self.rejected):
            return None
        self.rows.file_size = np.concatenate([np.zeros(0, np.int64), *self._sizes])
        self.rows.file_mtime_ns = np.concatenate([np.zeros(0, np.int64), *self._mtimes])
        width = self.journal.feature_dim or 0
        feats = self._buffer[: self._filled] if self._buffer is not None else None
        feats = np.zeros((0, width), np.float32) if feats is None else feats
        feats = feats.astype(self.dtype, copy=False)
        half = feats.shape[1] // 2
        main, mirrored = (feats[:, :half], feats[:, half:]) if self.flip else (feats, None)
        id_ = parts.new_id()
        rel = self.journal.relative(parts.part_name(id_))
        self.journal.sizes[rel], self.journal.ids[rel] = len(self), id_
        rows, refs = self.rows, zip(itertools.repeat(rel), range(len(self)))
        keys = zip(rows.file_size.tolist(), rows.file_mtime_ns.tolist(), rows.file_sha256, refs)
        plan_rows.update(zip(rows.paths, keys))  # (size, mtime, sha, ref), without a loop
        mirrored = None if mirrored is None else np.ascontiguousarray(mirrored)
        task = _PartToWrite(
            self.journal, self.rows, np.ascontiguousarray(main), mirrored, self.rejected,
            self.reasons, id_, self.batches,
        )  # fmt: skip
        self._reset()
        if submit is None:
            return task.write()
        return submit(task.write)


@dataclass
class _PartToWrite:
    """A gathered part, written (possibly in a background thread) by `write`, after which the
    journal batches it replaces are deleted."""

    journal: parts.Journal
    rows: parts.Rows
    main: np.ndarray
    mirrored: np.ndarray | None
    rejected: parts.Rows
    reasons: list
    id_: str
    batches: list

    def write(self) -> None:
        folder, key = self.journal.folder, self.journal.key
        parts.write_part(folder, key, self.rows, self.main, self.mirrored, self.rejected,
                         self.reasons, id_=self.id_)  # fmt: skip
        for batch in self.batches:
            batch.unlink(missing_ok=True)


def old_refs(old: store.Cache) -> list[tuple[str, int]]:
    """(source name, row) of each row of an existing cache read without features."""
    src = old.sources
    names = src.names
    return [(names[s], i) for s, i in zip(src.row_source.tolist(), src.row_index.tolist())]


def commit(cache_path: Path, meta: store.Cache, refs: list, writer: PartWriter | None, old,
           *, dim: int, dtype: str, flip: bool, compact: bool = False) -> list[str]:  # fmt: skip
    """Write the main file of `meta` (no features) whose row i has its features at refs[i];
    rewrite every feature into fresh parts first when the cache needs compaction (or `compact`).
    Returns the sources the new main file names."""
    sources, rows = zip(*refs) if refs else ((), ())
    names = {name: s for s, name in enumerate(dict.fromkeys(sources))}  # in order of first use
    row_source = np.fromiter(map(names.__getitem__, sources), np.int32, len(refs))
    row_index = np.fromiter(rows, np.int64, len(refs))
    journal = writer.journal if writer is not None else None
    known_sizes = dict(journal.sizes) if journal is not None else {}
    known_ids = dict(journal.ids) if journal is not None else {}
    old_dtype = dtype
    if old is not None:
        old_dtype = old.feature_dtype
        for s, name in enumerate(old.sources.names):
            known_sizes.setdefault(name, int(old.sources.sizes[s]))
            known_ids.setdefault(name, old.sources.ids[s])
    order = list(names)
    src = store.Sources(
        cache_path.parent, order, [known_ids[n] for n in order],
        np.array([known_sizes[n] for n in order], np.int64), row_source, row_index, dim,
        dtype, flip,
    )  # fmt: skip
    if compact or needs_compaction(cache_path, src, old_dtype != dtype and old is not None):
        src = _compact(cache_path, src, meta, old_dtype, writer)
    store.write_main(cache_path, meta, src)
    return src.names


def needs_compaction(cache_path: Path, src: store.Sources, dtype_changed: bool) -> bool:
    """Rewrite every row into fresh parts: the features are in a format-1 cache (the upgrade),
    another dtype is asked for, dead rows outnumber live ones, or the rows are too fragmented."""
    if dtype_changed or cache_path.name in src.names:
        return True
    total, live = int(src.sizes.sum()), len(src.row_source)
    if total and total - live > config.COMPACT_DEAD_FRACTION * total:
        return True
    return len(src.blocks()) > config.COMPACT_MAX_BLOCKS


def _compact(cache_path, src: store.Sources, meta: store.Cache, read_dtype, writer: PartWriter):
    """Every live row into fresh parts, in row order, PART_ROWS at a time (bounded memory)."""
    journal = writer.journal
    journal.start()
    reading = store.Sources(src.base, src.names, src.ids, src.sizes, src.row_source,
                            src.row_index, src.dim, read_dtype, src.flip)  # fmt: skip
    n = len(src.row_source)
    names, ids, sizes = [], [], []
    row_source, row_index = np.zeros(n, np.int32), np.zeros(n, np.int64)
    for lo in range(0, n, config.PART_ROWS):
        rows = np.arange(lo, min(n, lo + config.PART_ROWS))
        feats = parts.gather(reading, rows, dtype=src.dtype)
        mirrored = parts.gather(reading, rows, parts.FLIP_DATASET, src.dtype) if src.flip else None
        chunk = store.Rows(
            meta.paths[lo : rows[-1] + 1], meta.rows.file_size[rows],
            meta.rows.file_mtime_ns[rows], list(meta.rows.file_sha256[lo : rows[-1] + 1]),
        )  # fmt: skip
        name, id_ = parts.write_part(journal.folder, journal.key, chunk, feats, mirrored)
        row_source[rows], row_index[rows] = len(names), np.arange(len(rows))
        names.append(journal.relative(name))
        ids.append(id_)
        sizes.append(len(rows))
    return store.Sources(src.base, names, ids, np.array(sizes, np.int64), row_source, row_index,
                         src.dim, src.dtype, src.flip)  # fmt: skip
