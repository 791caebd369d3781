"""The `featx` command line: each command parses its options and calls one library function.

No TensorFlow, Keras or h5py at module level, so `featx --help` answers at once.
"""

from __future__ import annotations

import json
import sys
import time
from functools import wraps

import click

from featx import __version__, config
from featx.errors import FeatxError


def friendly_errors(fn):
    """Bad input becomes one line on stderr and exit status 1, never a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FeatxError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # permission denied, disk full, ...: the OS says which file
            where = f" '{e.filename}'" if e.filename else ""
            raise click.ClickException(
                f"{e.strerror or e}{where}. Check that the path exists and is writable, and "
                "that the disk has room."
            ) from None

    return wrapper


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="featx")
def cli():
    """featx: train an image classifier from a folder of photos in minutes.

    Run the frozen MobileNetV2 once over your images (`featx extract`), then train heads on the
    cached features in seconds (`featx fit-head`).
    """


class Progress:
    """A click progress bar that shows images/s; the library calls it with (done, total).

    When stderr is not a terminal (CI logs, pipes) it prints one line every LOG_EVERY seconds and
    one at the end instead of a line per batch."""

    LOG_EVERY = 10.0

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.bar = label, enabled, None
        self.last_line = time.monotonic()

    def __call__(self, done: int, total: int, rate: float) -> None:
        if not self.enabled:
            return
        if not sys.stderr.isatty():
            if done >= total or time.monotonic() - self.last_line >= self.LOG_EVERY:
                click.echo(f"{self.label} {done}/{total}, {rate:.1f} images/s", err=True)
                self.last_line = time.monotonic()
            return
        if self.bar is None:
            self.bar = click.progressbar(
                length=total, label=self.label, file=sys.stderr, show_pos=True, width=30
            )
            self.bar.__enter__()
        self.bar.label = f"{self.label} {rate:6.1f} images/s"
        self.bar.update(done - self.bar.pos)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@cli.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option(
    "--cache",
    "cache_path",
    type=click.Path(dir_okay=False),
    help="HDF5 file to create or update  [default: cache/<DATA_DIR name>.h5]",
)
@click.option(
    "--weights",
    default=config.WEIGHTS,
    show_default=True,
    help="imagenet, none (random, for tests) or a MobileNetV2 no-top .h5 file.",
)
@click.option(
    "--image-size",
    default=config.IMAGE_SIZE,
    show_default=True,
    type=int,
    help="Square input size in pixels.",
)
@click.option(
    "--alpha",
    default=config.ALPHA,
    show_default=True,
    type=float,
    help="MobileNetV2 width multiplier.",
)
@click.option("--batch-size", default=config.BATCH_SIZE, show_default=True, type=int)
@click.option(
    "--dtype",
    default=config.FEATURE_DTYPE,
    show_default=True,
    type=click.Choice(["float32", "float16"]),
    help="float16 halves the cache.",
)
@click.option(
    "--val-split",
    default=config.VAL_SPLIT,
    show_default=True,
    type=float,
    help="Validation share per class when DATA_DIR has no split folders.",
)
@click.option("--seed", default=config.SEED, show_default=True, type=int, help="Seeds the split.")
@click.option("--overwrite", is_flag=True, help="Replace a cache made with another backbone.")
@click.option(
    "--engine",
    default=config.ENGINE,
    show_default=True,
    type=click.Choice(config.ENGINES),
    help="onnx: ONNX Runtime, ~2x faster on a CPU; auto: onnx when it can run, no GPU is seen.",
)
@click.option(
    "--precision",
    default="fp32",
    show_default=True,
    type=click.Choice(config.PRECISIONS),
    help="int8: a quantized ONNX backbone, ~2x faster again, features not mixable with fp32.",
)
@click.option(
    "--flip/--no-flip",
    default=None,
    help="Also store the features of each image mirrored left-right (~2x the model time); "
    "fit-head trains on both and predicts from their mean.  [default: the cache's; new: "
    + ("--flip" if config.FLIP else "--no-flip")
    + "]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@friendly_errors
def extract(
    data_dir,
    cache_path,
    weights,
    image_size,
    alpha,
    batch_size,
    dtype,
    val_split,
    seed,
    overwrite,
    engine,
    precision,
    flip,
    as_json,
):
    """Extract MobileNetV2 features of every image in DATA_DIR into an HDF5 cache.

    DATA_DIR is DATA/CLASS/* (split into train/validation by --val-split) or
    DATA/{train,validation,test}/CLASS/*. Runs again only on new or changed files.
    """
    from featx.extract import extract as run_extract

    progress = Progress("extracting", enabled=not as_json)
    try:
        summary = run_extract(
            data_dir,
            cache_path,
            weights=weights,
            image_size=image_size,
            alpha=alpha,
            batch_size=batch_size,
            dtype=dtype,
            val_split=val_split,
            seed=seed,
            overwrite=overwrite,
            engine=engine,
            precision=precision,
            flip=flip,
            progress=progress,
            log=lambda m: click.echo(m, err=True),
        )
    finally:
        progress.close()
    if as_json:
        print_json(summary)
    else:
        click.echo(format_extract_summary(summary))


def format_extract_summary(s: dict) -> str:
    lines = [f"cache: {s['cache']}"]
    for split, per_class in s["counts"].items():
        parts = ", ".join(f"{c} {n}" for c, n in per_class.items())
        lines.append(f"  {split:<10} {sum(per_class.values()):>6} images ({parts})")
    lines.append(
        f"extracted {s['extracted']} new or changed, kept {s['kept']}, reused {s['resumed']} "
        f"from an interrupted run, dropped {s['dropped']} deleted"
    )
    lines.append(f"rejected {len(s['rejected'])} files" + (":" if s["rejected"] else ""))
    lines += [f"  {r['path']}: {r['reason']}" for r in s["rejected"][:20]]
    if len(s["rejected"]) > 20:
        lines.append(f"  ... and {len(s['rejected']) - 20} more (see `featx info --json`)")
    lines.append(
        f"{s['seconds']:.1f} s, {s['images_per_second']:.1f} images/s ({s['engine']} engine"
        + (", int8)" if s.get("precision") == "int8" else ")")
    )
    return "\n".join(lines)


@cli.command()
@click.argument("cache_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@friendly_errors
def info(cache_path, as_json):
    """Show what a feature cache holds: counts per split and class, fingerprint, rejected files."""
    from featx.store import info as cache_info

    data = cache_info(cache_path)
    if as_json:
        print_json(data)
        return
    click.echo(f"{data['path']}: {data['images']} images, {data['feature_dim']}-d {data['dtype']}")
    click.echo(f"data: {data['data_dir']} ({data['layout']} layout), updated {data['updated']}")
    for split, per_class in data["counts"].items():
        parts = ", ".join(f"{c} {n}" for c, n in per_class.items())
        click.echo(f"  {split:<10} {sum(per_class.values()):>6} ({parts})")
    fp = data["fingerprint"]
    click.echo(
        f"backbone: {fp['backbone']} alpha={fp['alpha']} image_size={fp['image_size']} "
        f"weights={fp['weights']} sha256={fp['weights_sha256'][:12]} engine={fp.get('engine')}"
    )
    click.echo(f"rejected: {len(data['rejected'])}")
    for r in data["rejected"]:
        click.echo(f"  {r['path']}: {r['reason']}")


@cli.command()
@click.argument("cache_path", type=click.Path(dir_okay=False))
@click.option(
    "--head",
    "head_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="A `featx fit-head` output folder fitted on CACHE: the warm start.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    help="Folder to write  [default: <CACHE folder>/<CACHE name>-finetune/]",
)
@click.option(
    "--unfreeze-layers",
    default=config.FINETUNE_UNFREEZE_LAYERS,
    show_default=True,
    type=int,
    help="Top layers of MobileNetV2 that train (BatchNorm never does); 0: only the head.",
)
@click.option("--epochs", default=config.FINETUNE_EPOCHS, show_default=True, type=int)
@click.option(
    "--learning-rate", default=config.FINETUNE_LEARNING_RATE, show_default=True, type=float
)
@click.option("--batch-size", default=config.FINETUNE_BATCH_SIZE, show_default=True, type=int)
@click.option(
    "--augment/--no-augment",
    default=True,
    show_default=True,
    help="Random flip, rotation, zoom and contrast while training.",
)
@click.option("--dropout", default=config.FINETUNE_DROPOUT, show_default=True, type=float)
@click.option(
    "--patience",
    default=config.FINETUNE_PATIENCE,
    show_default=True,
    type=int,
    help="Epochs without a lower validation loss before stopping.",
)
@click.option(
    "--reduce-lr-on-plateau", is_flag=True, help="Lower the learning rate when it stalls."
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Where CACHE's images are now, if they moved since extraction.",
)
@click.option("--seed", default=config.SEED, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@friendly_errors
def finetune(cache_path, head_dir, output, as_json, **options):
    """Fine-tune MobileNetV2 and a fitted head end to end on the images of CACHE.

    Rebuilds one model (augmentation, preprocessing, backbone, head) warm-started from the head,
    trains the top of the backbone at a low learning rate on the cache's train split, and keeps
    the best weights on the validation split, never worse than the warm start. Ctrl-C keeps the
    best weights so far.
    """
    from featx.finetune import finetune as run_finetune
    from featx.report import format_summary

    m = run_finetune(
        cache_path, head_dir, output, log=lambda msg: click.echo(msg, err=True), **options
    )
    if as_json:
        print_json(m)
    else:
        before, after = m["before"]["validation"]["accuracy"], m["validation"]["accuracy"]
        click.echo(
            f"fine-tuned in {m['seconds'] / 60:.1f} min, best epoch {m['best_epoch']} of "
            f"{m['epochs_run']}; validation accuracy {before:.4f} (warm start) -> {after:.4f}"
        )
        click.echo(format_summary(m))
    if m["interrupted"]:
        raise SystemExit(130)


@cli.command("fit-head")
@click.argument("cache_path", type=click.Path(dir_okay=False))
@click.option(
    "--head", default=config.HEAD, show_default=True, type=click.Choice(["logreg", "dense"])
)
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    help="Folder to write  [default: <CACHE folder>/<CACHE name>-<head>/]",
)
@click.option("--C", "C", type=float, help="logreg: regularisation  [default: chosen by CV]")
@click.option(
    "--scaling",
    type=click.Choice(["auto", *config.SCALING_CHOICES]),
    help="Feature scaling; auto: chosen with C by CV  "
    f"[default: {config.SCALING} (logreg), {config.DENSE_SCALING} (dense)]",
)
@click.option(
    "--flip/--no-flip",
    default=None,
    help="Train on the mirror images too, predict from the mean of both (extract --flip)  "
    "[default: when the cache has them]",
)
@click.option(
    "--epochs", default=config.DENSE_EPOCHS, show_default=True, type=int, help="dense: at most."
)
@click.option("--learning-rate", default=config.DENSE_LEARNING_RATE, show_default=True, type=float)
@click.option("--dropout", default=config.DENSE_DROPOUT, show_default=True, type=float)
@click.option(
    "--hidden", default=config.DENSE_HIDDEN, show_default=True, type=int, help="dense: 0 = none."
)
@click.option(
    "--class-weight",
    default=config.CLASS_WEIGHT,
    show_default=True,
    type=click.Choice(["none", "balanced"]),
)
@click.option("--seed", default=config.SEED, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--min-accuracy", type=float, help="Exit 1 if validation accuracy is below this.")
@friendly_errors
def fit_head(cache_path, as_json, min_accuracy, **options):
    """Train a classifier head on CACHE's features and report honest metrics.

    logreg: multinomial logistic regression, feature scaling and C chosen by cross-validation on
    the train split. dense: a small Keras head with early stopping on the validation loss. Writes
    the head, metrics.json, confusion_matrix.png, misclassified.csv (dense: training_curves.png).
    """
    from featx.fit_head import fit_head as run_fit_head
    from featx.report import format_summary

    m = run_fit_head(cache_path, log=lambda msg: click.echo(msg, err=True), **options)
    if as_json:
        print_json(m)
    else:
        click.echo(format_summary(m))
    accuracy = m["validation"]["accuracy"]
    if min_accuracy is not None and accuracy < min_accuracy:
        raise click.ClickException(
            f"validation accuracy {accuracy:.4f} is below --min-accuracy {min_accuracy}."
        )


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    help="Write one row per image to this .csv or .json file instead of the table.",
)
@click.option(
    "--top-k",
    default=config.PREDICT_TOP_K,
    show_default=True,
    type=int,
    help="Classes listed per image, most probable first.",
)
@click.option("--batch-size", default=config.BATCH_SIZE, show_default=True, type=int)
@click.option(
    "--engine",
    default=config.ENGINE,
    show_default=True,
    type=click.Choice(config.ENGINES),
    help="What runs the backbone of a fit-head model (as for extract).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the rows and the summary as JSON.")
@friendly_errors
def predict(model_dir, paths, output, top_k, batch_size, engine, as_json):
    """Classify images with MODEL_DIR, a fit-head or finetune output folder.

    PATHS are image files, folders (searched recursively) or quoted glob patterns such as
    'photos/*.jpg'. Prints one line per image and, when the images sit in folders named after the
    model's classes, the accuracy. A file that cannot be read gets an error row; the exit status
    is 1 only when no image could be predicted.
    """
    from featx.predict import format_summary, format_table
    from featx.predict import predict as run_predict

    progress = Progress("predicting", enabled=not as_json)
    try:
        result = run_predict(
            model_dir,
            paths,
            output=output,
            top_k=top_k,
            batch_size=batch_size,
            engine=engine,
            progress=progress,
            log=lambda m: click.echo(m, err=True),
        )
    finally:
        progress.close()
    if as_json:
        print_json(result)
        return
    if output is None:
        click.echo(format_table(result))
    click.echo(format_summary(result))


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "model_format",
    default=config.EXPORT_FORMAT,
    show_default=True,
    type=click.Choice(["keras", "savedmodel", "tflite"]),
    help="savedmodel and tflite need the TensorFlow backend.",
)
@click.option(
    "--quantize",
    default=config.EXPORT_QUANTIZE,
    show_default=True,
    type=click.Choice(["none", "float16", "dynamic"]),
    help="TFLite only: float16 weights, or int8 weights (dynamic range).",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    help="Folder to write  [default: MODEL_DIR/export-<format>[-<quantize>]/]",
)
@click.option(
    "--cache",
    "cache_path",
    type=click.Path(dir_okay=False),
    help="The model's feature cache: evaluate the export on its validation split.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the export record as JSON.")
@friendly_errors
def export(model_dir, model_format, quantize, output, cache_path, as_json):
    """Export MODEL_DIR as one model from raw pixels to class probabilities.

    Writes the model (model.keras, saved_model/ or model.tflite), labels.txt and export.json
    (input size, preprocessing, class names), then checks the exported file against the
    in-process model and reports the largest probability difference.
    """
    from featx.export import export as run_export
    from featx.export import format_summary

    progress = Progress("evaluating", enabled=not as_json)
    try:
        result = run_export(
            model_dir,
            model_format,
            quantize,
            output,
            cache_path,
            progress=progress,
            log=lambda m: click.echo(m, err=True),
        )
    finally:
        progress.close()
    if as_json:
        print_json(result)
    else:
        click.echo(format_summary(result))


if __name__ == "__main__":
    cli()
