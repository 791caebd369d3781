"""Faults found by attack, round 3 (#27), the rest: each test failed before its fix."""

import os

import pytest
from helpers import COLOURS, TINY, write_images

from featx import config
from featx.commands.extract import extract
from featx.images import decoder

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
