"""`extract --shard K/N` and `featx merge`: N shard runs, joined, give the cache one run writes."""

import hashlib
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import TINY, assert_one_line_error, write_images

from featx.cache import store
from featx.cli import cli
from featx.commands.extract import extract
from featx.commands.merge import merge
from featx.errors import FeatxError
from featx.images import shards

ARGS = dict(**TINY, engine="keras", batch_size=8)


def test_shard_of_is_a_stable_hash_that_covers_every_image_once():
    paths = [f"train/c{i % 3}/img{i:04d}.jpg" for i in range(600)]
    for n in (1, 2, 3, 7):
        groups = [[p for p in paths if shards.shard_of(p, n) == k] for k in range(n)]
        assert sorted(sum(groups, [])) == sorted(paths)  # disjoint and covering
        if n > 1:  # balanced: no shard gets less than half its share
            assert min(len(g) for g in groups) > len(paths) / n / 2
    # Stable across runs and machines: the documented SHA-1 of the UTF-8 path, nothing else.
    path = "validation/dogs/dog.1234.jpg"
    expected = int.from_bytes(hashlib.sha1(path.encode()).digest()[:8], "big") % 5
    assert shards.shard_of(path, 5) == expected
    assert shards.shard_of("ünïcode/é.jpg", 4) == shards.shard_of("ünïcode/é.jpg", 4)


@pytest.mark.parametrize("text", ["3", "3/3", "-1/2", "a/b", "1/0", ""])
def test_a_bad_shard_is_one_line(text):
    with pytest.raises(FeatxError, match="--shard"):
        shards.parse(text)


def extract_shards(data, folder, n, **kwargs):
    paths = [folder / f"s{k}.h5" for k in range(n)]
    for k, path in enumerate(paths):
        extract(data, path, **{**ARGS, **kwargs}, shard=f"{k}/{n}")
    return paths


def read_all(path):
    cache = store.read_cache(path)
    return cache, {p: i for i, p in enumerate(cache.paths)}


def assert_same_cache(merged_path, single_path):
    merged, single = store.read_cache(merged_path), store.read_cache(single_path)
    assert merged.paths == single.paths
    assert merged.class_names == single.class_names
    assert merged.labels.tolist() == single.labels.tolist()
    assert merged.splits.tolist() == single.splits.tolist()
    assert merged.rows.file_sha256 == single.rows.file_sha256
    assert merged.rejected.paths == single.rejected.paths
    assert merged.features.dtype == single.features.dtype
    assert np.array_equal(merged.features, single.features)  # bit for bit: the same engine
    with h5py.File(merged_path, "r") as f:  # plain h5py reads it as one (N, D) array
        assert np.array_equal(f["features"][()], single.features)


@pytest.mark.parametrize("layout", ["flat", "splits"])
def test_three_shards_merged_equal_a_single_run(tmp_path, layout):
    counts = {"cats": 9, "dogs": 8, "owls": 7}
    if layout == "splits":
        counts = {"train": {"cats": 7, "dogs": 6}, "validation": {"cats": 3, "dogs": 3}}
    data = write_images(tmp_path / "data", counts, size=(40, 40))
    (data / ("cats" if layout == "flat" else "train/cats") / "broken.jpg").write_bytes(b"no")
    single = tmp_path / "single.h5"
    extract(data, single, **ARGS)
    parts = extract_shards(data, tmp_path, 3)
    sizes = [len(store.read_cache(p, features=False).paths) for p in parts]
    assert all(sizes) and sum(sizes) == len(store.read_cache(single, features=False).paths)

    summary = merge(tmp_path / "merged.h5", list(reversed(parts)))  # any order
    assert summary["shards"] == 3 and not summary["copied"]
    assert_same_cache(tmp_path / "merged.h5", single)
    # No features were copied: the merged file is small and names the shards' part files.
    merged = store.read_cache(tmp_path / "merged.h5", features=False)
    assert all(name.startswith("s") and ".parts/" in name for name in merged.sources.names)

    merge(tmp_path / "copied.h5", parts, copy=True)
    for p in parts:  # a copied merge needs the shards no more
        shutil.rmtree(p.with_name(p.name + ".parts"))
        p.unlink()
    assert_same_cache(tmp_path / "copied.h5", single)


def test_a_merged_cache_moves_with_its_shards_and_a_missing_part_is_loud(tmp_path):
    data = write_images(tmp_path / "data", {"a": 6, "b": 6}, size=(40, 40))
    work = tmp_path / "work"
    work.mkdir()
    single = tmp_path / "single.h5"
    extract(data, single, **ARGS)
    parts = extract_shards(data, work, 2)
    merge(work / "merged.h5", parts)
    moved = tmp_path / "moved"
    shutil.move(work, moved)
    assert_same_cache(moved / "merged.h5", single)

    part = next((moved / "s1.h5.parts").glob("features-*.h5"))
    part.unlink()
    result = CliRunner().invoke(cli, ["info", str(moved / "merged.h5")])
    assert_one_line_error(result, "missing")
    assert part.name in result.output


def test_merge_refuses_missing_duplicate_and_foreign_shards(tmp_path):
    data = write_images(tmp_path / "data", {"a": 5, "b": 5}, size=(40, 40))
    parts = extract_shards(data, tmp_path, 3)
    runner = CliRunner()

    result = runner.invoke(cli, ["merge", str(tmp_path / "m.h5"), str(parts[0]), str(parts[2])])
    assert_one_line_error(result, "Shards 1/3 are missing")

    twice = [str(p) for p in (parts[0], parts[1], parts[1], parts[2])]
    result = runner.invoke(cli, ["merge", str(tmp_path / "m.h5"), *twice])
    assert_one_line_error(result, "are both shard 1/3")

    other = tmp_path / "other"
    other.mkdir()
    odd = extract_shards(data, other, 3, image_size=48)  # another backbone input size
    result = runner.invoke(cli, ["merge", str(tmp_path / "m.h5"), str(parts[0]), str(parts[1]),
                                 str(odd[2])])  # fmt: skip
    assert_one_line_error(result, "another backbone")
    assert str(odd[2]) in result.output

    whole = tmp_path / "whole.h5"
    extract(data, whole, **ARGS)
    result = runner.invoke(cli, ["merge", str(tmp_path / "m.h5"), str(whole)])
    assert_one_line_error(result, "was not made with --shard")
    assert not (tmp_path / "m.h5").exists()

    result = runner.invoke(cli, ["merge", str(whole), *map(str, parts)])
    assert_one_line_error(result, "exists")  # never replaced without --overwrite


def test_a_shard_cache_keeps_its_shard(tmp_path):
    data = write_images(tmp_path / "data", {"a": 4, "b": 4}, size=(40, 40))
    (path,) = extract_shards(data, tmp_path, 1)
    with pytest.raises(FeatxError, match="holds shard 0/1"):
        extract(data, path, **ARGS)
    with pytest.raises(FeatxError, match="--precision fp32"):
        extract(data, tmp_path / "q.h5", **{**ARGS, "engine": "onnx"}, precision="int8",
                shard="0/2")  # fmt: skip
