"""Shared test constants and the one test-image writer (plain functions; fixtures live in
conftest.py).

Every generated image comes from `write_image`: a class colour plus seeded noise (or a solid
colour, or a smooth pattern), so images are distinct, deterministic and tell their class apart.
`write_images` writes a data folder of them; `write_split_data` is the folder most tests use.
"""

from __future__ import annotations

import importlib.util
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from featx.backbone import mobilenet

# The fastest MobileNetV2 there is: random weights, the narrowest width, 32 px.
TINY = dict(weights="none", alpha=0.35, image_size=32)
# Real photos and weights for the few `real` tests; they skip when these are not on the machine.
REAL_DATA = Path(
    os.environ.get("FEATX_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "cats_and_dogs_filtered"
)
WEIGHTS_FILE = mobilenet._keras_home() / "models" / mobilenet._imagenet_file_name(1.0, 224)


def real_photos(split: str, per_class: int) -> list[Path]:
    """The first `per_class` photos (by name) of each class of REAL_DATA/SPLIT, cats first."""
    folders = [REAL_DATA / split / c for c in ("cats", "dogs")]
    return [p for folder in folders for p in sorted(folder.glob("*.jpg"))[:per_class]]


def link_real_photos(root: Path, per_class: dict[str, int]) -> Path:
    """root/SPLIT/CLASS/ of links to real_photos(SPLIT, n) for each {SPLIT: n}: a small real
    data set without copying a byte."""
    for split, n in per_class.items():
        for photo in real_photos(split, n):
            folder = root / split / photo.parent.name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / photo.name).symlink_to(photo)
    return root


# One clearly different colour per class, so a classifier on generated images can succeed.
# A class not named here gets the colour of its position (the 7th class the first colour again).
CLASS_COLOURS = {
    "cats": (200, 60, 60),
    "dogs": (60, 60, 200),
    "birds": (60, 200, 60),
    "fish": (230, 200, 30),
    "frogs": (160, 40, 200),
    "owls": (30, 200, 200),
}
# The two classes of write_split_data, in label order.
COLOURS = {c: CLASS_COLOURS[c] for c in ("cats", "dogs")}


def stable_seed(*parts) -> int:
    """A seed from names and numbers that is the same in every process (unlike hash(), which
    Python randomises per process)."""
    return zlib.crc32(repr(parts).encode()) % 10_000


def class_colour(name: str, index: int = 0) -> tuple[int, int, int]:
    """The colour of class `name` (CLASS_COLOURS), else of its position `index`."""
    palette = list(CLASS_COLOURS.values())
    return CLASS_COLOURS.get(name, palette[index % len(palette)])


def write_image(
    path: str | Path,
    colour=(200, 60, 60),
    *,
    seed: int = 0,
    size: tuple[int, int] = (48, 40),
    noise: int = 50,
    texture: str = "noise",
    mirror: bool = False,
    mode: str = "RGB",
    fmt: str | None = None,
    **save_kwargs,
) -> Path:
    """Write one generated image to `path` (parent folders are created) and return the path.

    Args:
        colour: the RGB colour the pixels vary around. With noise=0 (a solid image) it may also
            be any value Image.new takes for `mode`: an int for "L" or "I;16", an RGBA tuple.
        seed: seeds the pixels: the same seed gives the same image. Derive it from the image's
            names with stable_seed(...), never hash().
        size: (width, height) in pixels.
        noise: texture "noise": each pixel and channel is colour + a uniform integer in
            [-noise, noise), clipped to 0..255; 0 gives a solid image, and noise=128 around
            (128, 128, 128) pure noise.
        texture: "noise", or "smooth": a random 4x4 grid upscaled (bicubic) and half-blended
            with `colour`, so images differ at 32 px and survive resizing (near copies).
        mirror: save the image flipped left to right (the mirror image of the same seed).
        mode: the Pillow mode saved ("RGB", "L", "RGBA", "P", "CMYK", "I;16", ...), converted
            from RGB.
        fmt: Pillow format ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"); None picks it from
            the suffix.
        save_kwargs: passed to Image.save, e.g. quality=90, exif=..., transparency=0.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    if texture == "smooth":
        rng = np.random.default_rng(seed)
        grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8))
        pattern = np.asarray(grid.resize(size, Image.Resampling.BICUBIC), np.float64)
        pixels = np.clip(0.5 * pattern + 0.5 * np.array(colour, np.float64), 0, 255)
        img = Image.fromarray(pixels.astype(np.uint8))
    elif texture != "noise":
        raise ValueError(f"texture must be 'noise' or 'smooth', got {texture!r}")
    elif noise:
        rng = np.random.default_rng(seed)
        pixels = np.array(colour) + rng.integers(-noise, noise, (height, width, 3))
        img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    elif not (isinstance(colour, tuple) and len(colour) == 3):
        img = Image.new(mode, size, colour)  # a value in `mode`'s own terms
    else:
        img = Image.new("RGB", size, colour)
    if mirror:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if img.mode != mode:
        img = img.convert(mode)
    img.save(path, fmt, **save_kwargs)
    return path


def write_images(
    root: str | Path,
    counts: dict,
    *,
    name: str = "{c}{i:03d}.jpg",
    start: int = 0,
    colour=None,
    seed: int | None = None,
    **image_kwargs,
) -> Path:
    """Write a data folder of generated images at `root` and return `root`.

    counts: {class: images} for a flat folder, root/CLASS/NAME, or {split: {class: images}} for
        split folders, root/SPLIT/CLASS/NAME.
    name: the file name, formatted with c (the class) and i (the number, from `start`).
    colour: one colour for every class; None gives each class its own (class_colour).
    seed: mixed into every image's seed, for a second folder unlike the first.
    image_kwargs: passed to write_image (size, noise, texture, fmt, quality, ...).
    Image i of class c is seeded by stable_seed(c, i) in a flat folder and stable_seed(split, c, i)
    in split folders (prefixed by `seed` when given): adding images never changes the others.
    """
    root = Path(root)
    nested = all(isinstance(v, dict) for v in counts.values())
    folders = counts.items() if nested else [(None, counts)]
    for split, per_class in folders:
        for k, (c, n) in enumerate(per_class.items()):
            folder = root / c if split is None else root / split / c
            for i in range(start, start + n):
                key = (c, i) if split is None else (split, c, i)
                write_image(
                    folder / name.format(c=c, i=i),
                    class_colour(c, k) if colour is None else colour,
                    seed=stable_seed(*key) if seed is None else stable_seed(seed, *key),
                    **image_kwargs,
                )
    return root


def write_split_data(root: Path, train: int = 10, validation: int = 4) -> Path:
    """root/{train,validation}/{cats,dogs}/{cats,dogs}NN.jpg: noisy 40x40 images around one colour
    per class (COLOURS), `train` and `validation` images per class."""
    counts = {
        "train": dict.fromkeys(COLOURS, train),
        "validation": dict.fromkeys(COLOURS, validation),
    }
    return write_images(root, counts, name="{c}{i:02d}.jpg", size=(40, 40), noise=50)


def assert_one_line_error(result, *fragments: str) -> None:
    """A CliRunner result that failed as featx promises: SystemExit with status 1 (an uncaught
    exception would also give exit code 1, with empty output), one line, naming `fragments`."""
    assert isinstance(result.exception, SystemExit), f"not a clean exit: {result.exception!r}"
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"


def load_bench(name: str):
    """The module of bench/NAME.py (bench/ is scripts, not a package), for testing its helpers."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PixelEngine:
    """Features = the first 1,280 pixel values of each image: distinct per image, no model
    (the `fake_engine` fixture makes extract use it)."""

    name = "keras"

    def features(self, batch):
        return batch.reshape(len(batch), -1)[:, :1280].astype(np.float32)


# A script that extracts argv[1] into argv[2] slowly (0.4 s a batch of 4), for tests that kill it
# with kill -9 mid-run. engine="keras": the slow engine below, not an ONNX Runtime one "auto" picks.
SLOW_EXTRACT = """
import sys, time
from featx.backbone import mobilenet
from featx.commands.extract import extract
real = mobilenet.KerasEngine.features
def slow(engine, batch):  # slow batches give the test time to kill mid-run
    time.sleep(0.4)
    return real(engine, batch)
mobilenet.KerasEngine.features = slow
extract(sys.argv[1], sys.argv[2], weights="none", alpha=0.35, image_size=32,
        batch_size=4, engine="keras")
"""


def assert_same_cache(got: Path, expected: Path, exact: bool = False) -> None:
    """Two caches hold the same rows (paths, splits, labels, rejections) and features: equal with
    `exact`, else to float32 rounding (another process or executor may sum in another order)."""
    from featx.cache import store

    a, b = store.read_cache(got), store.read_cache(expected)
    assert a.paths == b.paths and list(a.splits) == list(b.splits)
    assert a.class_names == b.class_names and a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.rows.file_sha256 == b.rows.file_sha256
    assert a.rejected.paths == b.rejected.paths and a.rejected_reasons == b.rejected_reasons
    pairs = [(a.features, b.features)]
    if b.features_flip is not None:
        pairs.append((a.features_flip, b.features_flip))
    for x, y in pairs:
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            scale = np.abs(y).max()
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * scale)
