"""Shared test constants and data writers (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from featx import backbone

# The fastest MobileNetV2 there is: random weights, the narrowest width, 32 px.
TINY = dict(weights="none", alpha=0.35, image_size=32)
# Real photos and weights for the few `real` tests; they skip when these are not on the machine.
REAL_DATA = Path(
    os.environ.get("FEATX_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "cats_and_dogs_filtered"
)
WEIGHTS_FILE = backbone._keras_home() / "models" / backbone._imagenet_file_name(1.0, 224)
# One clearly different colour per class, so a classifier on the images below can succeed.
COLOURS = {"cats": (200, 60, 60), "dogs": (60, 60, 200)}


def write_split_data(root: Path, train: int = 10, validation: int = 4) -> Path:
    """root/{train,validation}/{cats,dogs}/*.jpg: noisy (so not identical) images per class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("validation", validation)):
        for c, colour in COLOURS.items():
            for i in range(n):
                noise = rng.integers(-50, 50, (40, 40, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                path = root / split / c / f"{c}{i:02d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path, "JPEG")
    return root


def stable_seed(*parts) -> int:
    """A seed from names and numbers that is the same in every process (unlike hash(), which
    Python randomises per process)."""
    import zlib

    return zlib.crc32(repr(parts).encode()) % 10_000


def assert_one_line_error(result, *fragments: str) -> None:
    """A CliRunner result that failed as featx promises: SystemExit with status 1 (an uncaught
    exception would also give exit code 1, with empty output), one line, naming `fragments`."""
    assert isinstance(result.exception, SystemExit), f"not a clean exit: {result.exception!r}"
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"
