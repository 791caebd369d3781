"""The streaming cache (format 2): memory bounded by the batch, appends that write only new rows,
deletions without a rewrite, compaction, the format-1 upgrade, kill -9 during an append, and
--workers. A fake engine (features = the first pixels of each image) stands in for the model."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import COLOURS, TINY, PixelEngine, assert_one_line_error, write_images

import featx
from featx import config
from featx.backbone import engines, mobilenet
from featx.cache import store, stream
from featx.cli import cli
from featx.commands import extract
from featx.errors import FeatxError
from featx.images import decoding
from featx.options import ExtractOptions

DIM = 1280


def run(data, cache, **kw):
    return extract.extract(data, cache, **{**TINY, "batch_size": 4, **kw})


def make_data(root: Path, per_class: int) -> Path:
    return write_images(root, dict.fromkeys(COLOURS, per_class), noise=50)


def part_files(cache: Path) -> dict[str, int]:
    """{part file name: mtime_ns} in the cache's parts folder."""
    folder = cache.with_name(cache.name + ".parts")
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("features-*.h5")}


def sources(cache: Path) -> list[str]:
    with h5py.File(cache, "r") as f:
        return list(f["sources/names"].asstr()[()])


def test_an_append_writes_only_the_new_rows_and_plain_h5py_sees_them(fake_engine, tmp_path):
    data = make_data(tmp_path / "data", per_class=10)
    cache = tmp_path / "c.h5"
    run(data, cache)
    before = part_files(cache)
    assert len(before) == 1 and sources(cache) == [f"c.h5.parts/{n}" for n in before]
    more = make_data(tmp_path / "more", per_class=3)
    for c in COLOURS:
        for p in (more / c).iterdir():
            os.replace(p, data / c / f"new-{p.name}")
    summary = run(data, cache)
    assert summary["extracted"] == 6 and summary["kept"] == 20
    after = part_files(cache)
    assert {n: after[n] for n in before} == before  # the old part is untouched
    (new,) = set(after) - set(before)
    with h5py.File(cache.parent / "c.h5.parts" / new, "r") as f:
        assert f["features"].shape == (6, DIM)  # only the new rows were written
    with h5py.File(cache, "r") as f:  # plain h5py: one (N, D) array, rows sorted by path
        paths = list(f["paths"].asstr()[()])
        assert f["features"].shape == (26, DIM) and paths == sorted(paths)
        plain = f["features"][()]
    c = store.read_cache(cache)
    np.testing.assert_array_equal(c.features, plain)
    clean = tmp_path / "clean.h5"
    run(data, clean)
    np.testing.assert_array_equal(store.read_cache(clean).features, c.features)


def test_deleted_files_are_dropped_without_a_rewrite_and_compacted_when_most_are_dead(
    fake_engine, tmp_path
):
    data = make_data(tmp_path / "data", per_class=10)
    cache = tmp_path / "c.h5"
    run(data, cache)
    full = store.read_cache(cache)
    before = part_files(cache)
    for i in (1, 2, 5):
        (data / "cats" / f"cats{i:03d}.jpg").unlink()
    summary = run(data, cache)
    assert summary["dropped"] == 3 and summary["extracted"] == 0
    assert part_files(cache) == before  # nothing rewritten: the rows are left out of the mapping
    c = store.read_cache(cache)
    assert len(c.paths) == 17 and "cats/cats001.jpg" not in c.paths
    keep = [full.paths.index(p) for p in c.paths]
    np.testing.assert_array_equal(c.features, full.features[keep])
    for i in range(3, 10):  # now more dead rows than live ones: compacted
        (data / "dogs" / f"dogs{i:03d}.jpg").unlink(missing_ok=True)
    for i in range(6, 10):
        (data / "cats" / f"cats{i:03d}.jpg").unlink()
    run(data, cache)
    (part,) = part_files(cache)
    assert part not in before
    c = store.read_cache(cache)
    with h5py.File(cache.parent / "c.h5.parts" / part, "r") as f:
        assert f["features"].shape == (len(c.paths), DIM) == (6, DIM)
    np.testing.assert_array_equal(c.features, full.features[[full.paths.index(p) for p in c.paths]])


def test_the_journal_is_gathered_into_bounded_parts(fake_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(config, "PART_ROWS", 8)
    data = make_data(tmp_path / "data", per_class=10)
    cache = tmp_path / "c.h5"
    run(data, cache)
    folder = tmp_path / "c.h5.parts"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("features-")) == [
        ".featx-journal"
    ]  # no batch left: every one went into a part
    assert len(part_files(cache)) == 3  # 8 + 8 + 4 rows
    assert len(store.read_cache(cache).features) == 20


def test_fast_batches_are_written_once_as_parts_and_an_interrupted_run_resumes(
    fake_engine, tmp_path, monkeypatch
):
    """PART_MIN_ROWS: a journal write that finds enough rows and no journal batch writes a part."""
    monkeypatch.setattr(config, "PART_MIN_ROWS", 4)
    monkeypatch.setattr(config, "JOURNAL_SECONDS", 0.0)  # every batch is the journal's turn
    data = make_data(tmp_path / "data", per_class=10)
    batches = []
    monkeypatch.setattr(store.Journal, "write", lambda self, *a: batches.append(a))
    calls = {"n": 0}

    class Interrupted(PixelEngine):
        def features(self, batch):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return super().features(batch)

    monkeypatch.setattr(
        engines, "for_extract", lambda opts, *a: (Interrupted(), mobilenet.fingerprint(
            opts.weights, opts.image_size, opts.alpha, engine="keras"))
    )  # fmt: skip
    cache = tmp_path / "c.h5"
    with pytest.raises(KeyboardInterrupt):
        run(data, cache)
    assert len(part_files(cache)) == 2 and not batches  # two parts of 4 rows, no .npz
    summary = run(data, cache)
    assert (summary["resumed"], summary["extracted"]) == (8, 12) and not batches
    assert len(part_files(cache)) == 5
    clean = tmp_path / "clean.h5"
    monkeypatch.setattr(config, "PART_MIN_ROWS", 1024)
    run(data, clean)
    a, b = store.read_cache(cache), store.read_cache(clean)
    assert a.paths == b.paths and list(a.splits) == list(b.splits)
    np.testing.assert_array_equal(a.features, b.features)


def test_the_part_writer_keeps_every_row_exactly_past_its_buffer_and_across_dtypes(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(config, "PART_ROWS", 4)  # a buffer of 4 rows and a batch: it must grow
    journal = store.Journal(tmp_path / "c.h5", "k", 3)
    journal.start()
    writer = stream.PartWriter(journal, "float32", flip=False)
    blocks = [np.full((1, 3), 0.1, np.float16)] + [np.random.rand(n, 3) for n in (2, 5, 3)]
    blocks[1] = blocks[1].astype(np.float32)  # float16, float32, then float64: promoted, as
    # concatenating them would, never rounded to the first block's dtype
    originals = [b.copy() for b in blocks]
    paths, kept = [], []
    for b in blocks:
        names = [f"x{len(paths) + i}" for i in range(len(b))]
        paths += names
        rows = store.Rows(names, np.zeros(len(b), np.int64), np.zeros(len(b), np.int64),
                          ["0" * 64] * len(b))  # fmt: skip
        kept.append(writer.add_rows(rows, b))
        b[:] = 7  # the caller reuses its array: the writer kept a copy
    for k, b in zip(kept, originals):
        np.testing.assert_array_equal(k, b)
    plan_rows = {}
    writer.flush(plan_rows)
    (name,) = {ref[0] for *_, ref in plan_rows.values()}
    with h5py.File(tmp_path / name, "r") as f:
        expected = np.concatenate(originals).astype(np.float32)
        np.testing.assert_array_equal(f["features"][()], expected)
        assert list(f["paths"].asstr()[()]) == paths


def write_v1(path: Path, cache: store.Cache) -> None:
    """A cache as featx wrote it before format 2: /features inside the file."""
    S = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.attrs.update(format="featx-cache", format_version=1, data_dir=cache.attrs["data_dir"])
        f.attrs.update(layout="flat", val_split=0.2, seed=0)
        f.attrs["fingerprint"] = __import__("json").dumps(cache.fingerprint)
        f["class_names"] = np.array(cache.class_names, dtype=object).astype(S)
        f.create_dataset("features", data=cache.features, fletcher32=True)
        f["labels"] = cache.labels
        f.create_dataset("splits", data=np.array(list(cache.splits), dtype=object), dtype=S)
        for g, rows in ((f, cache.rows), (f.create_group("rejected"), cache.rejected)):
            g.create_dataset("paths", data=np.array(rows.paths, dtype=object), dtype=S)
            g["file_size"], g["file_mtime_ns"] = rows.file_size, rows.file_mtime_ns
            g.create_dataset("file_sha256", data=np.array(rows.file_sha256, dtype=object), dtype=S)
        f["rejected"].create_dataset("reasons", data=np.zeros(0, dtype=object), dtype=S)


def test_a_format_1_cache_is_read_and_upgraded_by_the_next_extract(fake_engine, tmp_path):
    data = make_data(tmp_path / "data", per_class=5)
    v2 = tmp_path / "v2.h5"
    run(data, v2)
    new = store.read_cache(v2)
    old = tmp_path / "old.h5"
    write_v1(old, new)
    read = store.read_cache(old)  # read as it is
    np.testing.assert_array_equal(read.features, new.features)
    assert featx.info(old)["images"] == 10 and featx.info(old)["feature_dim"] == DIM
    summary = run(data, old)
    assert summary["kept"] == 10 and summary["extracted"] == 0
    with h5py.File(old, "r") as f:
        assert f.attrs["format_version"] == 2 and f["features"].is_virtual
    np.testing.assert_array_equal(store.read_cache(old).features, new.features)
    assert len(part_files(old)) == 1


def test_a_missing_part_is_a_one_line_error_naming_it(fake_engine, tmp_path):
    data = make_data(tmp_path / "data", per_class=3)
    cache = tmp_path / "c.h5"
    run(data, cache)
    (part,) = part_files(cache)
    (tmp_path / "c.h5.parts" / part).unlink()
    with pytest.raises(FeatxError, match=f"needs its part file 'c.h5.parts/{part}', which is miss"):
        store.read_cache(cache)
    result = CliRunner().invoke(cli, ["info", str(cache)])
    assert_one_line_error(result, part, "--overwrite")
    with pytest.raises(FeatxError, match="which is missing"):
        run(data, cache)
    assert run(data, cache, overwrite=True)["extracted"] == 6


def test_a_moved_cache_folder_still_reads(fake_engine, tmp_path):
    data = make_data(tmp_path / "data", per_class=3)
    run(data, tmp_path / "a" / "c.h5")
    os.replace(tmp_path / "a", tmp_path / "b")
    with h5py.File(tmp_path / "b" / "c.h5", "r") as f:  # relative sources: plain h5py too
        assert np.isfinite(f["features"][()]).all()
    assert store.read_cache(tmp_path / "b" / "c.h5").features.shape == (6, DIM)


def test_workers_are_checked_and_passed_to_the_decoding_pool(fake_engine, tmp_path, monkeypatch):
    with pytest.raises(FeatxError, match="workers must be an integer between 1 and"):
        ExtractOptions(workers=0)
    seen = []
    real = decoding.prefetch

    def recording(chunks, load, ahead=config.PREFETCH_BATCHES, workers=None):
        seen.append(workers)
        return real(chunks, load, ahead, workers)

    monkeypatch.setattr(decoding, "prefetch", recording)
    data = make_data(tmp_path / "data", per_class=3)
    cmd = ["extract", str(data), "--cache", str(tmp_path / "c.h5"), "--weights", "none"]
    result = CliRunner().invoke(
        cli, [*cmd, "--alpha", "0.35", "--image-size", "32", "--workers", "3"]
    )
    assert result.exit_code == 0, result.output
    assert seen == [3]
    assert config.decode_workers() == len(os.sched_getaffinity(0))


def _peak_bytes(root: Path, n: int, monkeypatch) -> int:
    """Peak traced memory of extracting `n` (empty) files with decoding and model faked."""
    for c in COLOURS:
        (root / c).mkdir(parents=True)
        for i in range(n // 2):
            (root / c / f"{i:06d}.jpg").touch()
    pixels = np.zeros((32, 32, 3), np.uint8)

    def load(root_, image_size, item):
        return "ok", f"{hash(item[0]):064x}"[-64:], pixels

    monkeypatch.setattr(decoding, "load_one", load)
    tracemalloc.start()
    try:  # in threads: tracemalloc sees this process only
        extract.extract(root, root.with_suffix(".h5"), **TINY, batch_size=256, decode_in="threads")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_images(fake_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(config, "PART_ROWS", 1024)
    small = _peak_bytes(tmp_path / "small", 2_000, monkeypatch)
    large = _peak_bytes(tmp_path / "large", 20_000, monkeypatch)
    features = 18_000 * DIM * 4  # what holding the extra features would cost: 92 MB
    # Per-image bookkeeping (listing, paths, file keys, references, the main file being built)
    # stays: measured ~0.5 KB per image, a tenth of a feature row.
    assert large - small < min(features / 5, 18_000 * 1024), (small, large)


KILLABLE_APPEND = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from featx import config
    from featx.backbone import engines, mobilenet
    from featx.commands.extract import extract
    config.PART_ROWS = 8
    class Slow:
        name = "keras"
        def features(self, batch):
            time.sleep(0.3)
            return batch.reshape(len(batch), -1)[:, :1280].astype(np.float32)
    def for_extract(opts, old, cache_path, listing, root, log):
        return Slow(), mobilenet.fingerprint("none", 32, 0.35, engine="keras")
    engines.for_extract = for_extract
    extract(sys.argv[1], sys.argv[2], weights="none", alpha=0.35, image_size=32, batch_size=4)
    """
)


@pytest.mark.slow
def test_kill_9_during_an_append_keeps_the_old_cache_and_resume_matches(fake_engine, tmp_path):
    data = make_data(tmp_path / "data", per_class=4)
    cache = tmp_path / "c.h5"
    run(data, cache)
    more = make_data(tmp_path / "more", per_class=20)
    for c in COLOURS:
        for p in (more / c).iterdir():
            os.replace(p, data / c / f"new-{p.name}")
    committed = part_files(cache)
    cmd = [sys.executable, "-c", KILLABLE_APPEND, str(data), str(cache)]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 120
    while len(part_files(cache)) < len(committed) + 2:  # two parts of the append written
        assert proc.poll() is None, "the append ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert featx.info(cache)["images"] == 8  # the previous cache, complete
    summary = run(data, cache)
    assert summary["resumed"] >= 16 and summary["resumed"] + summary["extracted"] == 40
    assert set(committed) <= set(part_files(cache))  # the old part was kept, not rewritten
    clean = tmp_path / "clean.h5"
    run(data, clean)
    a, b = store.read_cache(cache), store.read_cache(clean)
    assert a.paths == b.paths and list(a.splits) == list(b.splits)
    np.testing.assert_array_equal(a.features, b.features)
