"""Faults found by attack, round 3 (#27): each test failed before its fix."""

import csv
import errno
import os
import shutil

import pytest
from click.testing import CliRunner
from helpers import COLOURS, TINY, assert_one_line_error, write_images

from featx import files
from featx.cli import cli
from featx.commands import predict
from featx.commands.extract import extract
from featx.commands.fit_head import fit_head
from featx.errors import FeatxError
from featx.images import decoder, finder

TINY_ARGS = ["--weights", "none", "--alpha", "0.35", "--image-size", "32", "--engine", "keras"]


def _failing_fsync(fd):
    raise OSError(errno.EIO, "Input/output error")


# --- 3. fsync errors are errors ------------------------------------------------------------------


def test_an_fsync_error_is_one_line_and_keeps_the_previous_cache(tmp_path, monkeypatch):
    data = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 4), noise=50)
    cache = tmp_path / "c.h5"
    extract(data, cache, engine="keras", batch_size=4, **TINY)
    before = cache.read_bytes()
    monkeypatch.setattr(os, "fsync", _failing_fsync)
    args = ["extract", str(data), "--cache", str(cache), "--overwrite", *TINY_ARGS]
    result = CliRunner().invoke(cli, args)
    assert_one_line_error(result, "Could not write", "Input/output error")
    assert cache.read_bytes() == before


def test_an_fsync_error_in_fit_head_keeps_the_previous_head(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "head"
    shutil.copytree(tiny_model.logreg, out)
    before = (out / "head.json").read_bytes()
    monkeypatch.setattr(os, "fsync", _failing_fsync)
    with pytest.raises(FeatxError, match="Input/output error"):  # (a copied folder: --overwrite)
        fit_head(tiny_model.cache, "logreg", out, C=0.5, overwrite=True)
    assert (out / "head.json").read_bytes() == before


def test_a_folder_that_cannot_fsync_is_not_an_error(tmp_path, monkeypatch):
    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", fsync)
    assert files.write_text_atomic(tmp_path / "a.txt", "x").read_text() == "x"


# --- 4. only the formats featx lists are decoded ----------------------------------------------


def test_a_postscript_file_named_jpg_never_reaches_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"
    path = tmp_path / "holiday.jpg"
    path.write_bytes(eps)
    with pytest.raises(ValueError, match="not an image"):
        decoder.load_image(path, 32)
    # the report's and the audit's thumbnails read through the same list of formats
    from featx.reports import contact_sheet, html_report

    assert html_report.thumbnail(path) is None
    assert contact_sheet.thumbnail(path, 16)[1] == "unreadable"
    assert not ran


# --- 6. CSV formula injection ------------------------------------------------------------------


def test_csv_cells_a_spreadsheet_would_run_are_neutralised(tmp_path):
    rows = [
        {
            "path": '=HYPERLINK("http://x")',
            "predicted": "@SUM(A1)",
            "probability": -0.5,
            "top_k": [{"class": "+cats", "probability": 0.9}],
            "label": "-dogs",
            "error": None,
            "unknown": None,  # the novelty columns (#23) between probability and top_k
            "novelty": None,
        }
    ]
    predict.write_rows(tmp_path / "p.csv", rows, 1)
    with open(tmp_path / "p.csv", newline="") as fh:
        row = list(csv.DictReader(fh))[0]
    cells = [row[c] for c in ("path", "predicted", "probability", "top1", "top1_probability")]
    assert cells == ['\'=HYPERLINK("http://x")', "'@SUM(A1)", "-0.5", "'+cats", "0.9"]
    assert row["label"] == "'-dogs"
    assert files.csv_safe("cats") == "cats" and files.csv_safe(-1) == -1


# --- 7. class names that labels.txt cannot hold --------------------------------------------------


def test_a_class_name_with_a_line_break_is_refused_in_one_line(tmp_path):
    data = write_images(tmp_path / "data", {"cats": 2, "dogs": 2})
    (data / "dogs").rename(data / "big\ndogs")
    with pytest.raises(FeatxError, match="line break"):
        finder.find_images(data)
    result = CliRunner().invoke(cli, ["extract", str(data), "--cache", str(tmp_path / "c.h5")])
    assert_one_line_error(result, "line break", "Rename the folder")
