"""Issue #26, daily use round 2: options checked before any work, in the CLI's words, and wrong
paths answered before TensorFlow loads, with the near match."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error, write_images

from featx.cli import cli
from featx.errors import FeatxError, check_fraction


def test_a_percent_given_for_a_fraction_gets_the_fraction_it_means():
    with pytest.raises(FeatxError, match=r"a fraction in \[0, 1\]; did you mean 0.95\?"):
        check_fraction("min_accuracy", 95, closed=True)
    with pytest.raises(FeatxError, match=r"got 1.5\.$"):  # no percent: no guess
        check_fraction("val_split", 1.5)


def test_fit_head_min_accuracy_as_a_percent_is_refused_before_any_work(tiny_model, tmp_path):
    out = tmp_path / "out"
    args = ["fit-head", str(tiny_model.cache), "--output", str(out), "--min-accuracy", "95"]
    result = CliRunner().invoke(cli, args)
    assert_one_line_error(result, "--min-accuracy must be in [0, 1]", "did you mean 0.95?")
    assert not out.exists()  # nothing trained, nothing written


def test_fit_head_dense_options_are_checked_before_the_cache_is_read(tmp_path):
    cache = tmp_path / "not-a-cache.h5"
    cache.write_text("not read: the option is refused first")
    args = ["fit-head", str(cache), "--head", "dense", "--dropout", "50"]
    result = CliRunner().invoke(cli, args)
    assert_one_line_error(result, "--dropout must be in [0, 1)", "did you mean 0.5?")


def test_messages_name_the_option_as_typed_on_the_cli(tmp_path):
    data = write_images(tmp_path / "data", {"cats": 1, "dogs": 1})
    cmd = ["extract", str(data), "--cache", str(tmp_path / "c.h5"), "--weights", "none"]
    result = CliRunner().invoke(cli, [*cmd, "--val-split", "20"])
    assert_one_line_error(result, "--val-split must be in [0, 1)", "did you mean 0.2?")
    result = CliRunner().invoke(cli, [*cmd, "--image-size", "16"])
    assert_one_line_error(result, "--image-size must be an integer between 32 and 1024")


@pytest.mark.parametrize(
    "args",
    [
        ["fit-head", "cache/banana"],
        ["finetune", "cache/banan", "--head", "cache/banana-logreg"],
        ["audit", "cache/banana"],
        ["info", "cache/banana"],
    ],
)
def test_a_wrong_cache_path_gets_the_near_match(tmp_path, monkeypatch, args):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "banana.h5").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert_one_line_error(result, "Cache not found", "did you mean cache/banana.h5?".capitalize())


@pytest.mark.slow
def test_a_wrong_path_is_answered_before_tensorflow_loads(tmp_path):
    """fit-head said "Cache not found" after 2.6 s (5.3 s on the user's machine) before #26."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "banana.h5").write_bytes(b"")
    code = (
        "import sys; from featx.cli import main; sys.argv = ['featx', 'fit-head', "
        "'cache/banana']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('tensorflow' in sys.modules, 'sklearn' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert "Did you mean cache/banana.h5?" in done.stderr, done.stderr
    assert done.stdout.split() == ["False", "False"], done.stdout
    assert time.perf_counter() - t0 < 10


def test_a_cache_given_as_model_folder_says_what_to_pass(tiny_model, tmp_path):
    result = CliRunner().invoke(cli, ["predict", str(tiny_model.cache), str(tmp_path)])
    expected = str(tiny_model.cache.with_name("tiny-logreg"))
    assert_one_line_error(result, "is a feature cache; pass a fit-head output folder", expected)
    result = CliRunner().invoke(cli, ["export", str(tiny_model.cache)])
    assert_one_line_error(result, "is a feature cache")


def test_predict_says_when_the_accuracy_leaves_out_folders_not_named_after_classes(
    tiny_model, tmp_path
):
    photos = write_images(tmp_path / "held_out", {"cats": 2, "birds": 3})
    args = ["predict", str(tiny_model.logreg), str(photos), "--engine", "keras"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "/2 images in folders named after their class" in result.output
    assert "not counted: 3 images in folders not named after one of the model's classes" in (
        result.output
    )


# --- item 8: paths relative to the data folder; info --files ------------------------------------


def noise_folder(root):
    """root/{cats,dogs}/*.png of pure noise: a head guesses, so misclassified.csv has rows."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(15):
            pixels = rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}{i:02d}.png")
    return root


def test_misclassified_csv_holds_the_caches_relative_paths_and_the_report_finds_them(
    fake_engine, tmp_path, monkeypatch
):
    import csv
    import json

    from helpers import TINY

    import featx

    data = noise_folder(tmp_path / "data")
    cache = tmp_path / "c.h5"
    featx.extract(data, cache, progress=False, batch_size=8, **TINY)
    out = tmp_path / "head"
    featx.fit_head(cache, output=out, C=1.0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cache"]["data_dir"] == str(data.resolve())
    with open(out / "misclassified.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows, "a head on noise gets some wrong"
    cached = {f["path"] for f in featx.info(cache, files=True)["files"]}
    assert all(r["path"] in cached for r in rows)  # the cache's own relative paths
    assert all(not os.path.isabs(r["path"]) for r in rows)
    # report.html finds each thumbnail in the data folder, wherever featx report runs
    monkeypatch.chdir(tmp_path / "head")
    result = CliRunner().invoke(cli, ["report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    shown = sum(r["split"] == "validation" for r in rows)
    assert page.count("class='thumb'") == min(shown, 24) and "image not found" not in page


def test_info_files_lists_every_images_path_split_and_label(tiny_model):
    import csv
    import io
    import json

    import featx
    from featx.cache import store

    cache = store.read_cache(tiny_model.cache, features=False)
    expected = [
        {"path": p, "split": s, "label": cache.class_names[int(y)]}
        for p, s, y in zip(cache.paths, cache.splits.tolist(), cache.labels)
    ]
    assert featx.info(tiny_model.cache, files=True)["files"] == expected
    assert "files" not in featx.info(tiny_model.cache)
    runner = CliRunner()
    result = runner.invoke(cli, ["info", str(tiny_model.cache), "--files", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["files"] == expected
    result = runner.invoke(cli, ["info", str(tiny_model.cache), "--files"])
    assert result.exit_code == 0, result.output
    assert list(csv.DictReader(io.StringIO(result.output))) == expected
    assert all((tiny_model.data / row["path"]).is_file() for row in expected)


# --- 1. featx never reads its own outputs as data ------------------------------------------------


def test_extract_in_a_project_folder_skips_featx_outputs_and_names_photos(tmp_path):
    from helpers import COLOURS, TINY

    from featx.commands.extract import extract
    from featx.commands.fit_head import fit_head

    proj = tmp_path / "proj"
    photos = write_images(proj / "photos", dict.fromkeys(COLOURS, 4), noise=50)
    cache = proj / "cache" / "photos.h5"
    extract(photos, cache, engine="keras", batch_size=4, **TINY)
    fit_head(cache, "logreg", proj / "cache" / "photos-logreg")
    result = CliRunner().invoke(cli, ["extract", str(proj), "--cache", str(tmp_path / "p.h5")])
    assert_one_line_error(result, "Found 1 class folder(s)", f"If '{photos}' holds the class")


def test_featx_outputs_inside_a_data_folder_are_skipped_with_the_reason(tmp_path):
    from helpers import COLOURS

    from featx.images import finder

    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 2))
    (data / "cats" / "old.h5.parts").mkdir()  # a cache's parts folder, marker and all
    (data / "cats" / "old.h5.parts" / ".featx-journal").touch()
    (data / "cats" / "old.h5").write_bytes(b"\x89HDF")
    (data / "cats" / "old.h5.lock").touch()
    for marker in ("head.json", "export.json", "audit.json", "featx-files.json"):
        write_images(data / "dogs" / f"out-{marker}", {"x": 1})  # an output folder with images
        (data / "dogs" / f"out-{marker}" / marker).write_text("{}")
    listing = finder.find_images(data)
    assert [f.path for f in listing.files] == [
        "cats/cats000.jpg", "cats/cats001.jpg", "dogs/dogs000.jpg", "dogs/dogs001.jpg"
    ]  # fmt: skip
    own = "featx's own output; not read as data"
    assert dict(listing.skipped) == {
        "cats/old.h5": own, "cats/old.h5.lock": own, "cats/old.h5.parts": own,
        "dogs/out-audit.json": own, "dogs/out-export.json": own,
        "dogs/out-featx-files.json": own, "dogs/out-head.json": own,
    }  # fmt: skip
