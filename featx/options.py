"""Options of each stage as validated objects: every value is checked before any work starts.

The public functions keep plain keyword arguments (the Keras API guideline) and build one of these
once; a bad value is a FeatxError naming the option, the value and the accepted range. Defaults
come from `featx.config`, the only place they are written.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from featx import config
from featx.backbone import mobilenet
from featx.errors import FeatxError, check_choice, check_fraction, check_int, fraction_hint
from featx.files import is_url
from featx.heads import novelty
from featx.images import shards


def build_options(cls, options: dict):
    """`cls(**options)`, with a one-line FeatxError for a keyword `cls` has no field of (and the
    near match: `image_sise` -> "did you mean image_size?")."""
    names = [f.name for f in fields(cls)]
    for key in options:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {near[0]}?" if near else f"expected one of {', '.join(names)}."
            raise FeatxError(f"Unknown option {key!r}; {hint}")
    return cls(**options)


def takes_options(cls):
    """Decorator of a command whose `**options` become `cls` (validated and defaulted there, once):
    its signature (help(), inspect, a notebook's Shift-Tab) lists each option with its default,
    in front of the keyword-only parameters the function declares itself (progress, log)."""

    def decorate(func):
        signature = inspect.signature(func)
        own = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
        keyword = inspect.Parameter.KEYWORD_ONLY
        options = [
            inspect.Parameter(f.name, keyword, default=f.default, annotation=f.type)
            for f in fields(cls)
            if f.default is not MISSING
        ]
        first_own_keyword = next((i for i, p in enumerate(own) if p.kind == keyword), len(own))
        params = own[:first_own_keyword] + options + own[first_own_keyword:]
        func.__signature__ = signature.replace(parameters=params)
        return func

    return decorate


@dataclass(frozen=True)
class ExtractOptions:
    """What `featx extract` was asked for. None: the existing cache's value, else the default."""

    weights: str = config.WEIGHTS
    image_size: int = config.IMAGE_SIZE
    alpha: float = config.ALPHA
    batch_size: int | None = None  # None: config.BATCH_SIZE, or GPU_BATCH_SIZE on a GPU
    dtype: str | None = None
    val_split: float | None = None
    seed: int | None = None
    overwrite: bool = False
    engine: str | None = None  # None: config.ENGINE when the run starts
    precision: str = config.PRECISION
    flip: bool | None = None  # also the mirror images' features; None: the cache's
    workers: int | None = None  # decoding threads; None: one per core (config.decode_workers)
    shard: str | None = None  # "K/N": only the images of shard K of N (featx.images.shards)
    # "ray": the backbone runs on Ray (featx.cache.ray_executor); workers are then its actors
    executor: str = config.EXECUTOR
    ray_address: str | None = None  # None: a local Ray of this machine's cores
    gpus_per_worker: float = config.GPUS_PER_WORKER  # GPUs per Ray actor
    # Where Ray's actors write their part files when the nodes share no disk: a URL every node
    # reaches. None: the cache's own folder (`<cache URL>.parts` for a cache at a URL).
    parts: str | None = None
    decode_in: str = config.DECODE_IN  # "threads", "processes" or "auto" (featx.images.decoding)

    def __post_init__(self):
        if self.engine is None:  # read now: config.ENGINE may be set at run time
            object.__setattr__(self, "engine", config.ENGINE)
        mobilenet.validate(self.image_size, self.alpha, self.batch_size)
        if self.workers is not None:
            check_int("workers", self.workers, 1, config.MAX_DECODE_WORKERS)
        self._check_executor()
        if self.dtype is not None:
            check_choice("dtype", self.dtype, config.FEATURE_DTYPES)
        if self.val_split is not None:
            check_fraction("val_split", self.val_split)
        if self.seed is not None:
            check_int("seed", self.seed, 0)
        check_choice("engine", self.engine, config.ENGINES)
        check_choice("precision", self.precision, config.PRECISIONS)
        if self.shard is not None:
            shards.parse(self.shard)
            if self.precision == "int8":  # each shard would calibrate on other images
                raise FeatxError(
                    "--shard needs --precision fp32: an int8 backbone is calibrated on the images "
                    "a run sees, so shards would not share one. Drop --precision int8."
                )
        if self.precision == "int8" and self.engine == "keras":
            raise FeatxError(
                "--precision int8 runs on ONNX Runtime; pass --engine onnx (or auto), or drop "
                "--precision int8 to use Keras."
            )

    def _check_executor(self) -> None:
        check_choice("executor", self.executor, config.EXECUTORS)
        ok = isinstance(self.gpus_per_worker, (int, float)) and not isinstance(
            self.gpus_per_worker, bool
        )
        if not ok or self.gpus_per_worker < 0:
            raise FeatxError(
                f"gpus_per_worker must be a number >= 0, got {self.gpus_per_worker!r}."
            )
        if self.parts is not None and not is_url(self.parts):
            raise FeatxError(f"--parts must be a URL every Ray node can reach (s3://bucket/run), "
                             f"got {self.parts!r}.")  # fmt: skip
        if self.executor != "ray" and (self.ray_address or self.gpus_per_worker or self.parts):
            option = "--ray-address" if self.ray_address else "--gpus-per-worker"
            option = "--parts" if self.parts else option
            raise FeatxError(f"{option} is an option of the Ray executor; add --executor ray.")
        check_choice("decode_in", self.decode_in, config.DECODE_INS)
        if self.executor == "ray" and self.decode_in == "processes":
            raise FeatxError(
                "--decode-in processes is an option of the local executor: Ray's actors are "
                "processes already, each decoding in threads. Drop --decode-in."
            )
        if self.executor == "ray" and self.precision == "int8":  # calibrated on the driver
            raise FeatxError(
                "--executor ray needs --precision fp32: the int8 backbone is a file calibrated "
                "by one process. Drop --precision int8."
            )

    @property
    def shard_numbers(self) -> tuple[int, int] | None:
        return None if self.shard is None else shards.parse(self.shard)

    @property
    def spec(self) -> mobilenet.BackboneSpec:
        """What makes the features (the one place extract builds it from its options)."""
        return mobilenet.BackboneSpec(self.weights, self.image_size, self.alpha)


@dataclass(frozen=True)
class PredictOptions:
    """What `featx predict` was asked for (see predict.predict)."""

    top_k: int = config.PREDICT_TOP_K
    batch_size: int = config.BATCH_SIZE
    engine: str | None = None  # None: config.ENGINE when the run starts (see load_classifier)
    min_confidence: float | None = None
    output: str | None = None
    unknown: bool = True  # flag images unlike the training images (--no-unknown: off)
    unknown_rate: float | None = None  # None: the rate the model was calibrated at

    def __post_init__(self):
        check_int("top_k", self.top_k, 1)
        if self.unknown_rate is not None:
            novelty.check_rate(self.unknown_rate)
        check_int("batch_size", self.batch_size, 1, config.MAX_BATCH_SIZE)
        if self.engine is not None:
            check_choice("engine", self.engine, config.ENGINES)
        if self.min_confidence is not None:
            ok = isinstance(self.min_confidence, (int, float)) and 0 <= self.min_confidence <= 1
            if not ok:
                raise FeatxError(
                    "--min-confidence is a probability between 0 and 1, got "
                    f"{self.min_confidence!r}{fraction_hint(self.min_confidence)}"
                )
        if self.output is not None and Path(self.output).suffix.lower() not in (".csv", ".json"):
            raise FeatxError(
                f"Cannot tell the format of --output '{self.output}'; name it .csv or .json "
                "(e.g. predictions.csv)."
            )


@dataclass(frozen=True)
class ExportOptions:
    """What `featx export` was asked for (see export.export)."""

    format: str = config.EXPORT_FORMAT
    quantize: str = config.EXPORT_QUANTIZE
    check_images: int = config.EXPORT_CHECK_IMAGES
    batch_size: int = config.BATCH_SIZE

    def __post_init__(self):
        check_choice("format", self.format, config.EXPORT_FORMATS)
        check_choice("quantize", self.quantize, config.EXPORT_QUANTIZES)
        if self.quantize != "none" and self.format != "tflite":
            raise FeatxError(
                f"--quantize {self.quantize} applies to --format tflite only, got --format "
                f"{self.format}. Drop --quantize, or export to tflite."
            )
        check_int("check_images", self.check_images, 1)
        check_int("batch_size", self.batch_size, 1, config.MAX_BATCH_SIZE)


@dataclass(frozen=True)
class FinetuneOptions:
    """What `featx finetune` was asked for (see finetune.finetune)."""

    unfreeze_layers: int = config.FINETUNE_UNFREEZE_LAYERS
    epochs: int = config.FINETUNE_EPOCHS
    learning_rate: float = config.FINETUNE_LEARNING_RATE
    batch_size: int = config.FINETUNE_BATCH_SIZE
    augment: bool = True
    dropout: float = config.FINETUNE_DROPOUT
    patience: int = config.FINETUNE_PATIENCE
    reduce_lr_on_plateau: bool = False
    seed: int = config.SEED

    def __post_init__(self):
        check_int("unfreeze_layers", self.unfreeze_layers, 0)
        check_int("epochs", self.epochs, 0)
        check_int("batch_size", self.batch_size, 1, config.MAX_BATCH_SIZE)
        check_int("patience", self.patience, 0)
        check_int("seed", self.seed, 0)
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise FeatxError(f"learning_rate must be > 0, got {lr!r}.")
        check_fraction("dropout", self.dropout)

    def record(self) -> dict:
        """The options as finetune.json and metrics.json record them."""
        augmentation = {
            "flip": config.AUGMENT_FLIP,
            "rotation": config.AUGMENT_ROTATION,
            "zoom": config.AUGMENT_ZOOM,
            "contrast": config.AUGMENT_CONTRAST,
        }
        return {**asdict(self), "augmentation": augmentation if self.augment else None}
