"""featx.images: folder layouts, split assignment and robust decoding, on tiny generated images."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from featx import config
from featx.errors import FeatxError
from featx.images.decoder import decode_image, load_image, read_file
from featx.images.finder import ImageFile, assign_splits, find_images

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
WHITE = (255, 255, 255)


def encode(img: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def halves(size=(60, 40), left=RED, right=BLUE) -> Image.Image:
    """An RGB image whose left half is `left` and right half is `right`."""
    w, h = size
    img = Image.new("RGB", size, left)
    img.paste(right, (w // 2, 0, w, h))
    return img


def assert_color(pixel, expected, tol=0):
    diff = np.abs(np.asarray(pixel, dtype=int) - np.asarray(expected, dtype=int))
    assert diff.max() <= tol, f"pixel {tuple(int(v) for v in pixel)} != {expected} (tol {tol})"


def assert_rgb_array(arr, size):
    assert isinstance(arr, np.ndarray)
    assert arr.shape == (size, size, 3)
    assert arr.dtype == np.uint8


def touch(path, data=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --- find_images: layouts ------------------------------------------------------------------------


def test_flat_layout_lists_every_file_with_its_class_and_no_split(tiny_dataset):
    data = tiny_dataset(layout="flat", classes=3, per_class=4)
    listing = find_images(data)
    assert listing.layout == "flat"
    assert listing.class_names == ["birds", "cats", "dogs"]
    assert listing.empty_classes == []
    assert len(listing.files) == 12
    assert all(f.split is None for f in listing.files)
    for f in listing.files:
        assert f.path.split("/")[0] == f.class_name
    assert listing.files[0] == ImageFile("birds/birds_000.jpg", "birds", None)


def test_split_layout_keeps_the_split_of_every_file(tiny_dataset):
    data = tiny_dataset(layout="splits", classes=2, per_class=6)
    listing = find_images(data)
    assert listing.layout == "splits"
    assert listing.class_names == ["cats", "dogs"]
    counts = {}
    for f in listing.files:
        assert f.path.startswith(f"{f.split}/{f.class_name}/")
        counts[f.split, f.class_name] = counts.get((f.split, f.class_name), 0) + 1
    assert counts == {
        ("train", "cats"): 6,
        ("train", "dogs"): 6,
        ("validation", "cats"): 2,
        ("validation", "dogs"): 2,
        ("test", "cats"): 2,
        ("test", "dogs"): 2,
    }


def test_val_folder_maps_to_the_validation_split(tiny_dataset):
    data = tiny_dataset(layout="splits", per_class=3, splits=("train", "val"))
    listing = find_images(data)
    val = [f for f in listing.files if f.path.startswith("val/")]
    assert len(val) == 2
    assert {f.split for f in val} == {"validation"}
    assert {f.split for f in listing.files} == {"train", "validation"}


def test_split_folder_names_are_matched_case_insensitively(tmp_path, make_image):
    for split in ("Train", "VAL"):
        for cls in ("cats", "dogs"):
            make_image(tmp_path / split / cls / "a.jpg")
    listing = find_images(tmp_path)
    assert listing.layout == "splits"
    assert sorted({f.split for f in listing.files}) == ["train", "validation"]


def test_both_val_and_validation_folders_is_an_error(tiny_dataset):
    data = tiny_dataset(layout="splits", per_class=3, splits=("train", "val", "validation"))
    with pytest.raises(FeatxError, match="both val/ and validation/"):
        find_images(data)


def test_split_folders_mixed_with_class_folders_is_an_error(tiny_dataset, make_image):
    data = tiny_dataset(layout="splits", per_class=3)
    make_image(data / "horses" / "h.jpg")
    with pytest.raises(FeatxError, match="mixes split folders") as exc:
        find_images(data)
    assert "horses" in str(exc.value)


def test_split_folders_without_train_is_an_error(tiny_dataset):
    data = tiny_dataset(layout="splits", per_class=3, splits=("validation", "test"))
    with pytest.raises(FeatxError, match="no train/ folder"):
        find_images(data)


def test_missing_data_folder_is_an_error(tmp_path):
    with pytest.raises(FeatxError, match="Data folder not found"):
        find_images(tmp_path / "nowhere")


def test_one_class_is_a_clear_error(tiny_dataset):
    data = tiny_dataset(classes=1)
    with pytest.raises(FeatxError, match="needs at least 2") as exc:
        find_images(data)
    assert "Found 1 class folder(s)" in str(exc.value)
    assert "cats" in str(exc.value)


def test_no_class_at_all_is_a_clear_error(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FeatxError, match="Found 0 class folder"):
        find_images(tmp_path)


def test_one_class_with_files_and_one_empty_is_still_too_few(tiny_dataset):
    data = tiny_dataset(classes=1)
    (data / "dogs").mkdir()
    with pytest.raises(FeatxError, match="needs at least 2"):
        find_images(data)


def test_empty_class_folder_is_reported_not_listed(tiny_dataset):
    data = tiny_dataset(classes=2, per_class=3)
    (data / "birds").mkdir()
    touch(data / "frogs" / ".DS_Store", b"x")  # only hidden files: empty too
    (data / "owls" / "sub").mkdir(parents=True)  # only empty subfolders: empty too
    listing = find_images(data)
    assert listing.class_names == ["cats", "dogs"]
    assert listing.empty_classes == ["birds", "frogs", "owls"]
    assert {f.class_name for f in listing.files} == {"cats", "dogs"}


def test_class_empty_in_one_split_is_not_reported_empty(tmp_path, make_image):
    make_image(tmp_path / "train" / "cats" / "a.jpg")
    make_image(tmp_path / "train" / "dogs" / "a.jpg")
    (tmp_path / "test" / "dogs").mkdir(parents=True)
    listing = find_images(tmp_path)
    assert listing.class_names == ["cats", "dogs"]
    assert listing.empty_classes == []


def test_hidden_files_and_folders_are_ignored(tiny_dataset, make_image):
    data = tiny_dataset(classes=2, per_class=2)
    touch(data / ".DS_Store", b"x")
    touch(data / "cats" / ".DS_Store", b"x")
    make_image(data / "cats" / "._cats_000.jpg")  # macOS resource fork twin
    make_image(data / "cats" / ".ipynb_checkpoints" / "cats_000-checkpoint.jpg")
    make_image(data / ".ipynb_checkpoints" / "x.jpg")
    make_image(data / ".hidden_class" / "x.jpg")
    make_image(data / "__MACOSX" / "cats" / "x.jpg")
    listing = find_images(data)
    assert listing.class_names == ["cats", "dogs"]
    assert listing.empty_classes == []
    assert [f.path for f in listing.files] == [
        "cats/cats_000.jpg",
        "cats/cats_001.jpg",
        "dogs/dogs_000.jpg",
        "dogs/dogs_001.jpg",
    ]


def test_files_in_nested_subfolders_belong_to_the_class_folder(tiny_dataset, make_image):
    data = tiny_dataset(classes=2, per_class=1)
    make_image(data / "cats" / "2023" / "summer" / "deep.png", fmt="PNG")
    make_image(data / "cats" / "2023" / "z.jpg")
    listing = find_images(data)
    nested = {f.path: f for f in listing.files if f.path.count("/") > 1}
    assert nested == {
        "cats/2023/summer/deep.png": ImageFile("cats/2023/summer/deep.png", "cats", None),
        "cats/2023/z.jpg": ImageFile("cats/2023/z.jpg", "cats", None),
    }


def test_paths_are_relative_posix_and_sorted(tiny_dataset, make_image):
    data = tiny_dataset(layout="splits", classes=3, per_class=3)
    make_image(data / "train" / "cats" / "sub" / "A.jpg")
    listing = find_images(data)
    paths = [f.path for f in listing.files]
    assert paths == sorted(paths)
    assert len(set(paths)) == len(paths)
    for p in paths:
        assert "\\" not in p and not os.path.isabs(p) and not p.startswith("./")
        assert (data / p).is_file()


def test_every_visible_file_is_a_candidate_whatever_its_name(tiny_dataset):
    # Formats are detected from content when decoding; a non-image is rejected then, not here.
    data = tiny_dataset(classes=2, per_class=1)
    touch(data / "cats" / "notes.txt", b"not an image")
    touch(data / "dogs" / "photo", b"\xff\xd8")
    paths = [f.path for f in find_images(data).files]
    assert "cats/notes.txt" in paths
    assert "dogs/photo" in paths


def test_files_directly_in_the_data_folder_are_ignored(tiny_dataset):
    data = tiny_dataset(classes=2, per_class=1)
    touch(data / "README.txt", b"about this data")
    assert [f.path for f in find_images(data).files] == ["cats/cats_000.jpg", "dogs/dogs_000.jpg"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinked_folders_are_followed_but_a_loop_ends(tiny_dataset, make_image, tmp_path):
    data = tiny_dataset(classes=2, per_class=1)
    make_image(tmp_path / "elsewhere" / "far.jpg")
    try:
        os.symlink(tmp_path / "elsewhere", data / "cats" / "linked")
        os.symlink(data / "cats", data / "cats" / "loop")  # points back to its parent
    except OSError:
        pytest.skip("symlinks not permitted here")
    paths = [f.path for f in find_images(data).files]
    assert "cats/linked/far.jpg" in paths
    assert len(paths) == 3


# --- assign_splits -------------------------------------------------------------------------------


def flat_files(counts: dict[str, int], prefix="img") -> list[ImageFile]:
    return [
        ImageFile(f"{cls}/{prefix}_{i:04d}.jpg", cls, None)
        for cls, n in counts.items()
        for i in range(n)
    ]


def per_class(files, splits, split="validation"):
    out = {}
    for f in files:
        if splits[f.path] == split:
            out[f.class_name] = out.get(f.class_name, 0) + 1
    return out


def expected_val(n, val_split):
    target = round(n * val_split)
    if val_split > 0 and n >= 2:
        target = max(1, min(target, n - 1))
    return target


def test_flat_split_is_stratified_per_class():
    files = flat_files({"cats": 10, "dogs": 7, "birds": 2, "owls": 1})
    splits = assign_splits(files, {}, val_split=0.2, seed=0)
    assert set(splits) == {f.path for f in files}
    assert set(splits.values()) == {"train", "validation"}
    # cats round(2.0)=2, dogs round(1.4)=1, birds round(0.4)=0 -> at least 1;
    # owls has 1 image, which stays in train
    assert per_class(files, splits) == {"cats": 2, "dogs": 1, "birds": 1}
    assert per_class(files, splits, "train") == {"cats": 8, "dogs": 6, "birds": 1, "owls": 1}


@pytest.mark.parametrize("val_split", [0.1, 0.2, 0.25, 0.5, 0.9])
def test_validation_count_is_rounded_share_with_one_image_each_side(val_split):
    counts = {f"c{n}": n for n in range(1, 31)}
    files = flat_files(counts)
    got = per_class(files, assign_splits(files, {}, val_split=val_split, seed=3))
    for cls, n in counts.items():
        assert got.get(cls, 0) == expected_val(n, val_split), (cls, n)
        if n >= 2:
            assert 1 <= got[cls] <= n - 1


def test_val_split_zero_puts_everything_in_train():
    files = flat_files({"cats": 5, "dogs": 5})
    assert set(assign_splits(files, {}, val_split=0.0).values()) == {"train"}


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_val_split_outside_zero_one_is_an_error(bad):
    with pytest.raises(FeatxError, match="val_split must be in"):
        assign_splits(flat_files({"cats": 3, "dogs": 3}), {}, val_split=bad)


def test_split_is_seeded():
    files = flat_files({"cats": 50, "dogs": 50})
    a = assign_splits(files, {}, val_split=0.2, seed=0)
    assert assign_splits(files, {}, val_split=0.2, seed=0) == a
    assert assign_splits(list(reversed(files)), {}, val_split=0.2, seed=0) == a  # order-free
    b = assign_splits(files, {}, val_split=0.2, seed=1)
    assert b != a
    assert per_class(files, b) == per_class(files, a) == {"cats": 10, "dogs": 10}


def test_split_layout_is_kept_as_is():
    files = [
        ImageFile("train/cats/a.jpg", "cats", "train"),
        ImageFile("train/dogs/b.jpg", "dogs", "train"),
        ImageFile("validation/cats/c.jpg", "cats", "validation"),
        ImageFile("test/dogs/d.jpg", "dogs", "test"),
    ]
    existing = {"train/cats/a.jpg": "validation", "test/dogs/d.jpg": "train"}  # layout wins
    assert assign_splits(files, existing, val_split=0.5) == {f.path: f.split for f in files}


def test_train_only_split_layout_carves_validation_from_train():
    train = [
        ImageFile(f"train/{c}/{i}.jpg", c, "train") for c in ("cats", "dogs") for i in range(10)
    ]
    test = [ImageFile(f"test/{c}/{i}.jpg", c, "test") for c in ("cats", "dogs") for i in range(3)]
    splits = assign_splits(train + test, {}, val_split=0.2, seed=0)
    assert all(splits[f.path] == "test" for f in test)
    assert {splits[f.path] for f in train} == {"train", "validation"}
    assert per_class(train, splits) == {"cats": 2, "dogs": 2}


def test_adding_files_never_moves_an_existing_file_and_keeps_the_share():
    first = flat_files({"cats": 10, "dogs": 10})
    old = assign_splits(first, {}, val_split=0.2, seed=0)
    more = first + flat_files({"cats": 15, "dogs": 30}, prefix="new")
    new = assign_splits(more, old, val_split=0.2, seed=0)
    assert {p: new[p] for p in old} == old
    # cats: 25 images -> 5 validation; dogs: 40 -> 8 (2 of each were already carved)
    assert per_class(more, new) == {"cats": 5, "dogs": 8}


def test_adding_files_one_by_one_keeps_old_splits_and_the_share():
    names = [f"cats/{i:03d}.jpg" for i in range(40)]
    splits: dict[str, str] = {}
    for n in range(1, len(names) + 1):
        files = [ImageFile(p, "cats", None) for p in names[:n]]
        new = assign_splits(files, splits, val_split=0.2, seed=0)
        assert {p: new[p] for p in splits} == splits, f"a split changed when file {n} came"
        assert list(new.values()).count("validation") == expected_val(n, 0.2)
        splits = new
    assert list(splits.values()).count("validation") == 8


def test_existing_split_beats_a_new_seed_and_deleted_files_drop_out():
    files = flat_files({"cats": 10, "dogs": 10})
    old = assign_splits(files, {}, val_split=0.2, seed=0)
    kept = files[:-1]
    new = assign_splits(kept, old, val_split=0.2, seed=99)
    assert new == {f.path: old[f.path] for f in kept}


def test_existing_non_train_validation_values_are_reassigned():
    files = flat_files({"cats": 5, "dogs": 5})
    bogus = {f.path: "test" for f in files}
    assert assign_splits(files, bogus, val_split=0.2) == assign_splits(files, {}, val_split=0.2)


# --- decoding: formats ---------------------------------------------------------------------------

FORMATS = [
    ("JPEG", {"quality": 95}, 6),
    ("PNG", {}, 0),
    ("GIF", {}, 0),
    ("BMP", {}, 0),
    ("WEBP", {"lossless": True}, 0),
    ("WEBP", {"quality": 90}, 8),
    ("TIFF", {}, 0),
]


@pytest.mark.parametrize(("fmt", "kwargs", "tol"), FORMATS)
def test_every_format_decodes_to_a_square_rgb_uint8_array(fmt, kwargs, tol):
    data = encode(halves((60, 40), left=(200, 40, 40), right=(40, 40, 200)), fmt, **kwargs)
    arr = decode_image(data, image_size=32)
    assert_rgb_array(arr, 32)
    assert_color(arr[16, 2], (200, 40, 40), tol)
    assert_color(arr[16, 29], (40, 40, 200), tol)


def test_default_size_is_the_configured_input_size():
    arr = decode_image(encode(Image.new("RGB", (50, 30), RED), "PNG"))
    assert_rgb_array(arr, config.IMAGE_SIZE)


@pytest.mark.parametrize("image_size", [1, 7, 96, 224])
def test_output_size_follows_image_size_for_any_input_shape(image_size):
    for shape in [(3, 500), (500, 3), (image_size, image_size)]:
        arr = decode_image(encode(Image.new("RGB", shape, GREEN), "PNG"), image_size)
        assert_rgb_array(arr, image_size)
        assert_color(arr[0, 0], GREEN)


def test_decoding_is_deterministic_and_load_image_matches_decode_image(tmp_path, make_image):
    path = make_image(tmp_path / "a.jpg", size=(64, 48), color=(10, 120, 230))
    data, _ = read_file(path)
    a = decode_image(data, 24)
    assert np.array_equal(a, decode_image(data, 24))
    assert np.array_equal(a, load_image(path, 24))


@pytest.mark.parametrize(("first", "second"), [(RED, BLUE), (BLUE, RED)])
def test_animated_gif_gives_its_first_frame(first, second):
    frames = [Image.new("RGB", (20, 20), c) for c in (first, second, GREEN)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    arr = decode_image(data, 8)
    assert_color(arr.reshape(-1, 3).min(0), first)
    assert_color(arr.reshape(-1, 3).max(0), first)


def test_multipage_tiff_gives_its_first_page():
    pages = [Image.new("RGB", (20, 20), c) for c in (BLUE, RED)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert_color(decode_image(data, 8)[4, 4], BLUE)


def test_format_comes_from_content_not_file_name(tmp_path, make_image):
    png_named_jpg = make_image(tmp_path / "really_a_png.jpg", fmt="PNG", color=GREEN)
    jpeg_no_ext = make_image(tmp_path / "photo", fmt="JPEG", color=BLUE, quality=95)
    gif_named_png = make_image(tmp_path / "x.png", fmt="GIF", color=RED)
    assert_color(load_image(png_named_jpg, 8)[4, 4], GREEN)
    assert_color(load_image(jpeg_no_ext, 8)[4, 4], BLUE, tol=6)
    assert_color(load_image(gif_named_png, 8)[4, 4], RED)


# --- decoding: modes -----------------------------------------------------------------------------


def test_grayscale_becomes_equal_rgb_channels():
    arr = decode_image(encode(Image.new("L", (10, 10), 77), "PNG"), 4)
    assert_color(arr[0, 0], (77, 77, 77))


def test_one_bit_image_is_black_and_white():
    img = Image.new("1", (20, 10), 0)
    img.paste(1, (10, 0, 20, 10))
    arr = decode_image(encode(img, "PNG"), 20)
    assert_color(arr[5, 2], (0, 0, 0))
    assert_color(arr[5, 17], WHITE)


def palette_image() -> Image.Image:
    """A P image: index 0 (red) on the left half, index 1 (blue) on the right half."""
    img = Image.new("P", (20, 10), 0)
    img.putpalette([*RED, *BLUE] + [0] * (256 - 2) * 3)
    img.paste(1, (10, 0, 20, 10))
    return img


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP"])
def test_palette_image_without_transparency_uses_its_colours(fmt):
    arr = decode_image(encode(palette_image(), fmt), 20)
    assert_color(arr[5, 2], RED)
    assert_color(arr[5, 17], BLUE)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_the_background(fmt):
    data = encode(palette_image(), fmt, transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    arr = decode_image(data, 20)
    assert_color(arr[5, 2], config.BACKGROUND)
    assert_color(arr[5, 17], BLUE)


def test_transparent_colour_key_in_l_and_rgb_png_becomes_the_background():
    gray = Image.new("L", (20, 10), 0)
    gray.paste(90, (10, 0, 20, 10))
    arr = decode_image(encode(gray, "PNG", transparency=0), 20)
    assert_color(arr[5, 2], WHITE)
    assert_color(arr[5, 17], (90, 90, 90))
    rgb = halves((20, 10), left=(0, 0, 0), right=RED)
    arr = decode_image(encode(rgb, "PNG", transparency=(0, 0, 0)), 20)
    assert_color(arr[5, 2], WHITE)
    assert_color(arr[5, 17], RED)


def test_cmyk_jpeg_becomes_rgb():
    img = Image.new("CMYK", (40, 20), (0, 255, 255, 0))  # red
    img.paste((255, 255, 0, 0), (20, 0, 40, 20))  # blue
    data = encode(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    arr = decode_image(data, 20)
    assert_color(arr[10, 2], RED, tol=8)
    assert_color(arr[10, 17], BLUE, tol=8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
@pytest.mark.parametrize(
    ("value16", "value8"), [(32896, 128), (65535, 255), (0, 0), (257 * 40, 40), (200, 1)]
)
def test_16_bit_grayscale_is_scaled_to_8_bits(fmt, value16, value8):
    # (200, 1): a dark 16-bit image is still 16-bit; its values must not be read as 8-bit ones.
    img = Image.fromarray(np.full((8, 12), value16, dtype=np.uint16))
    data = encode(img, fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    arr = decode_image(data, 4)
    assert_color(arr[1, 1], (value8,) * 3, tol=1)


def test_16_bit_gradient_keeps_its_order_and_range():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (4, 1))
    arr = decode_image(encode(Image.fromarray(ramp), "PNG"), 64)[2, :, 0].astype(int)
    assert arr[0] == 0 and arr[-1] == 255
    assert np.all(np.diff(arr) >= 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_fully_transparent_pixels_become_white(mode):
    img = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    img.paste((0, 0, 0, 255), (10, 0, 20, 10))
    arr = decode_image(encode(img.convert(mode), "PNG"), 20)
    assert config.BACKGROUND == WHITE
    assert_color(arr[5, 2], WHITE)
    assert_color(arr[5, 17], (0, 0, 0))


def test_half_transparent_pixels_are_blended_with_the_background():
    arr = decode_image(encode(Image.new("RGBA", (6, 6), (255, 0, 0, 128)), "PNG"), 6)
    assert_color(arr[3, 3], (255, 127, 127), tol=1)
    arr = decode_image(encode(Image.new("LA", (6, 6), (0, 64)), "PNG"), 6)
    assert_color(arr[3, 3], (191, 191, 191), tol=1)


def test_background_colour_comes_from_config(monkeypatch):
    monkeypatch.setattr(config, "BACKGROUND", GREEN)
    arr = decode_image(encode(Image.new("RGBA", (6, 6), (9, 9, 9, 0)), "PNG"), 6)
    assert_color(arr[3, 3], GREEN)


def test_rgba_webp_and_tiff_are_composited_too():
    img = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    for fmt, kwargs in [("WEBP", {"lossless": True}), ("TIFF", {})]:
        assert_color(decode_image(encode(img, fmt, **kwargs), 4)[2, 2], WHITE)


# --- decoding: EXIF orientation and draft -------------------------------------------------------


def exif_jpeg(orientation: int, size=(60, 40)) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(halves(size), "JPEG", quality=95, exif=exif)


def test_exif_orientation_6_is_applied():
    # Stored: 60x40, left half red, right half blue. Orientation 6 = rotate 90 degrees clockwise
    # to display: the picture becomes 40x60 with red on top and blue at the bottom.
    arr = decode_image(exif_jpeg(6), 20)
    assert_color(arr[2, 10], RED, tol=10)
    assert_color(arr[17, 10], BLUE, tol=10)


def test_exif_orientation_1_and_3_for_comparison():
    arr = decode_image(exif_jpeg(1), 20)
    assert_color(arr[10, 2], RED, tol=10)
    assert_color(arr[10, 17], BLUE, tol=10)
    arr = decode_image(exif_jpeg(3), 20)  # rotated 180 degrees: blue left, red right
    assert_color(arr[10, 2], BLUE, tol=10)
    assert_color(arr[10, 17], RED, tol=10)


def test_exif_orientation_is_applied_by_load_image(tmp_path):
    path = tmp_path / "portrait.jpg"
    path.write_bytes(exif_jpeg(8))  # rotate 90 degrees counter-clockwise: blue on top
    arr = load_image(path, 20)
    assert_color(arr[2, 10], BLUE, tol=10)
    assert_color(arr[17, 10], RED, tol=10)


@pytest.fixture
def draft_sizes(monkeypatch):
    """Records the size every JPEG has after `draft`, i.e. the size it is decoded at."""
    sizes = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return sizes


def test_large_jpeg_is_decoded_at_reduced_scale(draft_sizes):
    data = encode(halves((2000, 1500)), "JPEG", quality=90)
    arr = decode_image(data, 224)
    assert_rgb_array(arr, 224)
    assert_color(arr[112, 20], RED, tol=10)
    assert_color(arr[112, 200], BLUE, tol=10)
    # min(2000 // 224, 1500 // 224) = 6 -> DCT scale 1/4: decoded at 500x375, still >= 224 a side
    assert draft_sizes == [(500, 375)]
    decode_image(data, 64)
    assert draft_sizes[-1] == (250, 188)  # scale 1/8


def test_draft_never_decodes_below_the_input_size(draft_sizes):
    for shape in [(300, 300), (500, 230), (230, 2000)]:
        arr = decode_image(encode(Image.new("RGB", shape, BLUE), "JPEG"), 224)
        assert_rgb_array(arr, 224)
        assert min(draft_sizes[-1]) >= 224


def test_large_rotated_jpeg_uses_draft_and_orientation(draft_sizes):
    exif = Image.Exif()
    exif[0x0112] = 6
    arr = decode_image(encode(halves((1600, 1200)), "JPEG", exif=exif), 32)
    assert draft_sizes == [(200, 150)]
    assert_color(arr[3, 16], RED, tol=10)
    assert_color(arr[28, 16], BLUE, tol=10)


# --- decoding: the decompression-bomb guard ---------------------------------------------------


def test_decompression_bomb_guard_rejects_too_many_pixels(tmp_path):
    data = encode(Image.new("RGB", (40, 30), RED), "PNG")
    with pytest.raises(ValueError, match="decompression-bomb guard") as exc:
        decode_image(data, 16, max_pixels=1000)
    assert "40x30 > 1000" in str(exc.value)
    assert_rgb_array(decode_image(data, 16, max_pixels=1200), 16)  # exactly at the limit is fine
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="decompression-bomb guard"):
        load_image(path, 16, max_pixels=1000)


def test_pillows_own_bomb_error_is_reported_the_same_way(monkeypatch):
    # Pillow refuses to open images above 2x Image.MAX_IMAGE_PIXELS, before featx's check.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = encode(Image.new("RGB", (40, 30), RED), "PNG")
    with pytest.raises(ValueError, match="decompression-bomb guard"):
        decode_image(data, 16, max_pixels=10**9)


def test_default_guard_is_pillows_limit():
    assert config.MAX_IMAGE_PIXELS == 89_478_485
    # A header that claims 20000x20000 (4e8 pixels) is refused without decoding anything.
    header = encode(Image.new("L", (1, 1)), "BMP")
    big = bytearray(header)
    big[18:22] = (20000).to_bytes(4, "little")
    big[22:26] = (20000).to_bytes(4, "little")
    with pytest.raises(ValueError, match="decompression-bomb guard"):
        decode_image(bytes(big), 16)


# --- decoding: bad inputs -----------------------------------------------------------------------


def jpeg_bytes() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return encode(Image.fromarray(noise), "JPEG", quality=90)


def png_bytes() -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return encode(Image.fromarray(noise), "PNG")


def corrupt_middle(data: bytes, n=64) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(n) + data[mid + n :]


BAD_INPUTS = {
    "zero bytes": (b"", "empty file"),
    "truncated jpeg": (jpeg_bytes()[: len(jpeg_bytes()) // 2], "truncated"),
    # cut inside its tables: Pillow's open() itself fails, with a plain OSError
    "jpeg truncated in its header": (jpeg_bytes()[:400], "truncated"),
    "truncated png": (png_bytes()[: len(png_bytes()) // 2], "truncated"),
    "png corrupt in the middle": (corrupt_middle(png_bytes()), "corrupt"),
    "jpeg with a corrupt header": (jpeg_bytes()[:20] + bytes(100) + jpeg_bytes()[120:], "corrupt"),
    "text": (b"hello, this is a text file\n", "not an image"),
    "html": (b"<!DOCTYPE html><html><body>404</body></html>", "not an image"),
    "random bytes": (np.random.default_rng(2).bytes(3000), "not an image"),
    "jpeg magic only": (b"\xff\xd8\xff", "not an image|corrupt|truncated"),
    "png signature only": (b"\x89PNG\r\n\x1a\n", "not an image|corrupt|truncated"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_value_error_with_a_short_reason(name, tmp_path):
    data, reason = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=reason) as exc:
        decode_image(data, 16)
    message = str(exc.value)
    assert message and "\n" not in message and len(message) < 200
    path = tmp_path / "bad.jpg"  # the same through load_image, with a misleading name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=reason):
        load_image(path, 16)


def test_corruption_inside_jpeg_image_data_never_raises_anything_but_value_error():
    # libjpeg treats damaged entropy-coded data as a warning and decodes it with artefacts: such a
    # file cannot be told from a valid one. What featx guarantees is "an array or a ValueError".
    data = jpeg_bytes()
    rng = np.random.default_rng(3)
    for start in range(300, len(data) - 100, len(data) // 12):
        bad = data[:start] + rng.bytes(40) + data[start + 40 :]
        try:
            arr = decode_image(bad, 16)
        except ValueError:
            continue
        assert_rgb_array(arr, 16)


def test_reason_names_the_detected_format():
    with pytest.raises(ValueError, match=r"\(JPEG\)"):
        decode_image(jpeg_bytes()[:2000], 16)
    with pytest.raises(ValueError, match=r"\(PNG\)"):
        decode_image(corrupt_middle(png_bytes()), 16)


def test_missing_file_is_an_os_error_not_a_decode_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "gone.jpg", 16)


# --- the user's files are never modified ------------------------------------------------------


def test_read_file_returns_bytes_and_their_sha256(tmp_path, make_image):
    path = make_image(tmp_path / "a.png", fmt="PNG")
    data, sha = read_file(path)
    assert data == path.read_bytes()
    assert sha == hashlib.sha256(data).hexdigest()


def test_load_image_never_modifies_the_file(tmp_path, make_image):
    exif = Image.Exif()
    exif[0x0112] = 6
    paths = [
        make_image(tmp_path / "rotated.jpg", size=(60, 40), exif=exif),
        make_image(tmp_path / "alpha.png", mode="RGBA", fmt="PNG", color=(1, 2, 3, 0)),
        make_image(tmp_path / "anim.gif", fmt="GIF"),
        touch(tmp_path / "broken.jpg", jpeg_bytes()[:500]),
        touch(tmp_path / "empty.jpg"),
    ]
    past = 1_500_000_000_000_000_000
    for p in paths:
        os.utime(p, ns=(past, past))
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in paths}
    for p in paths:
        with contextlib.suppress(ValueError):
            load_image(p, 16)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in paths} == before
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)  # nothing written beside


# --- conftest helpers (other test files rely on them) --------------------------------------------


def test_make_image_writes_the_requested_format_mode_and_size(tmp_path, make_image):
    path = make_image(tmp_path / "sub" / "x.bin", size=(13, 7), mode="L", fmt="PNG", color=RED)
    with Image.open(path) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "L", (13, 7))
    path = make_image(tmp_path / "y.jpg")
    with Image.open(path) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (40, 30))


def test_tiny_dataset_images_all_decode_and_classes_differ_in_colour(tiny_dataset):
    data = tiny_dataset(layout="flat", classes=3, per_class=2)
    listing = find_images(data)
    means = {}
    for f in listing.files:
        arr = load_image(data / f.path, 8)
        means.setdefault(f.class_name, []).append(arr.reshape(-1, 3).mean(0))
    centers = {c: np.mean(v, axis=0) for c, v in means.items()}
    assert np.abs(centers["cats"] - centers["dogs"]).max() > 100
    assert np.abs(centers["cats"] - centers["birds"]).max() > 100
