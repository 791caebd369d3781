"""The `featx` command line: each command parses its options and calls one library function.

No TensorFlow, Keras or h5py at module level, so `featx --help` answers at once.
"""

from __future__ import annotations

import json
import sys
from functools import wraps

import click

from featx import config
from featx.config import VERSION
from featx.errors import FeatxError, check_exists, check_fraction


def friendly_errors(fn):
    """Bad input becomes one line on stderr and exit status 1, never a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:  # the reader went away (`featx info | head -1`): stop quietly
            _quiet_stdout()
            sys.exit(0)
        except FeatxError as e:
            raise click.ClickException(cli_names(str(e))) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            if isinstance(e, MemoryError) or _too_little_memory(e):
                raise click.ClickException(_out_of_memory(e)) from None
            if not isinstance(e, OSError):
                raise
            # permission denied, disk full, ...: the OS says which file
            where = f" '{e.filename}'" if e.filename else ""
            raise click.ClickException(
                f"{e.strerror or e}{where}. Check that the path exists and is writable, and "
                "that the disk has room."
            ) from None

    return wrapper


def _address_space_limit() -> int | None:
    """The soft address-space limit of this process in bytes (`ulimit -v`), None when unlimited."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _too_little_memory(error: Exception) -> bool:
    """Whether `error` is best explained by too little memory: under an address-space limit below
    config.MIN_ADDRESS_SPACE, an allocation failing inside TensorFlow's import surfaces as a
    SystemError or an ImportError as often as a MemoryError."""
    limit = _address_space_limit()
    return limit is not None and limit < config.MIN_ADDRESS_SPACE


def _out_of_memory(error: BaseException) -> str:
    """The one line for a run that ran out of memory (a MemoryError, or see _too_little_memory)."""
    limit = _address_space_limit()
    text = str(error).splitlines()[0] if str(error) else ""
    return (
        "Out of memory: memory is too low for featx ("
        + type(error).__name__
        + (f": {text}" if text else "")
        + (f"; `ulimit -v` limits this process to {limit / 2**30:.1f} GiB" if limit else "")
        + f"). It needs at least {config.MIN_ADDRESS_SPACE / 2**30:.0f} GiB with TensorFlow: "
        "raise the limit or free memory, or use a smaller --batch-size and fewer --workers."
    )


def cli_names(message: str) -> str:
    """A library message in the CLI's words: "val_split must be ..." names the option as typed,
    "--val-split must be ..." (#26). Only a leading name of one of this command's options."""
    import re

    ctx = click.get_current_context(silent=True)
    match = re.match(r"([A-Za-z_]\w*) must ", message)
    if ctx is None or match is None:
        return message
    for param in ctx.command.params:
        flags = [o for o in param.opts if o.startswith("--")]
        if param.name == match.group(1) and flags and isinstance(param, click.Option):
            return flags[0] + message[match.end(1) :]
    return message


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def show(result: dict, as_json: bool, formatter) -> None:
    """The result as JSON (--json), or as the command's summary."""
    if as_json:
        print_json(result)
    else:
        click.echo(formatter(result))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, prog_name="featx")
@click.option(
    "--verbose", is_flag=True, help="Show TensorFlow's start-up log lines (hidden by default)."
)
def cli(verbose):
    """featx: train an image classifier from a folder of photos in minutes.

    Run the frozen MobileNetV2 once over your images (`featx extract`), then train heads on the
    cached features in seconds (`featx fit-head`).
    """
    from featx import quiet

    quiet.configure(verbose)


def shown(flag: str, default, help: str | None = None, **kwargs):
    """A click option whose default (from config) is shown in --help."""
    return click.option(flag, default=default, show_default=True, help=help, **kwargs)


def engine_option(help: str):
    """--engine: what runs the backbone (see featx.backbone.engines)."""
    return shown("--engine", config.ENGINE, help, type=click.Choice(config.ENGINES))


def output_folder(default: str):
    """The --output and --overwrite options of a command that writes a folder (the rule:
    featx.artifacts.outputs)."""
    output = click.option(
        "--output", type=click.Path(file_okay=False), help=f"Folder to write  [default: {default}]"
    )
    overwrite = click.option(
        "--overwrite",
        is_flag=True,
        help="Replace another featx output in that folder (the same run's is replaced without).",
    )
    return lambda fn: output(overwrite(fn))


def echo_err(message: str) -> None:
    click.echo(message, err=True)


def with_progress(as_json: bool, run, *args, **kwargs):
    """run(*args, progress=..., log=..., **kwargs) with a progress bar unless --json."""
    return run(*args, progress=not as_json, log=echo_err, **kwargs)


@cli.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option(
    "--cache",
    "cache_path",
    type=click.Path(dir_okay=False),
    help="HDF5 file to create or update  [default: cache/<DATA_DIR name>.h5]",
)
@shown(
    "--weights",
    config.WEIGHTS,
    "imagenet, none (random, for tests) or a MobileNetV2 no-top .h5 file.",
)
@shown("--image-size", config.IMAGE_SIZE, "Square input size in pixels.", type=int)
@shown("--alpha", config.ALPHA, "MobileNetV2 width multiplier.", type=float)
@click.option(
    "--batch-size",
    type=int,
    help=f"Images per model call  [default: {config.BATCH_SIZE}; {config.GPU_BATCH_SIZE} when "
    "Keras runs on a GPU]",
)
@click.option(
    "--workers",
    type=int,
    help="Decoding threads or processes; with --executor ray, Ray actors  [default: one per "
    "core this process may use; Ray: cores - 1, or GPUs / --gpus-per-worker]",
)
@shown(
    "--decode-in",
    config.DECODE_IN,
    "Decode in threads or processes; auto: processes when the model runs on a GPU, for "
    f"{config.PROCESS_DECODE_MIN_IMAGES:,}+ images on 2+ workers.",
    type=click.Choice(config.DECODE_INS),
)
@click.option(
    "--dtype",
    type=click.Choice(config.FEATURE_DTYPES),
    help=f"float16 halves the cache  [default: the cache's, {config.FEATURE_DTYPE} for a new one]",
)
@click.option(
    "--val-split",
    type=float,
    help="Validation share per class when DATA_DIR has no split folders  "
    f"[default: the cache's, {config.VAL_SPLIT} for a new one]",
)
@click.option(
    "--seed",
    type=int,
    help=f"Seeds the split  [default: the cache's, {config.SEED} for a new one]",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Rebuild the cache: a new split, rejected files retried, another backbone allowed.",
)
@engine_option(
    "onnx: ONNX Runtime, ~2x faster on a CPU; auto: onnx when it can run, no GPU is seen."
)
@shown(
    "--precision",
    config.PRECISION,
    "int8: a quantized ONNX backbone, ~2x faster again, features not mixable with fp32.",
    type=click.Choice(config.PRECISIONS),
)
@click.option(
    "--flip/--no-flip",
    default=None,
    help="Also store the features of each image mirrored left-right (~2x the model time); "
    "fit-head trains on both and predicts from their mean.  [default: the cache's; new: "
    + ("--flip" if config.FLIP else "--no-flip")
    + "]",
)
@click.option(
    "--shard",
    metavar="K/N",
    help="Only the images of shard K of N (0..N-1), for N runs in parallel; join their caches "
    "with `featx merge`.",
)
@shown(
    "--executor",
    config.EXECUTOR,
    "ray: run the backbone on Ray Data actors (pip install 'featx[ray]'); same cache, same resume.",
    type=click.Choice(config.EXECUTORS),
)
@click.option(
    "--ray-address",
    metavar="ADDR",
    help="With --executor ray: the cluster (auto, ray://HOST:10001)  [default: a local Ray]",
)
@click.option(
    "--parts",
    metavar="URL",
    help="With --executor ray: where the actors write their part files when the nodes share no "
    "disk (s3://bucket/run)  [default: beside the cache; <cache URL>.parts for a cache at a URL]",
)
@shown(
    "--gpus-per-worker",
    config.GPUS_PER_WORKER,
    "With --executor ray: GPUs reserved per actor; 0.5 puts two actors on one GPU.",
    type=float,
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@friendly_errors
def extract(data_dir, cache_path, as_json, **options):
    """Extract MobileNetV2 features of every image in DATA_DIR into an HDF5 cache.

    DATA_DIR is DATA/CLASS/* (split into train/validation by --val-split) or
    DATA/{train,validation,test}/CLASS/*, a folder or a URL (s3://bucket/prefix, gs://, az://).
    Runs again only on new or changed files.
    """
    # before TensorFlow loads: a wrong path answered at once, with the near match (#26)
    check_exists(data_dir, "data")
    from featx.commands.extract import extract as run_extract

    summary = with_progress(as_json, run_extract, data_dir, cache_path, **options)
    show(summary, as_json, format_extract_summary)
    warn_leakage(summary["cache"])


def warn_leakage(cache_path) -> None:
    """One line on stderr when `featx audit` would find leakage or cross-label copies (after the
    extraction, whose own memory stays flat; fit-head warns from the library)."""
    from featx.quality.duplicates import leakage_line

    line = leakage_line(cache_path)
    if line:
        click.echo(f"warning: {line}", err=True)


def format_counts(counts: dict, unit: str = " images") -> list[str]:
    """One line per split: its size and each class's count ({split: {class: n}})."""
    lines = []
    for split, per_class in counts.items():
        parts = ", ".join(f"{c} {n}" for c, n in per_class.items())
        lines.append(f"  {split:<10} {sum(per_class.values()):>6}{unit} ({parts})")
    return lines


def format_extract_summary(s: dict) -> str:
    lines = [f"cache: {s['cache']}", *format_counts(s["counts"])]
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
@click.argument("output", type=click.Path(dir_okay=False))
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "--copy",
    is_flag=True,
    help="Copy the features into OUTPUT's own part files (default: refer to the shards' files).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing featx cache at OUTPUT.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@friendly_errors
def merge(output, shards, copy, overwrite, as_json):
    """Join the caches of `featx extract --shard K/N` runs into OUTPUT.

    OUTPUT is the cache a single run over the whole folder writes: the same paths, labels,
    splits and features. Every shard 0..N-1 must be named once.
    """
    from featx.commands.merge import merge as run_merge

    summary = run_merge(output, list(shards), copy=copy, overwrite=overwrite)
    if as_json:
        print_json(summary)
        return
    click.echo(f"{summary['cache']}: {summary['images']} images from {summary['shards']} shards")
    for line in format_counts(summary["counts"]):
        click.echo(line)


@cli.command()
@click.argument("cache_path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option(
    "--files",
    is_flag=True,
    help="List every image as CSV (path,split,label; paths relative to the data folder); "
    "with --json, as a 'files' list.",
)
@friendly_errors
def info(cache_path, as_json, files):
    """Show what a feature cache holds: counts per split and class, fingerprint, rejected files."""
    # before TensorFlow loads: a wrong path answered at once, with the near match (#26)
    check_exists(cache_path, "cache")
    from featx.commands.info import info as cache_info

    data = cache_info(cache_path, files=files)
    if as_json:
        print_json(data)
        return
    if files:
        import csv
        import io

        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["path", "split", "label"])
        writer.writerows([f["path"], f["split"], f["label"]] for f in data["files"])
        click.echo(text.getvalue(), nl=False)
        return
    click.echo(f"{data['path']}: {data['images']} images, {data['feature_dim']}-d {data['dtype']}")
    click.echo(f"data: {data['data_dir']} ({data['layout']} layout), updated {data['updated']}")
    assigned = data["layout"] == "flat" or "validation" not in data["counts"]
    how = "validation carved out by featx" if assigned else "from the split folders"
    click.echo(f"split: --val-split {data['val_split']} --seed {data['seed']} ({how})")
    for line in format_counts(data["counts"], unit=""):
        click.echo(line)
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
@output_folder("<CACHE folder>/<CACHE name>-finetune/")
@shown(
    "--unfreeze-layers",
    config.FINETUNE_UNFREEZE_LAYERS,
    "Top layers of MobileNetV2 that train (BatchNorm never does); 0: only the head.",
    type=int,
)
@click.option("--epochs", default=config.FINETUNE_EPOCHS, show_default=True, type=int)
@shown("--learning-rate", config.FINETUNE_LEARNING_RATE, type=float)
@click.option("--batch-size", default=config.FINETUNE_BATCH_SIZE, show_default=True, type=int)
@shown("--augment/--no-augment", True, "Random flip, rotation, zoom and contrast while training.")
@click.option("--dropout", default=config.FINETUNE_DROPOUT, show_default=True, type=float)
@shown(
    "--patience",
    config.FINETUNE_PATIENCE,
    "Epochs without a lower validation loss before stopping.",
    type=int,
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
    # before TensorFlow loads: a wrong path answered at once, with the near match (#26)
    check_exists(cache_path, "cache")
    check_exists(head_dir, "head")
    from featx.commands.finetune import finetune as run_finetune
    from featx.reports.evaluation import format_summary

    m = run_finetune(cache_path, head_dir, output, progress=not as_json, log=echo_err, **options)
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
@shown("--head", config.HEAD, type=click.Choice(config.HEADS))
@output_folder("<CACHE folder>/<CACHE name>-<head>/")
@click.option("--C", "C", type=float, help="logreg: regularisation  [default: chosen by CV]")
@click.option(
    "--scaling",
    type=click.Choice(config.SCALINGS),
    help="Feature scaling; auto: chosen with C by CV  "
    f"[default: {config.SCALING} (logreg), {config.DENSE_SCALING} (dense)]",
)
@click.option(
    "--flip/--no-flip",
    default=None,
    help="Train on the mirror images too, predict from the mean of both (extract --flip)  "
    "[default: when the cache has them]",
)
@shown("--epochs", config.DENSE_EPOCHS, "dense: at most.", type=int)
@click.option("--learning-rate", default=config.DENSE_LEARNING_RATE, show_default=True, type=float)
@click.option("--dropout", default=config.DENSE_DROPOUT, show_default=True, type=float)
@shown("--hidden", config.DENSE_HIDDEN, "dense: 0 = none.", type=int)
@shown("--class-weight", config.CLASS_WEIGHT, type=click.Choice(config.CLASS_WEIGHTS))
@click.option("--seed", default=config.SEED, show_default=True, type=int)
@click.option(
    "--exclude-duplicates",
    is_flag=True,
    help="Leave out train copies of validation/test images (leakage; see featx audit).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--min-accuracy", type=float, help="Exit 1 if validation accuracy is below this.")
@friendly_errors
def fit_head(cache_path, as_json, min_accuracy, **options):
    """Train a classifier head on CACHE's features and report honest metrics.

    logreg: multinomial logistic regression, feature scaling and C chosen by cross-validation on
    the train split. dense: a small Keras head with early stopping on the validation loss. Writes
    the head, metrics.json, confusion_matrix.png, misclassified.csv (dense: training_curves.png).
    """
    # before TensorFlow loads: a wrong path answered at once, with the near match (#26)
    check_exists(cache_path, "cache")
    if min_accuracy is not None:  # before any work: `--min-accuracy 95` is a percent (#26)
        check_fraction("min_accuracy", min_accuracy, closed=True)
    from featx.commands.fit_head import fit_head as run_fit_head
    from featx.reports.evaluation import format_summary

    m = run_fit_head(cache_path, log=echo_err, **options)
    show(m, as_json, format_summary)
    accuracy = m["validation"]["accuracy"]
    if min_accuracy is not None and accuracy < min_accuracy:
        raise click.ClickException(
            f"validation accuracy {accuracy:.4f} is below --min-accuracy {min_accuracy}."
        )


@cli.command()
@click.argument("cache_path", type=click.Path(dir_okay=False))
@output_folder("<CACHE folder>/<CACHE name>-audit/")
@shown(
    "--threshold",
    config.AUDIT_NEAR_DUPLICATE,
    "Cosine similarity of features from which two images are near duplicates.",
    type=float,
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Where CACHE's images are now, if they moved (for the contact sheets).",
)
@shown("--seed", config.SEED, "Seeds the CV folds.", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print audit.json and a summary as JSON.")
@friendly_errors
def audit(cache_path, output, overwrite, threshold, data_dir, seed, as_json):
    """Find what spoils a classifier in CACHE: duplicates and leakage, label errors, outliers.

    Exact (sha256) and near (feature cosine) duplicates, marked when they cross splits (leakage)
    or classes; likely label errors in the train split (out-of-fold logistic regression, then
    cleanlab); images far from all others; class balance. Writes audit.json, CSV files and
    contact sheets (PNG). Reads the cache and the images only.
    """
    # before TensorFlow loads: a wrong path answered at once, with the near match (#26)
    check_exists(cache_path, "cache")
    from featx.commands.audit import audit as run_audit
    from featx.commands.audit import format_summary

    result = run_audit(
        cache_path,
        output,
        threshold=threshold,
        data_dir=data_dir,
        seed=seed,
        overwrite=overwrite,
        progress=not as_json,
        log=echo_err,
    )
    show(result, as_json, format_summary)


@cli.command()
@click.argument("model_dir", type=click.Path())  # a file: model_kind says what to pass
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    help="Write one row per image to this .csv, or the --json object to this .json file.",
)
@shown("--top-k", config.PREDICT_TOP_K, "Classes listed per image, most probable first.", type=int)
@click.option("--batch-size", default=config.BATCH_SIZE, show_default=True, type=int)
@engine_option("What runs the backbone of a fit-head model (as for extract).")
@click.option(
    "--min-confidence",
    type=float,
    default=config.PREDICT_MIN_CONFIDENCE,
    help=f"Predict '{config.UNKNOWN_CLASS}' when the top probability is below this (0-1).",
)
@click.option(
    "--unknown/--no-unknown",
    default=True,
    show_default=True,
    help="Flag images unlike the training images: the 'unknown' and 'novelty' columns.",
)
@click.option(
    "--unknown-rate",
    type=float,
    default=None,
    help=f"Share of known validation images flagged unknown (0-1); default: the model's "
    f"({config.UNKNOWN_RATE:g} unless changed).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the rows and the summary as JSON.")
@friendly_errors
def predict(model_dir, paths, as_json, **options):
    """Classify images with MODEL_DIR, a fit-head, finetune or export output folder.

    PATHS are image files, folders (searched recursively), quoted glob patterns such as
    'photos/*.jpg', or URLs of objects and prefixes (s3://bucket/new/). Prints one line per
    image and, when the images sit in folders named after the model's classes, the accuracy. A
    file that cannot be read gets an error row; the exit status is 1 only when no image could be
    predicted.
    """
    # before TensorFlow loads: a wrong path answered at once, with the near match (#26)
    check_exists(model_dir, "model")
    from featx.commands.predict import format_summary, format_table
    from featx.commands.predict import predict as run_predict

    result = with_progress(as_json, run_predict, model_dir, paths, **options)
    if as_json:
        print_json(result)
        return
    if options["output"] is None:
        click.echo(format_table(result))
    click.echo(format_summary(result))


@cli.command()
@click.argument("model_dir", type=click.Path())  # a file: model_kind says what to pass
@click.option(
    "--format",
    "model_format",
    default=config.EXPORT_FORMAT,
    show_default=True,
    type=click.Choice(config.EXPORT_FORMATS),
    help="savedmodel and tflite need the TensorFlow backend; onnx, featx[onnx].",
)
@shown(
    "--quantize",
    config.EXPORT_QUANTIZE,
    "TFLite only: float16 weights, or int8 weights (dynamic range).",
    type=click.Choice(config.EXPORT_QUANTIZES),
)
@output_folder("MODEL_DIR/export-<format>[-<quantize>]/")
@click.option(
    "--cache",
    "cache_path",
    type=click.Path(dir_okay=False),
    help="The model's feature cache: evaluate the export on its validation split.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the export record as JSON.")
@friendly_errors
def export(model_dir, model_format, quantize, output, overwrite, cache_path, as_json):
    """Export MODEL_DIR as one model from raw pixels to class probabilities.

    Writes the model (model.keras, saved_model/, model.tflite or model.onnx), labels.txt and
    export.json (input size, preprocessing, class names), then checks the exported file against
    the in-process model and reports the largest probability difference.
    """
    # before TensorFlow loads: a wrong path answered at once, with the near match (#26)
    check_exists(model_dir, "model")
    if cache_path is not None:
        check_exists(cache_path, "cache")
    from featx.commands.export import export as run_export
    from featx.commands.export import format_summary

    args = (model_dir, model_format, quantize, output, cache_path)
    result = with_progress(as_json, run_export, *args, overwrite=overwrite)
    show(result, as_json, format_summary)


@cli.command()
@click.argument("model_dir", type=click.Path())  # a file: model_kind says what to pass
@friendly_errors
def report(model_dir):
    """Rebuild MODEL_DIR/report.html from its metrics.json and misclassified.csv.

    One self-contained page (it opens from disk): headline metrics, confusion matrices, per-class
    precision/recall/F1, the most-confused pairs and the worst misclassified images. fit-head and
    finetune write it already; run this after moving the images or the folder.
    """
    # before TensorFlow loads: a wrong path answered at once, with the near match (#26)
    check_exists(model_dir, "model")
    from featx.commands.report import report as run_report

    click.echo(f"wrote {run_report(model_dir)}")


def main() -> None:
    """The console script. A reader that goes away early (`featx info c.h5 | head -1`) ends the
    output quietly with exit status 0, as CLI tools do, also when it is gone only by the time
    the last buffered output is flushed."""
    code = 0
    try:
        cli.main(prog_name="featx")
    except SystemExit as e:
        code = e.code
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        code = 0
    sys.exit(code)


def _quiet_stdout() -> None:
    # Python flushes stdout again at exit, which would raise a second BrokenPipeError.
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    main()
