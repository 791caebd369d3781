"""bench/quality.py: the plain baseline, the paired counts and the near-duplicate leak, on small
synthetic caches (the benchmark itself runs on the real data sets with `make bench`)."""

import numpy as np
import pytest
from helpers import load_bench
from test_fit_head import write_synthetic_cache


@pytest.fixture(scope="module")
def quality():
    return load_bench("quality")


def test_paired_counts_add_up_to_the_accuracy_difference(quality, tmp_path):
    counts = {"train": (30, 30), "validation": (40, 40)}
    cache = write_synthetic_cache(tmp_path / "c.h5", counts, distance=1.5)
    plain = quality.read_plain(cache)
    base = quality.baseline(plain)
    row = quality.featx_row(cache, "logreg", {"C": 0.01}, plain["data_dir"])
    assert base["validation"]["n"] == row["validation"]["n"] == 80
    assert base["validation"]["accuracy"] < 1 and row["validation"]["accuracy"] < 1
    # both list the wrong images by their path in the cache, so the two sets can be compared
    assert set(row["wrong"]["validation"]) <= set(plain["paths"])
    assert set(base["wrong"]["validation"]) <= set(plain["paths"])
    p = quality.paired(row, base)
    difference = row["validation"]["accuracy"] - base["validation"]["accuracy"]
    assert (p["only_featx_right"] - p["only_baseline_right"]) / 80 == pytest.approx(difference)
    assert quality.paired(base, base) == {"only_featx_right": 0, "only_baseline_right": 0}


def test_validation_images_with_a_near_duplicate_in_train_are_found_by_file_name(quality, tmp_path):
    (tmp_path / "flowers.txt").write_text("0 a.jpg b.jpg\n3 c.jpg d.jpg\n1 e.jpg f.jpg\n")
    plain = {
        "paths": np.array(["x/a.jpg", "x/b.jpg", "y/c.jpg", "y/d.jpg", "z/e.jpg", "z/f.jpg"]),
        "splits": np.array(["train", "validation", "validation", "train", "test", "validation"]),
    }
    quality.NEAR_DUPLICATES["flowers"] = "flowers.txt"
    try:
        mask = quality.leaked(tmp_path, "flowers", plain)
    finally:
        del quality.NEAR_DUPLICATES["flowers"]
    # b's twin and c's twin are in train; f's twin is in test, which is no leak
    assert mask.tolist() == [False, True, True, False, False, False]
    assert quality.leaked(tmp_path, "cats", plain) is None


def test_means_are_over_the_sets_that_have_the_row(quality):
    sets = {
        name: {
            "rows": {
                "a": {"validation": {"accuracy": acc, "balanced_accuracy": acc, "macro_f1": acc}}
            }
        }
        for name, acc in (("one", 0.9), ("two", 0.8))
    }
    sets["two"]["rows"]["b"] = {
        "validation": {"accuracy": 1, "balanced_accuracy": 1, "macro_f1": 1}
    }
    means = quality.means(sets, {"a": "A", "b": "B"})
    assert means == {"a": {"accuracy": 0.85, "balanced_accuracy": 0.85, "macro_f1": 0.85}}
