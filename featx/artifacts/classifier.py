"""A loaded model folder as one function from pixels to class probabilities, and the loop that runs
it over image files in batches.

A fit-head folder becomes its backbone engine (Keras, ONNX Runtime or INT8) followed by the head; a
finetune folder its Keras model; an export folder the exported file (Keras, SavedModel, TFLite or
ONNX).
predict and export both run models through here, so neither imports the other.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx import config
from featx.artifacts import outputs
from featx.artifacts.model_dirs import (
    FINETUNE_INFO,
    FINETUNE_MODEL,
    check_backbone,
    model_kind,
    read_export_info,
    read_finetune_info,
)
from featx.backbone import engines, onnx_engine
from featx.errors import FeatxError, Messages, check_int
from featx.images import decoder, decoding


def load_finetune_model(model_dir: str | Path):
    """model.keras of a finetune output, loaded in safe mode (no code runs from the file)."""
    import keras

    path = Path(model_dir) / FINETUNE_MODEL
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:
        raise FeatxError(f"Could not load '{path}' ({type(e).__name__}: {e}).") from None


@dataclass(repr=False)
class Classifier:
    """A loaded model folder (fit-head, finetune or export): images in, classes out.

    `featx.load(MODEL_DIR)` makes one; its backbone is loaded once and reused by every call.
    predict_proba(images) -> (n, k) probabilities in `classes_` order; predict(images) -> the n
    most probable class names. `images`: a path, a PIL image or an HxWx3 uint8 array, or a
    list of them. Each is decoded and resized as extraction does: a path gives exactly the
    probabilities `featx predict` gives for that file.

    novelty(images) -> (n,) how unlike the training images each one is (higher: less alike; see
    featx.heads.novelty), unknown(images) -> (n,) bool, novelty above `threshold`, which flags
    `unknown_rate` of the known validation images; `has_novelty` is False for models saved
    without the score (older featx), whose novelty() raises."""

    kind: str  # "head", "finetune" or "export"
    class_names: list[str]
    image_size: int
    engine: str  # what computes the backbone: "keras", "onnx", ...
    meta: dict  # head.json, finetune.json or export.json
    _run: object
    model_dir: str = ""
    batch_size: int = config.BATCH_SIZE
    _score: object = None  # pixels -> (n, k + 1): the probabilities, then the novelty; or None
    threshold: float | None = None  # novelty above it is unknown
    unknown_rate: float | None = None  # the share of known validation images above threshold
    _known: object = None  # the known images' novelty, sorted: the threshold at another rate

    @property
    def classes_(self) -> np.ndarray:
        return np.asarray(self.class_names)

    @property
    def has_novelty(self) -> bool:
        return self._score is not None

    def proba_of_pixels(self, batch: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8 pixels, already decoded and resized -> (n, k) float64."""
        return np.asarray(self._run(batch), np.float64)

    def _check_novelty(self) -> None:
        if self._score is None:
            raise FeatxError(
                f"The model in '{self.model_dir}' has no novelty score (saved by an older featx); "
                "re-run `featx fit-head` or `featx finetune` (and `featx export`) to add it."
            )

    def scores_of_pixels(self, batch: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8 pixels -> (n, k + 1) float64: probabilities, then novelty."""
        self._check_novelty()
        return np.asarray(self._score(batch), np.float64)

    def set_unknown_rate(self, rate: float) -> None:
        """Calibrate the threshold again, on the same known images, to flag `rate` of them."""
        from featx.heads import novelty

        novelty.check_rate(rate)
        self._check_novelty()
        self.threshold = novelty.threshold_at(self._known, rate)
        self.unknown_rate = float(rate)

    def _batched(self, images, run, width: int) -> np.ndarray:
        pixels = [self._pixels(image) for image in _as_list(images)]
        step = self.batch_size
        out = np.zeros((len(pixels), width))
        for lo in range(0, len(pixels), step):
            chunk = pixels[lo : lo + step]
            out[lo : lo + len(chunk)] = engines.run_padded(run, chunk, step)
        return out

    def predict_proba(self, images) -> np.ndarray:
        return self._batched(images, self.proba_of_pixels, len(self.class_names))

    def novelty(self, images) -> np.ndarray:
        """(n,) float: how unlike the training images each image is (higher: less alike)."""
        return self._batched(images, self.scores_of_pixels, len(self.class_names) + 1)[:, -1]

    def unknown(self, images) -> np.ndarray:
        """(n,) bool: novelty above the threshold, an image unlike those it was trained on."""
        return self.novelty(images) > self.threshold

    def predict(self, images) -> np.ndarray:
        return self.classes_[self.predict_proba(images).argmax(axis=1)]

    def _pixels(self, image) -> np.ndarray:
        size = self.image_size
        try:
            if isinstance(image, (str, Path)):
                return decoder.load_image(image, size)
            if isinstance(image, np.ndarray):
                return decoder.from_array(image, size)
            if hasattr(image, "getbands"):  # a PIL image (PIL is imported by featx.images)
                return decoder.to_input(image, size)
        except FileNotFoundError:
            raise FeatxError(f"Image not found: '{image}'. Check the path.") from None
        except (OSError, ValueError) as e:
            what = f"'{image}'" if isinstance(image, (str, Path)) else "the image"
            raise FeatxError(f"Cannot classify {what}: {e}.") from None
        raise FeatxError(
            f"Cannot classify a {type(image).__name__}: pass a path, a PIL image or an HxWx3 "
            "uint8 array (or a list of them)."
        )

    def __repr__(self) -> str:
        return (
            f"Classifier({self.model_dir!r}, kind={self.kind!r}, classes={self.class_names!r}, "
            f"engine={self.engine!r}, image_size={self.image_size})"
        )


def _as_list(images) -> list:
    """One image alone, or a list or tuple of them (a 4-D array: a batch of arrays)."""
    if isinstance(images, (str, Path)) or hasattr(images, "getbands"):
        return [images]
    if isinstance(images, np.ndarray):
        return [images] if images.ndim in (2, 3) else list(images)
    return list(images)


def load(
    model_dir: str | Path,
    *,
    engine: str | None = None,
    batch_size: int = config.BATCH_SIZE,
    unknown_rate: float | None = None,
    log=None,
) -> Classifier:
    """`featx.load(MODEL_DIR)`: a fit-head, finetune or export output folder as a Classifier.

    Args:
        model_dir: the folder `featx fit-head`, `featx finetune` or `featx export` wrote.
        engine: what runs a fit-head model's backbone: "keras", "onnx" or "auto" (None:
            config.ENGINE; "auto" for a head fitted on INT8 features); finetune and export
            models run as they were saved.
        batch_size: images per model call (the last batch is padded: one compile).
        unknown_rate: the share of known validation images `unknown()` flags; None: the rate
            the model was calibrated at (config.UNKNOWN_RATE by default).
        log: called with one-line notes; default: logging.getLogger("featx").
    """
    check_int("batch_size", batch_size, 1, config.MAX_BATCH_SIZE)
    classifier = load_classifier(model_dir, engine, Messages(log))
    classifier.batch_size = batch_size
    if unknown_rate is not None:
        classifier.set_unknown_rate(unknown_rate)
    return classifier


def load_classifier(model_dir: str | Path, engine: str | None, log=None) -> Classifier:
    """The classifier of a fit-head, finetune or export output folder: only a complete folder,
    loaded again if another run swapped a new one in while it read (outputs.read_whole).

    For a head, the backbone runs on `engine` ("keras", "onnx" or "auto", see
    backbone.engines.make_engine; None: config.ENGINE, except for a head fitted on INT8 features,
    which only ONNX Runtime computes: "auto" then); a finetune model is one Keras model and
    always runs in Keras; an export runs as exported.
    """
    log = log or (lambda message: None)
    classifier = outputs.read_whole(model_dir, lambda: _load_classifier(model_dir, engine, log))
    classifier.model_dir = str(model_dir)  # (what its messages name)
    return classifier


def _load_classifier(model_dir: str | Path, engine: str | None, log) -> Classifier:
    kind = model_kind(model_dir)
    if kind == "export":
        info = read_export_info(model_dir)
        if engine == "onnx":
            log("note: an export runs as exported; --engine onnx applies to fit-head models.")
        path = Path(model_dir) / info["model_file"]
        try:
            run, score = load_exported(path, info["model_format"])
        except Exception as e:  # a damaged file, or a format this installation cannot run
            raise FeatxError(
                f"Could not load '{path}' ({type(e).__name__}: {e}). Re-run `featx export`."
            ) from None
        runs_on = {"keras": "keras", "savedmodel": "tensorflow", "onnx": "onnxruntime"}.get(
            info["model_format"], "tflite"
        )
        size = int(info["image_size"])
        model = Classifier("export", list(info["class_names"]), size, runs_on, info, run)
        if score is not None and info.get("novelty"):  # an output "novelty" and its threshold
            unknown = info["novelty"]
            model._score, model._known = score, np.asarray(unknown.get("known", []), np.float64)
            model.threshold, model.unknown_rate = unknown["threshold"], unknown["rate"]
        return model
    if kind == "finetune":
        return _finetune_classifier(model_dir, engine, log)

    from featx.backbone.mobilenet import BackboneSpec
    from featx.heads import estimators, novelty

    head, meta = estimators.load_head(model_dir)
    fp = meta.get("fingerprint") or {}
    check_backbone(fp, f"The head in '{model_dir}'")
    if fp.get("precision", "fp32") == "int8":
        runner = _int8_runner(engine or "auto", fp, model_dir, meta, log)
    else:
        runner = engines.make_engine(
            engine or config.ENGINE,
            BackboneSpec.from_fingerprint(fp),
            onnx_dir=config.ONNX_DIR,
            log=log,
            search=_onnx_dirs(model_dir, meta),
        )

    def features(batch):
        out = runner.features(batch)
        if head.flip_:  # fitted with mirror images: predict from the mean of both views
            mirrored = runner.features(np.ascontiguousarray(batch[:, :, ::-1]))
            out = estimators.flip_views(out, mirrored)
        return out

    def run(batch):
        return head.predict_proba(features(batch))

    size = int(fp["image_size"])
    model = Classifier(kind, list(meta["class_names"]), size, runner.name, meta, run)
    if meta.get("novelty"):

        def features_and_proba(batch):
            f = features(batch)
            return f, head.predict_proba(f)

        _add_novelty(model, novelty.load(model_dir, meta["novelty"]), features_and_proba)
    return model


def _finetune_classifier(model_dir: str | Path, engine: str | None, log) -> Classifier:
    """A finetune folder's classifier: its Keras model, and its novelty score when it has one."""
    info = read_finetune_info(model_dir)
    if engine == "onnx":
        log("note: a finetune model runs in Keras; --engine onnx applies to fit-head models.")
    model = load_finetune_model(model_dir)
    size = int(info["image_size"])
    if tuple(model.input_shape[1:]) != (size, size, 3):
        raise FeatxError(
            f"'{Path(model_dir) / FINETUNE_MODEL}' takes inputs of shape "
            f"{model.input_shape}, {FINETUNE_INFO} says {size}x{size} RGB. Re-run "
            "`featx finetune`."
        )

    def run(batch):
        return model.predict_on_batch(np.asarray(batch, np.float32))

    classifier = Classifier("finetune", list(info["class_names"]), size, "keras", info, run)
    if info.get("novelty"):
        _add_finetune_novelty(classifier, model, model_dir, info["novelty"])
    return classifier


def _add_finetune_novelty(classifier: Classifier, model, model_dir, info: dict) -> None:
    """A finetune model's novelty score: the features its head takes come from the same Keras
    layers, chained again with a second output (backbone.mobilenet.rechain)."""
    from featx.backbone import mobilenet
    from featx.heads import novelty

    both = mobilenet.scoring_model(model)

    def features_and_proba(batch):
        f, p = both.predict_on_batch(np.asarray(batch, np.float32))
        return np.asarray(f, np.float32), np.asarray(p)

    _add_novelty(classifier, novelty.load(model_dir, info), features_and_proba)


def _add_novelty(model: Classifier, state, features_and_proba) -> None:
    """A novelty score on the classifier: pixels -> probabilities and novelty, from a function
    pixels -> (the features the head takes, its probabilities)."""

    def score(batch):
        f, proba = features_and_proba(batch)
        return np.column_stack([proba, state.score(f, proba)])

    model._score, model._known = score, state.known
    model.threshold, model.unknown_rate = state.threshold, state.rate


def _int8_runner(engine: str, fp: dict, model_dir, meta: dict, log):
    """The quantized backbone a head fitted on an int8 cache needs: that exact file, found next
    to its cache, next to the model folder, or in the default cache folder."""
    from featx.backbone import int8

    if engine == "keras":
        raise FeatxError(
            f"The head in '{model_dir}' was fitted on INT8 features, which only the onnx engine "
            "computes; pass --engine onnx (or auto)."
        )
    folders = [Path(meta["cache"]).resolve().parent] if meta.get("cache") else []
    folders += [Path(model_dir).resolve().parent, Path(config.ONNX_DIR or config.CACHE_DIR)]
    folders = list(dict.fromkeys(f for f in folders if f.is_dir()))
    return int8.engine(fp, folders or [Path(model_dir)], log=log)[0]


def _onnx_dirs(model_dir, meta: dict) -> list[Path]:
    """Where older versions of extract stored the backbone's .onnx file (now kept per user): the
    folder of the cache the head was fitted on, and the model folder's parent (fit-head's default
    output is cache/<name>-<head>/); those that exist."""
    folders = [Path(meta["cache"]).resolve().parent] if meta.get("cache") else []
    folders.append(Path(model_dir).resolve().parent)
    return list(dict.fromkeys(f for f in folders if f.is_dir()))


def _load(path: str, image_size: int):
    """(pixels, None) or (None, reason) for one file; runs in a worker thread."""
    try:
        return decoder.load_image(path, image_size), None
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    except Exception as e:  # any decoder failure: the reason, never a crash
        return None, str(e) or type(e).__name__


def run_batches(
    predict_proba,
    paths: list[str],
    image_size: int,
    num_classes: int,
    batch_size: int = config.BATCH_SIZE,
    progress=None,
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode `paths` with the loader of extraction, a few batches ahead (decoding.prefetch), and
    run `predict_proba` on fixed-size uint8 batches (the last one padded, so models trace once).

    Returns (probabilities (n, num_classes) with NaN rows for files that failed,
    {index: reason} of those files). `progress(done, total, images_per_second)` after each batch.
    """
    if batch_size < 1:
        raise FeatxError(f"batch_size must be >= 1, got {batch_size}.")
    n = len(paths)
    proba = np.full((n, num_classes), np.nan)
    errors: dict[int, str] = {}
    size = min(batch_size, n) or 1  # a handful of images is not padded to a whole batch
    chunks = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    t0, done = time.perf_counter(), 0
    batches = decoding.prefetch(chunks, lambda i: _load(paths[i], image_size))
    try:
        for chunk, results in batches:
            ok = [i for i, (_, reason) in zip(chunk, results) if reason is None]
            errors.update((i, reason) for i, (_, reason) in zip(chunk, results) if reason)
            if ok:
                pixels = [p for p, reason in results if reason is None]
                proba[ok] = engines.run_padded(predict_proba, pixels, size)
            done += len(chunk)
            if progress is not None:
                progress(done, n, done / max(time.perf_counter() - t0, 1e-9))
    finally:
        batches.close()  # Ctrl-C or a model error: stop decoding what is queued, at once
    return proba, errors


def output_names(model) -> list[str]:
    """The names of a Keras model's outputs (in `model.outputs` order) as featx exports them:
    config.EXPORT_PROBABILITIES for a model with one output; a model built with a dict of
    outputs, its keys (Keras' output_names are then the layers', e.g. "maximum" for the novelty);
    else the model's own output names."""
    names = list(model.output_names)
    if len(names) == 1:
        return [config.EXPORT_PROBABILITIES]
    if isinstance(model.output, dict):
        key_of = {id(tensor): key for key, tensor in model.output.items()}
        return [key_of[id(tensor)] for tensor in model.outputs]
    return names


def keras_outputs(model, batch) -> dict[str, np.ndarray]:
    """Every output of a Keras model on `batch`, by the names of `output_names`."""
    return _named(model.predict_on_batch(np.asarray(batch, np.float32)), output_names(model))


def probabilities(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The class probabilities among a model's outputs (by name; else its only or first one)."""
    return outputs.get(config.EXPORT_PROBABILITIES, next(iter(outputs.values())))


def onnx_outputs(path: str | Path):
    """A function (n, size, size, 3) pixels -> {output name: array}: every output of an ONNX
    export, run by ONNX Runtime."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise FeatxError(
            f"'{path}' is an ONNX model, which needs ONNX Runtime ({e}). Run "
            f"`{onnx_engine.INSTALL_HINT}`."
        ) from None
    session = ort.InferenceSession(
        str(path), onnx_engine.session_options(), providers=onnx_engine.providers()
    )
    feed = session.get_inputs()[0].name
    names = [output.name for output in session.get_outputs()]

    def run(batch):
        return dict(zip(names, session.run(names, {feed: np.asarray(batch, np.float32)})))

    run.names = names
    return run


def tflite_interpreter(path: str | Path):
    """A TFLite interpreter: LiteRT's (ai-edge-litert) when installed, else TensorFlow's."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        return Interpreter(model_path=str(path))


def exported_outputs(path: str | Path, format: str):
    """A function pixels -> {output name: array} running an exported file, every output it has
    (probabilities, and novelty for a model that carries the score)."""
    return _exported_call(Path(path), format)[0]


def load_exported(path: str | Path, format: str):
    """(pixels -> (n, C) probabilities, pixels -> (n, C + 1) probabilities and novelty or None)
    running the exported file; the second is None for a model without a novelty output."""
    call, names = _exported_call(Path(path), format)

    def proba(batch):
        return np.asarray(probabilities(call(batch)), np.float64)

    def scores(batch):
        out = call(batch)
        p = np.asarray(probabilities(out), np.float64)
        return np.column_stack([p, np.asarray(out["novelty"], np.float64).reshape(len(p))])

    return proba, (scores if "novelty" in names else None)


def _named(out, names: list[str]) -> dict[str, np.ndarray]:
    """A model's output (an array, a list or a dict of arrays) as {output name: array}."""
    if isinstance(out, dict):
        return {name: np.asarray(value) for name, value in out.items()}
    if not isinstance(out, (list, tuple)):
        out = [out]
    return dict(zip(names, (np.asarray(value) for value in out)))


def _exported_call(path: Path, format: str):
    """(a function pixels -> {output name: array} running the exported file, its output names)."""
    one = [config.EXPORT_PROBABILITIES]
    if format == "onnx":
        run = onnx_outputs(path)
        return run, list(run.names)
    if format == "keras":
        import keras

        model = keras.saving.load_model(path, compile=False, safe_mode=True)
        return (lambda batch: keras_outputs(model, batch)), output_names(model)
    if format == "savedmodel":
        import tensorflow as tf

        loaded = tf.saved_model.load(str(path))  # keep it: `serve` needs its variables alive
        outputs = loaded.signatures["serving_default"].structured_outputs
        names = list(outputs) if len(outputs) > 1 else one

        def serve(batch):
            out = loaded.serve(tf.constant(np.asarray(batch, np.float32)))
            if isinstance(out, dict):
                return {k: v.numpy() for k, v in out.items()}
            return _named(out.numpy(), one)

        return serve, names
    interpreter = tflite_interpreter(path)
    if len(interpreter.get_output_details()) > 1:  # named outputs: the signature runner
        runner = interpreter.get_signature_runner()
        signature = interpreter.get_signature_list()["serving_default"]
        name = signature["inputs"][0]
        call = lambda batch: _named(runner(**{name: np.asarray(batch, np.float32)}), one)  # noqa: E731
        return call, list(signature["outputs"])
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    shape = [None]

    def run(batch):
        batch = np.asarray(batch, np.float32)
        if shape[0] != batch.shape:
            interpreter.resize_tensor_input(inp, batch.shape)
            interpreter.allocate_tensors()
            shape[0] = batch.shape
        interpreter.set_tensor(inp, batch)
        interpreter.invoke()
        return {config.EXPORT_PROBABILITIES: interpreter.get_tensor(out).copy()}

    return run, one
