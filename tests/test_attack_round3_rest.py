"""Faults found by attack, round 3 (#27), the rest: each test failed before its fix."""

import json
import os
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import COLOURS, TINY, assert_one_line_error, write_images

from featx import config
from featx.cache import parts, store
from featx.cli import cli
from featx.commands import predict
from featx.commands.extract import extract
from featx.errors import FeatxError, FeatxWarning
from featx.images import decoder, finder
from featx.quality import duplicates

TINY_ARGS = ["--weights", "none", "--alpha", "0.35", "--image-size", "32", "--engine", "keras"]

# --- 8. files larger than any image are not read -------------------------------------------------


def test_a_huge_sparse_file_is_rejected_without_being_read(tmp_path):
    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 3), noise=50)
    huge = data / "cats" / "disk.img"
    with open(huge, "wb") as fh:
        fh.truncate(40 * 2**30)  # 40 GB, sparse: reading it whole was a MemoryError
    summary = extract(data, tmp_path / "c.h5", engine="keras", batch_size=4, **TINY)
    assert summary["images"] == 6
    [rejected] = summary["rejected"]
    assert rejected["path"] == "cats/disk.img"
    assert rejected["reason"] == (
        "too large for an image file (40,960 MiB > 768 MiB, config.MAX_FILE_BYTES); not read"
    )


def test_a_file_growing_past_the_cap_while_read_is_rejected(tmp_path, monkeypatch):
    path = tmp_path / "growing.jpg"
    path.write_bytes(b"\xff\xd8" + b"\0" * 100)
    monkeypatch.setattr(config, "MAX_FILE_BYTES", 1000)
    real_fstat = os.fstat

    def fstat_then_grow(fd):  # the file grows (sparse) right after featx looked at its size
        st = real_fstat(fd)
        with open(path, "r+b") as fh:
            fh.truncate(2**30)
        return st

    monkeypatch.setattr(os, "fstat", fstat_then_grow)
    with pytest.raises(ValueError, match=r"too large for an image file \(0 MiB or more > 0 MiB"):
        decoder.read_file(path)


# --- 9. names that are not UTF-8, times after 2262 ------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_rejected_with_a_reason(tmp_path):
    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 3), noise=50)
    bad = os.fsencode(data / "cats") + b"/caf\xe9.jpg"  # Latin-1, as old cameras and zips write
    os.rename(data / "cats" / "cats000.jpg", bad)
    summary = extract(data, tmp_path / "c.h5", engine="keras", batch_size=4, **TINY)
    assert summary["images"] == 5
    assert summary["rejected"] == [{"path": "cats/caf\\xe9.jpg", "reason": finder.NOT_UTF8}]
    again = extract(data, tmp_path / "c.h5", engine="keras", batch_size=4, **TINY)  # and again
    assert again["extracted"] == 0 and again["rejected"] == summary["rejected"]
    assert store.read_cache(tmp_path / "c.h5", features=False).rejected.paths == [
        "cats/caf\\xe9.jpg"
    ]


def test_a_class_folder_that_is_not_utf8_is_one_line(tmp_path):
    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 2))
    os.rename(data / "dogs", os.fsencode(data) + b"/chiens-\xe9")
    result = CliRunner().invoke(cli, ["extract", str(data), "--cache", str(tmp_path / "c.h5")])
    assert_one_line_error(result, "chiens-\\xe9", "not valid UTF-8", "Rename the folder")


def test_predict_shows_a_name_that_is_not_utf8_escaped(tiny_model, tmp_path):
    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copy(next(tiny_model.data.rglob("*.jpg")), os.fsencode(folder) + b"/\xe9t\xe9.jpg")
    result = predict.predict(tiny_model.logreg, [folder], output=tmp_path / "p.csv")
    [row] = result["rows"]
    assert row["path"].endswith("/\\xe9t\\xe9.jpg") and row["error"] is None
    assert "\\xe9t\\xe9.jpg" in (tmp_path / "p.csv").read_text()


def test_an_mtime_after_2262_is_stored_clamped(tmp_path):
    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 3), noise=50)
    year_3000 = 1000 * 365 * 86400 * 10**9 + 2**62
    os.utime(data / "cats" / "cats000.jpg", ns=(year_3000, year_3000))
    summary = extract(data, tmp_path / "c.h5", engine="keras", batch_size=4, **TINY)
    assert summary["images"] == 6 and not summary["rejected"]
    rows = store.read_cache(tmp_path / "c.h5", features=False).rows
    assert rows.file_mtime_ns[rows.paths.index("cats/cats000.jpg")] == 2**63 - 1
    assert extract(data, tmp_path / "c.h5", engine="keras", **TINY)["kept"] == 6


# --- 5. content changed, size and mtime kept ------------------------------------------------------


def test_new_content_under_the_old_size_and_mtime_is_extracted_again(tmp_path):
    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 3), noise=50, fmt="BMP")
    cache = tmp_path / "c.h5"
    extract(data, cache, engine="keras", batch_size=4, **TINY)
    cat, dog = data / "cats" / "cats000.jpg", data / "dogs" / "dogs000.jpg"
    assert cat.stat().st_size == dog.stat().st_size  # BMPs of one size: the same file size
    before = cat.stat()
    cat.write_bytes(dog.read_bytes())  # `cp` over it, then `touch -r`: size and mtime as before
    os.utime(cat, ns=(before.st_atime_ns, before.st_mtime_ns))
    summary = extract(data, cache, engine="keras", batch_size=4, **TINY)
    assert (summary["extracted"], summary["kept"]) == (1, 5)
    c = store.read_cache(cache)
    row = c.features[c.paths.index("cats/cats000.jpg")]
    np.testing.assert_array_equal(row, c.features[c.paths.index("dogs/dogs000.jpg")])


def test_a_copied_folder_is_hashed_again_without_model_work(tmp_path):
    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 3), noise=50)
    cache = tmp_path / "c.h5"
    extract(data, cache, engine="keras", batch_size=4, **TINY)
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)  # copy2: same sizes and mtimes, other inodes and ctimes
    summary = extract(copy, cache, engine="keras", batch_size=4, **TINY)
    assert (summary["extracted"], summary["kept"]) == (0, 6)
    again = extract(copy, cache, engine="keras", batch_size=4, **TINY)
    assert (again["extracted"], again["kept"]) == (0, 6)
    rows = store.read_cache(cache, features=False).rows
    assert rows.file_inode.tolist() == [(copy / p).stat().st_ino for p in rows.paths]


def test_an_older_cache_gets_ctime_and_inode_on_its_next_extract(tmp_path):
    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 3), noise=50)
    cache = tmp_path / "c.h5"
    extract(data, cache, engine="keras", batch_size=4, **TINY)
    with h5py.File(cache, "a") as f:  # as a cache written before they were recorded
        del f["file_ctime_ns"], f["file_inode"]
    assert not store.read_cache(cache, features=False).rows.identified
    summary = extract(data, cache, engine="keras", batch_size=4, **TINY)
    assert (summary["extracted"], summary["kept"]) == (0, 6)
    rows = store.read_cache(cache, features=False).rows
    assert rows.identified
    assert rows.file_ctime_ns.tolist() == [(data / p).stat().st_ctime_ns for p in rows.paths]


# --- 10. a cache's structure is checked on open ---------------------------------------------------


def _set(name, value, **kwargs):
    def craft(f):
        del f[name]
        f.create_dataset(name, data=value, **kwargs)

    return craft


_NAMES = {"dtype": h5py.string_dtype()}
CRAFTED = {
    "a negative label": (_set("labels", np.array([-1] + [0] * 7, np.int32)), "label -1"),
    "a label past the classes": (_set("labels", np.array([5] + [0] * 7, np.int32)), "label 5"),
    "no class names": (_set("class_names", np.array([], object), **_NAMES), "0 class names"),
    "one class name": (_set("class_names", np.array(["cats"], object), **_NAMES), "its 1 class"),
    "rows out of a part": (_set("blocks", np.array([[0, 100, 8]])), "out of range of its part"),
    "a part out of range": (_set("blocks", np.array([[3, 0, 8]])), "not among its sources"),
    "a format_version 'abc'": (lambda f: f.attrs.__setitem__("format_version", "abc"), "'abc'"),
    "a fingerprint list": (lambda f: f.attrs.__setitem__("fingerprint", "[1, 2]"), "is a list"),
}


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("crafted")
    data = write_images(root / "data", dict.fromkeys(COLOURS, 4), noise=50)
    extract(data, root / "c.h5", engine="keras", batch_size=4, **TINY)
    return root / "c.h5"


@pytest.mark.parametrize("craft", CRAFTED)
def test_a_crafted_cache_is_one_line_naming_overwrite(craft, small_cache, tmp_path):
    cache = tmp_path / "c.h5"
    shutil.copy(small_cache, cache)
    parts = small_cache.with_name("c.h5.parts")
    shutil.copytree(parts, tmp_path / parts.name)
    change, why = CRAFTED[craft]
    with h5py.File(cache, "a") as f:
        change(f)
    for args in (["info"], ["fit-head", "--output", str(tmp_path / "h")], ["audit"]):
        result = CliRunner().invoke(cli, [args[0], str(cache), *args[1:]])
        assert_one_line_error(result, f"'{cache}' is damaged", why, "--overwrite")


def test_a_head_json_of_another_class_count_is_one_line_in_predict(tiny_model, tmp_path):
    head = tmp_path / "head"
    shutil.copytree(tiny_model.logreg, head)
    meta = json.loads((head / "head.json").read_text())
    meta["class_names"].append("zebras")  # head.json of a 3-class run beside a 2-class head.npz
    (head / "head.json").write_text(json.dumps(meta))
    image = next(tiny_model.data.rglob("*.jpg"))
    result = CliRunner().invoke(cli, ["predict", str(head), str(image)])
    assert_one_line_error(result, "lists 3 classes", "has 2 outputs", "Re-run `featx fit-head`")


# --- 11. too little memory is one line ------------------------------------------------------------


@pytest.mark.slow
def test_too_little_address_space_is_one_line_not_a_traceback(tmp_path):
    import resource
    import subprocess
    import sys

    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 2))

    def limit():  # `ulimit -v 1500000`, in the child only
        resource.setrlimit(resource.RLIMIT_AS, (1_500_000 * 1024, resource.RLIM_INFINITY))

    args = [sys.executable, "-m", "featx", "extract", str(data), "--cache", str(tmp_path / "c.h5")]
    args += ["--weights", "none", "--alpha", "0.35", "--image-size", "32", "--engine", "keras"]
    done = subprocess.run(args, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: Out of memory: memory is too low for featx (")
    assert "`ulimit -v` limits this process to 1.4 GiB" in last and "at least 3 GiB" in last


# --- 12. a reader racing a commit reads the new main file -----------------------------------------


def test_a_reader_racing_a_commit_reads_the_new_cache(small_cache, tmp_path, monkeypatch):
    cache = tmp_path / "c.h5"
    shutil.copy(small_cache, cache)
    shutil.copytree(small_cache.with_name("c.h5.parts"), tmp_path / "c.h5.parts")
    data = small_cache.parent / "data"
    real_check, calls = parts.check_sources, []

    def commit_first(cache_path, sources, **kwargs):  # a writer commits while this one reads
        calls.append(sources.names)
        if len(calls) == 1:
            monkeypatch.setattr(parts, "check_sources", real_check)
            extract(data, cache, engine="keras", batch_size=4, overwrite=True, **TINY)
            monkeypatch.setattr(parts, "check_sources", commit_first)
        return real_check(cache_path, sources, **kwargs)

    monkeypatch.setattr(parts, "check_sources", commit_first)
    c = store.read_cache(cache)  # was: "needs its part file ..., which is missing"
    assert len(calls) == 2 and calls[0] != calls[1]  # read again, on the new main file
    assert c.features.shape == (8, c.feature_dim) and np.isfinite(c.features).all()


def test_a_part_that_is_really_gone_is_still_the_error(small_cache, tmp_path, monkeypatch):
    cache = tmp_path / "c.h5"
    shutil.copy(small_cache, cache)
    shutil.copytree(small_cache.with_name("c.h5.parts"), tmp_path / "c.h5.parts")
    for part in (tmp_path / "c.h5.parts").glob("features-*.h5"):
        part.unlink()
    real_check, calls = parts.check_sources, []
    monkeypatch.setattr(
        parts, "check_sources", lambda *a, **k: calls.append(1) or real_check(*a, **k)
    )
    with pytest.raises(FeatxError, match="which is missing"):
        store.read_cache(cache)
    assert len(calls) == 1  # the main file did not change: no second try


# --- 13. a symlinked cache ----------------------------------------------------------------------


def test_a_symlinked_cache_is_read_and_rewritten_where_it_really_is(tmp_path):
    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 3), noise=50)
    real = tmp_path / "real" / "c.h5"
    extract(data, real, engine="keras", batch_size=4, **TINY)
    link = tmp_path / "L" / "c.h5"
    link.parent.mkdir()
    link.symlink_to("../real/c.h5")
    assert len(store.read_cache(link).paths) == 6  # was: "needs its part file ..., missing"
    result = CliRunner().invoke(cli, ["info", str(link)])
    assert result.exit_code == 0, result.output
    write_images(data, {"cats": 1}, start=10, noise=50)
    summary = extract(data, link, engine="keras", batch_size=4, **TINY)
    assert (summary["extracted"], summary["kept"]) == (1, 6)
    summary = extract(data, link, engine="keras", batch_size=4, overwrite=True, **TINY)
    assert summary["images"] == 7
    assert link.is_symlink() and os.readlink(link) == "../real/c.h5"  # the link, not replaced
    assert sorted(p.name for p in link.parent.iterdir()) == ["c.h5"]  # no parts, no lock here
    assert (tmp_path / "real" / "c.h5.parts").is_dir()
    assert len(store.read_cache(real).paths) == 7


# --- 14. look-alike classes; a cache inside the data folder ------------------------------------


def test_look_alike_class_folders_are_warned(tmp_path):
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    data = write_images(tmp_path / "data", {"Dogs": 2, "dogs": 2, nfc: 2, nfd: 2})
    with pytest.warns(FeatxWarning) as caught:
        summary = extract(data, tmp_path / "c.h5", engine="keras", **TINY)
    assert sorted(summary["class_names"]) == sorted(["Dogs", "dogs", nfc, nfd])
    text = [str(w.message) for w in caught]
    assert "the class folders 'Dogs', 'dogs' look alike" in " ".join(text)
    assert "the class folders 'cafe\\u0301', 'caf\\xe9' look alike" in " ".join(text)
    assert "are 2 classes; merge them into one folder, or rename them" in text[0]


def test_a_cache_inside_the_data_folder_makes_no_phantom_class(tmp_path):
    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 3), noise=50)
    cache = data / "feats.h5"
    for run in range(2):  # the second run lists feats.h5.parts/, made by the first
        summary = extract(data, cache, engine="keras", batch_size=4, **TINY)
        assert summary["class_names"] == ["cats", "dogs"] and summary["images"] == 6
        # was: its part files, each "not an image"
        assert summary["rejected"] == run * [{"path": "feats.h5.parts", "reason": finder.FEATX_OWN}]
    assert finder.find_images(data).class_names == ["cats", "dogs"]  # was: + "feats.h5.parts"
    assert store.read_cache(cache, features=False).class_names == ["cats", "dogs"]


# --- 15. smaller --------------------------------------------------------------------------------


def test_the_leakage_warning_counts_files_and_photos(tmp_path):
    splits = ("train", "validation")
    data = write_images(tmp_path / "data", {s: dict.fromkeys(COLOURS, 3) for s in splits}, noise=50)
    burst = data / "train" / "cats" / "cats000.jpg"
    for i in range(3):  # one photo, 5 files: 4 in train, 1 in validation
        shutil.copy(burst, data / "train" / "cats" / f"burst{i}.jpg")
    shutil.copy(burst, data / "validation" / "cats" / "burst.jpg")
    extract(data, tmp_path / "c.h5", engine="keras", **TINY)
    cache = store.read_cache(tmp_path / "c.h5")
    assert duplicates.leakage(cache, threshold=2.0) == (  # exact copies only
        "5 files, copies of 1 photo, are in both train and validation"
    )  # was: "1 photo is in both train and validation"


def test_a_truncated_heic_is_rejected_with_a_one_line_reason(tmp_path):
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, "HEIF")
    data = buffer.getvalue()
    with pytest.raises(ValueError) as caught:
        decoder.decode_image(data[:-20], 32)
    reason = str(caught.value)
    assert reason.startswith("corrupt or truncated image (HEIF): Invalid input: Unexpected end")
    assert "\n" not in reason and reason == reason.strip()  # was: pillow-heif's, ending in "\n"
    path = tmp_path / "cut.heic"
    path.write_bytes(data[:-20])
    assert decoder.load_for_cache(path, 32) == ("rejected", reason, None)


def test_a_nan_float_tiff_decodes_without_a_numpy_warning(tmp_path):
    import warnings

    from PIL import Image

    pixels = np.full((8, 8), 100.0, np.float32)
    pixels[0, :] = np.nan
    pixels[1, :] = np.inf
    path = tmp_path / "nan.tif"
    Image.fromarray(pixels, "F").save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: RuntimeWarning: invalid value encountered in cast
        rgb = decoder.load_image(path, 8)
    assert rgb[0].max() == 0 and rgb[1].min() == 255 and (rgb[2:] == 100).all()


def test_a_fifo_given_as_the_cache_is_named_so(tmp_path):
    fifo = tmp_path / "c.h5"
    os.mkfifo(fifo)
    for args in (["info", str(fifo)], ["fit-head", str(fifo), "--output", str(tmp_path / "h")]):
        result = CliRunner().invoke(cli, args)  # was: "Cache not found"
        assert_one_line_error(result, f"'{fifo}' is a FIFO, not a featx cache")
    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 2))
    result = CliRunner().invoke(cli, ["extract", str(data), "--cache", str(fifo), *TINY_ARGS])
    assert_one_line_error(result, f"'{fifo}' is a FIFO, not a featx cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "data"]


def test_no_lock_is_made_beside_an_h5_file_that_is_not_a_featx_cache(tmp_path):
    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 2))
    theirs = tmp_path / "theirs.h5"
    with h5py.File(theirs, "w") as f:
        f["x"] = np.arange(3)
    before = theirs.read_bytes()
    for extra in ([], ["--overwrite"]):
        args = ["extract", str(data), "--cache", str(theirs), *TINY_ARGS, *extra]
        result = CliRunner().invoke(cli, args)
        assert_one_line_error(result, f"'{theirs}' is not a featx cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "theirs.h5"]  # was: + .lock
    assert theirs.read_bytes() == before
