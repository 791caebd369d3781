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

import json
import time
from pathlib import Path

import numpy as np

from featx import config
from featx.artifacts import outputs
from featx.cache import remote_cache, store
from featx.errors import FeatxError, Messages, fraction_hint
from featx.files import is_url, write_csv_atomic, write_text_atomic
from featx.images import finder
from featx.quality.duplicates import find_duplicates, leaking_train_rows
from featx.reports.display import Result
from featx.reports.progress import reporter

KEYS = ("duplicates", "label_issues", "outliers", "class_counts")


def default_output_dir(cache_path: str | Path) -> Path:
    """`<cache folder>/<cache name>-audit/`, next to the cache like fit-head's output (a cache at
    a URL: cache/<cache name>-audit/)."""
    cache_path = remote_cache.beside(cache_path)
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


# --- 1. duplicates: see quality.duplicates -----------------------------------------------


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

    from featx.heads import estimators

    y = np.asarray(y, np.int64)
    k = int(y.max()) + 1
    C = estimators.LogRegHead(class_weight=class_weight, seed=seed).fit(X, y).C_
    folds = max(2, min(int(folds), int(np.bincount(y, minlength=k).min())))
    proba = np.zeros((len(y), k))
    for train, held_out in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        head = estimators.LogRegHead(C=C, class_weight=class_weight, seed=seed).fit(
            X[train], y[train]
        )
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
    overwrite: bool = False,
    progress=True,
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
        overwrite: replace an output folder that holds another featx output; the audit of the
            same cache is replaced without it (see featx.artifacts.outputs).
        progress: True: a progress bar over the audit's steps (tqdm); False: none; a function:
            called as progress(done, total, steps_per_second).
        log: called with one-line notes; default: logging.getLogger("featx"), and warnings as
            featx.FeatxWarning.
    Returns:
        audit.json's content (the keys in KEYS) plus "summary": counts, hints, seconds, files.
    """
    log = Messages(log)
    if not 0.0 < float(threshold) <= 1.0:
        raise FeatxError(
            f"threshold must be a cosine similarity in (0, 1], got {threshold}"
            f"{fraction_hint(threshold, '(0, 1]')} The default, "
            f"{config.AUDIT_NEAR_DUPLICATE}, is calibrated on real near-identical photos."
        )
    out = Path(output) if output else default_output_dir(cache_path)
    made_by = outputs.made_by("audit", out, cache_path)
    outputs.check_target(out, made_by, overwrite)  # before any work
    t0 = time.perf_counter()
    cache = store.read_cache(cache_path)
    check_cache(cache, cache_path)
    seconds = {}

    bar = reporter(progress, "auditing", unit="steps")  # duplicates, label issues, files
    t = time.perf_counter()
    groups, nearest = find_duplicates(cache, threshold, neighbors=config.AUDIT_NEIGHBORS)
    seconds["duplicates_and_neighbours"] = time.perf_counter() - t
    bar(1, 3)
    t = time.perf_counter()
    issues, issues_note = find_label_issues(cache, seed)
    seconds["label_issues"] = time.perf_counter() - t
    bar(2, 3)
    if issues_note:
        log(f"note: {issues_note}.")
    outliers = find_outliers(nearest)
    hint = class_balance(cache)

    report = _report(cache, groups, issues, outliers)
    t = time.perf_counter()
    with outputs.writing(out, made_by, overwrite=overwrite, log=log) as stage:
        files, missing = _write_all(stage, report, cache, data_dir if sheets else False, log)
    seconds["files"] = time.perf_counter() - t
    bar(3, 3)
    bar.close()
    seconds["total"] = time.perf_counter() - t0
    summary = _summary(cache, cache_path, threshold, groups, (issues, outliers))
    summary.update(
        {
            "hints": [h for h in (hint, issues_note) if h],
            "unreadable_images": len(missing),
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "output": str(out),
            "files": [p.name for p in files],
        }
    )
    return Result({**report, "summary": summary}, "audit")


def _summary(cache, cache_path, threshold, groups, found) -> dict:
    """The counts of audit's summary."""
    issues, outliers = found
    leaking = leaking_train_rows(cache, groups=groups)
    return {
        "cache": str(cache_path),
        "images": len(cache.paths),
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
    }


def _report(cache: store.Cache, groups, issues, outliers) -> dict:
    """audit.json: exactly the keys in KEYS, paths as stored in the cache."""
    paths = cache.paths
    return {
        "duplicates": [g.to_json(paths) for g in groups],
        "label_issues": [
            {"path": paths[d["row"]], **{k: d[k] for k in ("label", "suggested", "score")}}
            for d in issues
        ],
        "outliers": [{"path": paths[d["row"]], "score": d["score"]} for d in outliers],
        "class_counts": cache.counts(),
    }


def _write_all(out: Path, report: dict, cache: store.Cache, data_dir, log):
    """The JSON and CSV files and (unless data_dir is False) the contact sheets, into `out` (the
    staging folder): (files, {path: reason} of the images the sheets could not read)."""
    files = _write_files(out, report, cache)
    if data_dir is False:
        return files, {}
    root = _folder(data_dir) if data_dir else _cache_data_dir(cache)
    drawn, missing = _write_sheets(out, report, cache, root)
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
    return files + drawn, missing


def _folder(data_dir) -> Path | str:
    return str(data_dir) if is_url(data_dir) else Path(data_dir)  # a bucket's photos: a URL


def _cache_data_dir(cache: store.Cache) -> Path | str | None:
    d = cache.attrs.get("data_dir")
    return _folder(d) if d else None


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
        written.append(write_csv_atomic(out / name, header, rows))
    return written


def _write_sheets(out: Path, report: dict, cache: store.Cache, root: Path | None):
    """Contact sheets of the top duplicate groups, label issues and outliers. An empty list
    writes no sheet (and removes the one an earlier audit left)."""
    from featx.reports.contact_sheet import Block, Tile, pack, write_sheet

    index = {p: i for i, p in enumerate(cache.paths)}
    top, size = config.AUDIT_SHEET_ITEMS, config.AUDIT_THUMBNAIL
    columns = config.AUDIT_SHEET_COLUMNS

    def tile(path: str, *extra: str) -> Tile:
        i = index[path]
        image = finder.inside(root, path) if root else None
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
        if not rows:  # no sheet (the one of an earlier audit goes with its folder)
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
    lines.append(  # a score, not a verdict: see the measured precision in the README
        f"label issues: {s['label_issues']} of {s['train_images']} train images worth a look, "
        "highest score first"
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
