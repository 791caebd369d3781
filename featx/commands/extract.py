"""Stage 1: images -> frozen MobileNetV2 -> HDF5 feature cache, incremental and resumable.

A run holds the cache's writer lock and goes through four phases:
  _resolve  the options against the existing cache (its dtype, split and seed are kept);
  _plan     pure: which files are kept from the cache, resumed from the journal, or to extract;
  _run      decode ahead (threads or processes: images.decoding), run the model batch by batch,
            journal the finished batches (at most every JOURNAL_SECONDS) and gather them into
            part files (featx.cache.stream) as it goes, the writing done in a background thread;
  _write    name every row's part in a new main file, replaced atomically.
Features already on disk are referred to, never loaded: memory is bounded by the batches in
flight and two parts (one being written), not by the number of images. On a CPU the model, not
Pillow, sets the pace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx import config
from featx.backbone import engines, mobilenet
from featx.cache import parts, ray_executor, remote_cache, store, stream
from featx.errors import FeatxError, Messages
from featx.files import absolute, is_url
from featx.images import decoding, finder, shards
from featx.options import ExtractOptions, build_options, takes_options
from featx.quality import duplicates
from featx.reports.display import Result
from featx.reports.progress import reporter


@dataclass(slots=True)  # one per image to extract: no __dict__ each
class _Todo:
    path: str
    size: int
    mtime_ns: int
    old_sha: str | None  # content hash of the cached version, if any
    old_ref: tuple | None  # where its features are: (source, row)


@dataclass
class _Plan:
    """The final state as far as it is known without the model, and the work left."""

    # path -> (size, mtime, sha, ref): ref is (source, row) once on disk, else the feature
    rows: dict[str, tuple] = field(default_factory=dict)
    rejected: dict[str, tuple] = field(default_factory=dict)  # path -> (size, mtime, reason)
    todo: list[_Todo] = field(default_factory=list)
    # ctime_ns and inode of each listed file (listing.files' order; 0 for a vanished one), as
    # when planned: two int64 columns, not a tuple per image kept until the main file is written
    ctime_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    inode: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    kept: int = 0  # images whose features were reused (their content unchanged)
    resumed: int = 0
    extracted: int = 0  # images that went through the model
    dropped: int = 0


@dataclass
class _Job:
    root: Path | str  # a folder, or a URL (images.remote)
    opts: ExtractOptions
    fingerprint: dict
    runner: object
    journal: parts.Journal
    created: str | None = None  # the existing cache's creation time, kept by every rewrite
    writer: stream.Writer | None = None  # made with the plan, whose rows it fills
    committed: list = field(default_factory=list)  # the parts the existing cache names
    pulled: list = field(default_factory=list)  # parts copied from the --parts URL


def default_cache_path(data_dir: str | Path) -> Path:
    if is_url(data_dir):  # s3://bucket/photos -> cache/photos.h5
        return Path(config.CACHE_DIR) / f"{str(data_dir).rstrip('/').rsplit('/', 1)[-1]}.h5"
    return Path(config.CACHE_DIR) / f"{Path(data_dir).resolve().name}.h5"


def is_transient(reason: str) -> bool:
    """Rejections that may go away without the file changing (permissions, I/O errors): they
    are tried again on every run instead of being remembered."""
    return reason.startswith("unreadable")


@takes_options(ExtractOptions)
def extract(
    data_dir: str | Path,
    cache_path: str | Path | None = None,
    *,
    progress=True,
    log=None,
    **options,
) -> dict:
    """Extract features of every image in `data_dir` into the HDF5 cache at `cache_path`.

    Args:
        data_dir: DATA/CLASS/* or DATA/{train,validation|val,test}/CLASS/*.
        cache_path: the HDF5 file; default `cache/<data_dir name>.h5`.
        weights: "imagenet", "none" (random, seeded) or a MobileNetV2 no-top .h5 file.
        dtype: "float32" or "float16"; None keeps the cache's dtype (float32 for a new cache).
        val_split, seed: the stratified split of a folder without split folders; None keeps the
            cache's (config.VAL_SPLIT and config.SEED for a new cache). Asking for another split
            of an existing cache is refused unless `overwrite`.
        overwrite: rebuild the cache: a new split, every rejected file tried again, another
            backbone allowed, a damaged cache replaced. Features of unchanged files are reused
            when the backbone is the same.
        engine: "keras", "onnx" or "auto" (default: config.ENGINE; see engines.make_engine).
        precision: "fp32", or "int8" for a quantized ONNX Runtime backbone (see backbone.int8); its
            features do not mix with fp32 ones.
        flip: also store the features of every image mirrored left-right (/features_flip, about
            2x the model time); None keeps what the cache has (config.FLIP for a new cache).
        batch_size: images per model call; None: config.GPU_BATCH_SIZE when Keras runs the
            backbone on a GPU, else config.BATCH_SIZE.
        workers: decoding workers (None: one per core); with executor="ray", Ray actors.
        decode_in: "threads", "processes" or "auto" (featx.images.decoding.choose). Processes import
            a calling script again: call featx under `if __name__ == "__main__":` there.
        shard: "K/N": extract only the images of shard K of N (featx.images.shards), for N runs in
            parallel whose caches `featx merge` joins into the cache a single run writes.
        executor: "local", or "ray": the images to extract run on Ray Data (cache.ray_executor),
            whose actors write the cache's parts; the cache and its resume are a local run's.
        ray_address, gpus_per_worker: the Ray cluster ("auto", "ray://host:10001"; None: a
            local Ray) and the GPUs reserved per actor (0: CPU only; 0.5: two per GPU).
        progress: True: a progress bar (tqdm: a widget in Jupyter); False: none; a function:
            called as progress(done, total, images_per_second) after each batch.
        log: called with one-line messages (warnings, notes); default: logging.getLogger(
            "featx"), and warnings as featx.FeatxWarning (also listed in the result).
    Returns:
        A summary dict (counts per split and class, work done, rejected files, timings).
    """
    t0 = time.perf_counter()
    log = Messages(log)
    opts = build_options(ExtractOptions, options)  # every option checked, before any work
    _start(opts)
    root = str(data_dir).rstrip("/") if is_url(data_dir) else Path(data_dir)
    listing = shards.restrict(finder.find_images(root), opts.shard_numbers)
    cache_path, cache_url, opts = _cache_place(cache_path, root, opts)
    for c in listing.empty_classes:
        log(f"warning: class folder '{c}' has no files; it is left out.")
    for names in finder.look_alike_classes(listing.class_names):
        log(finder.look_alike_warning(names))
    store.check_not_foreign(cache_path)  # before its lock is made beside it
    with store.writer_lock(cache_path), contextlib.closing(reporter(progress, "extracting")) as bar:
        job, plan, splits, timing = _locked(root, cache_path, listing, opts, bar, log)
        if cache_url:
            remote_cache.push(cache_url, cache_path)
        elif opts.parts:  # copied into the cache's own folder: the URL was only the way there
            remote_cache.drop_parts(opts.parts, job.pulled)
    summary = _summary(job, cache_url or cache_path, listing, plan, splits)
    _warn_empty_splits(summary["counts"], log)
    if summary["rejected"]:
        n = len(summary["rejected"])
        first = summary["rejected"][0]
        log.warning(
            f"{n} file{'s' if n > 1 else ''} could not be used (e.g. {first['path']}: "
            f"{first['reason']}); see the summary's 'rejected' list",
            summary_shows=True,
        )
    summary["warnings"] = log.warnings
    seconds = time.perf_counter() - t0
    extracted = summary["extracted"]
    summary["seconds"] = round(seconds, 3)
    # Preparing the fast engine (once per backbone and user) is its own step, not the rate.
    working = seconds - (timing.get("prepare_seconds") or 0.0)
    summary["images_per_second"] = round(extracted / working, 2) if extracted else 0.0
    return Result({**summary, **timing}, "extract")


def _cache_place(cache_path, root, opts: ExtractOptions):
    """(local cache path, the cache's URL or None, opts). A cache at a URL: this run works on its
    local copy (cache.remote_cache), and Ray's actors write their parts beside it at the URL."""
    cache_url = str(cache_path).rstrip("/") if cache_path and is_url(cache_path) else None
    if cache_url:
        cache_path = remote_cache.local_copy(cache_url, missing_ok=True)
        if opts.executor == "ray" and opts.parts is None:
            opts = dataclasses.replace(opts, parts=remote_cache.parts_url(cache_url))
    local = Path(cache_path) if cache_path else default_cache_path(root)
    return store.real_path(local), cache_url, opts  # a link to a cache: resolved once


def _start(opts: ExtractOptions) -> None:
    """Before any work: Ray must be installed (one line, the cache untouched); decoding processes
    that may be used have their forkserver started, importing Pillow while the folder is listed."""
    if opts.executor == "ray":
        ray_executor.check_installed()
        return
    auto = opts.decode_in == "auto" and (opts.workers or config.decode_workers()) >= 2
    if opts.decode_in == "processes" or (auto and engines.gpu_expected(opts)):
        decoding.warm_up()


def _locked(root: Path, cache_path: Path, listing, opts: ExtractOptions, progress, log):
    """The run itself, under the cache's writer lock: (job, plan, splits, timing)."""
    store.remove_stale_temporaries(cache_path)
    previous = store.read_previous(cache_path, opts.overwrite)
    opts = _resolve(opts, previous, listing, cache_path, log)
    opts = dataclasses.replace(opts, batch_size=engines.batch_size(opts))
    if opts.executor == "ray" and opts.gpus_per_worker and opts.engine == "auto":
        opts = dataclasses.replace(opts, engine="keras")  # the GPU actors', not this CPU's choice
    runner, fp = engines.for_extract(opts, previous, cache_path, listing, root, log)
    old = store.compatible_or_none(previous, fp, cache_path, opts.overwrite)
    flip = opts.flip if opts.flip is not None else config.FLIP if old is None else old.flip
    opts = dataclasses.replace(opts, flip=flip)
    if flip:
        runner = engines.WithMirror(runner)
    if old is not None and flip and not old.flip:
        if len(old.paths):
            log("note: the cache has no features of mirror images; extracting every image again.")
        old = None  # --flip on a cache without mirrored features: every image again
    if old is not None and old.attrs.get("data_dir") not in (None, absolute(root)):
        log(f"note: the cache was made from {old.attrs['data_dir']}; matching files by path.")
    key = mobilenet.model_key({**fp, "flip": flip}, (*mobilenet.MODEL_KEYS, "flip"))
    journal = store.Journal(cache_path, key, mobilenet.feature_dim(opts.alpha) * (1 + flip))
    created = previous.attrs.get("created") if previous is not None else None
    job = _Job(root, opts, fp, runner, journal, created)
    committed = job.committed = previous.sources.names if previous is not None else []
    if opts.parts:  # what Ray's actors wrote there before (a run killed mid-way) is resumed
        job.pulled += remote_cache.pull_parts(opts.parts, journal)
    plan = _plan(
        listing, _stat_all(root, listing), old, journal.load(committed), not opts.overwrite
    )
    job.writer = stream.Writer(journal, opts.dtype, flip, plan.rows)
    if not cache_path.exists():  # a valid (empty) cache at once: a killed run leaves one
        _write(cache_path, job, listing, _Plan(), {})
    timing = {"model_seconds": 0.0, "model_load_seconds": None, "steady_images_per_second": None,
              "decoded_in": None, "prepare_seconds": 0.0}  # fmt: skip
    if plan.todo or journal.batches:
        journal.start()
        job.writer.resume({p: r for p, r in plan.rows.items() if isinstance(r[3], np.ndarray)})
    if plan.todo:
        timing = (_run_ray if opts.executor == "ray" else _run)(job, plan, progress, log)
    job.writer.flush()
    # Recorded splits never change without --overwrite, even when every image is extracted
    # again (--flip on a cache without mirror images sets `old` aside, not its splits).
    recorded = (
        {} if previous is None or opts.overwrite else dict(zip(previous.paths, previous.splits))
    )
    # The other shards' images count too: a flat folder is split as a single run splits it.
    kept_files = [f for f in listing.files if f.path in plan.rows] + listing.others
    groups = _copy_groups(cache_path, job, listing, plan, (recorded, old), log)
    splits = finder.assign_splits(kept_files, recorded, opts.val_split, opts.seed, groups)
    keep = committed
    if _changed(plan, old, opts):
        keep = _write(cache_path, job, listing, plan, splits, old)
    journal.clear(keep=keep)
    return job, plan, splits, timing


def _copy_groups(cache_path: Path, job: _Job, listing, plan: _Plan, previous: tuple, log) -> list:
    """[[path, ...]]: the groups of copies the split keeps on one side (duplicates.split_groups:
    the audit's duplicate groups, up to config.SPLIT_GROUP_MAX_IMAGES images) among the images
    with features; [] when every image has its split already. The features are read from the
    parts in tiles, so memory stays flat. `previous`: (the recorded splits, the old cache or
    None). Under --shard, the groups are this shard's only: `featx merge` splits again over
    every image."""
    recorded, old = previous
    files = [f for f in listing.files if f.path in plan.rows]
    if not finder.unassigned(files, recorded):
        return []
    paths = [f.path for f in files]
    _, _, shas, refs = zip(*map(plan.rows.__getitem__, paths))
    dim = mobilenet.feature_dim(job.opts.alpha)
    src, _ = stream.sources_of(
        cache_path, list(refs), job.writer.parts, old, dim=dim, dtype="float32", flip=False
    )
    index = {c: i for i, c in enumerate(listing.class_names)}
    n = len(paths)
    cache = store.Cache(
        fingerprint=job.fingerprint,
        class_names=listing.class_names,
        features=None,
        labels=np.array([index[f.class_name] for f in files], np.int32),
        splits=np.array([f.split or "" for f in files], dtype=object),
        rows=store.Rows(paths, np.zeros(n, np.int64), np.zeros(n, np.int64), list(shas)),
        sources=src,
    )
    return duplicates.split_groups(cache, log)


# --- phase 1: the options against the existing cache ---------------------------------------------


def _resolve(opts: ExtractOptions, old, listing, cache_path: Path, log) -> ExtractOptions:
    """Fill dtype, val_split and seed from the existing cache (or the defaults); refuse a
    different split of an existing cache unless --overwrite."""
    recorded = {} if old is None or opts.overwrite else old.attrs
    if old is not None and not opts.overwrite and old.attrs.get("shard") != opts.shard:
        had = old.attrs.get("shard")
        raise FeatxError(
            f"The cache '{cache_path}' holds "
            + (f"shard {had}" if had else "every image")
            + "; this run asks for "
            + (f"shard {opts.shard}" if opts.shard else "every image")
            + ". Pass --cache OTHER.h5 for another shard (or `featx merge` to join shards)."
        )
    assigns = listing.layout == "flat" or not any(f.split == "validation" for f in listing.files)
    values = {}
    for name, default in (("val_split", config.VAL_SPLIT), ("seed", config.SEED)):
        asked, had = getattr(opts, name), recorded.get(name)
        option = "--" + name.replace("_", "-")
        if asked is not None and had is not None and asked != had and assigns:
            raise FeatxError(
                f"The cache '{cache_path}' was split with {option} {had}; this run asks for "
                f"{asked}. Pass --overwrite to re-split it (unchanged files are not extracted "
                f"again), or drop {option} to keep its split."
            )
        if asked is not None and not assigns:
            log(f"note: {option} has no effect: the data folder has its own validation/ split.")
        values[name] = asked if asked is not None else had if had is not None else default
    dtype = opts.dtype or (old.feature_dtype if old is not None else config.FEATURE_DTYPE)
    return dataclasses.replace(opts, dtype=dtype, **values)


# --- phase 2: the plan (pure) --------------------------------------------------------------------


_INT64 = (-(2**63), 2**63 - 1)


def _ns(t: int) -> int:
    """A file time in ns as the cache's int64 stores it: a time after 2262-04-11 (or before
    1677) is clamped, not an OverflowError on every run."""
    return min(max(t, _INT64[0]), _INT64[1])


def _stat_all(root: Path | str, listing) -> dict[str, tuple[int, int, int, int]]:
    """{path: (size, mtime_ns, ctime_ns, inode)} of the listed files; a file gone since the
    listing is left out. Objects in a bucket: (size, stamp, 0, 0) as the listing read them
    (images.remote.stamp; an object has no ctime or inode, its stamp changes with its content)."""
    if listing.stats is not None:
        return {
            f.path: (*listing.stats[f.path], 0, 0) for f in listing.files if f.path in listing.stats
        }
    stats, base = {}, str(root)
    for f in listing.files:
        try:
            st = os.stat(os.path.join(base, f.path))
        except OSError:
            continue
        stats[f.path] = (st.st_size, _ns(st.st_mtime_ns), _ns(st.st_ctime_ns), st.st_ino)
    return stats


def _plan(listing, stats: dict, old, journalled: tuple, keep_rejected: bool = True) -> _Plan:
    """Which files are kept from the cache (same size, mtime, ctime and inode), resumed from the
    journal of an interrupted run, or still to extract. Pure: no file is opened, no model is built.
    A file whose size and mtime are the same but not its ctime or inode (copied, then `touch -r`;
    `exiftool -P`) is hashed again: its features are kept if its content is (see _record).

    Args:
        listing: finder.find_images' result; its `skipped` entries become rejected rows.
        stats: {path: (size, mtime_ns, ctime_ns, inode)} of the files as they are now.
        old: the existing cache whose features may be reused, or None.
        journalled: Journal.load()'s ({path: row}, {path: rejected row}).
        keep_rejected: remember the cache's rejections (False with --overwrite).
    """
    done, done_rej = journalled
    n, gone = len(listing.files), (0, 0, 0, 0)
    plan = _Plan(
        ctime_ns=np.fromiter((stats.get(f.path, gone)[2] for f in listing.files), np.int64, n),
        inode=np.fromiter((stats.get(f.path, gone)[3] for f in listing.files), np.uint64, n),
    )
    for path, reason in listing.skipped:
        plan.rejected[path] = (0, 0, reason)
    cached = {} if old is None else {p: i for i, p in enumerate(old.paths)}
    refs = [] if old is None else stream.old_refs(old)
    cached_rej = {} if old is None or not keep_rejected else old.rejected.paths
    cached_rej = {p: i for i, p in enumerate(cached_rej)}
    same_file = _same_file(old)
    for f in listing.files:
        st = stats.get(f.path)
        if st is None:
            continue  # vanished since listing
        key = st[:2]
        i, r = cached.get(f.path), cached_rej.get(f.path)
        if (
            i is not None
            and key == (old.rows.file_size[i], old.rows.file_mtime_ns[i])
            and (same_file(i, st))
        ):
            plan.rows[f.path] = (*key, old.rows.file_sha256[i], refs[i])
            plan.kept += 1
        elif r is not None and _same_rejection(old, r, key):
            plan.rejected[f.path] = (*key, old.rejected_reasons[r])
            plan.kept += 1
        elif f.path in done and done[f.path][:2] == key:
            plan.rows[f.path] = done[f.path]
            plan.resumed += 1
        elif f.path in done_rej and done_rej[f.path][:2] == key:
            if is_transient(done_rej[f.path][2]):
                plan.todo.append(_Todo(f.path, *key, None, None))
                continue
            plan.rejected[f.path] = done_rej[f.path]
            plan.resumed += 1
        else:
            old_sha = old.rows.file_sha256[i] if i is not None else None
            plan.todo.append(_Todo(f.path, *key, old_sha, refs[i] if old_sha else None))
    present = {f.path for f in listing.files}
    plan.dropped = 0 if old is None else sum(p not in present for p in old.paths)
    return plan


def _same_file(old):
    """(row, stat) -> whether row `row` of `old` was made from this very file, as far as its
    ctime and inode say (always True for a cache made before they were recorded)."""
    if old is None or not old.rows.identified:
        return lambda i, st: True
    ctimes, inodes = old.rows.file_ctime_ns, old.rows.file_inode
    return lambda i, st: st[2] == ctimes[i] and st[3] == inodes[i]


def _same_rejection(old, r: int, key: tuple) -> bool:
    same_file = key == (old.rejected.file_size[r], old.rejected.file_mtime_ns[r])
    return same_file and not is_transient(old.rejected_reasons[r])


# --- phase 3: the model --------------------------------------------------------------------------


class _Timer:
    """model_seconds (inside the engine), model_load_seconds (the first call, which imports and
    builds the model) and steady_images_per_second (after it: the rate a long run tends to)."""

    def __init__(self):
        self.model_seconds, self.first_call, self.first_done, self.after_first = 0.0, None, None, 0

    def add(self, seconds: float, images_done: int) -> None:
        self.model_seconds += seconds
        if self.first_call is None:
            self.first_call, self.first_done = seconds, time.perf_counter()
        else:
            self.after_first += images_done

    def summary(self) -> dict:
        steady = None
        if self.after_first and self.first_done is not None:
            steady = round(self.after_first / (time.perf_counter() - self.first_done), 2)
        return {
            "model_seconds": round(self.model_seconds, 3),
            "model_load_seconds": None if self.first_call is None else round(self.first_call, 3),
            "steady_images_per_second": steady,
        }


def _run(job: _Job, plan: _Plan, progress, log) -> dict:
    """Decode ahead (images.decoding), run the model batch by batch, journal the finished batches.
    Fills plan.rows and plan.rejected; returns the timing (see _Timer)."""
    size, batch_size = job.opts.image_size, job.opts.batch_size
    chunks = [plan.todo[i : i + batch_size] for i in range(0, len(plan.todo), batch_size)]
    prepared = engines.prepare(job.runner)  # before the first batch, with its own log line
    timer, done, t0 = _Timer(), 0, time.perf_counter()
    workers = job.opts.workers or config.decode_workers()
    on_gpu = engines.gpu_expected(job.opts)
    how = decoding.choose(job.opts.decode_in, workers, len(plan.todo), on_gpu)
    job.writer.start()
    items = ([(t.path, t.old_sha) for t in chunk] for chunk in chunks)  # what a worker needs
    batches = decoding.decode(
        items, str(job.root), size, workers=workers, processes=how == "processes"
    )  # str root: no Path per image
    try:
        for index, (_, results) in enumerate(batches):
            chunk = chunks[index]
            ok = [r[2] for r in results if r[0] == "ok"]
            feats = None
            if ok:
                t_model = time.perf_counter()
                feats = engines.run_padded(job.runner.features, ok, batch_size)
                timer.add(time.perf_counter() - t_model, len(ok))
            _record(job, index, chunk, results, feats, plan)
            done += len(chunk)
            if progress is not None:
                progress(done, len(plan.todo), done / max(time.perf_counter() - t0, 1e-9))
        job.writer.finish()  # the rows not journalled yet go into the last part, written next
    except KeyboardInterrupt:
        job.writer.save()  # the finished batches are kept
        log(f"interrupted: {done} of {len(plan.todo)} images are saved; run again to resume.")
        raise
    except Exception:
        with contextlib.suppress(OSError):  # a full disk: report the error that stopped the run
            job.writer.save()
        raise
    finally:
        batches.close()  # stops the decoding threads without waiting for them
        job.writer.close()  # a journal write is finished, never cut short
    return {**timer.summary(), "decoded_in": how, "prepare_seconds": round(prepared, 3)}


def _run_ray(job: _Job, plan: _Plan, progress, log) -> dict:
    """The model phase on Ray (featx.cache.ray_executor): its actors write part files into the
    journal folder, read back here as the parts of an interrupted run are. Every file to extract
    must come back, as features or a rejection: Ray's at-least-once delivery may write a block
    twice (the same part), never none."""
    opts, t0 = job.opts, time.perf_counter()
    ray_job = ray_executor.RayJob(
        root=absolute(job.root),
        spec=opts.spec,
        folder=opts.parts or job.journal.folder.resolve(),
        key=job.journal.key,
        run_id=parts.new_id(),
        batch_size=opts.batch_size,
        workers=opts.workers,
        gpus_per_worker=opts.gpus_per_worker,
        flip=bool(opts.flip),
        dtype=opts.dtype,
        engine=job.runner.name,
    )
    todo = [(t.path, t.size, t.mtime_ns) for t in plan.todo]
    try:
        ray_executor.run(todo, ray_job, ray_address=opts.ray_address, progress=progress, log=log)
    except KeyboardInterrupt:
        log("interrupted: the parts Ray wrote are kept; run again to resume.")
        raise
    if opts.parts:
        job.pulled += remote_cache.pull_parts(opts.parts, job.journal)
    # Only the parts Ray wrote: the committed ones and those this run resumed were read already
    # (and one holding an older version of a file to extract must not answer for it).
    done, rejected = job.journal.load([*job.committed, *job.journal.sizes])
    missing = []
    for t in plan.todo:
        key = (t.size, t.mtime_ns)
        if t.path in done and done[t.path][:2] == key:
            plan.rows[t.path] = done[t.path]
            plan.extracted += 1
        elif t.path in rejected and rejected[t.path][:2] == key:
            plan.rejected[t.path] = rejected[t.path]
        else:
            missing.append(t.path)
    if missing:
        raise FeatxError(
            f"Ray finished, but {len(missing)} images have no result (e.g. '{missing[0]}'); the "
            "cache was not changed. Run again: what Ray did write is kept."
        )
    if progress is not None:  # the last parts may have come after the watcher's last look
        progress(len(todo), len(todo), len(todo) / max(time.perf_counter() - t0, 1e-9))
    return {
        "model_seconds": None,
        "model_load_seconds": None,
        "steady_images_per_second": None,
        "decoded_in": "threads",
        "prepare_seconds": 0.0,
    }  # fmt: skip: Ray's actors decode in threads


def _record(job: _Job, index: int, chunk, results, feats, plan: _Plan) -> None:
    """One finished batch into the plan and the cache's writer (stream.Writer: the part being
    gathered, the journal). A row whose content did not change keeps its reference and is not
    journalled: a resumed run finds it unchanged again, without the model."""
    ok = [(t, r[1]) for t, r in zip(chunk, results) if r[0] == "ok"]
    rej, reasons = [], []
    if len(ok) < len(chunk):  # rejected or unchanged files (rare): one at a time
        for t, (status, value, _) in zip(chunk, results):
            if status == "rejected":
                plan.rejected[t.path] = (t.size, t.mtime_ns, value)
                rej.append((t, ""))
                reasons.append(value)
            elif status == "same":  # its content unchanged: its features are kept
                plan.rows[t.path] = (t.size, t.mtime_ns, value, t.old_ref)
                plan.kept += 1
    plan.extracted += len(ok)
    job.writer.add_batch(index, _rows(ok), feats, _rows(rej), reasons)


def _rows(todo_sha: list) -> store.Rows:
    """store.Rows of [(_Todo, sha256)]."""
    n = len(todo_sha)
    return store.Rows(
        [t.path for t, _ in todo_sha],
        np.fromiter((t.size for t, _ in todo_sha), np.int64, n),
        np.fromiter((t.mtime_ns for t, _ in todo_sha), np.int64, n),
        [sha for _, sha in todo_sha],
    )


# --- phase 4: the cache --------------------------------------------------------------------------


def _changed(plan: _Plan, old, opts: ExtractOptions) -> bool:
    if old is None or opts.overwrite or plan.todo or plan.resumed or plan.dropped:
        return True
    if old.flip != opts.flip or old.attrs.get("format_version") != store.FORMAT_VERSION:
        return True  # a format-1 cache is upgraded
    if not old.rows.identified:
        return True  # a cache made before ctime and inode were recorded gets them
    return old.feature_dtype != opts.dtype or len(old.rejected.paths) != len(plan.rejected)


def _write(cache_path: Path, job: _Job, listing, plan: _Plan, splits: dict, old=None):
    """Name every row's features (rows sorted by path) in a new main file, replaced atomically.
    Returns the part files it names."""
    rows, rejected = plan.rows, plan.rejected
    files = [f for f in listing.files if f.path in rows]  # listing is sorted by path
    paths = [f.path for f in files]
    # (size, mtime, sha, ref) columns in one pass (a lookup per row, not four)
    sizes, mtimes, shas, refs = zip(*map(rows.__getitem__, paths)) if files else ([],) * 4
    class_names = sorted({f.class_name for f in files}) or listing.class_names
    index = {c: i for i, c in enumerate(class_names)}
    ctimes, inodes = plan.ctime_ns[:0], plan.inode[:0]  # (an empty cache: no plan, no listing)
    if files:
        written = np.fromiter((f.path in rows for f in listing.files), bool, len(listing.files))
        ctimes, inodes = plan.ctime_ns[written], plan.inode[written]
    rej_paths = sorted(rejected)
    attrs = {
        "data_dir": absolute(job.root),
        "layout": listing.layout,
        "val_split": float(job.opts.val_split),
        "seed": int(job.opts.seed),
        "shard": job.opts.shard,
        "created": job.created,
    }
    meta = store.Cache(
        fingerprint=job.fingerprint,
        class_names=class_names,
        features=None,
        labels=np.array([index[f.class_name] for f in files], np.int32),
        splits=np.array(list(map(splits.__getitem__, paths)), dtype=object),
        rows=store.Rows(
            paths,
            np.array(sizes, np.int64),
            np.array(mtimes, np.int64),
            list(shas),
            ctimes,
            inodes,
        ),  # fmt: skip
        rejected=store.Rows(
            rej_paths,
            np.array([rejected[p][0] for p in rej_paths], np.int64),
            np.array([rejected[p][1] for p in rej_paths], np.int64),
            ["" for _ in rej_paths],
        ),
        rejected_reasons=[rejected[p][2] for p in rej_paths],
        attrs=attrs,
    )
    return stream.commit(
        cache_path, meta, list(refs), job.writer.parts, old,
        dim=mobilenet.feature_dim(job.opts.alpha), dtype=job.opts.dtype,
        flip=bool(job.opts.flip), compact=job.opts.overwrite and old is not None,
    )  # fmt: skip


def _counts(listing, rows, splits) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for f in listing.files:
        if f.path in rows:
            per = counts.setdefault(splits[f.path], dict.fromkeys(listing.class_names, 0))
            per[f.class_name] += 1
    return {s: counts[s] for s in config.SPLITS if s in counts}


def _summary(job: _Job, cache_path: Path | str, listing, plan: _Plan, splits: dict) -> dict:
    counts = _counts(listing, plan.rows, splits)
    return {
        "cache": str(cache_path),
        "data_dir": str(job.root),
        "layout": listing.layout,
        "class_names": [c for c in listing.class_names if any(counts[s].get(c) for s in counts)],
        "counts": counts,
        "images": len(plan.rows),
        "extracted": plan.extracted,
        "kept": plan.kept,
        "resumed": plan.resumed,
        "dropped": plan.dropped,
        "rejected": [{"path": p, "reason": r[2]} for p, r in sorted(plan.rejected.items())],
        "empty_classes": listing.empty_classes,
        "engine": job.runner.name,
        "precision": job.opts.precision,
        "flip": bool(job.opts.flip),
        "batch_size": job.opts.batch_size,
        "val_split": job.opts.val_split,
        "seed": job.opts.seed,
    }


def _warn_empty_splits(counts: dict, log) -> None:
    for split in ("train", "validation"):
        if split not in counts:
            log(
                f"warning: no image is in the {split} split; fit-head needs both train and "
                "validation. Re-run with --overwrite --val-split 0.2 (or add a validation/ folder)."
            )
