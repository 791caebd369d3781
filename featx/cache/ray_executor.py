"""Stage 1 on Ray (#15): `featx extract --executor ray`. The backbone runs in a fixed-size actor
pool, and every block of results becomes one of the cache's own part files.

    blocks of (path, size, mtime) ──from_items──▶ actors: read + decode + engine (built once each)
        ──rows: path, sha256, features | reason──▶ _PartSink ──▶ <cache>.parts/features-<id>.h5

Only paths travel into Ray: each actor reads and decodes its files with
`decoder.load_for_cache`, as the single-machine extract does (same pixels, same rejection reasons,
same sha256 content key; a missing or unreadable file is a rejected row, never a failed job), so
the object store holds paths and features, never pixels. A Ray Data Datasink writes each block as
a part file of the cache's journal folder (`parts.write_part`: checksummed, replaced atomically),
named from the run and the block's paths: a block Ray runs again (an actor died) replaces its own
part. extract then reads the parts back as it reads the parts of an interrupted run
(`parts.Journal.load`), so resuming after a driver killed mid-run is featx's own: the next run
finds the parts written so far and sends only the rest to Ray. Ray's checkpointing is not used.

Ray is optional (`pip install 'featx[ray]'`) and imported only inside `run`. On a cluster, every
node must reach the data folder and the parts' folder: a shared disk at the same paths, or URLs
(a data folder in a bucket, `extract --parts s3://...` or a cache at a URL: the actors read the
objects and PUT their parts there, and the driver copies the parts into the cache;
cache.remote_cache). Each node needs its own credentials for the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx import config
from featx.backbone import engines, mobilenet
from featx.cache import parts
from featx.errors import FeatxError
from featx.files import is_url
from featx.images import decoder, decoding, finder, remote


@dataclass(frozen=True)
class Faults:
    """Faults a test injects into the actors; they travel with the RayJob, never through the
    environment. delay: seconds each actor call sleeps (time to kill the driver mid-run).
    crash_once: a marker file's path; an actor's second call that finds no marker creates it and
    kills its process (os._exit), like a machine lost mid-run."""

    delay: float = 0.0
    crash_once: str | None = None

    def apply(self, calls: int) -> None:
        if self.delay:
            time.sleep(self.delay)
        if self.crash_once and calls > 1 and not os.path.exists(self.crash_once):
            Path(self.crash_once).write_text(str(os.getpid()))
            os._exit(1)  # no cleanup, no exception: the process is gone, as on a lost machine


NO_FAULTS = Faults()
# What the next RayJob carries: NO_FAULTS, unless a test replaces it (monkeypatch).
FAULTS = NO_FAULTS


INSTALL_HINT = "pip install 'featx[ray]'"


def check_installed() -> None:
    """A one-line FeatxError when Ray Data is not installed (without importing it: seconds)."""
    try:
        found = all(importlib.util.find_spec(m) is not None for m in ("ray", "pyarrow"))
    except (ImportError, ValueError):  # a module set to None, or without a spec
        found = False
    if not found:
        raise FeatxError(
            f"--executor ray needs Ray Data, which is not installed. Install it with: "
            f"{INSTALL_HINT}"
        )


def import_ray():
    """The `ray` module with Ray Data, or a one-line FeatxError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the `data` extra of ray)
    except ImportError as e:
        raise FeatxError(
            f"--executor ray needs Ray Data, which is not installed ({e}). "
            f"Install it with: {INSTALL_HINT}"
        ) from None
    return ray


def default_workers() -> int:
    """One actor per core but one: Ray's own read and write tasks need a core too."""
    return max(1, config.decode_workers() - 1)


def worker_env(backend: str | None = None) -> dict[str, str]:
    """Environment of every actor (Ray's runtime_env): the driver's Keras backend, TensorFlow's
    start-up log quiet, and GPU memory grown on demand instead of preallocated, so several actors
    can share one GPU (`gpus_per_worker` < 1)."""
    env = {
        "KERAS_BACKEND": backend or mobilenet.keras_backend(),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",  # JAX takes 75 % of the GPU at start otherwise
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",  # TensorFlow takes all of it otherwise
    }
    names = (config.HOME_ENV, "KERAS_HOME")  # where the weights and the ONNX file are
    env.update({name: os.environ[name] for name in names if os.environ.get(name)})
    return env


@dataclass(frozen=True)
class RayJob:
    """What every actor needs to know; sent to each actor once.

    folder, key: the cache's journal folder, or a URL every node reaches (`extract --parts`), and
    the fingerprint key its parts carry (parts.Journal). run_id names this run's parts. engine:
    the engine the driver resolved ("keras" or "onnx"; the cache's fingerprint names it).
    workers: actors; None: cores - 1 on a local Ray, on a cluster its GPUs / gpus_per_worker,
    else its CPUs - 1. extract builds it from ExtractOptions, which have checked every value."""

    root: Path | str  # a folder every node sees at this path, or a URL (images.remote)
    spec: mobilenet.BackboneSpec
    folder: Path | str
    key: str
    run_id: str
    batch_size: int = config.BATCH_SIZE
    workers: int | None = None
    gpus_per_worker: float = config.GPUS_PER_WORKER
    flip: bool = False
    dtype: str = config.FEATURE_DTYPE
    engine: str = "keras"
    faults: Faults = field(default_factory=lambda: FAULTS)  # tests only


def blocks(todo: Sequence[tuple[str, int, int]], job: RayJob) -> list[list[tuple]]:
    """`todo` cut into blocks of block_rows images: one actor call and one part file each."""
    rows = block_rows(len(todo), job)
    return [list(todo[i : i + rows]) for i in range(0, len(todo), rows)]


def block_rows(n: int, job: RayJob) -> int:
    """Rows per block (one actor call, one part file): enough blocks to keep every actor busy
    (four each), at most config.PART_ROWS (so a million images make ~250 parts, not 30,000), in
    whole batches."""
    per_block = -(-n // (4 * (job.workers or 1)))
    per_block = -(-per_block // job.batch_size) * job.batch_size
    return max(job.batch_size, min(config.PART_ROWS, per_block))


# --- in the actors -------------------------------------------------------------------------------


class _Extractor:
    """The callable class of `map_batches`: Ray builds one per actor, so the engine (seconds to
    build) is built once per actor, on its first block."""

    def __init__(self, job: RayJob):
        self.job, self.spec = job, job.spec
        self.engine, self.calls = None, 0

    def __call__(self, blocks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One row per block of images in; one row per image out (see _execute)."""
        self.calls += 1
        self.job.faults.apply(self.calls)
        paths = [str(p) for block in blocks["paths"] for p in block]
        n, step = len(paths), self.job.batch_size
        dim = self.spec.feature_dim * (1 + self.job.flip)
        features = np.zeros((n, dim), self.job.dtype)
        sha, reason = [""] * n, [""] * n
        chunks = [list(range(i, min(n, i + step))) for i in range(0, n, step)]
        # Batches decode in threads while the model runs the one before, as in extract.
        batches = decoding.prefetch(chunks, lambda i: self._load(paths[i]),
                                  workers=config.RAY_DECODE_THREADS)  # fmt: skip
        for chunk, results in batches:
            ok = [i for i, r in zip(chunk, results) if r[0] == "ok"]
            for i, (status, value, _) in zip(chunk, results):
                sha[i], reason[i] = (value, "") if status == "ok" else ("", value)
            if ok:
                pixels = [r[2] for r in results if r[0] == "ok"]
                features[ok] = self._features(np.stack(pixels))
        return {
            "path": np.array(paths, dtype=str),
            "size": np.concatenate([np.asarray(b, np.int64) for b in blocks["sizes"]]),
            "mtime_ns": np.concatenate([np.asarray(b, np.int64) for b in blocks["mtimes"]]),
            "sha256": np.array(sha, dtype=str),
            "reason": np.array(reason, dtype=str),
            "features": features,
        }

    def _load(self, path: str) -> tuple:
        full = finder.inside(self.job.root, path)
        if full is None:
            return "rejected", "path outside the data folder", None
        return decoder.load_for_cache(full, self.spec.image_size)

    def _features(self, pixels: np.ndarray) -> np.ndarray:
        """Features of (n, size, size, 3) pixels, n <= the batch size; with flip, each row is
        [features | features of the mirror image] (engines.WithMirror, as extract)."""
        if self.engine is None:
            engine = engines.make_engine(self.job.engine, self.spec)
            self.engine = engines.WithMirror(engine) if self.job.flip else engine
        return engines.run_padded(self.engine.features, pixels, self.job.batch_size)


def part_id(run_id: str, paths: Sequence[str]) -> str:
    """The id of a block's part: the same block of the same run always gets the same id (so a
    block written again replaces its part instead of adding one); another run, another id (a
    committed part is never overwritten)."""
    return hashlib.sha256("\n".join([run_id, *sorted(paths)]).encode()).hexdigest()[:32]


def write_block(job: RayJob, cols: dict[str, np.ndarray]) -> str:
    """One block of actor rows as one part file of the journal folder, atomically; its name."""
    paths = np.asarray(cols["path"], dtype=str)
    reasons = np.asarray(cols["reason"], dtype=str)
    sizes = np.asarray(cols["size"], np.int64)
    mtimes = np.asarray(cols["mtime_ns"], np.int64)
    ok = reasons == ""
    kept = parts.Rows(paths[ok].tolist(), sizes[ok], mtimes[ok],
                      np.asarray(cols["sha256"], dtype=str)[ok].tolist())  # fmt: skip
    rejected = parts.Rows(paths[~ok].tolist(), sizes[~ok], mtimes[~ok], [""] * int((~ok).sum()))
    features = np.asarray(cols["features"])[ok]
    dim = job.spec.feature_dim
    main = np.ascontiguousarray(features[:, :dim])
    mirrored = np.ascontiguousarray(features[:, dim:]) if job.flip else None
    name, _ = parts.write_part(
        job.folder, job.key, kept, main, mirrored, rejected, reasons[~ok].tolist(),
        id_=part_id(job.run_id, paths.tolist()),
    )  # fmt: skip
    return name


def _part_sink(job: RayJob):
    """A Ray Data Datasink writing each block it gets as one part (made here, where Ray is
    imported: featx itself must import without Ray)."""
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class PartSink(Datasink):
        def write(self, blocks, ctx) -> list[str]:
            written = []
            for block in blocks:
                cols = BlockAccessor.for_block(block).to_numpy()
                # Ray may hand over several calls' rows as one block: parts of at most
                # PART_ROWS rows, as a local run writes.
                for lo in range(0, len(cols["path"]), config.PART_ROWS):
                    piece = {k: v[lo : lo + config.PART_ROWS] for k, v in cols.items()}
                    written.append(write_block(job, piece))
            return written

        def get_name(self) -> str:
            return "FeatxParts"

    return PartSink()


# --- on the driver -------------------------------------------------------------------------------


def run(
    todo: Sequence[tuple[str, int, int]],
    job: RayJob,
    *,
    ray_address: str | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> int:
    """Extract the features of `todo` on Ray into part files of `job.folder`; returns the number
    of actors used. extract reads the parts back (parts.Journal.load).

    Args:
        todo: (path relative to job.root with forward slashes, size, mtime_ns) of each image
            still to extract, as the cache records them.
        job: see RayJob. job.folder must exist (parts.Journal.start).
        ray_address: an existing cluster ("auto", "ray://host:10001", ...). None: start a local
            Ray with workers + 1 CPUs (shut down again at the end), unless this process is
            already connected to one (then that one is used and left running).
        progress: called as progress(done, total, images_per_second) from a thread that watches
            the parts appear (about once a second while the count changes).
        log: called with one-line progress messages.
    """
    if not todo:
        return 0
    ray = import_ray()
    with _connected(ray, ray_address, job.workers) as resources:
        if job.workers is None:
            job = dataclasses.replace(job, workers=_cluster_workers(resources, job.gpus_per_worker))
        if log is not None:
            gpus = f", {job.gpus_per_worker} GPU each" if job.gpus_per_worker else ""
            where = ray_address or "a local Ray"
            log(f"ray: {len(todo)} images on {where}, {job.workers} workers{gpus}")
        cut = blocks(todo, job)
        with _watching(job, cut, progress):
            _execute(ray, job, cut)
    return job.workers


@contextmanager
def _watching(job: RayJob, cut: list[list[tuple]], progress) -> Iterator[None]:
    """Report progress from the parts written so far: each block's part name is known ahead
    (part_id), so a thread counts the images of the parts that exist."""
    if progress is None:
        yield
        return
    expected = {parts.part_name(part_id(job.run_id, [t[0] for t in b])): len(b) for b in cut}
    total, stop, t0 = sum(expected.values()), threading.Event(), time.perf_counter()

    def written() -> set[str]:
        if is_url(job.folder):
            return set(remote.names(str(job.folder), ".h5"))
        return {p.name for p in Path(job.folder).glob("features-*.h5")}

    def watch() -> None:
        reported = 0
        while not stop.wait(1.0):
            there = written()
            done = sum(n for name, n in expected.items() if name in there)
            if done != reported and done < total:  # the caller reports the end
                reported = done
                progress(done, total, done / max(time.perf_counter() - t0, 1e-9))

    thread = threading.Thread(target=watch, name="featx-ray-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def _connected(ray, address: str | None, workers: int | None) -> Iterator[dict]:
    """Ray's cluster resources, within a connection: the one this process already has (left
    running), the cluster at `address`, or a new local Ray of workers + 1 CPUs (default: every
    core); a connection made here is closed (a local Ray shut down) at the end."""
    # Ray Data logs its execution plan and timings at INFO on stderr; featx says what it does.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    if address is None:  # "local": a new Ray of our own, never someone's `ray start` cluster
        ray.init(address="local", num_cpus=(workers or default_workers()) + 1, **quiet)
    else:
        ray.init(address=address, **quiet)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


def _cluster_workers(resources: dict, gpus_per_worker: float) -> int:
    """Actors for a cluster: as many as its GPUs hold with `gpus_per_worker`, else one per CPU
    but one (left for Ray's read and write tasks)."""
    if gpus_per_worker:
        return max(1, int(resources.get("GPU", 0) / gpus_per_worker))
    return max(1, int(resources.get("CPU", 2)) - 1)


def _execute(ray, job: RayJob, cut: list[list[tuple]]) -> None:
    ray.data.DataContext.get_current().enable_progress_bars = False
    # One item per block of images, one block per actor call (batch_size=1), so blocks are
    # exactly as `blocks` cuts them: Ray would bundle rows of several blocks into one call.
    items = [
        {"paths": [t[0] for t in b], "sizes": [t[1] for t in b], "mtimes": [t[2] for t in b]}
        for b in cut
    ]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _Extractor,
        fn_constructor_kwargs={"job": job},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=job.workers),
        num_cpus=1,
        num_gpus=job.gpus_per_worker or None,
        runtime_env={"env_vars": worker_env()},
        # No max_restarts / max_task_retries here: Ray Data already restarts a dead actor and
        # runs its batch again without limit (ActorPoolMapOperator._apply_default_remote_args),
        # and passing them (**ray_remote_args) is deprecated in Ray 2.60, removed in 2.64.
    )
    ds.write_datasink(_part_sink(job))
