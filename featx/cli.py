"""The `featx` command line: each command parses its options and calls one library function.

No TensorFlow, Keras or h5py at module level, so `featx --help` answers at once.
"""

from __future__ import annotations

import json
import sys
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
    """A click progress bar that shows images/s; the library calls it with (done, total)."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.bar = label, enabled, None

    def __call__(self, done: int, total: int, rate: float) -> None:
        if not self.enabled:
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
    lines.append(f"{s['seconds']:.1f} s, {s['images_per_second']:.1f} images/s")
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


if __name__ == "__main__":
    cli()
