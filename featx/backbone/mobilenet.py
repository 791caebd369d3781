"""The frozen MobileNetV2 feature extractor, its preprocessing and its fingerprint.

Every stage builds its model from here, so extraction, fine-tuning, prediction and export all
see the same preprocessing (a Keras Rescaling layer, which loads in safe mode) and the same weights.
Keras is imported inside functions: `featx --help` and the image loader never pay for it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx import config
from featx.config import VERSION
from featx.errors import FeatxError, check_int
from featx.files import file_sha256

# Keras publishes ImageNet weights for these widths and square sizes only.
IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
IMAGENET_SIZES = (96, 128, 160, 192, 224)
WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"

# Fingerprint keys that decide whether two sets of features are comparable. Versions and the
# engine are recorded too, but features from different versions or engines may be mixed.
# The keys that decide the float model (and its exported .onnx file) ...
FLOAT_MODEL_KEYS = ("backbone", "alpha", "image_size", "weights_sha256", "preprocessing", "resize")
# ... and every key that decides the features: with `--precision int8`, the quantized file too.
MODEL_KEYS = (*FLOAT_MODEL_KEYS, "precision", "int8_sha256")
KEY_DEFAULTS = {"precision": "fp32", "int8_sha256": None}  # for caches made before they existed


def _imagenet_file_name(alpha: float, rows: int) -> str:
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"


def resolve_weights(weights: str, image_size: int, alpha: float) -> str | None:
    """The local weights file for `weights` ("imagenet", "none" or a path); None for "none".

    "imagenet" uses Keras' own cache (~/.keras/models), downloading once like
    keras.applications does. Sizes without a published file use the 224 px file: convolution
    weights do not depend on the input size.
    """
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights).lower() != "imagenet":
        path = Path(weights)
        if not path.is_file():
            raise FeatxError(
                f"Weights file not found: '{weights}'. Pass --weights imagenet, none, or the "
                "path of a MobileNetV2 no-top .h5 file."
            )
        return str(path)
    if alpha not in IMAGENET_ALPHAS:
        raise FeatxError(
            f"ImageNet weights exist for alpha in {IMAGENET_ALPHAS}, got alpha={alpha}. "
            "Pick one of those, or pass --weights none."
        )
    rows = image_size if image_size in IMAGENET_SIZES else 224
    candidates = [rows] if rows == 224 else [rows, 224]
    for i, r in enumerate(candidates):
        name = _imagenet_file_name(alpha, r)
        cached = _keras_home() / "models" / name
        if cached.is_file():  # no Keras import (seconds) when the file is already there
            return str(cached)
        import keras

        try:
            return keras.utils.get_file(name, WEIGHTS_URL + name, cache_subdir="models")
        except Exception as e:  # offline and not cached
            if i + 1 < len(candidates):
                warnings.warn(
                    f"{name} is not available ({e}); using the 224 px weights.", stacklevel=2
                )
                continue
            cache = _keras_home() / "models" / name
            raise FeatxError(
                f"Could not get the ImageNet weights '{name}': {e}. Connect to the internet "
                f"once, or copy the file to {cache}, or pass --weights FILE."
            ) from None
    raise AssertionError("unreachable")


def _keras_home() -> Path:
    # Where keras.utils.get_file caches downloads (KERAS_HOME, else ~/.keras).
    return Path(os.environ.get("KERAS_HOME") or os.path.expanduser("~/.keras"))


def keras_version() -> str:
    import importlib.metadata  # (here: 13 ms of a one-image predict's start-up, with email & co.)

    return importlib.metadata.version("keras")


def keras_backend() -> str:
    """The active Keras backend, without importing Keras when it is not loaded yet."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    try:
        return json.loads((_keras_home() / "keras.json").read_text())["backend"]
    except (OSError, ValueError, KeyError):
        return "tensorflow"


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)  # cached per (path, size, mtime): hashing 14 MB costs ~50 ms


def cached_sha256(path: str | Path) -> str:
    """The file's sha256, hashed once per process for each (path, size, mtime): a predict checks
    the weights and the stored .onnx file several times."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def weights_sha256(weights_path: str | None) -> str:
    if weights_path is None:
        # Random weights are reproducible only for a given seed and Keras version.
        return f"random-seed{config.RANDOM_WEIGHTS_SEED}-keras{keras_version()}"
    return cached_sha256(weights_path)


def fingerprint(
    weights: str = config.WEIGHTS,
    image_size: int = config.IMAGE_SIZE,
    alpha: float = config.ALPHA,
    engine: str = "keras",
    precision: str = "fp32",
    int8_sha256: str | None = None,
    versions: bool = True,
) -> dict:
    """Everything that determines the features, without building the model (or importing it).

    precision "int8" with int8_sha256, the sha256 of the quantized .onnx file (backbone.int8).
    versions=False leaves out the featx and Keras versions and backend, which are recorded but
    no model key (looking Keras' version up costs a one-image predict 10 ms of imports)."""
    validate(image_size, alpha)
    path = resolve_weights(weights, image_size, alpha)
    recorded = {"featx_version": VERSION, "keras_version": keras_version(),
                "keras_backend": keras_backend()} if versions else {}  # fmt: skip
    return {
        "backbone": config.BACKBONE,
        "alpha": float(alpha),
        "image_size": int(image_size),
        "weights": "none" if path is None else str(weights),
        "weights_file": None if path is None else os.path.basename(path),
        "weights_sha256": weights_sha256(path),
        "preprocessing": config.PREPROCESSING,
        "resize": config.RESIZE,
        "precision": precision,
        "int8_sha256": int8_sha256,
        "engine": engine,
        **recorded,
    }


def model_key(fp: dict, keys=MODEL_KEYS) -> str:
    """sha256 of the fingerprint's model keys: equal keys, comparable features."""
    values = {k: fp.get(k, KEY_DEFAULTS.get(k)) for k in keys}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def feature_dim(alpha: float) -> int:
    """Width of the pooled features: 1280, or 1280 x alpha rounded to a multiple of 8 above 1
    (MobileNetV2 keeps its last layer at 1280 for narrower models)."""
    if alpha <= 1.0:
        return 1280
    width = max(8, int(1280 * alpha + 4) // 8 * 8)
    return width + 8 if width < 0.9 * 1280 * alpha else width


def check_compatible(recorded: dict, wanted: dict, what: str, fix: str) -> None:
    """Raise a FeatxError naming every differing model key of two fingerprints."""

    def get(fp, k):
        return fp.get(k, KEY_DEFAULTS.get(k))

    diffs = [f"{k}: {get(recorded, k)!r} vs {get(wanted, k)!r}" for k in MODEL_KEYS]
    diffs = [d for d, k in zip(diffs, MODEL_KEYS) if get(recorded, k) != get(wanted, k)]
    if diffs:
        raise FeatxError(f"{what} was made with another backbone ({'; '.join(diffs)}). {fix}")


def require_float(fp: dict, what: str, command: str) -> None:
    """Refuse INT8 features where a command rebuilds the float Keras backbone (finetune, export):
    a head fitted on INT8 features would run on other features there."""
    if fp.get("precision", "fp32") != "fp32":
        raise FeatxError(
            f"{what} was fitted on {fp['precision']} features; `featx {command}` rebuilds the "
            "float backbone, whose features differ. Fit the head on a float cache (`featx "
            "extract` without --precision int8) for this; predict works with int8 heads."
        )


def validate(image_size, alpha, batch_size: int | None = None) -> None:
    """The one check of the backbone's options (extract, and every spec built): image_size in
    [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE], alpha in (0, MAX_ALPHA], a batch that fits in memory."""
    check_int("image_size", image_size, config.MIN_IMAGE_SIZE, config.MAX_IMAGE_SIZE)
    ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if not ok or not 0 < alpha <= config.MAX_ALPHA:
        raise FeatxError(f"alpha must be in (0, {config.MAX_ALPHA}], got {alpha!r}.")
    if batch_size is not None:
        check_int("batch_size", batch_size, 1, config.MAX_BATCH_SIZE)
        if batch_size * image_size**2 > config.MAX_BATCH_PIXELS:
            raise FeatxError(
                f"A batch of {batch_size} images of {image_size} px needs too much memory "
                f"(batch_size x image_size^2 must be <= {config.MAX_BATCH_PIXELS:,}). Lower "
                "--batch-size or --image-size."
            )


def preprocessing_layer():
    """MobileNetV2's preprocess_input (pixels 0..255 to [-1, 1]) as a layer that saves safely."""
    import keras

    return keras.layers.Rescaling(scale=1.0 / 127.5, offset=-1.0, name="preprocess")


def build_base(
    weights: str = config.WEIGHTS,
    image_size: int = config.IMAGE_SIZE,
    alpha: float = config.ALPHA,
):
    """A new MobileNetV2 base (no top, average pooling) with the requested weights loaded."""
    import keras

    validate(image_size, alpha)
    path = resolve_weights(weights, image_size, alpha)
    if path is None:
        keras.utils.set_random_seed(config.RANDOM_WEIGHTS_SEED)
    base = keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3),
        alpha=alpha,
        include_top=False,
        pooling="avg",
        weights=None,
    )
    if path is not None:
        try:
            base.load_weights(path)
        except Exception as e:
            raise FeatxError(
                f"Could not load weights '{path}' into MobileNetV2(alpha={alpha}): {e}. "
                "Expected a no-top MobileNetV2 .h5 weights file of the same alpha."
            ) from None
    return base


@dataclass(frozen=True)
class BackboneSpec:
    """What makes the features: the one object the stages pass around (timm's pretrained_cfg,
    nanoGPT's GPTConfig). Every cache and head records its `fingerprint()`, and
    `from_fingerprint` gives it back; a second backbone or engine plugs in here."""

    weights: str = config.WEIGHTS
    image_size: int = config.IMAGE_SIZE
    alpha: float = config.ALPHA
    precision: str = config.PRECISION
    int8_sha256: str | None = None  # the quantized .onnx file, with precision "int8"

    @classmethod
    def from_fingerprint(cls, fp: dict) -> BackboneSpec:
        try:
            return cls(
                str(fp["weights"]),
                int(fp["image_size"]),
                float(fp["alpha"]),
                fp.get("precision", config.PRECISION),
                fp.get("int8_sha256"),
            )
        except KeyError as e:
            raise FeatxError(f"The fingerprint records no complete backbone (no {e}).") from None

    def fingerprint(self, engine: str = "keras") -> dict:
        return fingerprint(
            self.weights, self.image_size, self.alpha, engine, self.precision, self.int8_sha256
        )

    @property
    def feature_dim(self) -> int:
        return feature_dim(self.alpha)


def augmentation_layers(seed: int = config.SEED) -> list:
    """Random flip, rotation, zoom and contrast on 0..255 pixels; identity outside training."""
    import keras

    return [
        keras.layers.RandomFlip(config.AUGMENT_FLIP, seed=seed, name="augment_flip"),
        keras.layers.RandomRotation(
            config.AUGMENT_ROTATION, seed=seed + 1, name="augment_rotation"
        ),
        keras.layers.RandomZoom(config.AUGMENT_ZOOM, seed=seed + 2, name="augment_zoom"),
        keras.layers.RandomContrast(
            config.AUGMENT_CONTRAST, value_range=(0, 255), seed=seed + 3, name="augment_contrast"
        ),
    ]


def compose(
    spec: BackboneSpec,
    head=None,
    *,
    augment: bool = False,
    dropout: float = 0.0,
    flip: bool = False,
    seed: int = config.SEED,
    name: str = "featx_model",
    novelty=None,
):
    """The one graph every stage builds, from raw RGB pixels (0..255, NHWC float32):
    [augmentation] -> preprocessing -> frozen MobileNetV2 (BatchNorm in inference mode, even
    where fine-tuning unfreezes it) -> [mean with the mirror image's features] -> [dropout ->
    head]. Without a head it gives the pooled features (extract's Keras engine); with one, class
    probabilities (finetune, export). The base starts frozen (see finetune.set_trainable).
    `novelty`, a function (features, probabilities) -> tensor (heads.novelty.keras_score), makes
    the outputs {"probabilities", "novelty"} (export)."""
    import keras

    base = build_base(spec.weights, spec.image_size, spec.alpha)
    base.trainable = False
    keras.utils.set_random_seed(seed)  # after build_base, which seeds random weights itself
    size = spec.image_size
    inputs = keras.Input((size, size, 3), dtype="float32", name="image")
    x = inputs
    for layer in augmentation_layers(seed) if augment else []:
        x = layer(x)
    x = preprocessing_layer()(x)
    features = base(x, training=False)
    if flip:  # a head fitted with mirror images sees the mean of both views' features
        mirrored = base(keras.ops.flip(x, axis=2), training=False)  # NHWC: reverse the width
        features = keras.layers.Average(name="mean_with_mirror_image")([features, mirrored])
    if head is None:
        return keras.Model(inputs, features, name=name)
    if head.input_shape[-1] != features.shape[-1]:
        raise FeatxError(
            f"The head takes {head.input_shape[-1]}-d features, the backbone gives "
            f"{features.shape[-1]}-d ones. Use a head fitted on features of this backbone."
        )
    if dropout:
        features = keras.layers.Dropout(dropout, seed=seed, name="dropout")(features)
    probabilities = head(features)
    if novelty is None:
        return keras.Model(inputs, probabilities, name=name)
    outputs = {"probabilities": probabilities, "novelty": novelty(features, probabilities)}
    return keras.Model(inputs, outputs, name=name)


def is_augmentation(layer) -> bool:
    """A random augmentation layer (identity at inference), of augmentation_layers or Keras'."""
    import keras

    random_layers = tuple(
        getattr(keras.layers, n)
        for n in ("RandomFlip", "RandomRotation", "RandomZoom", "RandomContrast")
        if hasattr(keras.layers, n)
    )
    return isinstance(layer, random_layers) or layer.name.startswith("augment_")


def rechain(model, outputs=None):
    """The layers of a chain `model` (compose's, as finetune saves it) called again in order on a
    new input, augmentation left out and each with training=False: the inference graph. Its
    output is the last layer's (the probabilities), or `outputs(features, probabilities)` where
    features are what the last layer (the head) takes. The layers, and so the weights, are
    shared with `model`. A model that is not a chain of single-input layers raises."""
    import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    x = inputs = keras.Input(model.input_shape[1:], dtype="float32", name="image")
    for layer in layers[:-1]:
        if not is_augmentation(layer):
            x = layer(x, training=False)
    probabilities = layers[-1](x, training=False)
    result = probabilities if outputs is None else outputs(x, probabilities)
    return keras.Model(inputs, result, name=model.name)


def scoring_model(model):
    """`model` (a chain, see rechain) for inference with two outputs, [the features its head
    takes, probabilities]: one pass gives both the evaluation and the novelty score's features.
    It shares the weights of `model`, so it follows its training."""
    return rechain(model, lambda features, probabilities: [features, probabilities])


@functools.lru_cache(maxsize=4)
def build_backbone(
    weights: str = config.WEIGHTS,
    image_size: int = config.IMAGE_SIZE,
    alpha: float = config.ALPHA,
):
    """The frozen feature extractor: raw RGB pixels (0..255) in, pooled features out.

    Cached per process: building MobileNetV2 costs seconds.
    """
    return compose(BackboneSpec(weights, image_size, alpha), name="featx_backbone")


class KerasEngine:
    """Runs the backbone with Keras on whichever backend is active."""

    name = "keras"

    def __init__(self, spec: BackboneSpec):
        self.spec = spec
        self._model = None

    def features(self, batch: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8 or float pixels -> (n, dim) float32 features."""
        if self._model is None:
            spec = self.spec
            self._model = build_backbone(spec.weights, spec.image_size, spec.alpha)
        out = self._model.predict_on_batch(np.asarray(batch, dtype=np.float32))
        return np.asarray(out, dtype=np.float32)
