"""Stage 1: images -> frozen MobileNetV2 -> HDF5 feature cache, incremental and resumable.

A run lists the data folder, keeps every cached row whose file is unchanged (same size and mtime,
or same content hash), reuses batches journalled by an interrupted run, and pushes only the rest
through the model. Decoding runs in a thread pool a few batches ahead of the model, so on a CPU the
model, not Pillow, sets the pace. The new cache replaces the old one atomically at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx import backbone, config, images, store
from featx.errors import FeatxError


@dataclass
class _Todo:
    path: str
    size: int
    mtime_ns: int
    old_sha: str | None  # content hash of the cached version, if any
    old_feature: np.ndarray | None


def default_cache_path(data_dir: str | Path) -> Path:
    return Path(config.CACHE_DIR) / f"{Path(data_dir).resolve().name}.h5"


def _load(root: Path, todo: _Todo, image_size: int):
    """Read and decode one file in a worker thread: ("ok", sha, pixels), ("same", sha, None)
    when the content is unchanged, or ("rejected", reason, None)."""
    try:
        data, sha = images.read_file(root / todo.path)
    except OSError as e:
        return "rejected", f"unreadable: {e.strerror or e}", None
    if todo.old_sha is not None and sha == todo.old_sha:
        return "same", sha, None
    try:
        return "ok", sha, images.decode_image(data, image_size)
    except Exception as e:  # any decoder failure skips the file, with its reason
        return "rejected", str(e) or type(e).__name__, None


def _open_existing(cache_path: Path, fp: dict, overwrite: bool) -> store.Cache | None:
    if not cache_path.exists():
        return None
    old = store.read_cache(cache_path)  # refuses files that are not featx caches
    try:
        backbone.check_compatible(
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


def make_engine(name: str, weights: str, image_size: int, alpha: float, *, onnx_dir=None, log=None):
    """The engine that runs the backbone; its `.name` is the engine actually used.

    name: "keras", "onnx" (ONNX Runtime; its exported .onnx file lives in `onnx_dir`) or "auto"
    (onnx when onnxruntime is installed, Keras sees no GPU and the backend can export ONNX, else
    keras; see onnx_engine.choose_engine). Building is lazy:
    the model is loaded on the first batch.
    """
    from featx import onnx_engine

    if onnx_engine.choose_engine(name, log) == "onnx":
        engine = onnx_engine.OnnxEngine(weights, image_size, alpha, onnx_dir=onnx_dir, log=log)
        problem = None if name == "onnx" else engine.cannot_export_here()
        if problem is None:
            return engine
        if log is not None:  # auto must never fail where keras would work
            log(f"note: using the Keras engine; {problem}.")
    return backbone.KerasEngine(weights, image_size, alpha)


def _int8_engine(
    engine,
    weights,
    image_size,
    alpha,
    cache_path,
    overwrite,
    onnx_dir,
    root,
    listing,
    batch_size,
    val_split,
    seed,
    log,
):
    """The INT8 engine and fingerprint: an int8 cache keeps its quantized file; a new one gets
    one calibrated on its training images."""
    from featx import int8, onnx_engine

    if engine == "keras":
        raise FeatxError(
            "--precision int8 runs on ONNX Runtime; pass --engine onnx (or auto), or drop "
            "--precision int8 to use Keras."
        )
    onnx_engine.import_onnxruntime()  # a clear error when it is missing
    wanted = backbone.fingerprint(weights, image_size, alpha, engine="onnx", precision="int8")
    recorded = None
    if cache_path.exists() and not overwrite:
        recorded = store.read_fingerprint(cache_path)
        backbone.check_compatible(
            recorded,
            {**wanted, "int8_sha256": recorded.get("int8_sha256")},
            f"The cache '{cache_path}'",
            "Pass --overwrite to rebuild it, or --cache NEW.h5 to keep both.",
        )
    runner, sha = int8.engine(
        {**wanted, "int8_sha256": recorded and recorded.get("int8_sha256")},
        [onnx_dir],
        root=root,
        listing=listing,
        batch_size=batch_size,
        val_split=val_split,
        seed=seed,
        log=log,
    )
    return runner, {**wanted, "int8_sha256": sha}


def extract(
    data_dir: str | Path,
    cache_path: str | Path | None = None,
    *,
    weights: str = config.WEIGHTS,
    image_size: int = config.IMAGE_SIZE,
    alpha: float = config.ALPHA,
    batch_size: int = config.BATCH_SIZE,
    dtype: str | None = None,
    val_split: float = config.VAL_SPLIT,
    seed: int = config.SEED,
    overwrite: bool = False,
    engine: str = "keras",
    precision: str = "fp32",
    flip: bool | None = None,
    progress=None,
    log=None,
) -> dict:
    """Extract features of every image in `data_dir` into the HDF5 cache at `cache_path`.

    Args:
        data_dir: DATA/CLASS/* or DATA/{train,validation|val,test}/CLASS/*.
        cache_path: the HDF5 file; default `cache/<data_dir name>.h5`.
        weights: "imagenet", "none" (random, seeded) or a MobileNetV2 no-top .h5 file.
        dtype: "float32" or "float16"; None keeps the cache's dtype (float32 for a new cache).
        val_split, seed: the stratified split of a folder without split folders.
        overwrite: replace a cache made with another backbone instead of refusing.
        engine: "keras", "onnx" or "auto" (see `make_engine`); features of both engines mix.
        precision: "fp32", or "int8" for a quantized ONNX Runtime backbone (see featx.int8); its
            features do not mix with fp32 ones.
        flip: also store the features of every image mirrored left-right (/features_flip, about
            2x the model time); None keeps what the cache has (config.FLIP for a new cache).
        progress: called as progress(done, total, images_per_second) after each batch.
        log: called with one-line messages (warnings, notes); default: silent.
    Returns:
        A summary dict (counts per split and class, work done, rejected files, timings).
    """
    t0 = time.perf_counter()
    log = log or (lambda message: None)
    if batch_size < 1:
        raise FeatxError(f"batch_size must be >= 1, got {batch_size}.")
    if dtype not in (None, "float32", "float16"):
        raise FeatxError(f"dtype must be float32 or float16, got {dtype!r}.")
    root = Path(data_dir)
    listing = images.find_images(root)
    for c in listing.empty_classes:
        log(f"warning: class folder '{c}' has no files; it is left out.")
    cache_path = Path(cache_path) if cache_path else default_cache_path(root)
    onnx_dir = Path(config.ONNX_DIR or cache_path.parent)
    if precision not in config.PRECISIONS:
        raise FeatxError(f"precision must be one of {config.PRECISIONS}, got {precision!r}.")
    if precision == "fp32":
        runner = make_engine(engine, weights, image_size, alpha, onnx_dir=onnx_dir, log=log)
        fp = backbone.fingerprint(weights, image_size, alpha, engine=runner.name)
    else:
        runner, fp = _int8_engine(
            engine,
            weights,
            image_size,
            alpha,
            cache_path,
            overwrite,
            onnx_dir,
            root,
            listing,
            batch_size,
            val_split,
            seed,
            log,
        )
    old = _open_existing(cache_path, fp, overwrite)
    if flip is None:
        flip = config.FLIP if old is None else old.features_flip is not None
    if flip:
        runner = _WithMirror(runner)
    reusable = old is not None and _stack_mirror(old, flip, log)
    if old is not None and old.attrs.get("data_dir") not in (None, str(root.resolve())):
        log(f"note: the cache was made from {old.attrs['data_dir']}; matching files by path.")
    dtype = dtype or (str(old.features.dtype) if old is not None else config.FEATURE_DTYPE)

    # What is cached already: rows and rejected files, by path.
    cached = {p: i for i, p in enumerate(old.paths)} if reusable else {}
    cached_rej = {} if old is None else {p: i for i, p in enumerate(old.rejected.paths)}
    model_keys = {**{k: fp[k] for k in backbone.MODEL_KEYS}, "flip": bool(flip)}
    journal = store.Journal(
        cache_path, hashlib.sha256(json.dumps(model_keys, sort_keys=True).encode()).hexdigest()
    )
    journalled, journalled_rej = journal.load()

    # Final state, filled below: path -> (size, mtime, sha, feature) / (size, mtime, reason).
    rows: dict[str, tuple] = {}
    rejected: dict[str, tuple] = {}
    todo: list[_Todo] = []
    kept = resumed = 0
    for f in listing.files:
        try:
            st = os.stat(root / f.path)
        except OSError:
            continue  # vanished since listing
        key = (st.st_size, st.st_mtime_ns)
        i, r = cached.get(f.path), cached_rej.get(f.path)
        if i is not None and key == (old.rows.file_size[i], old.rows.file_mtime_ns[i]):
            rows[f.path] = (*key, old.rows.file_sha256[i], old.features[i])
            kept += 1
        elif r is not None and key == (old.rejected.file_size[r], old.rejected.file_mtime_ns[r]):
            rejected[f.path] = (*key, old.rejected_reasons[r])
            kept += 1
        elif f.path in journalled and journalled[f.path][:2] == key:
            rows[f.path] = journalled[f.path]
            resumed += 1
        elif f.path in journalled_rej and journalled_rej[f.path][:2] == key:
            rejected[f.path] = journalled_rej[f.path]
            resumed += 1
        else:
            todo.append(
                _Todo(
                    f.path,
                    *key,
                    old.rows.file_sha256[i] if i is not None else None,
                    old.features[i] if i is not None else None,
                )
            )
    present = {f.path for f in listing.files}
    dropped = 0 if old is None else sum(p not in present for p in old.paths)

    if old is None and not cache_path.exists():
        # A valid (empty) cache from the start: a run killed at any point leaves one to open.
        _write(cache_path, listing, root, fp, {}, {}, {}, dtype, val_split, seed, None, flip)

    extracted = 0
    timing = {"model_seconds": 0.0, "model_load_seconds": None, "steady_images_per_second": None}
    if todo:
        journal.start()
        extracted, timing = _run_pipeline(
            root,
            todo,
            runner,
            image_size,
            batch_size,
            journal,
            rows,
            rejected,
            progress,
            log,
        )

    changed = todo or resumed or dropped or old is None or str(old.features.dtype) != dtype
    changed = changed or len(old.rejected.paths) != len(rejected)
    changed = changed or (old.features_flip is not None) != flip
    splits = images.assign_splits(
        [f for f in listing.files if f.path in rows],
        {} if old is None else dict(zip(old.paths, old.splits)),
        val_split,
        seed,
    )
    if changed:
        _write(
            cache_path, listing, root, fp, rows, rejected, splits, dtype, val_split, seed, old, flip
        )
    journal.clear()

    seconds = time.perf_counter() - t0
    counts = _counts(listing, rows, splits)
    return {
        "cache": str(cache_path),
        "data_dir": str(root),
        "layout": listing.layout,
        "class_names": [c for c in listing.class_names if any(counts[s].get(c) for s in counts)],
        "counts": counts,
        "images": len(rows),
        "extracted": extracted,
        "kept": kept,
        "resumed": resumed,
        "dropped": dropped,
        "rejected": [{"path": p, "reason": r[2]} for p, r in sorted(rejected.items())],
        "empty_classes": listing.empty_classes,
        "seconds": round(seconds, 3),
        "images_per_second": round(extracted / seconds, 2) if extracted else 0.0,
        **timing,
        "engine": runner.name,
        "precision": precision,
        "flip": bool(flip),
        "batch_size": batch_size,
    }


class _WithMirror:
    """`--flip`: an engine whose features are [features | features of the mirrored images];
    extract carries them as one row through the journal, _write splits them again."""

    def __init__(self, engine):
        self.engine, self.name = engine, engine.name

    def features(self, batch: np.ndarray) -> np.ndarray:
        mirrored = np.ascontiguousarray(batch[:, :, ::-1])  # NHWC: reverse the width
        return np.hstack([self.engine.features(batch), self.engine.features(mirrored)])


def _stack_mirror(old: store.Cache, flip: bool, log) -> bool:
    """Give the old cache's rows the shape of this run's (with --flip: [features | mirrored]);
    False when they cannot be reused (--flip on a cache without mirrored features)."""
    if flip and old.features_flip is None:
        if len(old.paths):
            log("note: the cache has no features of mirror images; extracting every image again.")
        return False
    if flip:
        old.features = np.hstack([old.features, old.features_flip])
    return True


def _run_pipeline(
    root, todo, engine, image_size, batch_size, journal, rows, rejected, progress, log
) -> tuple[int, dict]:
    """Decode ahead in threads, run the model batch by batch, journal each finished batch.

    Returns the images extracted and the timing: model_seconds (inside the engine),
    model_load_seconds (the first batch's call, which imports and builds the model) and
    steady_images_per_second (after that first batch: the rate a longer run tends to)."""
    chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    t0 = time.perf_counter()
    done = extracted = 0
    model_seconds = 0.0
    first_call = first_done = None  # seconds of the first model call; when it returned
    after_first = 0  # images extracted after the first model call
    pending: deque = deque()
    with ThreadPoolExecutor(config.DECODE_THREADS, thread_name_prefix="featx-decode") as pool:

        def submit(chunk):
            pending.append((chunk, [pool.submit(_load, root, t, image_size) for t in chunk]))

        try:
            for chunk in chunks[: config.PREFETCH_BATCHES]:
                submit(chunk)
            for index in range(len(chunks)):
                chunk, futures = pending.popleft()
                if index + config.PREFETCH_BATCHES < len(chunks):
                    submit(chunks[index + config.PREFETCH_BATCHES])
                results = [fut.result() for fut in futures]
                ok = [(t, r) for t, r in zip(chunk, results) if r[0] == "ok"]
                feats = None
                if ok:
                    batch = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
                    for j, (_, r) in enumerate(ok):
                        batch[j] = r[2]
                    t_model = time.perf_counter()
                    feats = engine.features(batch)[: len(ok)]  # fixed shape: one compile
                    model_seconds += time.perf_counter() - t_model
                    extracted += len(ok)
                    if first_call is None:
                        first_call, first_done = time.perf_counter() - t_model, time.perf_counter()
                    else:
                        after_first += len(ok)
                part_rows, part_feats, part_rej, reasons = store.Rows(), [], store.Rows(), []
                k = 0
                for t, (status, value, _) in zip(chunk, results):
                    if status == "rejected":
                        rejected[t.path] = (t.size, t.mtime_ns, value)
                        _append(part_rej, t, "")
                        reasons.append(value)
                        continue
                    feature = t.old_feature if status == "same" else feats[k]
                    k += status == "ok"
                    rows[t.path] = (t.size, t.mtime_ns, value, feature)
                    _append(part_rows, t, value)
                    part_feats.append(np.asarray(feature, np.float32))
                dim = part_feats[0].shape[0] if part_feats else 0
                journal.write(
                    index,
                    part_rows,
                    np.stack(part_feats) if part_feats else np.zeros((0, dim), np.float32),
                    part_rej,
                    reasons,
                )
                done += len(chunk)
                if progress is not None:
                    progress(done, len(todo), done / max(time.perf_counter() - t0, 1e-9))
        except KeyboardInterrupt:
            for _, futures in pending:
                for fut in futures:
                    fut.cancel()
            log(f"interrupted: {done} of {len(todo)} images are saved; run again to resume.")
            raise
    steady = None
    if after_first and first_done is not None:
        steady = round(after_first / (time.perf_counter() - first_done), 2)
    return extracted, {
        "model_seconds": round(model_seconds, 3),
        "model_load_seconds": None if first_call is None else round(first_call, 3),
        "steady_images_per_second": steady,
    }


def _append(r: store.Rows, t: _Todo, sha: str) -> None:
    r.paths.append(t.path)
    r.file_size = np.append(r.file_size, t.size)
    r.file_mtime_ns = np.append(r.file_mtime_ns, t.mtime_ns)
    r.file_sha256.append(sha)


def _counts(listing, rows, splits) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for f in listing.files:
        if f.path in rows:
            per = counts.setdefault(splits[f.path], dict.fromkeys(listing.class_names, 0))
            per[f.class_name] += 1
    return {s: counts[s] for s in config.SPLITS if s in counts}


def _write(
    cache_path, listing, root, fp, rows, rejected, splits, dtype, val_split, seed, old, flip=False
):
    """Assemble the final state (rows sorted by path) and replace the cache atomically; with
    flip, each row's feature is [features | mirrored], stored as /features and /features_flip."""
    files = [f for f in listing.files if f.path in rows]  # listing is sorted by path
    class_names = sorted({f.class_name for f in files}) or listing.class_names
    index = {c: i for i, c in enumerate(class_names)}
    dim = len(rows[files[0].path][3]) if files else 0
    features = np.zeros((len(files), dim), dtype=dtype)
    for i, f in enumerate(files):
        features[i] = rows[f.path][3]
    rej_paths = sorted(rejected)
    attrs = {
        "data_dir": str(root.resolve()),
        "layout": listing.layout,
        "val_split": float(val_split),
        "seed": int(seed),
    }
    if old is not None and "created" in old.attrs:
        attrs["created"] = old.attrs["created"]
    store.write_cache(
        cache_path,
        store.Cache(
            fingerprint=fp,
            class_names=class_names,
            features=features[:, : dim // 2] if flip and dim else features,
            labels=np.array([index[f.class_name] for f in files], np.int32),
            splits=np.array([splits[f.path] for f in files], dtype=object),
            rows=store.Rows(
                [f.path for f in files],
                np.array([rows[f.path][0] for f in files], np.int64),
                np.array([rows[f.path][1] for f in files], np.int64),
                [rows[f.path][2] for f in files],
            ),
            rejected=store.Rows(
                rej_paths,
                np.array([rejected[p][0] for p in rej_paths], np.int64),
                np.array([rejected[p][1] for p in rej_paths], np.int64),
                ["" for _ in rej_paths],
            ),
            rejected_reasons=[rejected[p][2] for p in rej_paths],
            attrs=attrs,
            features_flip=features[:, dim // 2 :] if flip and dim else None,
        ),
    )
