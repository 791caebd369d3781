"""Splits that keep copies together (#23 item 2): a flat folder is split so that each group of
copies (featx audit's duplicate groups, at its threshold) is on one side, still stratified by
class and seeded; a new copy joins its group's side; recorded splits never change; `--overwrite`
splits again; `featx merge` splits as a single run does. A user's own split is kept, and its
leakage is reported in metrics.json and report.html.

Images are pure noise, so only the planted copies are alike (PixelEngine: features = pixels)."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from helpers import TINY
from PIL import Image

from featx import config
from featx.cache import store
from featx.commands.extract import extract
from featx.commands.fit_head import fit_head
from featx.commands.merge import merge
from featx.images.finder import ImageFile, assign_splits
from featx.quality import duplicates

ARGS = dict(**TINY, batch_size=8, progress=False)
# Planted groups per class: sizes of the groups of copies (the first of each is the original).
PLANTED = {"cats": (2, 2, 3, 2), "dogs": (2, 3, 2)}
SINGLES = 20  # unrelated images per class


def noise_image(path: Path, seed: int, jitter: int = 0, jitter_seed: int = 0) -> Path:
    """A 40x40 image of black and white 5x5 blocks at random (unrelated images: cosine about
    0.5); `jitter` > 0 adds small noise of its own (a near copy: cosine above 0.99)."""
    blocks = np.random.default_rng(seed).integers(0, 2, (8, 8, 3)) * 255
    pixels = np.kron(blocks, np.ones((5, 5, 1), np.int64))
    if jitter:
        rng = np.random.default_rng(1000 + jitter_seed)
        pixels = pixels + rng.integers(-jitter, jitter + 1, pixels.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def write_flat(root: Path) -> list[list[str]]:
    """root/CLASS/*.png: SINGLES unrelated images per class and the PLANTED groups, each an
    original, a byte copy (in the second group) and near copies. Returns the groups' paths."""
    groups, seed = [], 0
    for name, sizes in PLANTED.items():
        for i in range(SINGLES):
            seed += 1
            noise_image(root / name / f"{name}{i:02d}.png", seed)
        for g, size in enumerate(sizes):
            seed += 1
            members = [f"{name}/group{g}-0.png"]
            original = noise_image(root / members[0], seed)
            for k in range(1, size):
                members.append(f"{name}/group{g}-{k}.png")
                if g == 1 and k == 1:  # an exact copy: the same bytes
                    (root / members[-1]).write_bytes(original.read_bytes())
                else:
                    noise_image(root / members[-1], seed, jitter=6, jitter_seed=seed * 10 + k)
            groups.append(members)
    return groups


def splits_of(cache_path: Path) -> dict[str, str]:
    cache = store.read_cache(cache_path, features=False)
    return dict(zip(cache.paths, cache.splits.tolist()))


def assert_grouped(splits: dict[str, str], groups: list[list[str]]) -> None:
    for members in groups:
        assert len({splits[p] for p in members}) == 1, {p: splits[p] for p in members}


def test_a_flat_folder_keeps_each_group_of_copies_on_one_side(fake_engine, tmp_path):
    groups = write_flat(tmp_path / "data")
    extract(tmp_path / "data", tmp_path / "c.h5", **ARGS)
    splits = splits_of(tmp_path / "c.h5")
    assert_grouped(splits, groups)
    cache = store.read_cache(tmp_path / "c.h5")
    # the audit's own search finds the planted groups and nothing else, none across the splits
    found, _ = duplicates.find_duplicates(cache)
    assert sorted(sorted(cache.paths[i] for i in g.rows) for g in found) == sorted(groups)
    assert duplicates.leakage(cache) is None
    # still stratified: each class's validation share is 20 % within one image
    for name, sizes in PLANTED.items():
        n = SINGLES + sum(sizes)
        val = sum(s == "validation" for p, s in splits.items() if p.startswith(name + "/"))
        assert abs(val - round(n * config.VAL_SPLIT)) <= 1, (name, val)
    # seeded: another seed, another split, still grouped
    extract(tmp_path / "data", tmp_path / "seed1.h5", **ARGS, seed=1)
    other = splits_of(tmp_path / "seed1.h5")
    assert other != splits
    assert_grouped(other, groups)


def test_a_new_copy_joins_its_groups_side_and_recorded_splits_never_change(fake_engine, tmp_path):
    data = tmp_path / "data"
    groups = write_flat(data)
    cache = tmp_path / "c.h5"
    extract(data, cache, **ARGS)
    before = splits_of(cache)
    val = sorted(p for p, s in before.items() if s == "validation")[:3]
    train = sorted(p for p, s in before.items() if s == "train")[:3]
    added = {}
    for k, original in enumerate(val + train):  # a near copy of each, beside it
        seed = int.from_bytes(original.encode()[:4], "big")
        pixels = np.asarray(Image.open(data / original), np.int64)
        jitter = np.random.default_rng(seed).integers(-5, 6, pixels.shape)
        new = original.replace(".png", f"-new{k}.png")
        Image.fromarray(np.clip(pixels + jitter, 0, 255).astype(np.uint8)).save(data / new)
        added[new] = before[original]
    summary = extract(data, cache, **ARGS)
    assert summary["extracted"] == len(added)
    after = splits_of(cache)
    assert {p: after[p] for p in before} == before  # recorded splits never change
    assert {p: after[p] for p in added} == added  # each new copy on its original's side
    assert duplicates.leakage(store.read_cache(cache)) is None

    # --overwrite splits again: the split a fresh extraction of the folder makes, grouped
    extract(data, cache, **ARGS, overwrite=True)
    extract(data, tmp_path / "fresh.h5", **ARGS)
    assert splits_of(cache) == splits_of(tmp_path / "fresh.h5")
    assert_grouped(splits_of(cache), groups)


def test_merged_shards_keep_copies_together_as_a_single_run_does(fake_engine, tmp_path):
    groups = write_flat(tmp_path / "data")
    extract(tmp_path / "data", tmp_path / "single.h5", **ARGS)
    shards = [tmp_path / f"s{k}.h5" for k in range(3)]
    for k, path in enumerate(shards):
        extract(tmp_path / "data", path, **ARGS, shard=f"{k}/3")
    merge(tmp_path / "merged.h5", shards)
    merged = splits_of(tmp_path / "merged.h5")
    assert merged == splits_of(tmp_path / "single.h5")
    assert_grouped(merged, groups)


def test_a_users_own_split_is_kept_and_its_leakage_reported(fake_engine, tmp_path):
    for case in ("leaky", "clean"):
        root = tmp_path / case
        for split, n in (("train", 12), ("validation", 4)):
            for c, name in enumerate(("cats", "dogs")):
                for i in range(n):
                    noise_image(root / split / name / f"{name}{i:02d}.png", 100 * c + 10 * n + i)
        if case == "leaky":  # a near copy of a train photo in validation: leakage
            noise_image(root / "validation/cats/copy.png", 10 * 12 + 3, jitter=5)
        cache = tmp_path / f"{case}.h5"
        extract(root, cache, **ARGS)
        splits = splits_of(cache)
        assert all(s == p.split("/")[0] for p, s in splits.items())  # the user's split, kept
        with warnings.catch_warnings(record=True):  # the leakage, also a FeatxWarning
            metrics = fit_head(cache, output=tmp_path / f"{case}-head", C=1.0)
        written = json.loads((tmp_path / f"{case}-head" / "metrics.json").read_text())
        page = (tmp_path / f"{case}-head" / "report.html").read_text()
        leak = "2 files, copies of 1 photo, are in both train and validation"  # #27 item 15
        if case == "leaky":
            assert any(leak in w for w in written["warnings"]), written["warnings"]
            assert f"warning: {leak}" in page and "class='warnings'" in page
        else:
            assert not any("both train and validation" in w for w in written["warnings"])
            assert "both train and validation" not in page
        assert written["warnings"] == metrics["warnings"]


def test_assign_splits_places_each_group_whole_and_stratified():
    files, groups = [], []
    for name in ("a", "b", "c"):
        for i in range(60):
            files.append(ImageFile(f"{name}/{i:03d}.jpg", name, None))
        for g in range(6):  # groups of 2..7 images among the first 27 of each class
            groups.append(
                [f"{name}/{i:03d}.jpg" for i in range(g * (g + 3) // 2, (g + 1) * (g + 4) // 2)]
            )
    groups.append(["a/050.jpg", "b/050.jpg"])  # a copy filed under two classes
    for seed in range(5):
        plain = assign_splits(files, {}, 0.2, seed)
        grouped = assign_splits(files, {}, 0.2, seed, groups)
        assert_grouped(grouped, groups)
        val = Counter(f.class_name for f in files if grouped[f.path] == "validation")
        assert all(abs(val[c] - 12) <= 3 for c in "abc"), val
        # images outside every group move only to make room: most keep the plain split
        grouped_paths = {p for g in groups for p in g}
        same = sum(plain[f.path] == grouped[f.path] for f in files if f.path not in grouped_paths)
        assert same >= 0.8 * (len(files) - len(grouped_paths))
    assert assign_splits(files, {}, 0.2, 0, []) == assign_splits(files, {}, 0.2, 0)
    # a recorded member decides its group's side, whatever the hash says
    recorded = {"a/000.jpg": "validation", "a/003.jpg": "train"}
    again = assign_splits(files, recorded, 0.2, 0, groups)
    assert (
        again["a/001.jpg"] == "validation" and again["a/002.jpg"] == again["a/004.jpg"] == "train"
    )


def test_flip_on_an_older_cache_extracts_again_but_keeps_its_recorded_splits(
    fake_engine, tmp_path, monkeypatch
):
    """--flip on a cache without mirror images extracts every image again; its splits (here, of
    a featx before the grouped split) still never change without --overwrite."""
    write_flat(tmp_path / "data")
    cache = tmp_path / "c.h5"
    with monkeypatch.context() as m:  # a cache split image by image, as before #23 item 2
        m.setattr(duplicates, "split_groups", lambda cache, log=None: [])
        extract(tmp_path / "data", cache, **ARGS)
    before = splits_of(cache)
    summary = extract(tmp_path / "data", cache, flip=True, **ARGS)
    assert summary["extracted"] == len(before)
    assert splits_of(cache) == before
    assert store.read_cache(cache, features=False).flip
