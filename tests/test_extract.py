"""Stage 1: extraction into the HDF5 cache (tiny generated images, random MobileNetV2)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    CLASS_COLOURS,
    REAL_DATA,
    SLOW_EXTRACT,
    TINY,
    WEIGHTS_FILE,
    assert_one_line_error,
    stable_seed,
    write_image,
    write_images,
)

import featx
from featx.backbone import mobilenet
from featx.cache import store
from featx.cli import cli
from featx.commands.extract import extract
from featx.errors import FeatxError

# This module's images: the class colour (CLASS_COLOURS) plus noise in [-40, 40).
NOISE = 40


def make_flat(root: Path, per_class=10, classes=("cats", "dogs")) -> Path:
    return write_images(root, dict.fromkeys(classes, per_class), noise=NOISE)


@pytest.fixture
def flat(tmp_path):
    return make_flat(tmp_path / "data")


def run(data, cache, **kwargs):
    return extract(data, cache, **{**TINY, "batch_size": 4, **kwargs})


def test_flat_folder_gives_a_complete_self_describing_cache(flat, tmp_path):
    cache_path = tmp_path / "c.h5"
    summary = run(flat, cache_path)
    assert summary["extracted"] == 20 and summary["images"] == 20
    # 5 batches of 4: the first one loads the model, the other 16 images give the steady rate
    assert 0 < summary["model_load_seconds"] <= summary["model_seconds"] <= summary["seconds"]
    assert summary["steady_images_per_second"] > summary["images_per_second"] > 0
    assert summary["counts"] == {
        "train": {"cats": 8, "dogs": 8},
        "validation": {"cats": 2, "dogs": 2},
    }
    with h5py.File(cache_path, "r") as f:  # readable with plain h5py
        assert f.attrs["format"] == "featx-cache"
        assert f["features"].shape == (20, 1280) and f["features"].dtype == np.float32
        assert list(f["class_names"].asstr()[()]) == ["cats", "dogs"]
        paths = list(f["paths"].asstr()[()])
        assert paths == sorted(paths) and paths[0] == "cats/cats000.jpg"
        assert set(f["splits"].asstr()[()]) == {"train", "validation"}
        assert len(f["file_sha256"].asstr()[()][0]) == 64
    cache = store.read_cache(cache_path)
    assert cache.fingerprint["alpha"] == 0.35 and cache.fingerprint["image_size"] == 32
    assert cache.fingerprint["weights_sha256"].startswith("random-seed0")
    assert np.isfinite(cache.features).all() and cache.features.std() > 0
    labels = {p: cache.class_names[y] for p, y in zip(cache.paths, cache.labels)}
    assert all(p.startswith(c) for p, c in labels.items())


def test_bad_files_are_skipped_and_reported_and_never_touched(flat, tmp_path):
    good = (flat / "cats" / "cats000.jpg").read_bytes()
    bad = {
        "cats/empty.jpg": b"",
        "cats/truncated.jpg": good[: len(good) // 2],
        "dogs/notes.jpg": b"these are not pixels",
    }
    for rel, data in bad.items():
        (flat / rel).write_bytes(data)
    (flat / "dogs" / ".DS_Store").write_bytes(b"\0\0")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in flat.rglob("*") if p.is_file()}
    summary = run(flat, tmp_path / "c.h5")
    reasons = {r["path"]: r["reason"] for r in summary["rejected"]}
    assert set(reasons) == set(bad)
    assert "empty" in reasons["cats/empty.jpg"]
    assert "truncated" in reasons["cats/truncated.jpg"].lower()
    assert "not an image" in reasons["dogs/notes.jpg"]
    assert summary["images"] == 20
    info = featx.info(tmp_path / "c.h5")
    assert {r["path"] for r in info["rejected"]} == set(bad)
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in flat.rglob("*") if p.is_file()}
    assert after == before


class ModelCalls:
    """Counts the images the backbone sees."""

    def __init__(self, monkeypatch):
        self.images = 0
        real = mobilenet.KerasEngine.features

        def counting(engine, batch):
            self.images += len(batch)
            return real(engine, batch)

        monkeypatch.setattr(mobilenet.KerasEngine, "features", counting)


def test_second_run_with_nothing_changed_does_no_model_work(flat, tmp_path, monkeypatch):
    cache_path = tmp_path / "c.h5"
    run(flat, cache_path)
    stamp = cache_path.stat().st_mtime_ns
    calls = ModelCalls(monkeypatch)
    summary = run(flat, cache_path)
    assert calls.images == 0 and summary["extracted"] == 0 and summary["kept"] == 20
    assert summary["model_load_seconds"] is None and summary["steady_images_per_second"] is None
    assert cache_path.stat().st_mtime_ns == stamp  # not even rewritten


def test_incremental_run_extracts_only_new_and_changed_files(flat, tmp_path, monkeypatch):
    cache_path = tmp_path / "c.h5"
    run(flat, cache_path)
    first = store.read_cache(cache_path)
    first_split = dict(zip(first.paths, first.splits))
    first_feature = dict(zip(first.paths, first.features))

    write_image(flat / "cats" / "new1.jpg", CLASS_COLOURS["cats"], seed=1, noise=NOISE)
    write_image(flat / "dogs" / "new2.jpg", CLASS_COLOURS["dogs"], seed=2, noise=NOISE)
    write_image(flat / "dogs" / "dogs001.jpg", (255, 255, 0), seed=3, noise=NOISE)  # changed
    (flat / "cats" / "cats002.jpg").unlink()
    touched = flat / "cats" / "cats003.jpg"  # same content, new mtime
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))

    calls = ModelCalls(monkeypatch)
    summary = run(flat, cache_path)
    assert summary["extracted"] == 3  # two new files and one changed; the touched one is hashed
    assert summary["dropped"] == 1 and summary["images"] == 21
    assert calls.images == 4  # one batch of four (three images plus padding)
    second = store.read_cache(cache_path)
    assert "cats/cats002.jpg" not in second.paths
    for p, s in zip(second.paths, second.splits):
        if p in first_split:
            assert s == first_split[p], f"{p} changed split"
    row = second.paths.index("cats/cats003.jpg")
    np.testing.assert_array_equal(second.features[row], first_feature["cats/cats003.jpg"])
    assert second.rows.file_mtime_ns[row] == touched.stat().st_mtime_ns
    changed = second.paths.index("dogs/dogs001.jpg")
    # Random-weight features are tiny (~1e-11): compare relative to their scale.
    old_feature = first_feature["dogs/dogs001.jpg"]
    assert np.abs(second.features[changed] - old_feature).max() > 1e-3 * np.abs(old_feature).max()


def test_flip_stores_the_features_of_the_mirror_image_row_for_row(tmp_path, monkeypatch):
    # 32 px PNGs (the model's size: no resize), each beside its own mirror image as another file
    for c in ("cats", "dogs"):
        for i in range(3):
            noise = dict(colour=(128, 128, 128), noise=128, seed=stable_seed(c, i), size=(32, 32))
            write_image(tmp_path / "data" / c / f"{c}{i}.png", **noise)  # pure noise
            write_image(tmp_path / "data" / c / f"{c}{i}-mirror.png", mirror=True, **noise)
    cache_path = tmp_path / "c.h5"
    summary = run(tmp_path / "data", cache_path, flip=True)
    assert summary["flip"] is True and summary["extracted"] == 12
    cache = store.read_cache(cache_path)
    assert cache.features_flip.shape == cache.features.shape == (12, 1280)
    scale = np.abs(cache.features).max()  # random-weight features are tiny
    row = {p: i for i, p in enumerate(cache.paths)}
    for p in cache.paths:
        twin = p.replace("-mirror.png", ".png") if "-mirror" in p else p[:-4] + "-mirror.png"
        np.testing.assert_allclose(
            cache.features_flip[row[p]], cache.features[row[twin]], rtol=1e-4, atol=1e-5 * scale
        )
    assert np.abs(cache.features_flip - cache.features).max() > 1e-2 * scale  # not symmetric
    with h5py.File(cache_path) as f:  # plain h5py reads it, and it says what it is
        assert (
            f["features_flip"].shape == (12, 1280)
            and "mirrored" in f["features_flip"].attrs["transform"]
        )
    assert featx.info(cache_path)["flip"] is True

    calls = ModelCalls(monkeypatch)
    kept = run(tmp_path / "data", cache_path)  # the cache's setting is kept, no model work
    assert kept["flip"] is True and kept["extracted"] == 0 and calls.images == 0
    (tmp_path / "data" / "cats" / "new.png").write_bytes(
        (tmp_path / "data" / "cats" / "cats0.png").read_bytes()
    )
    added = run(tmp_path / "data", cache_path)
    assert added["extracted"] == 1 and calls.images == 2 * 4  # the image and its mirror image
    cache = store.read_cache(cache_path)
    new, old = cache.paths.index("cats/new.png"), cache.paths.index("cats/cats0.png")
    np.testing.assert_allclose(
        cache.features_flip[new], cache.features_flip[old], rtol=1e-4, atol=1e-5 * scale
    )
    dropped = run(tmp_path / "data", cache_path, flip=False)
    assert dropped["flip"] is False and calls.images == 8  # dropping them needs no model work
    plain = store.read_cache(cache_path)
    assert plain.features_flip is None
    np.testing.assert_array_equal(plain.features, cache.features)
    notes = []
    again = run(tmp_path / "data", cache_path, flip=True, log=notes.append)
    assert again["extracted"] == 13 and "extracting every image again" in " ".join(notes)


def test_fingerprint_mismatch_is_refused_unless_overwrite(flat, tmp_path):
    cache_path = tmp_path / "c.h5"
    run(flat, cache_path)
    with pytest.raises(FeatxError, match=r"another backbone \(alpha: 0\.35 vs 0\.5.*--overwrite"):
        run(flat, cache_path, alpha=0.5)
    summary = run(flat, cache_path, alpha=0.5, overwrite=True)
    assert summary["extracted"] == 20
    assert store.read_cache(cache_path, features=False).fingerprint["alpha"] == 0.5


def test_a_file_that_is_not_a_cache_is_never_overwritten(flat, tmp_path):
    precious = tmp_path / "mine.h5"
    precious.write_bytes(b"my own data")
    with pytest.raises(FeatxError, match="not a readable HDF5 file"):
        run(flat, precious, overwrite=True)
    assert precious.read_bytes() == b"my own data"


def test_split_folders_are_kept_and_val_means_validation(tmp_path):
    data = tmp_path / "data"
    for split, n in [("train", 6), ("val", 3), ("test", 2)]:
        for c in ("cats", "dogs"):
            for i in range(n):
                write_image(data / split / c / f"{i}.png", CLASS_COLOURS[c], seed=i, noise=NOISE)
    summary = run(data, tmp_path / "c.h5")
    assert summary["layout"] == "splits"
    assert summary["counts"] == {
        "train": {"cats": 6, "dogs": 6},
        "validation": {"cats": 3, "dogs": 3},
        "test": {"cats": 2, "dogs": 2},
    }
    cache = store.read_cache(tmp_path / "c.h5")
    assert all(
        p.split("/")[0] == {"validation": "val"}.get(s, s)
        for p, s in zip(cache.paths, cache.splits)
    )


def test_float16_halves_the_cache_and_is_kept_on_later_runs(flat, tmp_path):
    run(flat, tmp_path / "c.h5", dtype="float16")
    write_image(flat / "cats" / "later.jpg", CLASS_COLOURS["cats"], seed=9, noise=NOISE)
    run(flat, tmp_path / "c.h5")  # no --dtype: the cache keeps float16
    assert store.read_cache(tmp_path / "c.h5").features.dtype == np.float16


def test_empty_class_warns_and_single_class_is_an_error(tmp_path):
    data = make_flat(tmp_path / "data", per_class=3)
    (data / "empty").mkdir()
    messages = []
    summary = run(data, tmp_path / "c.h5", log=messages.append)
    assert summary["empty_classes"] == ["empty"] and any("'empty'" in m for m in messages)
    lonely = make_flat(tmp_path / "lonely", per_class=3, classes=("cats",))
    with pytest.raises(FeatxError, match="at least 2"):
        run(lonely, tmp_path / "l.h5")


KILLABLE = SLOW_EXTRACT


@pytest.mark.slow
def test_kill_9_mid_run_leaves_a_usable_cache_and_resume_matches_a_clean_run(tmp_path):
    data = make_flat(tmp_path / "data", per_class=20)
    cache_path = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(data), str(cache_path)])
    parts = cache_path.with_name(cache_path.name + ".parts")
    deadline = time.time() + 120
    while len(list(parts.glob("part-*.npz"))) < 3:
        assert proc.poll() is None, "extraction ended before it could be killed"
        assert time.time() < deadline, "no journalled batch after 120 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    assert featx.info(cache_path)["images"] == 0  # the cache opens: empty, but valid
    finished = len(list(parts.glob("part-*.npz"))) * 4
    summary = run(data, cache_path)
    assert summary["resumed"] >= 12 and summary["resumed"] == finished
    assert summary["extracted"] == 40 - finished
    with h5py.File(cache_path, "r") as f:  # no batch left: only the parts the cache names
        named = sorted(f["sources/names"].asstr()[()])
    left = sorted(f"{parts.name}/{p.name}" for p in parts.iterdir() if p.name != ".featx-journal")
    assert left == named and len(named) == 1

    clean = tmp_path / "clean.h5"
    run(data, clean)
    a, b = store.read_cache(cache_path), store.read_cache(clean)
    assert a.paths == b.paths and list(a.splits) == list(b.splits)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(
        a.features, b.features, rtol=1e-4, atol=1e-5 * np.abs(b.features).max()
    )


def test_cli_extract_and_info(flat, tmp_path, monkeypatch):
    from featx.reports import progress

    # A loaded machine can take 10 s for the first batch; the test is about the batches after it.
    monkeypatch.setattr(progress, "LOG_EVERY", 3600.0)
    runner = CliRunner()
    cache_path = tmp_path / "c.h5"
    args = ["--weights", "none", "--alpha", "0.35", "--image-size", "32", "--batch-size", "8"]
    result = runner.invoke(cli, ["extract", str(flat), "--cache", str(cache_path), *args])
    assert result.exit_code == 0, result.output
    assert "train" in result.output and "images/s" in result.output
    # not a terminal: one progress line at the end of a short run, not one per batch
    assert [line for line in result.output.splitlines() if line.startswith("extracting")] == [
        line for line in result.output.splitlines() if line.startswith("extracting 20/20, ")
    ] and "extracting 20/20, " in result.output
    result = runner.invoke(cli, ["extract", str(flat), "--cache", str(cache_path), *args, "--json"])
    assert result.exit_code == 0 and '"kept": 20' in result.output
    assert '"flip": false' in result.output  # the default for a new cache: config.FLIP
    result = runner.invoke(cli, ["info", str(cache_path)])
    assert result.exit_code == 0 and "validation" in result.output and "alpha=0.35" in result.output


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["extract", str(tmp_path / "nope"), "--weights", "none"])
    assert_one_line_error(result, "Data folder not found")
    result = runner.invoke(cli, ["info", str(tmp_path / "missing.h5")])
    assert result.exit_code == 1 and "Cache not found" in result.output


def test_help_is_instant_because_cli_imports_no_tensorflow():
    heavy = "('tensorflow', 'keras', 'h5py')"
    code = f"import sys, featx.cli; print(any(m in sys.modules for m in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_preprocessing_layer_is_mobilenet_v2_preprocess_input():
    import keras

    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = keras.ops.convert_to_numpy(mobilenet.preprocessing_layer()(x))
    theirs = keras.applications.mobilenet_v2.preprocess_input(x.copy())
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.real
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real photos not found at {REAL_DATA}")
@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason=f"ImageNet weights not in {WEIGHTS_FILE}")
def test_real_photos_give_the_features_of_keras_own_mobilenet_v2(tmp_path):
    import keras

    data = tmp_path / "photos"
    for c in ("cats", "dogs"):
        (data / c).mkdir(parents=True)
        for p in sorted((REAL_DATA / "train" / c).glob("*.jpg"))[:6]:
            (data / c / p.name).symlink_to(p)
    summary = extract(data, tmp_path / "real.h5", batch_size=8)
    assert summary["extracted"] == 12 and not summary["rejected"]
    cache = store.read_cache(tmp_path / "real.h5")
    assert cache.features.shape == (12, 1280) and cache.features.min() >= 0
    assert len(cache.fingerprint["weights_sha256"]) == 64

    # The reference: Keras' own model and preprocess_input on the same decoded pixels.
    from featx.images.decoder import load_image

    pixels = np.stack([load_image(data / p) for p in cache.paths]).astype("float32")
    reference = keras.applications.MobileNetV2((224, 224, 3), include_top=False, pooling="avg")
    expected = reference.predict(
        keras.applications.mobilenet_v2.preprocess_input(pixels), verbose=0
    )
    np.testing.assert_allclose(cache.features, expected, atol=1e-4)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.skipif(not _has("jax"), reason="jax is not installed (pip install jax)")
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real photos not found at {REAL_DATA}")
@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason=f"ImageNet weights not in {WEIGHTS_FILE}")
def test_jax_backend_gives_the_same_features_as_tensorflow(tmp_path):
    data = tmp_path / "photos"
    for c in ("cats", "dogs"):
        (data / c).mkdir(parents=True)
        for p in sorted((REAL_DATA / "validation" / c).glob("*.jpg"))[:4]:
            (data / c / p.name).symlink_to(p)
    # The Keras engine under both backends: this compares Keras backends, not ONNX Runtime.
    extract(data, tmp_path / "tf.h5", batch_size=8, engine="keras")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    cmd = [sys.executable, "-m", "featx", "extract", str(data), "--engine", "keras"]
    cmd += ["--cache", str(tmp_path / "jax.h5")]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    tf_cache, jax_cache = (
        store.read_cache(tmp_path / "tf.h5"),
        store.read_cache(tmp_path / "jax.h5"),
    )
    assert jax_cache.fingerprint["keras_backend"] == "jax"
    assert jax_cache.paths == tf_cache.paths
    np.testing.assert_allclose(jax_cache.features, tf_cache.features, atol=1e-4)
