"""Duplicate photos from the feature cache: exact copies (same sha256) and near copies (cosine
similarity of the features >= a threshold, every pair compared in blocks so memory stays at a few
tiles), linked into groups marked `cross_split` (leakage) and `cross_label`.

A lower layer: `featx audit` reports them, `featx fit-head --exclude-duplicates` trains without the
leaking copies, and `extract`/`fit-head` end with one line when there is leakage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx import config
from featx.cache import parts, store
from featx.errors import FeatxError


def unit_rows(features) -> np.ndarray:
    """float32 rows scaled to length 1, so a dot product is a cosine similarity (a zero row stays
    zero: similarity 0 with everything)."""
    X = np.asarray(features, np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


class StoredRows:
    """The unit rows of a cache read without features, gathered from its part files a tile at a
    time (`rows[a:b]` reads those rows; `rows[index_array]` is a view of some rows): the
    all-pairs search then holds two tiles, never every feature (extract's memory stays flat)."""

    def __init__(self, sources: store.Sources, rows: np.ndarray | None = None):
        self.sources = sources
        self.rows = np.arange(len(sources.row_source)) if rows is None else np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    block = config.AUDIT_STORED_BLOCK_SIZE  # rows per tile of the search

    def __getitem__(self, key):
        if isinstance(key, slice):
            X = parts.gather(self.sources, self.rows[key], dtype=np.float32)
            X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)  # in place
            return X
        return StoredRows(self.sources, self.rows[key])


def scan(
    X: np.ndarray,
    threshold: float,
    neighbors: int = 0,
    block: int = config.AUDIT_BLOCK_SIZE,
    max_pairs: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Every pair of the unit rows `X` with cosine similarity >= threshold, and each row's highest
    similarities to the other rows, in one pass over block x block tiles on and above the diagonal
    (each pair computed once; memory: two tiles and n x neighbors).

    Returns (pairs (m, 2) int64 with i < j, their similarities (m,) float32, nearest
    (n, min(neighbors, n - 1)) float32 highest similarities first, or None when neighbors is 0).
    More than `max_pairs` pairs (default config.AUDIT_MAX_PAIRS) is an error.
    """
    max_pairs = config.AUDIT_MAX_PAIRS if max_pairs is None else max_pairs
    n = len(X)
    k = max(0, min(int(neighbors), n - 1))
    top = np.full((n, k), -np.inf, np.float32) if k else None
    found_i, found_j, found_s = [], [], []
    total = 0
    for a in range(0, n, block):
        rows = X[a : a + block]
        for b in range(a, n, block):
            S = rows @ X[b : b + block].T
            if a == b:
                np.fill_diagonal(S, -np.inf)  # an image is not its own neighbour
            ii, jj = np.nonzero(threshold <= S)
            if a == b:
                keep = ii < jj
                ii, jj = ii[keep], jj[keep]
            if len(ii):
                total += len(ii)
                if total > max_pairs:
                    raise FeatxError(
                        f"More than {max_pairs:,} pairs of images have a cosine similarity >= "
                        f"{threshold}; that is no longer a list of duplicates. Raise --threshold "
                        f"(default {config.AUDIT_NEAR_DUPLICATE})."
                    )
                found_i.append(ii + a)
                found_j.append(jj + b)
                found_s.append(S[ii, jj])
            if k:
                _merge_top(top, a, S, k)
                if a != b:
                    _merge_top(top, b, S.T, k)
    if found_i:
        pairs = np.stack([np.concatenate(found_i), np.concatenate(found_j)], axis=1)
        sims = np.concatenate(found_s).astype(np.float32)
    else:
        pairs, sims = np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    if top is not None:
        top = -np.sort(-top, axis=1)
    return pairs.astype(np.int64), sims, top


def _merge_top(top: np.ndarray, start: int, S: np.ndarray, k: int) -> None:
    """Keep in top[start:start+len(S)] the k highest of its values and of S's rows.

    Once a row has k values, only the entries of S above its lowest one can enter: those few are
    merged by one sort, instead of partitioning the whole tile again."""
    rows = slice(start, start + len(S))
    current = top[rows]
    floor = current.min(axis=1)
    if not np.isfinite(floor).all():  # rows seen for the first time: partition the tile
        both = np.concatenate([current, S], axis=1)
        top[rows] = np.partition(both, both.shape[1] - k, axis=1)[:, -k:]
        return
    r, c = np.nonzero(floor[:, None] < S)
    if not len(r):
        return
    m = len(S)
    row = np.concatenate([np.repeat(np.arange(m), k), r])
    value = np.concatenate([current.ravel(), S[r, c]])
    order = np.lexsort((-value, row))  # by row, highest value first
    row, value = row[order], value[order]
    rank = np.arange(len(row)) - np.searchsorted(row, row)  # position within its row
    top[rows] = value[rank < k].reshape(m, k)  # every row keeps exactly k (it had k)


@dataclass
class Group:
    rows: np.ndarray  # row indices into the cache, sorted by path
    kind: str  # "exact" or "near"
    similarity: float
    cross_split: bool
    cross_label: bool

    def to_json(self, paths: list[str]) -> dict:
        return {
            "paths": [paths[i] for i in self.rows],
            "kind": self.kind,
            "similarity": self.similarity,
            "cross_split": self.cross_split,
            "cross_label": self.cross_label,
        }


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """The connected component of each of `n` rows linked by `pairs` (k x 2), numbered by its
    smallest row: a union-find in plain numpy and Python, since scipy's csgraph would load scipy
    into `featx merge` and extract (the import budget, tests/test_import_budget.py)."""
    parent = np.arange(n)
    for a, b in pairs.tolist():
        while parent[a] != a:
            parent[a] = a = parent[parent[a]]
        while parent[b] != b:
            parent[b] = b = parent[parent[b]]
        if a != b:
            parent[max(a, b)] = min(a, b)
    while True:  # point every row at its root
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def find_duplicates(
    cache: store.Cache,
    threshold: float = config.AUDIT_NEAR_DUPLICATE,
    neighbors: int = 0,
    X: np.ndarray | None = None,
) -> tuple[list[Group], np.ndarray | None]:
    """(duplicate groups, most harmful first; each row's `neighbors` highest similarities to
    other images, or None).

    Exact copies (same sha256) are searched once, as one representative, so a thousand copies of
    one file cost one row and the nearest-neighbour similarities do not count a copy as a
    neighbour. A cache read without features is searched a tile at a time (StoredRows)."""
    n = len(cache.paths)
    if X is None:
        X = StoredRows(cache.sources) if cache.features is None else unit_rows(cache.features)
    sha = cache.rows.file_sha256 if len(cache.rows.file_sha256) == n else [""] * n
    # one integer per distinct content (a row without a hash is its own): np.unique of the hex
    # strings themselves would hold ~1 KB per image, and extract's memory must stay flat
    seen: dict = {}
    keys = np.fromiter((seen.setdefault(s or i, len(seen)) for i, s in enumerate(sha)), np.int64, n)
    _, first, rep_of = np.unique(keys, return_index=True, return_inverse=True)
    block = getattr(X, "block", config.AUDIT_BLOCK_SIZE)
    pairs, sims, nearest = scan(X[first], threshold, neighbors, block)
    r = len(first)
    component = components(r, pairs)
    weakest = np.ones(r, np.float64)  # per component: the lowest similarity linking it
    linked = np.zeros(r, bool)
    if len(pairs):
        np.minimum.at(weakest, component[pairs[:, 0]], sims.astype(np.float64))
        linked[component[pairs[:, 0]]] = True
    of_row = component[rep_of]
    order = np.argsort(of_row, kind="stable")
    bounds = np.flatnonzero(np.diff(of_row[order])) + 1
    paths = cache.paths
    groups = []
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        c = of_row[members[0]]
        members = np.array(sorted(members, key=lambda i: paths[i]))
        groups.append(
            Group(
                rows=members,
                kind="near" if linked[c] else "exact",
                similarity=round(min(float(weakest[c]), 1.0), 6) if linked[c] else 1.0,
                cross_split=len(set(cache.splits[members])) > 1,
                cross_label=len(set(cache.labels[members].tolist())) > 1,
            )
        )
    groups.sort(
        key=lambda g: (not (g.cross_split or g.cross_label), -g.similarity, paths[g.rows[0]])
    )
    return groups, None if nearest is None else nearest[rep_of]


def leaking_train_rows(
    cache: store.Cache, threshold: float = config.AUDIT_NEAR_DUPLICATE, groups=None
) -> np.ndarray:
    """Boolean mask of train images that are copies (exact or near) of a validation or test
    image: what `fit-head --exclude-duplicates` leaves out."""
    if groups is None:
        groups, _ = find_duplicates(cache, threshold)
    mask = np.zeros(len(cache.paths), bool)
    for g in groups:
        splits = cache.splits[g.rows]
        if g.cross_split and (splits != "train").any():
            mask[g.rows[splits == "train"]] = True
    return mask


def without_rows(cache: store.Cache, drop: np.ndarray) -> store.Cache:
    """A copy of `cache` (in memory) without the rows where `drop` is True."""
    keep = ~np.asarray(drop, bool)
    rows = cache.rows
    sha = [s for s, k in zip(rows.file_sha256, keep) if k] if len(rows.file_sha256) else []
    return store.Cache(
        fingerprint=cache.fingerprint,
        class_names=cache.class_names,
        features=cache.features[keep],
        labels=cache.labels[keep],
        splits=cache.splits[keep],
        rows=store.Rows(
            [p for p, k in zip(rows.paths, keep) if k],
            rows.file_size[keep],
            rows.file_mtime_ns[keep],
            sha,
        ),
        rejected=cache.rejected,
        rejected_reasons=cache.rejected_reasons,
        attrs=cache.attrs,
    )


def quick_groups(
    cache: store.Cache, threshold: float | None = None, near_max_images: int | None = None
) -> tuple[list[Group], bool]:
    """(the duplicate groups, whether near copies were searched): exact copies (sha256) always,
    near copies too when the cache has at most `near_max_images` images and the search stays a
    list (at most config.AUDIT_MAX_PAIRS similar pairs). None: config.AUDIT_NEAR_DUPLICATE and
    AUDIT_QUICK_MAX_IMAGES. Features are read from `cache.features`, else in tiles."""
    threshold = config.AUDIT_NEAR_DUPLICATE if threshold is None else threshold
    if near_max_images is None:
        near_max_images = config.AUDIT_QUICK_MAX_IMAGES
    exact_only = np.zeros((len(cache.paths), 1), np.float32)  # features are not needed for those
    if len(cache.paths) > near_max_images or (cache.features is None and cache.sources is None):
        return find_duplicates(cache, 2.0, X=exact_only)[0], False  # no cosine reaches 2
    try:
        return find_duplicates(cache, threshold)[0], True
    except FeatxError:  # too many similar pairs to list: a warning must not fail the command
        return find_duplicates(cache, 2.0, X=exact_only)[0], False


def split_groups(cache: store.Cache, log=None) -> list[list[str]]:
    """[[path, ...]]: the groups of copies a split keeps on one side, from `quick_groups` (the
    audit's threshold), of at most config.SPLIT_GROUP_MAX_IMAGES images; `log` gets one note
    about what is left out (near copies not searched, larger groups of look-alikes)."""
    groups, near = quick_groups(cache)
    n, cap = len(cache.paths), config.SPLIT_GROUP_MAX_IMAGES
    large = [g for g in groups if len(g.rows) > cap]
    if log is not None and not near and n > 1:
        log(
            f"note: the split keeps exact copies together, not near copies ({n:,} images: more "
            f"than {config.AUDIT_QUICK_MAX_IMAGES:,} or too many similar pairs); see `featx audit`."
        )
    if log is not None and large:
        log(
            f"note: {len(large)} group(s) of more than {cap} look-alike images "
            f"({max(len(g.rows) for g in large)} at most) are split image by image; "
            "`featx audit` lists them."
        )
    return [[cache.paths[i] for i in g.rows] for g in groups if len(g.rows) <= cap]


def leakage(
    cache: store.Cache, threshold: float | None = None, near_max_images: int | None = None
) -> str | None:
    """What the audit would find of leakage and cross-label copies, in a few words, or None.
    Cheap: exact copies (sha256) always, near copies when the cache has at most `near_max_images`
    images (0.1-0.5 s for 3,000). None: config.AUDIT_NEAR_DUPLICATE and AUDIT_QUICK_MAX_IMAGES."""
    if len(cache.paths) < 2:
        return None
    groups, _ = quick_groups(cache, threshold, near_max_images)
    leaks = [g for g in groups if g.cross_split]
    mixed = [g for g in groups if g.cross_label]
    parts = []
    if leaks:
        splits = [s for s in config.SPLITS if any((cache.splits[g.rows] == s).any() for g in leaks)]
        where = f"both {splits[0]} and {splits[1]}" if len(splits) == 2 else "more than one split"
        parts.append(f"{_copies(leaks)} in {where}")
    if mixed:
        parts.append(f"{_copies(mixed)} filed under two or more classes")
    return "; ".join(parts) or None


def leakage_line(cache_path: str | Path) -> str | None:
    """The one line `featx extract` and `featx fit-head` print at the end when the audit would
    find leakage or cross-label copies ("6 files, copies of 3 photos, are in both train and
    validation: run `featx audit CACHE`"), else None."""
    found = leakage(store.read_cache(cache_path, features=False))  # features read in tiles
    return f"{found}: run `featx audit {cache_path}`" if found else None


def exclude_leaking(
    cache: store.Cache, threshold: float = config.AUDIT_NEAR_DUPLICATE
) -> tuple[store.Cache, list[str]]:
    """(the cache without its train copies of validation or test images, their paths): what
    `fit-head --exclude-duplicates` trains on. Validation and test stay whole, so metrics remain
    comparable with a run without the option."""
    drop = leaking_train_rows(cache, threshold)
    return without_rows(cache, drop), [p for p, d in zip(cache.paths, drop) if d]


def _copies(groups: list) -> str:
    """'2 files, copies of 1 photo, are': a group is one photo, however many files hold it (a
    burst of 40 copies was '1 photo is')."""
    files, photos = sum(len(g.rows) for g in groups), len(groups)
    return f"{files} files, copies of {photos} photo{'s' if photos > 1 else ''}, are"
