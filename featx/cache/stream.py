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
import time
from concurrent.futures import Future, ThreadPoolExecutor
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


def sources_of(cache_path: Path, refs: list, writer: PartWriter | None, old, *, dim: int,
               dtype: str, flip: bool) -> tuple[store.Sources, str]:  # fmt: skip
    """(where the features of rows at refs[i] = (source name, row) are, the dtype they were
    written in): the sources a main file will name, readable before it is written."""
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
    return src, old_dtype


def commit(cache_path: Path, meta: store.Cache, refs: list, writer: PartWriter | None, old,
           *, dim: int, dtype: str, flip: bool, compact: bool = False) -> list[str]:  # fmt: skip
    """Write the main file of `meta` (no features) whose row i has its features at refs[i];
    rewrite every feature into fresh parts first when the cache needs compaction (or `compact`).
    Returns the sources the new main file names."""
    src, old_dtype = sources_of(cache_path, refs, writer, old, dim=dim, dtype=dtype, flip=flip)
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


class Writer:
    """The one writer of a running extraction: finished batches go into the part being gathered
    (written when it holds PART_ROWS rows, its rows then joining `rows`), and into the journal at
    most every JOURNAL_SECONDS: a slow batch alone, fast ones gathered into one .npz, or written
    straight as a part when PART_MIN_ROWS rows or more are ready and no batch of the part is in
    the journal yet (each feature then written once). Writes run in one background thread, in
    order, while the next batches decode; a failed write (a full disk) raises in the next call.

    rows: the plan's {path: (size, mtime, sha, ref)}, where a written part's rows land."""

    def __init__(self, journal: parts.Journal, dtype: str, flip: bool, rows: dict):
        self.journal, self.rows = journal, rows
        self.parts = PartWriter(journal, dtype, flip)
        self._pending: list = []  # finished batches not journalled: (index, rows, feats, rej, why)
        self._journalled_at = time.perf_counter()
        self._io: ThreadPoolExecutor | None = None
        self._writing: Future | None = None  # the write under way (one at a time, in order)

    def resume(self, resumed: dict) -> None:
        """Rows resumed from journalled batches ({path: (size, mtime, sha, features)}) go into the
        next part; their batches are deleted once that part is written."""
        for path, (size, mtime, sha, feature) in resumed.items():
            self.parts.add(path, size, mtime, sha, feature)
        self.parts.batches.extend(self.journal.batches)

    def start(self) -> None:
        """Before the first batch: the background writer, and the journal clock."""
        self._io = ThreadPoolExecutor(1, thread_name_prefix="featx-journal")
        self._journalled_at = time.perf_counter()

    def add_batch(self, index: int, rows: parts.Rows, features, rejected: parts.Rows, reasons):
        """One finished batch: its extracted rows with their (n, D) features, and its rejected
        rows with their reasons. An unchanged row is not added: it keeps its reference."""
        width = features.shape[1] if features is not None else self.journal.feature_dim or 0
        features = features if len(rows) else np.zeros((0, width), np.float32)
        stacked = self.parts.add_rows(rows, features)  # a copy: ours to keep, the journal's too
        self.parts.reject(rejected, reasons)
        self._pending.append((index, rows, stacked, rejected, reasons))
        if len(self.parts) >= config.PART_ROWS:
            self._write_part()
        elif time.perf_counter() - self._journalled_at >= config.JOURNAL_SECONDS:
            self._settle()  # a batch still being written joins parts.batches
            if not self.parts.batches and len(self.parts) >= config.PART_MIN_ROWS:
                self._write_part()
            else:
                self._journal()

    def finish(self) -> None:
        """After the last batch: the write under way done; what is not journalled goes into the
        last part, written by `flush`."""
        self._settle()

    def save(self) -> None:
        """On an interrupt or an error: every finished batch journalled, on disk before return."""
        self._journal()
        self._settle()

    def close(self) -> None:
        """The background writer stopped; a write under way is finished, never cut short."""
        if self._io is not None:
            self._io.shutdown(wait=True)

    def flush(self) -> None:
        """The rows gathered so far as one part, written now."""
        self._settle()
        self.parts.flush(self.rows)

    def _write_part(self) -> None:
        self._settle()  # its .npz is on disk and known before the part replaces it
        self._writing = self.parts.flush(self.rows, self._io.submit)
        self._pending.clear()
        self._journalled_at = time.perf_counter()

    def _journal(self) -> None:
        """The batches not journalled yet as one .npz, written after the previous write."""
        self._settle()
        if not self._pending:
            return
        rows, rej, reasons, feats = parts.Rows(), parts.Rows(), [], []
        for _, r, f, j, why in self._pending:
            rows.paths += r.paths
            rows.file_sha256 += r.file_sha256
            rej.paths += j.paths
            reasons += why
            feats += [f] if len(f) else []
        for out, key in ((rows, 1), (rej, 3)):
            out.file_size = np.concatenate([p[key].file_size for p in self._pending])
            out.file_mtime_ns = np.concatenate([p[key].file_mtime_ns for p in self._pending])
        width = self.journal.feature_dim or 0
        stacked = np.concatenate(feats) if feats else np.zeros((0, width), np.float32)
        index = self._pending[-1][0]
        self._writing = self._io.submit(self.journal.write, index, rows, stacked, rej, reasons)
        self._pending.clear()
        self._journalled_at = time.perf_counter()

    def _settle(self) -> None:
        """Wait for the write under way: a journal .npz (which joins the batches of the part
        being gathered) or a part. A failed write raises here."""
        writing, self._writing = self._writing, None
        batch = writing.result() if writing is not None else None
        if batch is not None:
            self.parts.batches.append(batch)
