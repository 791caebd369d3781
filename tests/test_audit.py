"""`featx audit`: duplicates and leakage, label issues, outliers and class balance.

Two kinds of data: a folder of generated images with planted problems, extracted once with the
tiny random MobileNetV2 (module fixture), and small synthetic feature caches written directly.
One `real` test plants a resized copy among real photos and finds it at the default threshold.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    COLOURS,
    REAL_DATA,
    TINY,
    WEIGHTS_FILE,
    load_bench,
    write_image,
    write_split_data,
)
from PIL import Image

from featx import config
from featx.cache import store
from featx.cli import cli
from featx.commands import audit
from featx.commands.extract import extract
from featx.commands.fit_head import fit_head
from featx.quality import duplicates

TINY_ARGS = ["--weights", "none", "--alpha", "0.35", "--image-size", "32", "--batch-size", "8"]
# The tiny random backbone maps every image to similar features: unrelated generated images
# reach a cosine of 0.97 there (ImageNet features: 0.84), so tests on it use a higher threshold.
TINY_THRESHOLD = 0.98


def write_planted_data(root: Path) -> dict:
    """root/{train,validation}/{cats,dogs}/*.jpg (20 train and 6 validation images per class)
    with planted copies; returns what was planted, as cache paths."""
    for s, (split, n) in enumerate((("train", 20), ("validation", 6))):
        for c, (name, colour) in enumerate(COLOURS.items()):
            for i in range(n):
                # a smooth pattern half-blended with the class colour: images differ at 32 px
                path = root / split / name / f"{name}{i:02d}.jpg"
                seed = 1000 * s + 100 * c + i
                write_image(path, colour, seed=seed, size=(64, 48), texture="smooth", quality=90)
    t = root / "train"
    shutil.copyfile(t / "cats/cats00.jpg", root / "validation/cats/leaked.jpg")  # same bytes
    shutil.copyfile(t / "dogs/dogs01.jpg", t / "cats/dogs01_again.jpg")  # one photo, two classes
    with Image.open(t / "dogs/dogs03.jpg") as img:  # resized to 75 % and recompressed
        img.resize((48, 36), Image.Resampling.BILINEAR).save(
            t / "dogs/dogs03_small.jpg", quality=60
        )
    return {
        "cross_split": ["train/cats/cats00.jpg", "validation/cats/leaked.jpg"],
        "cross_label": ["train/cats/dogs01_again.jpg", "train/dogs/dogs01.jpg"],
        "near": ["train/dogs/dogs03.jpg", "train/dogs/dogs03_small.jpg"],
    }


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(data folder, cache, what was planted, the output of `featx extract`), extracted once."""
    tmp = tmp_path_factory.mktemp("planted")
    root = tmp / "data"
    truth = write_planted_data(root)
    cache = tmp / "planted.h5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "AUDIT_NEAR_DUPLICATE", TINY_THRESHOLD)
        result = CliRunner().invoke(
            cli, ["extract", str(root), "--cache", str(cache), "--engine", "keras", *TINY_ARGS]
        )
    assert result.exit_code == 0, result.output
    return root, cache, truth, result


@pytest.fixture(scope="module")
def planted_audit(planted, tmp_path_factory):
    root, cache, truth, _ = planted
    out = tmp_path_factory.mktemp("audit") / "out"
    notes = []
    result = audit.audit(cache, out, threshold=TINY_THRESHOLD, log=notes.append)
    return result, out, notes


def group_of(result: dict, paths: list[str]) -> dict:
    found = [g for g in result["duplicates"] if set(paths) <= set(g["paths"])]
    assert len(found) == 1, f"{paths} not in one group: {result['duplicates']}"
    return found[0]


# --- generated images, tiny backbone ------------------------------------------------------------


def test_exact_copies_across_splits_and_labels_are_grouped_and_marked(planted, planted_audit):
    truth = planted[2]
    result = planted_audit[0]
    leak = group_of(result, truth["cross_split"])
    assert leak == {
        "paths": truth["cross_split"],
        "kind": "exact",
        "similarity": 1.0,
        "cross_split": True,
        "cross_label": False,
    }
    mixed = group_of(result, truth["cross_label"])
    assert mixed["paths"] == truth["cross_label"] and mixed["kind"] == "exact"
    assert mixed["cross_label"] and not mixed["cross_split"]
    assert result["summary"]["leaking_train_images"] == 1
    # the harmful groups come first
    assert {tuple(g["paths"]) for g in result["duplicates"][:2]} == {
        tuple(truth["cross_split"]),
        tuple(truth["cross_label"]),
    }


def test_a_resized_recompressed_copy_is_a_near_duplicate(planted, planted_audit):
    truth = planted[2]
    result = planted_audit[0]
    near = group_of(result, truth["near"])
    assert near["paths"] == truth["near"] and near["kind"] == "near"
    assert TINY_THRESHOLD <= near["similarity"] < 1.0
    assert not near["cross_split"] and not near["cross_label"]
    # the three planted groups and nothing else
    assert len(result["duplicates"]) == 3
    assert result["summary"]["exact_groups"] == 2 and result["summary"]["near_groups"] == 1


@pytest.fixture(scope="module")
def flipped(tmp_path_factory):
    """(cache, {path: true class}): noisy one-colour-per-class images (20 train and 6 validation
    per class), three of them moved into the other class folder, extracted once."""
    root = write_split_data(tmp_path_factory.mktemp("flips") / "data", train=20, validation=6)
    t = root / "train"
    flips = {"cats/cats05.jpg": "dogs", "dogs/dogs02.jpg": "cats", "dogs/dogs07.jpg": "cats"}
    truth = {}
    for name, wrong in flips.items():
        true_class, file = name.split("/")
        os.rename(t / name, t / wrong / file)
        truth[f"train/{wrong}/{file}"] = true_class
    cache = root.parent / "flips.h5"
    extract(root, cache, **TINY, batch_size=8, engine="keras")
    return cache, truth


def test_planted_label_flips_are_found_with_their_true_class(flipped, tmp_path):
    cache, truth = flipped
    result = audit.audit(cache, tmp_path / "out", threshold=TINY_THRESHOLD)
    issues = {d["path"]: d for d in result["label_issues"]}
    for path, true_class in truth.items():
        assert path in issues, f"{path} not flagged: {list(issues)}"
        assert issues[path]["suggested"] == true_class
        assert issues[path]["label"] != true_class
        assert 0.5 < issues[path]["score"] <= 1.0
    assert len(set(issues) & set(truth)) / len(issues) >= 0.5  # precision
    scores = [d["score"] for d in result["label_issues"]]
    assert scores == sorted(scores, reverse=True)
    assert result["summary"]["label_issues"] == len(issues)


def test_the_summary_offers_label_issues_as_worth_a_look_highest_score_first(flipped, tmp_path):
    cache, truth = flipped
    args = ["audit", str(cache), "--output", str(tmp_path / "out"), "--threshold", "0.98"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "audit.json").read_text())["label_issues"]
    train = sum(1 for p in store.read_cache(cache, features=False).splits if p == "train")
    lines = result.stdout.splitlines()
    head = f"label issues: {len(saved)} of {train} train images worth a look, highest score first"
    assert head in lines and "mislabelled" not in result.stdout  # a score, not a verdict
    shown = lines[lines.index(head) + 1 : lines.index(head) + 4]
    scores = [float(line.rsplit("(", 1)[1].rstrip(")")) for line in shown]
    assert scores == sorted(scores, reverse=True) and len(shown) == min(3, len(saved))
    assert shown[0].strip().startswith(saved[0]["path"])


def test_the_label_noise_benchmark_moves_five_percent_of_train_to_another_class():
    bench = load_bench("label_issues")
    labels = np.repeat(np.arange(3, dtype=np.int32), 100)
    splits = np.array(["train", "validation"] * 150, dtype=object)
    noisy, rows = bench.plant_noise(labels, splits, 3, seed=0)
    assert len(rows) == round(0.05 * 150) and (splits[rows] == "train").all()
    assert (noisy[rows] != labels[rows]).all() and (noisy != labels).sum() == len(rows)
    assert np.array_equal(bench.plant_noise(labels, splits, 3, seed=0)[1], rows)  # seeded
    assert bench.precision_recall([1, 2, 3, 4], [2, 4, 6]) == (0.5, 2 / 3)


def test_a_photo_filed_under_two_classes_is_also_a_label_issue(planted, planted_audit):
    issues = {d["path"]: d for d in planted_audit[0]["label_issues"]}
    assert issues["train/cats/dogs01_again.jpg"]["suggested"] == "dogs"
    assert all(p.startswith("train/") for p in issues)


def test_audit_json_has_exactly_the_documented_keys_and_csv_files_match(planted, planted_audit):
    result, out, _ = planted_audit
    saved = json.loads((out / "audit.json").read_text())
    assert list(saved) == ["duplicates", "label_issues", "outliers", "class_counts"]
    assert saved == {k: result[k] for k in audit.KEYS}
    assert all(
        set(g) == {"paths", "kind", "similarity", "cross_split", "cross_label"}
        for g in saved["duplicates"]
    )
    assert all(set(d) == {"path", "label", "suggested", "score"} for d in saved["label_issues"])
    assert all(set(d) == {"path", "score"} for d in saved["outliers"])
    assert saved["class_counts"] == {
        "train": {"cats": 21, "dogs": 21},
        "validation": {"cats": 7, "dogs": 6},
    }
    with open(out / "duplicates.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(len(g["paths"]) for g in saved["duplicates"])
    assert {r["split"] for r in rows if r["path"] == "validation/cats/leaked.jpg"} == {"validation"}
    with open(out / "label_issues.csv") as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == [d["path"] for d in saved["label_issues"]]
    with open(out / "outliers.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(saved["outliers"])


def test_contact_sheets_show_the_images(planted, planted_audit):
    result, out, notes = planted_audit
    assert result["summary"]["unreadable_images"] == 0 and not notes
    with Image.open(out / "duplicates.png") as sheet:
        # three groups of two thumbnails: two groups side by side, then one
        assert sheet.width >= 5 * config.AUDIT_THUMBNAIL and sheet.height > 2 * 160
        colours = sheet.convert("RGB").getcolors(1 << 20)
        assert len(colours) > 100  # real thumbnails, not placeholders on white
    assert (out / "label_issues.png").is_file()


def test_the_cache_and_the_images_are_only_read(planted, tmp_path):
    root, cache, _, _ = planted
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in [cache, *root.rglob("*")]}
    audit.audit(cache, tmp_path / "out", threshold=TINY_THRESHOLD)
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in [cache, *root.rglob("*")]}
    assert after == before


def test_extract_ends_with_one_line_about_leakage(planted):
    result = planted[3]
    cache = planted[1]
    expected = (
        "warning: 2 files, copies of 1 photo, are in both train and validation; 2 files, copies "
        f"of 1 photo, are filed under two or more classes: run `featx audit {cache}`"
    )
    assert result.stderr.strip().splitlines()[-1] == expected
    assert expected not in result.stdout


def test_moved_images_are_drawn_as_placeholders_and_said_once(planted, tmp_path):
    root, cache, _, _ = planted
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    copy = tmp_path / "copy.h5"
    shutil.copyfile(cache, copy)
    parts = cache.with_name(cache.name + ".parts")  # the features: the part files it names
    shutil.copytree(parts, copy.parent / parts.name, dirs_exist_ok=True)
    c = store.read_cache(copy)
    c.attrs["data_dir"] = str(tmp_path / "gone")
    store.write_cache(copy, c)
    notes = []
    result = audit.audit(copy, tmp_path / "a", threshold=TINY_THRESHOLD, log=notes.append)
    assert result["summary"]["unreadable_images"] > 0
    assert len(notes) == 1 and "drawn as placeholders" in notes[0] and "--data-dir" in notes[0]
    assert (tmp_path / "a" / "duplicates.png").is_file()
    notes.clear()
    result = audit.audit(
        copy, tmp_path / "b", threshold=TINY_THRESHOLD, data_dir=moved, log=notes.append
    )
    assert result["summary"]["unreadable_images"] == 0 and not notes


# --- synthetic feature caches -------------------------------------------------------------------


def write_cache(
    path: Path,
    per_class: dict,
    class_names=("cats", "dogs", "birds"),
    dim: int = 64,
    seed: int = 0,
    data_dir: str | None = "/nowhere",
    edit=None,
) -> Path:
    """A featx cache of Gaussian-cluster features: per_class {split: [images per class]}. Unrelated
    rows have a cosine similarity below 0.9, so nothing is a near duplicate at the default
    threshold. edit(features, labels, splits, paths, sha) may change the arrays in place."""
    rng = np.random.default_rng(seed)
    centres = 1.5 * rng.normal(size=(len(class_names), dim))
    features, labels, splits, paths = [], [], [], []
    for split, counts in per_class.items():
        for c, n in enumerate(counts):
            for i in range(n):
                features.append(centres[c] + rng.normal(size=dim))
                labels.append(c)
                splits.append(split)
                paths.append(f"{split}/{class_names[c]}/{i:04d}.jpg")
    n = len(paths)
    features = np.asarray(features, np.float32).reshape(n, dim)
    labels = np.asarray(labels, np.int32)
    splits = np.array(splits, dtype=object)
    sha = [f"{i:064x}" for i in range(n)]
    if edit:
        edit(features, labels, splits, paths, sha)
    cache = store.Cache(
        fingerprint={"backbone": "test"},
        class_names=list(class_names),
        features=features,
        labels=labels,
        splits=splits,
        rows=store.Rows(paths, np.full(n, 1000, np.int64), np.arange(n, dtype=np.int64), sha),
        attrs={"data_dir": data_dir, "layout": "splits"},
    )
    store.write_cache(path, cache)
    return path


def test_a_cache_without_a_data_folder_gets_placeholders_and_one_note(tmp_path):
    counts = {"train": [30, 30], "validation": [5, 5]}
    path = write_cache(tmp_path / "c.h5", counts, ("a", "b"), data_dir=None, edit=_one_copy)
    notes = []
    result = audit.audit(path, tmp_path / "out", log=notes.append)
    assert notes == [
        "note: the cache records no data folder, so the contact sheets show placeholders; "
        "pass --data-dir to show the images."
    ]
    shown = {p for g in result["duplicates"] for p in g["paths"]}
    shown |= {d["path"] for d in result["label_issues"] + result["outliers"]}
    assert {"train/a/0000.jpg", "train/a/0001.jpg"} <= shown
    assert result["summary"]["unreadable_images"] == len(shown)  # one per image, by cache path
    assert (tmp_path / "out" / "duplicates.png").is_file()


def _one_copy(features, labels, splits, paths, sha):
    sha[1] = sha[0]  # an exact copy, so there is a duplicates sheet to draw
    features[1] = features[0]


def test_label_flips_in_a_feature_cache_are_found_and_ranked_first(tmp_path):
    flipped = [3, 50, 77, 130, 151, 170]  # rows of train, 60 per class

    def flip(features, labels, splits, paths, sha):
        for i in flipped:
            labels[i] = (labels[i] + 1) % 3

    path = write_cache(
        tmp_path / "c.h5", {"train": [60, 60, 60], "validation": [20] * 3}, edit=flip
    )
    result = audit.audit(path, tmp_path / "out", seed=0)
    cache = store.read_cache(path)
    flagged = [d["path"] for d in result["label_issues"]]
    assert sorted(flagged[: len(flipped)]) == sorted(cache.paths[i] for i in flipped)
    assert len(flagged) <= 2 * len(flipped)
    truth = {cache.paths[i]: cache.class_names[(cache.labels[i] - 1) % 3] for i in flipped}
    assert {d["path"]: d["suggested"] for d in result["label_issues"][:6]} == truth
    assert result["summary"]["label_issues"] == len(flagged)
    assert result["duplicates"] == []  # no false near duplicates among Gaussian clusters


def test_an_image_far_from_all_others_is_the_top_outlier(tmp_path):
    def plant(features, labels, splits, paths, sha):
        rng = np.random.default_rng(1)
        features[7] = 3 * rng.normal(size=features.shape[1])  # no class centre near it

    counts, names = {"train": [40, 40], "validation": [10, 10]}, ("a", "b")
    clean = audit.audit(write_cache(tmp_path / "c.h5", counts, names), tmp_path / "o1")
    path = write_cache(tmp_path / "d.h5", counts, names, edit=plant)
    outliers = audit.audit(path, tmp_path / "o2")["outliers"]
    assert outliers[0]["path"] == "train/a/0007.jpg"
    assert len(outliers) <= 3
    assert outliers[0]["score"] > 1.5 * max(d["score"] for d in outliers[1:] + clean["outliers"])
    with open(tmp_path / "o2" / "outliers.csv") as fh:
        assert next(csv.DictReader(fh)) == {
            "path": "train/a/0007.jpg",
            "label": "a",
            "split": "train",
            "score": str(outliers[0]["score"]),
        }


def test_uneven_classes_get_the_class_weight_hint(tmp_path):
    path = write_cache(tmp_path / "even.h5", {"train": [40, 20], "validation": [5, 5]}, ("a", "b"))
    assert audit.audit(path, tmp_path / "o1")["summary"]["hints"] == []
    path = write_cache(
        tmp_path / "uneven.h5", {"train": [60, 20], "validation": [5, 5]}, ("a", "b")
    )
    result = audit.audit(path, tmp_path / "o2")
    assert result["class_counts"]["train"] == {"a": 60, "b": 20}
    assert result["summary"]["hints"] == [
        "classes are uneven in train ('a' 60 images, 'b' 20: 3.0x): try "
        "`featx fit-head --class-weight balanced`"
    ]


def test_a_near_copy_above_the_threshold_is_found_below_it_not(tmp_path):
    def copy(features, labels, splits, paths, sha):
        rng = np.random.default_rng(2)
        features[-1] = features[0] + 0.2 * rng.normal(size=features.shape[1])  # cosine ~0.99

    path = write_cache(
        tmp_path / "c.h5", {"train": [30, 30], "test": [5, 5]}, ("a", "b"), edit=copy
    )
    cache = store.read_cache(path)
    x = duplicates.unit_rows(cache.features)
    similarity = float(x[0] @ x[-1])
    groups = audit.audit(path, tmp_path / "o", threshold=similarity - 0.001)["duplicates"]
    assert groups == [
        {
            "paths": ["test/b/0004.jpg", "train/a/0000.jpg"],
            "kind": "near",
            "similarity": pytest.approx(similarity, abs=2e-6),
            "cross_split": True,
            "cross_label": True,
        }
    ]
    assert audit.audit(path, tmp_path / "o", threshold=similarity + 0.001)["duplicates"] == []
    assert not (tmp_path / "o" / "duplicates.png").exists()  # an earlier sheet is not left behind
    assert duplicates.leakage(cache, threshold=similarity - 0.001) == (
        "2 files, copies of 1 photo, are in both train and test; 2 files, copies of 1 photo, are "
        "filed under two or more classes"
    )


def test_blocked_search_equals_all_pairs_at_once():
    rng = np.random.default_rng(3)
    x = duplicates.unit_rows(rng.normal(size=(157, 8)) + 1.0)
    pairs, sims, nearest = duplicates.scan(
        x, 0.9, neighbors=5, block=16
    )  # 10 blocks, the last of 13
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    i, j = np.nonzero(np.triu(full >= 0.9, 1))
    assert sorted(map(tuple, pairs.tolist())) == sorted(zip(i.tolist(), j.tolist()))
    np.testing.assert_allclose(sims[np.lexsort(pairs.T[::-1])], full[i, j], atol=1e-6)
    np.testing.assert_allclose(nearest, -np.sort(-full, axis=1)[:, :5], atol=1e-6)
    assert len(pairs) > 100  # the check had pairs to compare


def test_too_many_similar_pairs_fail_the_audit_but_not_the_warning(tmp_path, monkeypatch):
    def same(features, labels, splits, paths, sha):
        features[:] = features[0]  # every image alike, every file different

    monkeypatch.setattr(config, "AUDIT_MAX_PAIRS", 100)
    path = write_cache(
        tmp_path / "c.h5", {"train": [10, 10], "validation": [3, 3]}, ("a", "b"), edit=same
    )
    result = CliRunner().invoke(cli, ["audit", str(path)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "More than 100 pairs of images have a cosine similarity >= 0.9" in result.output
    assert "Raise --threshold" in result.output
    assert duplicates.leakage(store.read_cache(path)) is None  # exact copies only: there are none


def test_fit_head_exclude_duplicates_trains_without_the_leaking_copies(tmp_path):
    def leak(features, labels, splits, paths, sha):
        features[0] = features[-1]  # train/a/0000 is a copy of validation/b/0009 (another class)
        sha[0] = sha[-1]
        labels[0] = labels[-1]
        features[1] = features[-2] * 1.01  # a near copy (scaled) of validation/b/0008
        labels[1] = labels[-2]

    path = write_cache(
        tmp_path / "c.h5", {"train": [30, 30], "validation": [10, 10]}, ("a", "b"), edit=leak
    )
    plain = fit_head(path, output=tmp_path / "plain")
    assert "excluded_duplicates" not in plain
    notes = []
    m = fit_head(path, output=tmp_path / "x", exclude_duplicates=True, log=notes.append)
    assert m["excluded_duplicates"] == ["train/a/0000.jpg", "train/a/0001.jpg"]
    assert m["train"]["n"] == plain["train"]["n"] - 2
    assert m["validation"]["n"] == plain["validation"]["n"] == 20
    assert "excluded 2 train copies of validation or test images." in notes
    saved = json.loads((tmp_path / "x" / "metrics.json").read_text())
    assert saved["excluded_duplicates"] == m["excluded_duplicates"]

    runner = CliRunner()
    result = runner.invoke(cli, ["fit-head", str(path), "--output", str(tmp_path / "c1")])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        "warning: 4 files, copies of 2 photos, are in both train and validation: run "
        f"`featx audit {path}`"
    )
    args = ["fit-head", str(path), "--output", str(tmp_path / "c2"), "--exclude-duplicates"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.output and "excluded 2 train copies" in result.stderr


def test_clean_caches_give_no_warning(tmp_path):
    path = write_cache(tmp_path / "c.h5", {"train": [30, 30], "validation": [10, 10]}, ("a", "b"))
    result = CliRunner().invoke(cli, ["fit-head", str(path), "--output", str(tmp_path / "o")])
    assert result.exit_code == 0 and "warning" not in result.output
    assert duplicates.leakage_line(path) is None


@pytest.mark.parametrize(
    "counts, names, message",
    [
        ({}, ("a", "b"), "holds no images, so there is nothing to audit"),
        ({"train": [20], "validation": [5]}, ("a",), "holds images of one class only (a)"),
        ({"validation": [10, 10]}, ("a", "b"), "has no train images"),
    ],
    ids=["empty", "one-class", "no-train"],
)
def test_caches_without_anything_to_audit_are_refused_in_one_line(tmp_path, counts, names, message):
    path = write_cache(tmp_path / "c.h5", counts, names)
    result = CliRunner().invoke(cli, ["audit", str(path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a handled error, not a crash
    assert result.output.startswith("Error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_bad_threshold_and_missing_cache_are_one_line(tmp_path):
    path = write_cache(tmp_path / "c.h5", {"train": [20, 20], "validation": [5, 5]}, ("a", "b"))
    for args, message in (
        ([str(path), "--threshold", "1.5"], "threshold must be a cosine similarity in (0, 1]"),
        ([str(tmp_path / "none.h5")], "Cache not found"),
    ):
        result = CliRunner().invoke(cli, ["audit", *args])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
        assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_prints_a_summary_or_json_and_writes_next_to_the_cache(tmp_path):
    path = write_cache(tmp_path / "pets.h5", {"train": [30, 30], "validation": [5, 5]}, ("a", "b"))
    runner = CliRunner()
    result = runner.invoke(cli, ["audit", str(path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "pets-audit"
    assert f"wrote {out}" in result.stdout and "duplicates: 0 groups" in result.stdout
    assert "label issues:" in result.stdout and "class balance (train): 30 to 30" in result.stdout
    assert {p.name for p in out.iterdir()} >= {
        "audit.json",
        "duplicates.csv",
        "label_issues.csv",
        "outliers.csv",
    }
    result = runner.invoke(cli, ["audit", str(path), "--json", "--output", str(tmp_path / "j")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {*audit.KEYS, "summary"}
    assert data["summary"]["output"] == str(tmp_path / "j")
    assert {k: data[k] for k in audit.KEYS} == json.loads(
        (tmp_path / "j" / "audit.json").read_text()
    )


def test_cli_imports_no_cleanlab():
    import subprocess
    import sys

    code = "import sys, featx.cli; print('cleanlab' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- real photos, real weights ------------------------------------------------------------------


@pytest.mark.real
@pytest.mark.skipif(
    not (REAL_DATA / "train").is_dir(), reason=f"real photos not found at {REAL_DATA}"
)
@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason=f"ImageNet weights not in {WEIGHTS_FILE}")
def test_real_photos_a_resized_copy_is_found_at_the_default_threshold(tmp_path):
    data = tmp_path / "pets"
    for split, n in (("train", 8), ("validation", 3)):
        for c in ("cats", "dogs"):
            folder = data / split / c
            folder.mkdir(parents=True)
            for f in sorted((REAL_DATA / split / c).iterdir())[:n]:
                shutil.copyfile(f, folder / f.name)
    source = sorted((data / "train" / "dogs").iterdir())[2]
    with Image.open(source) as img:  # 3/4 size, recompressed, in validation: leakage
        small = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.Resampling.BILINEAR)
        small.save(data / "validation" / "dogs" / "copy.jpg", quality=70)
    cache = tmp_path / "pets.h5"
    extract(data, cache, engine="keras", batch_size=8)
    result = audit.audit(cache, tmp_path / "out")
    assert [g["paths"] for g in result["duplicates"]] == [
        [f"train/dogs/{source.name}", "validation/dogs/copy.jpg"]
    ]
    assert result["duplicates"][0]["cross_split"] and result["duplicates"][0]["kind"] == "near"


def test_the_components_of_duplicate_pairs_are_scipys_connected_components():
    """find_duplicates groups rows with its own union-find (no scipy in merge or extract)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from featx.quality.duplicates import components

    rng = np.random.default_rng(0)
    for _ in range(100):
        n, k = int(rng.integers(1, 60)), int(rng.integers(0, 80))
        pairs = rng.integers(0, n, (k, 2))
        ours = components(n, pairs)
        graph = coo_matrix((np.ones(k), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        _, theirs = connected_components(graph, directed=False)
        assert np.array_equal(ours[:, None] == ours[None, :], theirs[:, None] == theirs[None, :])
        assert all(ours[i] == min(np.flatnonzero(ours == ours[i])) for i in range(n))
