"""Stage 1 on a Ray cluster (#15): the backbone in a fixed-size actor pool, one part file per block.

    relative paths ──from_items──▶ actors (read + decode + engine, built once per actor)
        ──rows: path, sha256, features | reason──▶ _PartSink ──▶ OUT_DIR/ray-<hash>-<n>.npz

Only paths travel into Ray: each actor reads its files with `images.read_file` and decodes them
with `images.decode_image`, exactly as the single-machine extract does (same pixels, same
rejection reasons, same sha256 content key; a missing or unreadable file is a rejected row, never
a failed job), so the object store holds paths and features, never pixels. Each block of results
is written by a Ray Data Datasink to its own `.npz` part, atomically (`files.replaced_atomically`),
named by a hash of its paths: a retried block overwrites its own part. Ray retries a dead actor's
batch (at-least-once), so a path may still arrive in two parts; `read_parts` keeps one row per
path. Which files to extract (resume) and merging into the cache are the caller's (extract).

Ray is optional (`pip install 'featx[ray]'`) and imported only inside `run`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx import backbone, config, images
from featx.errors import FeatxError
from featx.files import replaced_atomically

# `ray-…`, not `part-…`: the cache's own journal batches are `part-PID-NNNNNN.npz` (store v2).
PART_GLOB = "ray-*.npz"
# Tests only: the path of a marker file. An actor's second batch that finds no marker there
# creates it and kills its process (os._exit), like a machine lost mid-run; the retry goes on.
CRASH_ONCE_ENV = "FEATX_TEST_RAY_CRASH_ONCE"


def import_ray():
    """The `ray` module with Ray Data, or a one-line FeatxError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the `data` extra of ray)
    except ImportError as e:
        raise FeatxError(
            f"--executor ray needs Ray Data, which is not installed ({e}). "
            "Install it with: pip install 'featx[ray]'"
        ) from None
    return ray


def default_workers() -> int:
    """One actor per core but one: Ray's own read and write tasks need a core too."""
    return max(1, _cores() - 1)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def worker_env(backend: str | None = None) -> dict[str, str]:
    """Environment of every actor (Ray's runtime_env): the driver's Keras backend, TensorFlow's
    start-up log quiet, and GPU memory grown on demand instead of preallocated, so several actors
    can share one GPU (`gpus_per_worker` < 1)."""
    env = {
        "KERAS_BACKEND": backend or backbone.keras_backend(),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",  # JAX takes 75 % of the GPU at start otherwise
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",  # TensorFlow takes all of it otherwise
    }
    for name in (config.HOME_ENV, "KERAS_HOME", CRASH_ONCE_ENV):  # weights, ONNX files, tests
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


@dataclass(frozen=True)
class RayJob:
    """What every actor needs to know (see `run` for each field); sent to each actor once."""

    root: Path
    spec: backbone.BackboneSpec
    out_dir: Path
    batch_size: int = config.BATCH_SIZE
    workers: int | None = None
    gpus_per_worker: float = 0
    flip: bool = False
    dtype: str = config.FEATURE_DTYPE
    engine: str = "keras"

    def __post_init__(self):
        if self.dtype not in config.FEATURE_DTYPES:
            raise FeatxError(f"dtype must be one of {config.FEATURE_DTYPES}, got {self.dtype!r}.")
        if self.workers is not None and self.workers < 1:
            raise FeatxError(f"workers must be at least 1, got {self.workers}.")
        if self.gpus_per_worker < 0:
            raise FeatxError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}.")
        if self.batch_size < 1:
            raise FeatxError(f"batch_size must be at least 1, got {self.batch_size}.")


# --- in the actors -------------------------------------------------------------------------------


class _Extractor:
    """The callable class of `map_batches`: Ray builds one per actor, so the engine (seconds to
    build) is built once per actor, on its first batch."""

    def __init__(self, job: RayJob):
        self.job, self.spec = job, job.spec
        self.engine, self.calls = None, 0
        self.pool = ThreadPoolExecutor(config.RAY_DECODE_THREADS, thread_name_prefix="featx-decode")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        # One task per thread, a slice of the batch each (as images.prefetch: a task per image
        # costs more Python time than decoding a small one).
        step = max(1, -(-len(paths) // config.RAY_DECODE_THREADS))
        slices = [paths[i : i + step] for i in range(0, len(paths), step)]
        loaded = [r for part in self.pool.map(self._load_all, slices) for r in part]
        self.calls += 1
        if self.calls > 1:  # mid-run: after this actor's first batch went on to be written
            _crash_once_for_tests()
        ok = [i for i, r in enumerate(loaded) if r[0] is not None]
        dim = self.spec.feature_dim * (1 + self.job.flip)
        features = np.zeros((len(paths), dim), self.job.dtype)
        if ok:
            features[ok] = self._features(np.stack([loaded[i][0] for i in ok]))
        return {
            "path": np.array(paths, dtype=str),
            "sha256": np.array([r[1] for r in loaded], dtype=str),
            "reason": np.array([r[2] for r in loaded], dtype=str),
            "features": features,
        }

    def _load_all(self, paths: list[str]) -> list[tuple]:
        return [self._load(p) for p in paths]

    def _load(self, path: str) -> tuple[np.ndarray | None, str, str]:
        """(pixels, sha256, "") or (None, sha256 or "", reason): extract's _load, row for row."""
        full = images.inside(self.job.root, path)
        if full is None:
            return None, "", "path outside the data folder"
        try:
            data, sha = images.read_file(full)
        except OSError as e:
            return None, "", f"unreadable: {e.strerror or e}"
        except ValueError as e:  # a FIFO, socket or device
            return None, "", str(e)
        try:
            return images.decode_image(data, self.spec.image_size), sha, ""
        except Exception as e:  # any decoder failure rejects the file, with its reason
            return None, sha, str(e) or type(e).__name__

    def _features(self, pixels: np.ndarray) -> np.ndarray:
        """Features of (n, size, size, 3) pixels, n <= the batch size; with flip, each row is
        [features | features of the mirror image] (as extract's _WithMirror)."""
        if self.engine is None:
            from featx import engines

            self.engine = engines.make_engine(self.job.engine, self.spec)
        n, size = len(pixels), self.spec.image_size
        batch = np.zeros((max(n, self.job.batch_size), size, size, 3), np.uint8)  # one shape: one
        batch[:n] = pixels  # compile, as extract pads its last batch
        out = self.engine.features(batch)[:n]
        if self.job.flip:
            mirrored = np.ascontiguousarray(batch[:, :, ::-1])  # NHWC: reverse the width
            out = np.hstack([out, self.engine.features(mirrored)[:n]])
        return out


def _crash_once_for_tests() -> None:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if marker and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)  # no cleanup, no exception: the process is gone, as on a lost machine


def part_name(paths: Sequence[str]) -> str:
    """`ray-<sha1 of the paths>-<count>.npz`: the same block always gets the same name, so a
    block written again (a retried task) replaces its part instead of adding one."""
    digest = hashlib.sha1("\n".join(sorted(paths)).encode()).hexdigest()[:16]
    return f"ray-{digest}-{len(paths)}.npz"


def write_part(out_dir: Path, cols: dict[str, np.ndarray], flip: bool) -> Path:
    """One block of actor rows (path, sha256, reason, features) as one part file, atomically."""
    paths = np.asarray(cols["path"], dtype=str)
    reasons = np.asarray(cols["reason"], dtype=str)
    features = np.asarray(cols["features"])
    ok = reasons == ""
    dim = features.shape[1] // 2 if flip else features.shape[1]
    arrays = {
        "paths": paths[ok],
        "sha256": np.asarray(cols["sha256"], dtype=str)[ok],
        "features": features[ok, :dim],
        "rejected_paths": paths[~ok],
        "rejected_reasons": reasons[~ok],
    }
    if flip:
        arrays["features_flip"] = features[ok, dim:]
    path = Path(out_dir) / part_name(paths.tolist())
    with replaced_atomically(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # plain str and float arrays: loads with allow_pickle=False
    return path


def _part_sink(out_dir: Path, flip: bool):
    """A Ray Data Datasink writing each block it gets as one part (made here, where Ray is
    imported: featx itself must import without Ray)."""
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class PartSink(Datasink):
        def write(self, blocks, ctx) -> list[str]:
            written = []
            for block in blocks:
                cols = BlockAccessor.for_block(block).to_numpy()
                if len(cols["path"]):
                    written.append(str(write_part(out_dir, cols, flip)))
            return written

        def get_name(self) -> str:
            return "FeatxParts"

    return PartSink()


# --- on the driver -------------------------------------------------------------------------------


def run(
    files: Sequence[str],
    root: str | Path,
    spec: backbone.BackboneSpec,
    out_dir: str | Path,
    *,
    batch_size: int = config.BATCH_SIZE,
    workers: int | None = None,
    gpus_per_worker: float = 0,
    ray_address: str | None = None,
    flip: bool = False,
    dtype: str = config.FEATURE_DTYPE,
    engine: str = "keras",
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Extract the features of `files` on Ray; return the part files in `out_dir` (those of an
    earlier, interrupted run into the same folder too: `read_parts` reads them all, once each).

    Args:
        files: the images still to extract, relative to `root` (forward slashes), as the cache
            records them; the caller leaves out what the cache already holds (resume).
        root: the data folder. Every Ray node must see it at the same path (a shared disk).
        spec: the backbone; its image_size is the decoded size.
        out_dir: folder for the part files (created). Read them with `read_parts`.
        batch_size: images per actor call (fixed model input shape, like extract's batches).
        workers: actors, each with its own model. None: cores - 1 on a local Ray; on a
            cluster, its GPUs / gpus_per_worker, or without GPUs its CPUs - 1.
        gpus_per_worker: GPUs reserved per actor; 0.5 puts two actors on one GPU. 0: CPU only.
        ray_address: an existing cluster ("auto", "ray://host:10001", ...). None: start a local
            Ray with workers + 1 CPUs (shut down again at the end), unless this process is
            already connected to one (then that one is used and left running).
        flip: also the features of the mirror images (the part's `features_flip`).
        dtype: "float32" or "float16", the features' type in the parts.
        engine: engines.make_engine's name ("keras", "onnx", "auto"), built once per actor.
        log: called with one-line progress messages.
    """
    job = RayJob(
        Path(root).resolve(),
        spec,
        Path(out_dir),
        batch_size=batch_size,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        flip=flip,
        dtype=dtype,
        engine=engine,
    )
    job.out_dir.mkdir(parents=True, exist_ok=True)
    if not files:
        return []
    ray = import_ray()
    with _connected(ray, ray_address, workers) as resources:
        if job.workers is None:
            job = dataclasses.replace(job, workers=_cluster_workers(resources, gpus_per_worker))
        if log is not None:
            gpus = f", {gpus_per_worker} GPU each" if gpus_per_worker else ""
            where = ray_address or "a local Ray"
            log(f"ray: {len(files)} images on {where}, {job.workers} workers{gpus}")
        _execute(ray, job, files)
    return sorted(job.out_dir.glob(PART_GLOB))


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
    if address is None:
        ray.init(num_cpus=(workers or default_workers()) + 1, **quiet)
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


def _execute(ray, job: RayJob, files: Sequence[str]) -> None:
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Blocks of about one batch: a part per batch, and work spread over every actor.
    blocks = max(1, -(-len(files) // job.batch_size))
    ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=blocks)
    ds = ds.map_batches(
        _Extractor,
        fn_constructor_kwargs={"job": job},
        batch_size=job.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=job.workers),
        num_cpus=1,
        num_gpus=job.gpus_per_worker or None,
        runtime_env={"env_vars": worker_env()},
        # No max_restarts / max_task_retries here: Ray Data already restarts a dead actor and
        # runs its batch again without limit (ActorPoolMapOperator._apply_default_remote_args),
        # and passing them (**ray_remote_args) is deprecated in Ray 2.60, removed in 2.64.
    )
    ds.write_datasink(_part_sink(job.out_dir, job.flip))


# --- reading the parts back ----------------------------------------------------------------------


@dataclass
class Parts:
    """Every row of a folder of part files, one per path, sorted by path."""

    paths: list[str]
    sha256: list[str]  # of the file's content, as the cache's file_sha256
    features: np.ndarray  # (n, D)
    features_flip: np.ndarray | None  # (n, D) with flip, else None
    rejected_paths: list[str]
    rejected_reasons: list[str]


def read_parts(out_dir: str | Path, dim: int | None = None) -> Parts:
    """Load the parts `run` wrote into `out_dir`: one row per path (Ray delivers at least once,
    so a retried block may have left a second part holding the same paths), sorted by path.

    A path with features in one part and a rejection in another (a transient read error, then
    success) keeps its features. Raises FeatxError naming the part when one is unreadable or its
    features have the wrong shape, type or non-finite values (`dim`: the expected width).
    """
    rows: dict[str, tuple] = {}
    rejected: dict[str, str] = {}
    kinds = set()
    for part in sorted(Path(out_dir).glob(PART_GLOB)):
        z = _load_part(part, dim)
        flip = z.get("features_flip")
        kinds.add((z["features"].shape[1], str(z["features"].dtype), flip is not None))
        for i, p in enumerate(z["paths"].tolist()):
            rows.setdefault(
                p, (z["sha256"][i], z["features"][i], None if flip is None else flip[i])
            )
        rejected.update(zip(z["rejected_paths"].tolist(), z["rejected_reasons"].tolist()))
    if len(kinds) > 1:
        raise FeatxError(
            f"The parts in '{out_dir}' differ in (width, dtype, flip): {sorted(kinds)}. They come "
            "from different runs; delete the folder and run again."
        )
    width, dtype, flip = kinds.pop() if kinds else (dim or 0, config.FEATURE_DTYPE, False)
    paths = sorted(rows)
    rej = sorted(p for p in rejected if p not in rows)

    def stack(k: int) -> np.ndarray:
        return np.stack([rows[p][k] for p in paths]) if paths else np.zeros((0, width), dtype)

    return Parts(
        paths=paths,
        sha256=[str(rows[p][0]) for p in paths],
        features=stack(1),
        features_flip=stack(2) if flip else None,
        rejected_paths=rej,
        rejected_reasons=[rejected[p] for p in rej],
    )


def _load_part(part: Path, dim: int | None) -> dict[str, np.ndarray]:
    fix = "Delete it and run again (its images are then extracted again)."
    try:
        with np.load(part, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise FeatxError(f"The part file '{part}' is unreadable ({e}). {fix}") from None
    missing = {"paths", "sha256", "features", "rejected_paths", "rejected_reasons"} - set(arrays)
    if missing:
        raise FeatxError(f"The part file '{part}' lacks {sorted(missing)}. {fix}")
    n = len(arrays["paths"])
    for key in ("features", "features_flip"):
        f = arrays.get(key)
        if f is None:
            continue
        problem = None
        if f.ndim != 2 or f.shape[0] != n or (dim is not None and f.shape[1] != dim):
            problem = f"shape {f.shape}, expected ({n}, {dim or 'D'})"
        elif str(f.dtype) not in config.FEATURE_DTYPES:
            problem = f"dtype {f.dtype}, expected one of {config.FEATURE_DTYPES}"
        elif not np.isfinite(f).all():
            problem = "non-finite values (NaN or inf)"
        if problem:
            raise FeatxError(f"The part file '{part}' has {key} of {problem}. {fix}")
    if len(arrays["sha256"]) != n or len(arrays["rejected_reasons"]) != len(
        arrays["rejected_paths"]
    ):
        raise FeatxError(f"The part file '{part}' has columns of different lengths. {fix}")
    return arrays
