"""Faults a real user meets: foreign folders, FIFOs, full disks, two writers, absurd options, links,
transient errors, flipped bits, bad journal parts, broken pipes. Each test failed before the fix."""

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import COLOURS, TINY, assert_one_line_error, write_images
from PIL import Image

import featx
from featx.cache import store
from featx.cli import cli
from featx.commands.extract import extract
from featx.errors import FeatxError
from featx.images import decoder, decoding, finder

TINY_ARGS = ["--weights", "none", "--alpha", "0.35", "--image-size", "32", "--engine", "keras"]


def make_data(root: Path, per_class: int = 6) -> Path:
    """Noisy, distinct JPEGs root/{cats,dogs}/{cats,dogs}NNN.jpg."""
    return write_images(root, dict.fromkeys(COLOURS, per_class), noise=50)


def run(data, cache, **kw):
    return extract(data, cache, engine="keras", batch_size=4, **TINY, **kw)


def featx_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "featx", *map(str, args)]


# --- 1. user files are never deleted -------------------------------------------------------------


def test_a_foreign_parts_folder_is_refused_and_left_intact(tmp_path):
    data = make_data(tmp_path / "data")
    parts = tmp_path / "c.h5.parts"
    parts.mkdir()
    (parts / "thesis.txt").write_text("mine")
    with pytest.raises(FeatxError, match=r"c\.h5\.parts' exists and was not made by featx"):
        run(data, tmp_path / "c.h5")
    assert (parts / "thesis.txt").read_text() == "mine"
    result = CliRunner().invoke(cli, ["extract", str(data), "--cache", str(tmp_path / "c.h5")])
    assert_one_line_error(result, "not made by featx", "--cache OTHER.h5")


def test_the_journal_removes_only_its_own_files(tmp_path):
    journal = store.Journal(tmp_path / "c.h5", "key")
    journal.start()
    rows = store.Rows(["a.jpg"], np.array([1]), np.array([2]), ["sha"])
    journal.write(0, rows, np.ones((1, 4), np.float32), store.Rows(), [])
    (journal.folder / "notes.txt").write_text("someone put this here")
    journal.clear()
    assert sorted(p.name for p in journal.folder.iterdir()) == ["notes.txt"]


# --- 2. nothing hangs ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_rejected_not_opened(tmp_path):
    data = make_data(tmp_path / "data")
    os.mkfifo(data / "cats" / "p.jpg")
    cmd = featx_cmd("extract", data, "--cache", tmp_path / "c.h5", *TINY_ARGS, "--json")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # hung before
    assert out.returncode == 0, out.stderr
    rejected = {r["path"]: r["reason"] for r in json.loads(out.stdout)["rejected"]}
    assert rejected == {"cats/p.jpg": "not a regular file (FIFO)"}
    with pytest.raises(ValueError, match="FIFO"):
        decoder.read_file(data / "cats" / "p.jpg")  # even when asked directly: no blocking open


def test_prefetch_stops_at_once_while_a_load_is_stuck():
    gate = threading.Event()

    def load(item):
        if item == "stuck":
            gate.wait(60)
        return item

    batches = decoding.prefetch([["a"], ["stuck"], ["c"]], load, ahead=2, workers=2)
    assert next(batches) == (["a"], ["a"])
    t0 = time.monotonic()
    batches.close()  # what Ctrl-C in the consumer does
    assert time.monotonic() - t0 < 2.0
    gate.set()


@pytest.mark.slow
def test_ctrl_c_stops_a_run_within_seconds(tmp_path):
    data = make_data(tmp_path / "data", per_class=300)
    cmd = featx_cmd("extract", data, "--cache", tmp_path / "c.h5", *TINY_ARGS, "--batch-size", "1")
    # A shell that starts the suite in the background (`pytest &`) ignores SIGINT, and a child
    # inherits that; Ctrl-C at a terminal is what is tested, so the child gets the default.
    default_sigint = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )
    parts = tmp_path / "c.h5.parts"
    deadline = time.monotonic() + 120
    while not list(parts.glob("part-*.npz")) and time.monotonic() < deadline:
        time.sleep(0.1)  # wait until the model is running
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    proc.communicate(timeout=30)
    # A stop, not a speed target: ~1-2 s on a quiet machine; the bound only catches a hang.
    assert time.monotonic() - t0 < 20.0
    assert proc.returncode != 0
    assert store.read_cache(tmp_path / "c.h5").features.shape[0] == 0  # the empty start cache


# --- 3. a full disk is one line, and leaves the old cache ----------------------------------------

FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.argv = ["featx", *sys.argv[2:]]
    from featx.cli import main
    main()
    """
)


@pytest.mark.slow
def test_a_write_that_fails_for_lack_of_space_is_one_line_and_keeps_the_old_cache(tmp_path):
    data = make_data(tmp_path / "data", per_class=4)
    cache = tmp_path / "c.h5"
    run(data, cache)
    before = cache.read_bytes()
    make_data(tmp_path / "more", per_class=40)
    for c in COLOURS:
        for p in (tmp_path / "more" / c).iterdir():
            shutil.copy(p, data / c / f"new-{p.name}")
    args = ["extract", data, "--cache", cache, *TINY_ARGS, "--batch-size", "4"]  # small parts
    cmd = [sys.executable, "-c", FULL_DISK, str(len(before) + 2048), *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr  # was a segfault (139) inside h5py
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: File too large") and str(cache) in last, out.stderr
    assert cache.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_temporary_files_of_dead_runs_are_removed_and_nothing_else(tmp_path):
    data = make_data(tmp_path / "data", per_class=3)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [f".c.h5.tmp-{dead}", f".c.h5.tmp-{alive.pid}", ".c.h5.tmp-notes", "c.h5.tmp-1"]
        for name in names:
            (tmp_path / name).write_text("x")
        run(data, tmp_path / "c.h5")
        left = sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name)
        assert left == sorted(names[1:])  # only the dead run's file, in featx's own pattern
    finally:
        alive.kill()


# --- 4. one writer per cache ---------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from featx.cache import store
    with store.writer_lock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
    """
)


def test_a_second_writer_is_refused_naming_the_first_and_readers_are_not_blocked(tmp_path):
    data = make_data(tmp_path / "data", per_class=3)
    cache = tmp_path / "c.h5"
    run(data, cache)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(cache)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FeatxError, match=f"Another featx extract \\(pid {holder.pid} on"):
            run(data, cache)
        assert featx.info(cache)["images"] == 6  # reading never waits for the lock
    finally:
        holder.communicate("", timeout=30)
    assert run(data, cache)["kept"] == 6  # released: the next writer runs


@pytest.mark.slow
def test_two_concurrent_extracts_lose_nothing(tmp_path):
    data = make_data(tmp_path / "data", per_class=20)
    cache = tmp_path / "c.h5"
    cmd = featx_cmd("extract", data, "--cache", cache, *TINY_ARGS, "--batch-size", "4")
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert 0 in codes, errors
    for code, err in zip(codes, errors):
        assert code == 0 or "is writing" in err.strip().splitlines()[-1], err
    assert store.read_cache(cache).features.shape[0] == 40


# --- 5. options are checked before any work ------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image-size", "10000"], "--image-size must be an integer between 32 and 1024"),
        (["--image-size", "16"], "--image-size must be an integer between 32 and 1024"),
        (["--val-split", "1.5"], "--val-split must be in [0, 1)"),
        (["--batch-size", "0"], "--batch-size must be an integer between 1 and 1024"),
        (["--batch-size", "1024", "--image-size", "1024"], "Lower --batch-size or --image-size"),
        (["--alpha", "0"], "--alpha must be in (0, 1.4]"),
        (["--seed", "-1"], "--seed must be an integer >= 0"),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, args, message):
    data = make_data(tmp_path / "data", per_class=1)
    cmd = ["extract", str(data), "--cache", str(tmp_path / "c.h5"), "--weights", "none", *args]
    result = CliRunner().invoke(cli, cmd)
    assert_one_line_error(result, message)
    assert os.listdir(tmp_path) == ["data"]  # no cache, no lock, no ONNX export


def test_huge_images_decode_one_at_a_time_within_the_pixel_budget(tmp_path, monkeypatch):
    big = []
    for i in range(4):
        big.append(tmp_path / f"big{i}.png")
        Image.new("RGB", (2000, 1500), (i * 40, 10, 10)).save(big[-1])
    peak = []

    class Recording(decoder._PixelBudget):
        def acquire(self, pixels):
            super().acquire(pixels)
            peak.append(self.used)

    monkeypatch.setattr(decoder, "_PIXEL_BUDGET", Recording(3_500_000))
    batches = decoding.prefetch([big], lambda p: decoder.load_image(p, 32), workers=4)
    (_, decoded), *_ = list(batches)
    assert max(peak) == 3_000_000  # 3 MP each: never two at once under a 3.5 MP budget
    assert all(d.shape == (32, 32, 3) for d in decoded)


# --- 6. links, special files and unreadable folders ----------------------------------------------


def test_a_link_back_into_the_data_folder_does_not_relabel_photos(tmp_path):
    data = make_data(tmp_path / "data", per_class=3)
    os.symlink("..", data / "cats" / "up")
    os.symlink(data / "dogs" / "dogs000.jpg", data / "cats" / "alias.jpg")
    os.symlink(tmp_path / "nowhere.jpg", data / "cats" / "dangling.jpg")
    os.symlink("loop.jpg", data / "dogs" / "loop.jpg")
    summary = run(data, tmp_path / "c.h5")
    cache = store.read_cache(tmp_path / "c.h5")
    labels = {p: cache.class_names[label] for p, label in zip(cache.paths, cache.labels)}
    assert sorted(labels) == [f"{c}/{c}00{i}.jpg" for c in ("cats", "dogs") for i in range(3)]
    assert all(p.startswith(f"{c}/") for p, c in labels.items())
    reasons = {r["path"]: r["reason"] for r in summary["rejected"]}
    assert "symbolic link to the data folder or above it" in reasons["cats/up"]
    assert "symbolic link to the file 'dogs/dogs000.jpg'" in reasons["cats/alias.jpg"]
    assert reasons["cats/dangling.jpg"] == "broken symbolic link"
    assert reasons["dogs/loop.jpg"] == "symbolic link loop"
    assert dict(zip(cache.rejected.paths, cache.rejected_reasons)) == reasons


def test_links_to_photos_outside_the_data_folder_are_followed(tmp_path):
    data = make_data(tmp_path / "data", per_class=2)
    elsewhere = make_data(tmp_path / "elsewhere", per_class=2)
    os.symlink(elsewhere / "cats", data / "cats" / "more")
    paths = [f.path for f in finder.find_images(data).files]
    assert "cats/more/cats000.jpg" in paths and len(paths) == 6


def test_an_unreadable_subfolder_is_reported(tmp_path, monkeypatch):
    data = make_data(tmp_path / "data", per_class=2)
    (data / "cats" / "private").mkdir()
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "private":  # chmod 000 would not stop root, who runs CI
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(finder.os, "scandir", scandir)
    listing = finder.find_images(data)
    assert listing.skipped == [("cats/private", "unreadable folder: Permission denied")]


def test_a_data_folder_one_level_too_high_is_refused(tmp_path):
    for project in ("proj", "other"):
        make_data(tmp_path / "top" / project / "train")
        make_data(tmp_path / "top" / project / "val")
    with pytest.raises(
        FeatxError, match=r"holds split folders \(train, val\)\. Pass '.*top.other'"
    ):
        finder.find_images(tmp_path / "top")
    (tmp_path / "one").mkdir()
    shutil.move(tmp_path / "top" / "proj" / "train", tmp_path / "one" / "dataset")
    with pytest.raises(FeatxError, match="If '.*dataset' holds the class folders, pass it"):
        finder.find_images(tmp_path / "one")


# --- 7. transient rejections are retried ---------------------------------------------------------


def test_a_file_that_was_unreadable_is_tried_again(tmp_path, monkeypatch):
    data = make_data(tmp_path / "data", per_class=3)
    real_read = decoder.read_file

    def denied(path):
        if Path(path).name == "cats001.jpg":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(decoder, "read_file", denied)
    first = run(data, tmp_path / "c.h5")
    assert first["rejected"] == [
        {"path": "cats/cats001.jpg", "reason": "unreadable: Permission denied"}
    ]
    monkeypatch.setattr(decoder, "read_file", real_read)  # chmod fixed it; the file is unchanged
    second = run(data, tmp_path / "c.h5")
    assert second["rejected"] == [] and second["extracted"] == 1 and second["images"] == 6


def test_overwrite_retries_every_rejection(tmp_path):
    data = make_data(tmp_path / "data", per_class=2)
    good = (data / "cats" / "cats000.jpg").read_bytes()
    bad = data / "cats" / "bad.jpg"
    bad.write_bytes(bytes(len(good)))  # zeros: "not an image", remembered while unchanged
    stamp = os.stat(bad).st_mtime_ns
    assert run(data, tmp_path / "c.h5")["rejected"][0]["path"] == "cats/bad.jpg"
    bad.write_bytes(good)  # repaired by a tool that keeps size and mtime
    os.utime(bad, ns=(stamp, stamp))
    assert run(data, tmp_path / "c.h5")["rejected"][0]["path"] == "cats/bad.jpg"
    summary = run(data, tmp_path / "c.h5", overwrite=True)
    assert summary["rejected"] == [] and summary["images"] == 5 and summary["extracted"] == 1


# --- 8. integrity --------------------------------------------------------------------------------


def flip_a_feature_byte(cache: Path) -> None:
    with h5py.File(cache, "r") as f:  # /features is a virtual dataset over the part files
        (source,) = {v.file_name for v in f["features"].virtual_sources()}
    part = cache.parent / source
    with h5py.File(part, "r") as f:
        ds = f["features"]
        offset = ds.id.get_chunk_info(0).byte_offset if ds.chunks else ds.id.get_offset()
    with open(part, "r+b") as fh:
        fh.seek(offset + 5)
        byte = fh.read(1)[0]
        fh.seek(offset + 5)
        fh.write(bytes([byte ^ 0x40]))


def test_a_flipped_bit_is_a_one_line_error_and_overwrite_rebuilds(tmp_path):
    data = make_data(tmp_path / "data", per_class=4)
    cache = tmp_path / "c.h5"
    run(data, cache)
    clean = store.read_cache(cache).features
    flip_a_feature_byte(cache)
    with pytest.raises(FeatxError, match="is damaged.*--overwrite"):
        store.read_cache(cache)
    result = CliRunner().invoke(cli, ["fit-head", str(cache)])
    assert_one_line_error(result, "is damaged", "--overwrite")
    with pytest.raises(FeatxError, match="is damaged"):
        run(data, cache)
    summary = run(data, cache, overwrite=True)
    assert summary["extracted"] == 8
    np.testing.assert_allclose(store.read_cache(cache).features, clean, atol=1e-5)


def test_a_bad_journal_part_is_redone_not_trusted(tmp_path):
    data = make_data(tmp_path / "data", per_class=4)
    clean = run(data, tmp_path / "clean.h5")
    cache = tmp_path / "c.h5"
    from featx.backbone import mobilenet

    fp = store.read_cache(tmp_path / "clean.h5", features=False).fingerprint
    journal = store.Journal(cache, mobilenet.model_key(fp), feature_dim=1280)
    journal.start()
    rows = store.Rows(["cats/cats000.jpg"], np.array([0]), np.array([0]), ["x"])
    st = os.stat(data / "cats" / "cats000.jpg")
    rows.file_size, rows.file_mtime_ns = np.array([st.st_size]), np.array([st.st_mtime_ns])
    journal.write(0, rows, np.ones((1, 10), np.float32), store.Rows(), [])  # 10-d features
    journal.write(1, rows, np.full((1, 1280), np.nan, np.float32), store.Rows(), [])
    summary = run(data, cache)
    assert summary["resumed"] == 0 and summary["extracted"] == 8
    assert clean["images"] == 8
    np.testing.assert_array_equal(
        store.read_cache(cache).features, store.read_cache(tmp_path / "clean.h5").features
    )


# --- 9. smaller ones -----------------------------------------------------------------------------


@pytest.mark.slow
def test_info_into_a_closed_pipe_exits_quietly(tmp_path):
    data = make_data(tmp_path / "data", per_class=2)
    for i in range(2000):  # 2,000 rejected files: more output than a pipe buffer holds
        (data / "cats" / f"empty{i:04d}.jpg").touch()
    cache = tmp_path / "c.h5"
    run(data, cache)
    script = f"{sys.executable} -m featx info --json {cache} | head -c 10; exit ${{PIPESTATUS[0]}}"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr, len(out.stdout)) == (0, "", 10)


def test_float16_is_kept_by_a_plain_cli_run(tmp_path):
    data = make_data(tmp_path / "data", per_class=2)
    cache = tmp_path / "c.h5"
    base = ["extract", str(data), "--cache", str(cache), *TINY_ARGS]
    assert CliRunner().invoke(cli, [*base, "--dtype", "float16"]).exit_code == 0
    (data / "cats" / "cats000.jpg").unlink()
    assert CliRunner().invoke(cli, base).exit_code == 0
    assert store.read_cache(cache).features.dtype == np.float16


def test_a_lambda_layer_in_a_dense_head_is_a_one_line_error(tmp_path):
    import keras

    from featx.heads import estimators

    X, y = np.eye(4, 3, dtype=np.float32), np.array([0, 1, 0, 1])
    head = estimators.DenseHead(epochs=1).fit(X, y, X, y)
    folder = tmp_path / "head"
    estimators.save_head(head, folder, ["a", "b"], {"backbone": "MobileNetV2"})
    inputs = keras.Input((3,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    keras.Model(inputs, outputs).save(folder / "head.keras")
    with pytest.raises(FeatxError, match=r"Could not load the head .*head\.keras.*fit-head"):
        estimators.load_head(folder)


# --- the split of an existing cache (daily use) --------------------------------------------------


def test_another_split_of_an_existing_cache_needs_overwrite_which_resplits(tmp_path):
    data = make_data(tmp_path / "data", per_class=10)
    cache = tmp_path / "c.h5"
    messages = []
    first = run(data, cache, val_split=0.0, log=messages.append)
    assert list(first["counts"]) == ["train"]
    assert any("no image is in the validation split" in m for m in messages)
    with pytest.raises(
        FeatxError, match=r"split with --val-split 0\.0; .* asks for 0\.2.*--overwrite"
    ):
        run(data, cache, val_split=0.2)
    with pytest.raises(FeatxError, match=r"--seed 0; this run asks for 3"):
        run(data, cache, seed=3)
    assert run(data, cache)["counts"] == first["counts"]  # no option: the cache's split is kept
    resplit = run(data, cache, val_split=0.2, overwrite=True)
    assert resplit["extracted"] == 0  # the features are reused, only the split is new
    assert resplit["counts"]["validation"] == {"cats": 2, "dogs": 2}
    info = CliRunner().invoke(cli, ["info", str(cache)])
    assert "split: --val-split 0.2 --seed 0" in info.output
    assert featx.info(cache)["val_split"] == 0.2 and featx.info(cache)["seed"] == 0


def test_finetune_never_reads_a_cached_path_outside_the_data_folder(tmp_path):
    from featx.commands import finetune

    data = make_data(tmp_path / "data", per_class=1)
    (tmp_path / "secret.jpg").write_bytes((data / "cats" / "cats000.jpg").read_bytes())
    paths = ["cats/cats000.jpg", "../secret.jpg", str(tmp_path / "secret.jpg"), "dogs/dogs000.jpg"]
    cache = store.Cache(
        fingerprint={},
        class_names=["cats", "dogs"],
        features=np.zeros((4, 8), np.float32),
        labels=np.array([0, 0, 0, 1], np.int32),
        splits=np.array(["train"] * 4, dtype=object),
        rows=store.Rows(paths, np.zeros(4, np.int64), np.zeros(4, np.int64), [""] * 4),
    )
    rows, missing = finetune._split_rows(cache, data, log=lambda m: None)
    assert rows["train"][0] == ["cats/cats000.jpg", "dogs/dogs000.jpg"]
    assert [m["reason"] for m in missing] == ["outside the data folder; not read"] * 2
