"""Fixtures for the tests. Everything is written under pytest's tmp_path at run time; no binary
test file is committed. Every image comes from helpers.write_image.

Fixtures:
  make_image    -> the `make_image(path, ...)` function below: writes one small solid image file.
  tiny_dataset  -> a factory `tiny_dataset(layout="flat", classes=2, per_class=6, ...)` that writes
                   a small data folder under tmp_path and returns its path (see `write_dataset`).
  tiny_model    -> (session) one tiny data folder, its cache and a fitted logistic-regression
                   head, built once for every test that needs a trained model. Read-only.
  tiny_dense    -> (session) a Dense head fitted on the tiny_model's cache. Read-only.
  tiny_flip     -> (session) a tiny data folder extracted with --flip (mirror images). Read-only.
  fake_engine   -> extract runs helpers.PixelEngine instead of the model.
`make_image` and `write_dataset` are plain functions too, for helpers of your own.
Every test session gets its own featx home (FEATX_HOME, where the exported ONNX backbone is
kept), so no test reads or writes the real ~/.cache/featx.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import (
    CLASS_COLOURS,
    COLOURS,
    TINY,
    PixelEngine,
    write_image,
    write_images,
    write_split_data,
)

# Class names used by write_dataset, in order; more classes than these are named class6, class7, ...
CLASS_NAMES = tuple(CLASS_COLOURS)


def make_image(
    path: str | Path,
    size: tuple[int, int] = (40, 30),
    mode: str = "RGB",
    fmt: str | None = "JPEG",
    color=(200, 40, 40),
    **save_kwargs,
) -> Path:
    """Write a solid-colour image to `path` (parent folders are created) and return the path:
    helpers.write_image with noise=0.

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
    return write_image(path, color, size=size, noise=0, mode=mode, fmt=fmt, **save_kwargs)


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
    Classes are CLASS_NAMES[:classes]; each class has its own colour (helpers.class_colour),
    with a little seeded noise, so no two files are identical.
    """
    names = [CLASS_NAMES[i] if i < len(CLASS_NAMES) else f"class{i}" for i in range(classes)]
    if layout == "flat":
        counts = dict.fromkeys(names, per_class)
    elif layout == "splits":
        counts = {
            split: dict.fromkeys(names, per_class if split == "train" else max(1, per_class // 3))
            for split in splits
        }
    else:
        raise ValueError(f"layout must be 'flat' or 'splits', got {layout!r}")
    return write_images(root, counts, name="{c}_{i:03d}.jpg", size=size, noise=20, quality=90)


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


# --- one trained tiny model for the whole session -------------------------------------------------


@dataclass(frozen=True)
class TinyModel:
    """What the `tiny_model` fixture built; every path is read-only for the tests.

    root:     the folder holding all of it (nothing else is written there)
    data:     write_split_data: {train,validation}/{cats,dogs}/*.jpg, 10 and 4 images per class
    cache:    its cache, extracted by the Keras engine with the tiny random MobileNetV2 (TINY)
    logreg:   a fit-head output folder: fit_head(cache, "logreg", C=1.0)
    metrics:  the metrics that fit_head returned for it
    The Dense head, which only slow tests use, is the `tiny_dense` fixture.
    """

    root: Path
    data: Path
    cache: Path
    logreg: Path
    metrics: dict


def _snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _assert_unchanged(root: Path, before: dict, what: str) -> None:
    after = _snapshot(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, (
        f"a test changed the shared {what} under {root}: {changed[:10]}. Tests must treat session "
        "fixtures as read-only: copy first (shutil.copytree) and change the copy."
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    """One tiny data folder, its cache and a logistic-regression head, built once per session
    (instead of once per test module) for every test that needs a trained model. Read-only: a
    test that changes a file copies it first; the session ends with an error naming any file
    that changed."""
    from featx.commands.extract import extract
    from featx.commands.fit_head import fit_head

    root = tmp_path_factory.mktemp("tiny-model")
    data = write_split_data(root / "data")
    cache = root / "tiny.h5"
    extract(data, cache, batch_size=8, engine="keras", **TINY)
    metrics = fit_head(cache, "logreg", root / "logreg", C=1.0)
    before = _snapshot(root)
    yield TinyModel(root, data, cache, root / "logreg", metrics)
    _assert_unchanged(root, before, "tiny model")


@pytest.fixture(scope="session")
def tiny_dense(tiny_model, tmp_path_factory) -> Path:
    """A fit-head output folder: a Dense head fitted on the tiny_model's cache (epochs=20), once
    per session. Read-only."""
    from featx.commands.fit_head import fit_head

    root = tmp_path_factory.mktemp("tiny-dense")
    fit_head(tiny_model.cache, "dense", root / "dense", epochs=20)
    before = _snapshot(root)
    yield root / "dense"
    _assert_unchanged(root, before, "tiny Dense head")


@pytest.fixture(scope="session")
def tiny_finetune(tiny_model, tmp_path_factory) -> Path:
    """A finetune output folder: the tiny_model's logistic-regression head warm-started into the
    end-to-end model, no epoch trained (so its features are the cache's), once per session.
    Read-only."""
    from featx.commands.finetune import finetune

    root = tmp_path_factory.mktemp("tiny-finetune")
    finetune(tiny_model.cache, tiny_model.logreg, root / "ft", epochs=0, batch_size=8)
    before = _snapshot(root)
    yield root / "ft"
    _assert_unchanged(root, before, "tiny finetune model")


@dataclass(frozen=True)
class TinyFlip:
    """What the `tiny_flip` fixture built (read-only): `data`, a folder laid out like the
    tiny_model's (the same names and counts), and `cache`, extracted from it with flip=True."""

    data: Path
    cache: Path


@pytest.fixture(scope="session")
def tiny_flip(tmp_path_factory) -> TinyFlip:
    """A tiny data folder extracted with --flip (features of the mirror images too), once per
    session. Read-only. Its images have left-right structure (texture "smooth"): the mirror image
    of per-pixel noise differs from it by noise only, so a head's probabilities on one view and on
    both differ by ~1e-3 at most, too little for the tests to tell the views apart (measured:
    2e-1 to 9e-1 here, 1e-4 to 1e-2 for noisy images, depending on the seed)."""
    from featx.commands.extract import extract

    root = tmp_path_factory.mktemp("tiny-flip")
    counts = {split: dict.fromkeys(COLOURS, n) for split, n in (("train", 10), ("validation", 4))}
    smooth = dict(name="{c}{i:02d}.jpg", size=(40, 40), texture="smooth")
    data = write_images(root / "data", counts, **smooth)
    cache = root / "flip.h5"
    extract(data, cache, batch_size=8, engine="keras", flip=True, **TINY)
    before = _snapshot(root)
    yield TinyFlip(data, cache)
    _assert_unchanged(root, before, "flip data and cache")


@pytest.fixture
def fake_engine(monkeypatch):
    """extract runs PixelEngine (features from pixels, no model) under a Keras fingerprint."""
    from featx.backbone import engines, mobilenet

    def for_extract(opts, old, cache_path, listing, root, log):
        fp = mobilenet.fingerprint(opts.weights, opts.image_size, opts.alpha, engine="keras")
        return PixelEngine(), fp

    monkeypatch.setattr(engines, "for_extract", for_extract)
