"""Options of each stage as validated objects: every value is checked before any work starts.

The public functions keep plain keyword arguments (the Keras API guideline) and build one of these
once; a bad value is a FeatxError naming the option, the value and the accepted range. Defaults
come from `featx.config`, the only place they are written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from featx import config
from featx.errors import FeatxError
from featx.images import shards


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """`value` is an int in [low, high]; else a FeatxError naming the option `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FeatxError(f"{name} must be an integer, got {value!r}.")
    if value < low or (high is not None and value > high):
        span = (
            f"an integer between {low} and {high}" if high is not None else f"an integer >= {low}"
        )
        raise FeatxError(f"{name} must be {span}, got {value}.")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise FeatxError(
            f"Unknown {name} {value!r}; expected one of {', '.join(map(str, choices))}."
        )


def check_fraction(name: str, value, *, closed: bool = False) -> None:
    """`value` is a number in [0, 1) (or [0, 1] with closed=True)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0.0 <= value < 1.0 or (closed and value == 1.0)):
        raise FeatxError(f"{name} must be in [0, {'1]' if closed else '1)'}, got {value!r}.")


def check_image_size(image_size, batch_size: int | None = None) -> None:
    check_int("image_size", image_size, config.MIN_IMAGE_SIZE, config.MAX_IMAGE_SIZE)
    if batch_size is not None:
        check_int("batch_size", batch_size, 1, config.MAX_BATCH_SIZE)
        if batch_size * image_size**2 > config.MAX_BATCH_PIXELS:
            raise FeatxError(
                f"A batch of {batch_size} images of {image_size} px needs too much memory "
                f"(batch_size x image_size^2 must be <= {config.MAX_BATCH_PIXELS:,}). Lower "
                "--batch-size or --image-size."
            )


def check_alpha(alpha) -> None:
    ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if not ok or not 0 < alpha <= config.MAX_ALPHA:
        raise FeatxError(f"alpha must be in (0, {config.MAX_ALPHA}], got {alpha!r}.")


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
    engine: str = config.ENGINE
    precision: str = config.PRECISION
    flip: bool | None = None  # also the mirror images' features; None: the cache's
    workers: int | None = None  # decoding threads; None: one per core (config.decode_workers)
    shard: str | None = None  # "K/N": only the images of shard K of N (featx.images.shards)
    # "ray": the backbone runs on Ray (featx.cache.ray_executor); workers are then its actors
    executor: str = config.EXECUTOR
    ray_address: str | None = None  # None: a local Ray of this machine's cores
    gpus_per_worker: float = config.GPUS_PER_WORKER  # GPUs per Ray actor
    decode_in: str = config.DECODE_IN  # "threads", "processes" or "auto" (featx.images.decoding)

    def __post_init__(self):
        check_image_size(self.image_size, self.batch_size)
        if self.workers is not None:
            check_int("workers", self.workers, 1, config.MAX_DECODE_WORKERS)
        self._check_executor()
        check_alpha(self.alpha)
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
        if self.executor != "ray" and (self.ray_address or self.gpus_per_worker):
            option = "--ray-address" if self.ray_address else "--gpus-per-worker"
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


@dataclass(frozen=True)
class PredictOptions:
    """What `featx predict` was asked for (see predict.predict)."""

    top_k: int = config.PREDICT_TOP_K
    batch_size: int = config.BATCH_SIZE
    engine: str = config.ENGINE
    min_confidence: float | None = None
    output: str | None = None

    def __post_init__(self):
        check_int("top_k", self.top_k, 1)
        check_int("batch_size", self.batch_size, 1, config.MAX_BATCH_SIZE)
        check_choice("engine", self.engine, config.ENGINES)
        if self.min_confidence is not None:
            ok = isinstance(self.min_confidence, (int, float)) and 0 <= self.min_confidence <= 1
            if not ok:
                raise FeatxError(
                    "--min-confidence is a probability between 0 and 1, got "
                    f"{self.min_confidence!r}."
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
