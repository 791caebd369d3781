"""iPhone photos (HEIC/HEIF) and AVIF go through the one decoder like every other format."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pillow_heif
import pytest
from helpers import TINY, write_images
from PIL import Image, features

from featx.commands.extract import extract
from featx.images.decoder import decode_image, load_image

RED, BLUE = (200, 40, 40), (40, 40, 200)
# To write HEIC test files; featx registers the plugin itself, only when it reads one.
pillow_heif.register_heif_opener()


def halves(size=(64, 48)) -> Image.Image:
    img = Image.new("RGB", size, RED)
    img.paste(Image.new("RGB", (size[0] // 2, size[1]), BLUE), (size[0] // 2, 0))
    return img


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def assert_halves(arr: np.ndarray, tol: int) -> None:
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert np.abs(arr[16, 3].astype(int) - RED).max() <= tol
    assert np.abs(arr[16, 28].astype(int) - BLUE).max() <= tol


def test_a_heic_photo_decodes_to_its_pixels():
    data = encode(halves(), "HEIF", quality=95)
    assert data[4:12] == b"ftypheic"  # what an iPhone writes
    assert_halves(decode_image(data, image_size=32), tol=12)


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow was built without AVIF")
def test_an_avif_image_decodes_to_its_pixels():
    data = encode(halves(), "AVIF", quality=95)
    assert data[4:12] == b"ftypavif"
    assert_halves(decode_image(data, image_size=32), tol=12)


def test_heic_orientation_is_applied(tmp_path):
    tall = halves((48, 64)).rotate(90, expand=True)  # stored sideways: 64 x 48
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(encode(tall, "HEIF", quality=95, exif=exif.tobytes()))
    arr = load_image(path, 32)
    # Displayed upright it is 48 x 64 again: red on the left, blue on the right.
    assert_halves(arr, tol=12)


def test_heic_files_are_extracted_not_rejected(tmp_path):
    counts = {"cats": 3, "dogs": 3}
    write_images(tmp_path / "data", counts, name="IMG_{i:04d}.HEIC", size=(40, 30), fmt="HEIF")
    summary = extract(tmp_path / "data", tmp_path / "c.h5", engine="keras", batch_size=6, **TINY)
    assert summary["rejected"] == [] and summary["extracted"] == 6


def test_the_heif_plugin_is_loaded_only_for_a_heif_file(tmp_path):
    """A JPEG decodes without importing pillow-heif (a fifth of a one-image predict's start-up,
    #25); the first HEIC file registers it, in a process that had not."""
    (tmp_path / "a.jpg").write_bytes(encode(halves(), "JPEG", quality=95))
    (tmp_path / "b.heic").write_bytes(encode(halves(), "HEIF", quality=95))
    script = (
        "import sys\n"
        "from featx.images.decoder import load_image\n"
        "load_image(sys.argv[1], 32)\n"
        "print('pillow_heif' in sys.modules)\n"
        "print(load_image(sys.argv[2], 32)[16, 28].tolist())\n"  # one pixel: [r, g, b]
    )
    out = subprocess.run(
        [sys.executable, "-c", script, tmp_path / "a.jpg", tmp_path / "b.heic"],
        capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    assert out[0] == "False"
    assert np.abs(np.array(json.loads(out[1])) - BLUE).max() <= 12
