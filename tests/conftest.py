"""Tiny generated images for the tests. Everything is written under pytest's tmp_path at run time;
no binary test file is committed.

Fixtures:
  make_image    -> the `make_image(path, ...)` function below: writes one small image file.
  tiny_dataset  -> a factory `tiny_dataset(layout="flat", classes=2, per_class=6, ...)` that writes
                   a small data folder under tmp_path and returns its path (see `write_dataset`).
`make_image` and `write_dataset` are plain functions too, for helpers of your own.
Every test session gets its own featx home (FEATX_HOME, where the exported ONNX backbone is
kept), so no test reads or writes the real ~/.cache/featx.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

# Class names used by write_dataset, in order; more classes than these are named class6, class7, ...
CLASS_NAMES = ("cats", "dogs", "birds", "fish", "frogs", "owls")
# One clearly different colour per class (RGB), so a classifier on these images can succeed.
CLASS_COLORS = (
    (220, 40, 40),
    (40, 40, 220),
    (40, 200, 40),
    (230, 200, 30),
    (160, 40, 200),
    (30, 200, 200),
)


def make_image(
    path: str | Path,
    size: tuple[int, int] = (40, 30),
    mode: str = "RGB",
    fmt: str | None = "JPEG",
    color=(200, 40, 40),
    **save_kwargs,
) -> Path:
    """Write a solid-colour image to `path` (parent folders are created) and return the path.

    Args:
        path: where to write; the suffix does not matter (format detection is by content).
        size: (width, height) in pixels.
        mode: Pillow mode of the saved image ("RGB", "L", "RGBA", "P", "CMYK", "I;16", ...).
        fmt: Pillow format name ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"); None picks it from
            the suffix.
        color: an RGB tuple, converted to `mode` (so "L" gets its gray, "P" a palette entry);
            or, when it is not a 3-tuple, a value given as is to Image.new(mode, size, color),
            e.g. an int for "L"/"I;16", an RGBA 4-tuple for "RGBA".
        save_kwargs: passed to Image.save, e.g. quality=95, exif=..., transparency=0.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(color, tuple) and len(color) == 3 and mode != "RGB":
        img = Image.new("RGB", size, color).convert(mode)
    else:
        img = Image.new(mode, size, color)
    img.save(path, fmt, **save_kwargs)
    return path


def write_dataset(
    root: str | Path,
    layout: str = "flat",
    classes: int = 2,
    per_class: int = 6,
    splits: tuple[str, ...] = ("train", "validation", "test"),
    size: tuple[int, int] = (40, 30),
) -> Path:
    """Write a tiny JPEG data folder at `root` and return `root`.

    layout="flat":   root/CLASS/CLASS_000.jpg ... with `per_class` images per class.
    layout="splits": root/SPLIT/CLASS/CLASS_000.jpg for each name in `splits` (use "val" or
                     "validation"); `per_class` images per class in train, max(1, per_class // 3)
                     in every other split.
    Classes are CLASS_NAMES[:classes]; each class has its own colour (CLASS_COLORS), varied a
    little per image so no two files are identical.
    """
    root = Path(root)
    names = [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"class{i}" for i in range(classes)]
    if layout == "flat":
        folders = [(root / name, name, i, per_class) for i, name in enumerate(names)]
    elif layout == "splits":
        folders = [
            (
                root / split / name,
                name,
                i,
                per_class if split == "train" else max(1, per_class // 3),
            )
            for split in splits
            for i, name in enumerate(names)
        ]
    else:
        raise ValueError(f"layout must be 'flat' or 'splits', got {layout!r}")
    for folder, name, i, count in folders:
        base = CLASS_COLORS[i % len(CLASS_COLORS)]
        for k in range(count):
            color = tuple(min(255, c + 3 * k) for c in base)
            make_image(folder / f"{name}_{k:03d}.jpg", size=size, color=color, quality=90)
    return root


@pytest.fixture(name="make_image")
def make_image_fixture():
    """The `make_image` function above, as a fixture (tests need not import conftest)."""
    return make_image


@pytest.fixture
def tiny_dataset(tmp_path):
    """Factory: tiny_dataset(layout="flat", classes=2, per_class=6, splits=..., name="data")
    writes tmp_path/name with `write_dataset` and returns that path."""

    def make(
        layout="flat", classes=2, per_class=6, splits=("train", "validation", "test"), name="data"
    ):
        return write_dataset(tmp_path / name, layout, classes, per_class, splits)

    return make


@pytest.fixture(autouse=True)
def keras_engine_by_default(monkeypatch):
    """Library calls that name no engine use Keras in the tests: exporting each tiny model to
    ONNX would cost seconds per test. Tests of the ONNX engine name it."""
    from featx import config

    monkeypatch.setattr(config, "ENGINE", "keras")


@pytest.fixture(scope="session", autouse=True)
def featx_home(tmp_path_factory):
    """FEATX_HOME points at a folder of this session (subprocesses inherit it)."""
    home = tmp_path_factory.mktemp("featx-home")
    old = os.environ.get("FEATX_HOME")
    os.environ["FEATX_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("FEATX_HOME", None)
    else:
        os.environ["FEATX_HOME"] = old
