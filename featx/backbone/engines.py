"""Which engine runs the frozen backbone: Keras, ONNX Runtime, or ONNX Runtime INT8.

extract and predict both choose here, so neither stage imports the other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featx import config
from featx.backbone import mobilenet


class WithMirror:
    """`--flip`: an engine whose features are [features | features of the mirrored images], one
    row per image; extract and its Ray actors carry them as one row, the part splits them."""

    def __init__(self, engine):
        self.engine, self.name = engine, engine.name

    def features(self, batch: np.ndarray) -> np.ndarray:
        mirrored = np.ascontiguousarray(batch[:, :, ::-1])  # NHWC: reverse the width
        return np.hstack([self.engine.features(batch), self.engine.features(mirrored)])


def make_engine(name: str, spec: mobilenet.BackboneSpec, *, onnx_dir=None, log=None, search=()):
    """The engine that runs the backbone; its `.name` is the engine actually used.

    name: "keras", "onnx" (ONNX Runtime; its exported .onnx file lives in `onnx_dir`, default the
    per-user folder, or in one of the `search` folders where older versions left it) or "auto"
    (onnx when onnxruntime is installed, Keras sees no GPU and the backend can export ONNX, else
    keras; see onnx_engine.choose_engine). Building is lazy: the model is loaded on the first batch.
    """
    from featx.backbone import onnx_engine

    if onnx_engine.choose_engine(name, log) == "onnx":
        engine = onnx_engine.OnnxEngine(spec, onnx_dir=onnx_dir, log=log, search=search)
        problem = None if name == "onnx" else engine.cannot_export_here()
        if problem is None:
            return engine
        if log is not None:  # auto must never fail where keras would work
            log(f"note: using the Keras engine; {problem}.")
    return mobilenet.KerasEngine(spec)


def prepare(runner) -> float:
    """Prepare `runner` before its first batch: the seconds spent making the ONNX Runtime engine's
    file (once per backbone and user; 0.0 for other engines or a stored file), so that extract
    reports it as its own step and leaves it out of images/s."""
    engine = getattr(runner, "engine", runner)  # WithMirror
    return engine.prepare() if hasattr(engine, "prepare") else 0.0


def for_extract(opts, old, cache_path: Path, listing, root: Path, log):
    """(engine, fingerprint) for an extraction with ExtractOptions `opts`; `old` is the existing
    cache (or None). An int8 cache keeps its quantized file; a new one gets one calibrated on its
    training images."""
    onnx_dir = Path(config.ONNX_DIR or cache_path.parent)  # int8 files; fp32 ones of old versions
    if opts.precision == "fp32":
        spec = opts.spec
        runner = make_engine(
            opts.engine, spec, onnx_dir=config.ONNX_DIR, log=log, search=[onnx_dir]
        )
        return runner, spec.fingerprint(engine=runner.name)
    from featx.backbone import int8, onnx_engine

    onnx_engine.import_onnxruntime()  # a clear error when it is missing
    wanted = mobilenet.fingerprint(
        opts.weights, opts.image_size, opts.alpha, engine="onnx", precision="int8"
    )
    # --overwrite quantizes anew; otherwise an int8 cache keeps the exact file it was made with.
    recorded = (
        old.fingerprint.get("int8_sha256") if old is not None and not opts.overwrite else None
    )
    runner, sha = int8.engine(
        {**wanted, "int8_sha256": recorded},
        [onnx_dir],
        root=root,
        listing=listing,
        batch_size=opts.batch_size or config.BATCH_SIZE,
        val_split=opts.val_split,
        seed=opts.seed,
        log=log,
    )
    return runner, {**wanted, "int8_sha256": sha}


def batch_size(opts) -> int:
    """The batch size asked for, else config.GPU_BATCH_SIZE when Keras will run the backbone on
    a GPU (within MAX_BATCH_PIXELS; on Ray: when its actors get GPUs), else config.BATCH_SIZE."""
    if opts.batch_size is not None:
        return opts.batch_size
    if not gpu_expected(opts):
        return config.BATCH_SIZE
    fits = config.MAX_BATCH_PIXELS // opts.image_size**2
    return max(config.BATCH_SIZE, min(config.GPU_BATCH_SIZE, fits))


def gpu_expected(opts) -> bool:
    """Whether the backbone will run on a GPU, before the engine is made: Keras (asked for, or
    chosen by auto) seeing one; on Ray, its actors getting GPUs."""
    if opts.engine == "onnx" or opts.precision != "fp32":
        return False
    if opts.executor == "ray":  # the actors' devices count, not this process's
        return opts.gpus_per_worker > 0
    from featx.backbone.onnx_engine import keras_sees_gpu

    return keras_sees_gpu()


def run_padded(model, pixels, batch_size: int) -> np.ndarray:
    """`model`'s output for n <= batch_size images (a list or an (n, H, W, 3) uint8 array), run
    as one batch of exactly batch_size rows, the rest zeros: every call has one shape, so a
    model compiles (traces) once. The one batch loop of extract, predict and the Ray actors."""
    n = len(pixels)
    first = pixels[0]
    batch = np.zeros((batch_size, *first.shape), np.uint8)
    batch[:n] = pixels
    return np.asarray(model(batch))[:n]
