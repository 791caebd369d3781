"""`featx audit`: what silently spoils a classifier, found in seconds from the feature cache alone.

Every image's 1280-d feature and sha256 are in the cache already, so no image is decoded except
for the contact sheets. Four findings:

1. Duplicates. Exact copies share a sha256. Near copies (resized, recompressed, cropped a little,
   watermarked) have features whose cosine similarity is >= `threshold`; every pair is compared
   in blocks (`scan`): memory stays at a few tiles (52 MB beyond the features for 100k images),
   time grows with the square (20k images: 6 s, 100k: 4.5 min on two busy cores).
   Copies are linked into groups (connected components). A group is `cross_split` when its
   members are in more than one split (leakage: the same photo is trained on and evaluated on) and
   `cross_label` when they are filed under more than one class.
2. Likely label errors in the train split: out-of-fold probabilities from the fit-head logistic
   regression (C chosen by its own cross-validation, then `folds` stratified folds with that C),
   then cleanlab's confident learning (`cleanlab.filter.find_label_issues`).
3. Outliers: images far from every other image; the score is the mean cosine distance to the
   `neighbors` most similar other images (the k-NN distance behind cleanlab's OutOfDistribution),
   flagged above a robust z-score (median and median absolute deviation of the cache's scores).
4. Class balance: images per split and class, and a hint to use `--class-weight balanced`.

audit.json holds exactly these keys (paths as stored in the cache, relative to its data folder):
    {"duplicates": [{"paths", "kind": "exact"|"near", "similarity", "cross_split",
                     "cross_label"}],                            most harmful first
     "label_issues": [{"path", "label", "suggested", "score"}],  most suspicious first
     "outliers": [{"path", "score"}],                            farthest first
     "class_counts": {split: {class: images}}}
`similarity` is 1.0 for exact copies, else the lowest cosine similarity of the pairs that link the
group. A label issue's `score` is 1 - the held-out probability of its label (higher = more
suspicious); `suggested` is the class the held-out model finds most probable.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx import config, store
from featx.errors import FeatxError
from featx.files import replaced_atomically, write_text_atomic

KEYS = ("duplicates", "label_issues", "outliers", "class_counts")
SPLITS = ("train", "validation", "test")


def default_output_dir(cache_path: str | Path) -> Path:
    """`<cache folder>/<cache name>-audit/`, next to the cache like fit-head's output."""
    cache_path = Path(cache_path)
    return cache_path.with_name(f"{cache_path.stem}-audit")


def check_cache(cache: store.Cache, cache_path) -> None:
    """Refuse a cache there is nothing to audit in, in one line."""
    if len(cache.paths) == 0:
        raise FeatxError(
            f"The cache '{cache_path}' holds no images, so there is nothing to audit. Run "
            "`featx extract DATA_DIR --cache CACHE` on a folder of class folders first."
        )
    present = sorted({cache.class_names[i] for i in np.unique(cache.labels)})
    if len(present) < 2:
        raise FeatxError(
            f"The cache '{cache_path}' holds images of one class only ({', '.join(present)}); "
            "an audit compares classes and needs at least two. Add another class folder and "
            "re-run `featx extract`."
        )
    if not (cache.splits == "train").any():
        raise FeatxError(
            f"The cache '{cache_path}' has no train images; the audit looks for label errors in "
            "the train split. Re-run `featx extract` on DATA/CLASS/* or DATA/train/CLASS/*."
        )
    if not np.isfinite(cache.features).all():
        raise FeatxError(
            f"The cache '{cache_path}' holds non-finite features (NaN or inf). Re-extract it "
            "with `featx extract --overwrite`."
        )


# --- the blocked similarity search --------------------------------------------------------------


def unit_rows(features) -> np.ndarray:
    """float32 rows scaled to length 1, so a dot product is a cosine similarity (a zero row stays
    zero: similarity 0 with everything)."""
    X = np.asarray(features, np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


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


# --- 1. duplicates ------------------------------------------------------------------------------


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
    neighbour."""
    n = len(cache.paths)
    X = unit_rows(cache.features) if X is None else X
    sha = list(cache.rows.file_sha256)
    keys = (
        [s or f"#{i}" for i, s in enumerate(sha)] if len(sha) == n else [f"#{i}" for i in range(n)]
    )
    _, first, rep_of = np.unique(np.array(keys), return_index=True, return_inverse=True)
    pairs, sims, nearest = scan(X[first], threshold, neighbors)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    r = len(first)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(r, r))
    _, component = connected_components(graph, directed=False)
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


def leakage(
    cache: store.Cache, threshold: float | None = None, near_max_images: int | None = None
) -> str | None:
    """What the audit would find of leakage and cross-label copies, in a few words, or None.
    Cheap: exact copies (sha256) always, near copies when the cache has at most `near_max_images`
    images (0.1-0.5 s for 3,000). None: config.AUDIT_NEAR_DUPLICATE and AUDIT_QUICK_MAX_IMAGES."""
    threshold = config.AUDIT_NEAR_DUPLICATE if threshold is None else threshold
    if near_max_images is None:
        near_max_images = config.AUDIT_QUICK_MAX_IMAGES
    if len(cache.paths) < 2:
        return None
    if len(cache.paths) > near_max_images:
        threshold = 2.0  # no cosine similarity reaches it: exact copies only
    try:
        groups, _ = find_duplicates(cache, threshold)
    except FeatxError:  # too many similar pairs to list: a warning must not fail the command
        groups, _ = find_duplicates(cache, 2.0)
    leaks = [g for g in groups if g.cross_split]
    mixed = [g for g in groups if g.cross_label]
    parts = []
    if leaks:
        splits = [s for s in SPLITS if any((cache.splits[g.rows] == s).any() for g in leaks)]
        where = f"both {splits[0]} and {splits[1]}" if len(splits) == 2 else "more than one split"
        parts.append(f"{_photos(len(leaks))} in {where}")
    if mixed:
        parts.append(f"{_photos(len(mixed))} filed under two or more classes")
    return "; ".join(parts) or None


def leakage_line(cache_path: str | Path) -> str | None:
    """The one line `featx extract` and `featx fit-head` print at the end when the audit would
    find leakage or cross-label copies ("3 photos are in both train and validation: run
    `featx audit CACHE`"), else None."""
    found = leakage(store.read_cache(cache_path))
    return f"{found}: run `featx audit {cache_path}`" if found else None


def exclude_leaking(
    cache: store.Cache, threshold: float = config.AUDIT_NEAR_DUPLICATE
) -> tuple[store.Cache, list[str]]:
    """(the cache without its train copies of validation or test images, their paths): what
    `fit-head --exclude-duplicates` trains on. Validation and test stay whole, so metrics remain
    comparable with a run without the option."""
    drop = leaking_train_rows(cache, threshold)
    return without_rows(cache, drop), [p for p, d in zip(cache.paths, drop) if d]


def _photos(n: int) -> str:
    return "1 photo is" if n == 1 else f"{n} photos are"


# --- 2. label issues ----------------------------------------------------------------------------


def out_of_fold_probabilities(
    X: np.ndarray,
    y: np.ndarray,
    seed: int = config.SEED,
    folds: int = config.AUDIT_CV_FOLDS,
    class_weight: str = config.CLASS_WEIGHT,
) -> np.ndarray:
    """(n, C) probabilities, each row from a logistic regression that never saw it.

    C is chosen once, by the fit-head head's own cross-validation on all rows (its defaults);
    then `folds` stratified folds each fit the head with that C and predict the held-out rows.
    y must hold every class 0..C-1 at least twice."""
    from sklearn.model_selection import StratifiedKFold

    from featx import heads

    y = np.asarray(y, np.int64)
    k = int(y.max()) + 1
    C = heads.LogRegHead(class_weight=class_weight, seed=seed).fit(X, y).C_
    folds = max(2, min(int(folds), int(np.bincount(y, minlength=k).min())))
    proba = np.zeros((len(y), k))
    for train, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        head = heads.LogRegHead(C=C, class_weight=class_weight, seed=seed).fit(X[train], y[train])
        proba[held_out] = head.predict_proba(X[held_out])
    return proba


def find_label_issues(
    cache: store.Cache,
    seed: int = config.SEED,
    folds: int = config.AUDIT_CV_FOLDS,
    filter_by: str = config.AUDIT_FILTER_BY,
) -> tuple[list[dict], str | None]:
    """(label issues of the train split, most suspicious first; a note when they could not be
    looked for). Each issue: {"row", "label", "suggested", "score" = 1 - held-out probability of
    the label}."""
    train = np.flatnonzero(cache.splits == "train")
    present, y = np.unique(cache.labels[train], return_inverse=True)
    counts = np.bincount(y)
    if len(present) < 2 or counts.min() < 2:
        few = [cache.class_names[present[i]] for i in np.flatnonzero(counts < 2)]
        reason = f"class {few[0]!r} has one training image" if few else "one class is in train"
        return [], f"label issues not looked for: {reason}; they need two classes of 2+ images"
    X = cache.features[train].astype(np.float32)
    proba = out_of_fold_probabilities(X, y, seed, folds)
    from cleanlab.filter import find_label_issues as cleanlab_find_label_issues

    ranked = cleanlab_find_label_issues(
        y, proba, filter_by=filter_by, return_indices_ranked_by="self_confidence", n_jobs=1
    )
    score = 1.0 - proba[np.arange(len(y)), y]
    suggested = proba.argmax(axis=1)
    issues = [
        {
            "row": int(train[i]),
            "label": cache.class_names[present[y[i]]],
            "suggested": cache.class_names[present[suggested[i]]],
            "score": round(float(score[i]), 6),
        }
        for i in ranked
    ]
    issues.sort(key=lambda d: (-d["score"], cache.paths[d["row"]]))
    return issues, None


# --- 3. outliers --------------------------------------------------------------------------------


def find_outliers(nearest: np.ndarray, z: float = config.AUDIT_OUTLIER_Z) -> list[dict]:
    """Rows far from every other image, farthest first: [{"row", "score"}].

    score = mean cosine distance (1 - similarity) to the most similar other images; flagged when
    its robust z-score, (score - median) / (1.4826 * median absolute deviation), is above `z`. The
    cut is relative to the cache, so it holds for any backbone and data set; when more than half
    of the scores are equal (no spread) nothing is flagged."""
    if nearest is None or nearest.shape[1] == 0:
        return []
    score = 1.0 - nearest.astype(np.float64).mean(axis=1)
    median = float(np.median(score))
    spread = 1.4826 * float(np.median(np.abs(score - median)))
    if spread <= 0:
        return []
    rows = np.flatnonzero((score - median) / spread > z)
    rows = rows[np.argsort(-score[rows], kind="stable")]
    return [{"row": int(i), "score": round(float(score[i]), 6)} for i in rows]


# --- 4. class balance ---------------------------------------------------------------------------


def class_balance(cache: store.Cache, ratio: float = config.AUDIT_IMBALANCE_RATIO) -> str | None:
    """A hint when the largest class of the train split has >= `ratio` times the images of the
    smallest, else None."""
    train = cache.counts().get("train", {})
    if len(train) < 2:
        return None
    small = min(train, key=train.get)
    large = max(train, key=train.get)
    if train[small] == 0:
        return f"class '{small}' has no train image: add some, or fit-head refuses the cache"
    if train[large] < ratio * train[small]:
        return None
    return (
        f"classes are uneven in train ('{large}' {train[large]} images, '{small}' "
        f"{train[small]}: {train[large] / train[small]:.1f}x): try "
        "`featx fit-head --class-weight balanced`"
    )


# --- the command --------------------------------------------------------------------------------


def audit(
    cache_path: str | Path,
    output: str | Path | None = None,
    *,
    threshold: float = config.AUDIT_NEAR_DUPLICATE,
    data_dir: str | Path | None = None,
    seed: int = config.SEED,
    sheets: bool = True,
    log=None,
) -> dict:
    """Audit a feature cache; write audit.json, CSV files and contact sheets to `output`.

    Args:
        cache_path: a cache written by `featx extract`.
        output: folder to write; default <cache folder>/<cache name>-audit/.
        threshold: cosine similarity of two images' features from which they are near copies.
        data_dir: where the images are now, for the contact sheets; default the cache's data_dir.
        seed: seeds the cross-validation folds of the label-issue search.
        sheets: draw the contact sheets (the only part that reads images).
        log: called with one-line notes; default: silent.
    Returns:
        audit.json's content (the keys in KEYS) plus "summary": counts, hints, seconds, files.
    """
    log = log or (lambda message: None)
    if not 0.0 < float(threshold) <= 1.0:
        raise FeatxError(
            f"threshold must be a cosine similarity in (0, 1], got {threshold}. The default, "
            f"{config.AUDIT_NEAR_DUPLICATE}, is calibrated on real near-identical photos."
        )
    t0 = time.perf_counter()
    cache = store.read_cache(cache_path)
    check_cache(cache, cache_path)
    paths = cache.paths
    seconds = {}

    t = time.perf_counter()
    groups, nearest = find_duplicates(cache, threshold, neighbors=config.AUDIT_NEIGHBORS)
    seconds["duplicates_and_neighbours"] = time.perf_counter() - t
    t = time.perf_counter()
    issues, issues_note = find_label_issues(cache, seed)
    seconds["label_issues"] = time.perf_counter() - t
    if issues_note:
        log(f"note: {issues_note}.")
    outliers = find_outliers(nearest)
    hint = class_balance(cache)

    report = {
        "duplicates": [g.to_json(paths) for g in groups],
        "label_issues": [
            {"path": paths[d["row"]], **{k: d[k] for k in ("label", "suggested", "score")}}
            for d in issues
        ],
        "outliers": [{"path": paths[d["row"]], "score": d["score"]} for d in outliers],
        "class_counts": cache.counts(),
    }
    out = Path(output) if output else default_output_dir(cache_path)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    files = _write_files(out, report, cache)
    root = Path(data_dir) if data_dir else _cache_data_dir(cache)
    missing = {}
    if sheets:
        drawn, missing = _write_sheets(out, report, cache, root)
        files += drawn
    seconds["files"] = time.perf_counter() - t
    if missing and root is None:
        log(
            "note: the cache records no data folder, so the contact sheets show placeholders; "
            "pass --data-dir to show the images."
        )
    elif missing:
        log(
            f"note: {len(missing)} image(s) of the contact sheets could not be read under "
            f"'{root}' ({next(iter(missing.values()))}: {next(iter(missing))}); they are drawn "
            "as placeholders. Pass --data-dir if the images moved."
        )
    seconds["total"] = time.perf_counter() - t0
    leaking = leaking_train_rows(cache, groups=groups)
    summary = {
        "cache": str(cache_path),
        "images": len(paths),
        "classes": len(cache.class_names),
        "threshold": float(threshold),
        "exact_groups": sum(g.kind == "exact" for g in groups),
        "near_groups": sum(g.kind == "near" for g in groups),
        "cross_split_groups": sum(g.cross_split for g in groups),
        "cross_label_groups": sum(g.cross_label for g in groups),
        "leaking_train_images": int(leaking.sum()),
        "train_images": int((cache.splits == "train").sum()),
        "label_issues": len(issues),
        "outliers": len(outliers),
        "hints": [h for h in (hint, issues_note) if h],
        "unreadable_images": len(missing),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "output": str(out),
        "files": [p.name for p in files],
    }
    return {**report, "summary": summary}


def _cache_data_dir(cache: store.Cache) -> Path | None:
    d = cache.attrs.get("data_dir")
    return Path(d) if d else None


def _write_files(out: Path, report: dict, cache: store.Cache) -> list[Path]:
    """audit.json and one CSV per list (written atomically)."""
    index = {p: i for i, p in enumerate(cache.paths)}
    written = [write_text_atomic(out / "audit.json", json.dumps(report, indent=2) + "\n")]

    def where(path):
        i = index[path]
        return cache.class_names[cache.labels[i]], cache.splits[i]

    tables = {
        "duplicates.csv": (
            ["group", "path", "label", "split", "kind", "similarity", "cross_split", "cross_label"],
            [
                [n, p, *where(p), g["kind"], g["similarity"], g["cross_split"], g["cross_label"]]
                for n, g in enumerate(report["duplicates"], 1)
                for p in g["paths"]
            ],
        ),
        "label_issues.csv": (
            ["path", "label", "suggested", "score"],
            [[d["path"], d["label"], d["suggested"], d["score"]] for d in report["label_issues"]],
        ),
        "outliers.csv": (
            ["path", "label", "split", "score"],
            [[d["path"], *where(d["path"]), d["score"]] for d in report["outliers"]],
        ),
    }
    for name, (header, rows) in tables.items():
        with replaced_atomically(out / name) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
        written.append(out / name)
    return written


def _write_sheets(out: Path, report: dict, cache: store.Cache, root: Path | None):
    """Contact sheets of the top duplicate groups, label issues and outliers. An empty list
    writes no sheet (and removes the one an earlier audit left)."""
    from featx.contact_sheet import Block, Tile, pack, write_sheet

    index = {p: i for i, p in enumerate(cache.paths)}
    top, size = config.AUDIT_SHEET_ITEMS, config.AUDIT_THUMBNAIL
    columns = config.AUDIT_SHEET_COLUMNS

    def tile(path: str, *extra: str) -> Tile:
        i = index[path]
        image = root / path if root else None
        label = cache.class_names[cache.labels[i]]
        return Tile(image, [Path(path).name, f"{label} | {cache.splits[i]}", *extra], path)

    groups = []
    for n, g in enumerate(report["duplicates"][:top], 1):
        flags = [f.replace("_", " ") for f in ("cross_split", "cross_label") if g[f]]
        shown = g["paths"][:columns]
        heading = f"#{n} {g['kind']} {g['similarity']:.3f}" + "".join(f", {f}" for f in flags)
        if len(shown) < len(g["paths"]):
            heading += f" ({len(shown)} of {len(g['paths'])} shown)"
        groups.append(Block([tile(p) for p in shown], heading))
    issues = [
        tile(d["path"], f"-> {d['suggested']}  {d['score']:.3f}")
        for d in report["label_issues"][:top]
    ]
    outliers = [tile(d["path"], f"score {d['score']:.3f}") for d in report["outliers"][:top]]
    n_dup, n_issues, n_out = (len(report[k]) for k in ("duplicates", "label_issues", "outliers"))
    items = {
        "duplicates.png": (f"top duplicate groups of {n_dup}", pack(groups, columns)),
        "label_issues.png": (
            f"top label issues of {n_issues} (label -> suggested, score)",
            [[Block(issues[i : i + columns])] for i in range(0, len(issues), columns)],
        ),
        "outliers.png": (
            f"top outliers of {n_out} (score: mean cosine distance to the nearest images)",
            [[Block(outliers[i : i + columns])] for i in range(0, len(outliers), columns)],
        ),
    }
    written, unreadable = [], {}
    for name, (title, rows) in items.items():
        if not rows:
            (out / name).unlink(missing_ok=True)  # a sheet of an earlier audit would mislead
            continue
        result = write_sheet(out / name, title, rows, size)
        written.append(result["path"])
        unreadable.update(result["unreadable"])
    return written, unreadable


def format_summary(result: dict) -> str:
    """The readable stdout summary of an audit."""
    s = result["summary"]
    lines = [
        f"audited {s['cache']}: {s['images']} images, {s['classes']} classes, "
        f"in {s['seconds']['total']:.1f} s"
    ]
    lines.append(
        f"duplicates: {s['exact_groups'] + s['near_groups']} groups ({s['exact_groups']} exact, "
        f"{s['near_groups']} near at cosine >= {s['threshold']}); {s['cross_split_groups']} "
        f"across splits (leakage: {s['leaking_train_images']} train copies), "
        f"{s['cross_label_groups']} across classes"
    )
    lines.append(
        f"label issues: {s['label_issues']} of {s['train_images']} train images look mislabelled"
    )
    for d in result["label_issues"][:3]:
        lines.append(f"  {d['path']}: {d['label']} -> {d['suggested']} ({d['score']:.3f})")
    lines.append(f"outliers: {s['outliers']} images far from every other image")
    train = result["class_counts"].get("train", {})
    if train:
        lines.append(
            f"class balance (train): {min(train.values())} to {max(train.values())} images per "
            "class"
        )
    lines += [f"hint: {h}" for h in s["hints"]]
    lines.append(f"wrote {s['output']} ({', '.join(s['files'])})")
    return "\n".join(lines)
