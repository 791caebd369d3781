"""The ONNX Runtime engine: same features as Keras, a trusted .onnx file or a rebuilt one,
caches shared across engines, and clear messages when onnxruntime is missing."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (
    COLOURS,
    REAL_DATA,
    TINY,
    WEIGHTS_FILE,
    assert_one_line_error,
    real_photos,
    write_images,
)

from featx.backbone import mobilenet, onnx_engine
from featx.backbone.engines import make_engine
from featx.backbone.mobilenet import BackboneSpec
from featx.cache import store
from featx.cli import cli
from featx.commands.extract import extract
from featx.errors import FeatxError

pytest.importorskip("onnxruntime", reason="the onnx engine needs `pip install 'featx[onnx]'`")

TINY_SPEC = BackboneSpec(**TINY)


def write_photos(root: Path, per_class: int, start: int = 0) -> Path:
    """Noisy, distinct JPEGs root/{cats,dogs}/NAME.jpg (numbered from `start`)."""
    return write_images(root, dict.fromkeys(COLOURS, per_class), start=start, noise=60)


def close(a, b, rtol=1e-3):
    """Random-weight features are tiny (~1e-11): compare relative to their scale."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    scale = np.abs(b).max()
    assert scale > 0
    return np.abs(a - b).max() <= rtol * scale


@pytest.fixture(scope="module")
def exported(featx_home):
    """The export of the tiny backbone in this session's FEATX_HOME, where the onnx engine of
    test_predict and test_int8 finds it too (one export per session, not one per module).
    Read-only: tests that need a stored .onnx file to change copy it first (copy_export)."""
    engine = onnx_engine.OnnxEngine(TINY_SPEC)
    assert engine.onnx_dir == featx_home
    engine.load()
    return engine.path


def copy_export(exported: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in (exported, onnx_engine.sidecar_path(exported)):
        shutil.copy2(p, folder / p.name)
    return folder / exported.name


def test_onnx_features_match_keras_for_uint8_batches(exported):
    batch = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    engine = onnx_engine.OnnxEngine(TINY_SPEC, onnx_dir=exported.parent)
    got = engine.features(batch)
    expected = mobilenet.KerasEngine(TINY_SPEC).features(batch)
    assert engine.name == "onnx" and got.dtype == np.float32 and got.shape == (5, 1280)
    assert close(got, expected)
    assert not close(got[1:], expected[:-1])  # different images, different features


def test_export_is_stored_with_a_sidecar_keyed_by_the_backbone(exported):
    meta = json.loads(onnx_engine.sidecar_path(exported).read_text())
    fp = mobilenet.fingerprint(**TINY)
    assert meta["model_key"] == onnx_engine.model_key(fp)
    assert exported.name == f"backbone-{meta['model_key'][:16]}.onnx"
    assert meta["onnx_sha256"] == onnx_engine.file_sha256(exported)
    assert meta["fingerprint"]["alpha"] == 0.35 and "engine" not in meta["fingerprint"]
    assert not list(exported.parent.glob("*.tmp-*"))  # no temporary file left behind


def test_the_export_is_kept_once_per_user_and_a_second_project_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_HOME", str(tmp_path / "home"))
    messages = []
    for project in ("birds", "cars"):
        data = write_photos(tmp_path / project / "photos", per_class=2)
        cache_path = tmp_path / project / "cache" / "photos.h5"
        summary = extract(
            data, cache_path, **TINY, batch_size=4, engine="onnx", log=messages.append
        )
        assert summary["engine"] == "onnx"
        assert not list(cache_path.parent.glob("*.onnx"))  # nothing per project
    exports = [m for m in messages if m.startswith("prepared the fast engine")]
    assert len(exports) == 1 and str(tmp_path / "home") in exports[0]  # the first project only
    (stored,) = (tmp_path / "home").glob("backbone-*.onnx")
    assert (
        onnx_engine.check_stored(stored, onnx_engine.model_key(mobilenet.fingerprint(**TINY)))
        is None
    )


def test_the_user_folder_follows_featx_home_then_xdg_cache_home_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATX_HOME", str(tmp_path / "fh"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert onnx_engine.user_dir() == tmp_path / "fh"
    assert onnx_engine.OnnxEngine(TINY_SPEC).onnx_dir == tmp_path / "fh"
    assert (
        onnx_engine.OnnxEngine(TINY_SPEC, onnx_dir=tmp_path / "mine").onnx_dir == tmp_path / "mine"
    )
    monkeypatch.delenv("FEATX_HOME")
    assert onnx_engine.user_dir() == tmp_path / "xdg" / "featx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    assert onnx_engine.user_dir() == tmp_path / "me" / ".cache" / "featx"


def test_other_weights_alpha_or_size_get_another_onnx_file(tmp_path):
    weights = tmp_path / "w.h5"
    weights.write_bytes(b"first weights")
    first = onnx_engine.OnnxEngine(BackboneSpec(str(weights), 32, 0.35), onnx_dir=tmp_path).path
    weights.write_bytes(b"retrained weights, a longer file")
    second = onnx_engine.OnnxEngine(BackboneSpec(str(weights), 32, 0.35), onnx_dir=tmp_path).path
    other_size = onnx_engine.OnnxEngine(BackboneSpec("none", 64, 0.35), onnx_dir=tmp_path).path
    other_alpha = onnx_engine.OnnxEngine(BackboneSpec("none", 32, 0.5), onnx_dir=tmp_path).path
    assert len({first, second, other_size, other_alpha}) == 4


def test_check_stored_accepts_only_a_complete_matching_export(exported, tmp_path):
    key = json.loads(onnx_engine.sidecar_path(exported).read_text())["model_key"]
    path = copy_export(exported, tmp_path)
    assert onnx_engine.check_stored(path, key) is None
    assert "another backbone" in onnx_engine.check_stored(path, "0" * 64)
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    assert "sha256" in onnx_engine.check_stored(path, key)
    onnx_engine.sidecar_path(path).unlink()
    assert "sidecar" in onnx_engine.check_stored(path, key)
    path.unlink()
    assert onnx_engine.check_stored(path, key) == "missing"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage bytes", "stale sidecar"])
def test_corrupt_or_stale_onnx_file_is_rebuilt_not_trusted(exported, tmp_path, damage):
    path = copy_export(exported, tmp_path)
    side = onnx_engine.sidecar_path(path)
    if damage == "garbage bytes":
        path.write_bytes(b"\x00not an onnx model\xff" * 100)
    else:  # a sidecar written for another backbone: the file may hold other weights
        meta = json.loads(side.read_text())
        side.write_text(json.dumps({**meta, "model_key": "f" * 64}))
    messages = []
    engine = onnx_engine.OnnxEngine(TINY_SPEC, onnx_dir=tmp_path, log=messages.append)
    batch = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    got = engine.features(batch)
    assert any("rebuilding" in m for m in messages)
    assert any("prepared the fast engine" in m for m in messages)
    assert close(got, mobilenet.KerasEngine(TINY_SPEC).features(batch))
    key = onnx_engine.model_key(mobilenet.fingerprint(**TINY))
    assert onnx_engine.check_stored(path, key) is None  # repaired on disk too


REUSE = textwrap.dedent(
    """
    import json, sys
    from featx.commands.extract import extract
    s = extract(sys.argv[1], sys.argv[2], weights="none", alpha=0.35, image_size=32,
                batch_size=4, engine="auto")
    heavy = [m for m in ("tensorflow", "keras") if m in sys.modules]
    print(json.dumps({"engine": s["engine"], "extracted": s["extracted"], "heavy": heavy}))
    """
)


def test_with_a_stored_onnx_file_extraction_never_imports_tensorflow(exported, tmp_path):
    path = copy_export(exported, tmp_path / "cache")
    stamp = path.stat().st_mtime_ns
    data = write_photos(tmp_path / "data", per_class=3)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["FEATX_HOME"] = str(tmp_path / "home")  # empty: the file an older version left is used
    out = subprocess.run(
        [sys.executable, "-c", REUSE, str(data), str(tmp_path / "cache" / "c.h5")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if onnx_engine._nvidia_device_present():
        pytest.skip("a GPU is present: auto picks Keras here")
    assert result == {"engine": "onnx", "extracted": 6, "heavy": []}
    assert path.stat().st_mtime_ns == stamp  # reused, not exported again
    assert not (tmp_path / "home").exists()
    assert (
        store.read_cache(tmp_path / "cache" / "c.h5", features=False).fingerprint["engine"]
        == "onnx"
    )


@pytest.mark.parametrize("first,second", [("keras", "onnx"), ("onnx", "keras")])
def test_a_cache_extends_incrementally_with_the_other_engine(exported, tmp_path, first, second):
    copy_export(exported, tmp_path)  # the onnx file lives next to the caches
    data = write_photos(tmp_path / "data", per_class=4)
    mixed = tmp_path / "mixed.h5"
    extract(data, mixed, **TINY, batch_size=4, engine=first)
    before = store.read_cache(mixed)
    write_photos(data, per_class=2, start=4)  # two new photos per class
    summary = extract(data, mixed, **TINY, batch_size=4, engine=second)
    assert summary["engine"] == second and summary["kept"] == 8 and summary["extracted"] == 4
    after = store.read_cache(mixed)
    assert after.fingerprint["engine"] == second and len(after.paths) == 12
    old = [after.paths.index(p) for p in before.paths]
    np.testing.assert_array_equal(after.features[old], before.features)  # kept as they were

    # Every feature, whichever engine made it, agrees with a clean run of either engine.
    for engine in ("keras", "onnx"):
        clean = tmp_path / f"clean-{engine}.h5"
        extract(data, clean, **TINY, batch_size=4, engine=engine)
        reference = store.read_cache(clean)
        assert reference.paths == after.paths
        assert close(after.features, reference.features)


def test_make_engine_resolves_auto_from_onnxruntime_and_the_gpu(monkeypatch):
    monkeypatch.setattr(onnx_engine, "keras_sees_gpu", lambda: False)
    assert make_engine("auto", TINY_SPEC).name == "onnx"
    monkeypatch.setattr(onnx_engine, "keras_sees_gpu", lambda: True)
    assert make_engine("auto", TINY_SPEC).name == "keras"
    assert make_engine("keras", TINY_SPEC).name == "keras"
    assert make_engine("onnx", TINY_SPEC).name == "onnx"  # explicit: even with a GPU
    with pytest.raises(FeatxError, match="Unknown engine 'tensorrt'"):
        make_engine("tensorrt", TINY_SPEC)


def test_auto_uses_keras_when_the_export_could_not_be_stored(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_engine, "keras_sees_gpu", lambda: False)
    monkeypatch.setattr(onnx_engine.os, "access", lambda path, mode: False)  # a read-only disk
    messages = []
    engine = make_engine("auto", TINY_SPEC, onnx_dir=tmp_path / "ro" / "cache", log=messages.append)
    assert engine.name == "keras"
    assert len(messages) == 1 and "is not writable" in messages[0] and str(tmp_path) in messages[0]
    assert make_engine("onnx", TINY_SPEC, onnx_dir=tmp_path / "ro").name == "onnx"  # explicit
    copy_export(exported, tmp_path / "stored")  # a valid stored file needs no writing
    assert make_engine("auto", TINY_SPEC, onnx_dir=tmp_path / "stored").name == "onnx"


def test_no_gpu_is_found_without_importing_tensorflow():
    code = (
        "import sys; from featx.backbone import onnx_engine; "
        "print(onnx_engine.keras_sees_gpu(), 'tensorflow' in sys.modules)"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1", "KERAS_BACKEND": "tensorflow"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["False", "False"], out.stderr


@pytest.mark.parametrize(
    "keras_backend,installed,expected",
    [
        ("tensorflow", {"tf2onnx"}, None),
        ("jax", {"jax2onnx"}, None),
        ("tensorflow", set(), "pip install tf2onnx"),
        ("jax", {"tf2onnx"}, "pip install jax2onnx"),
        ("torch", {"tf2onnx", "jax2onnx"}, "KERAS_BACKEND=tensorflow"),
    ],
)
def test_auto_uses_keras_when_the_backend_cannot_export_onnx(
    monkeypatch, keras_backend, installed, expected
):
    monkeypatch.setattr(mobilenet, "keras_backend", lambda: keras_backend)
    monkeypatch.setattr(onnx_engine, "_installed", lambda dist: dist in installed)
    monkeypatch.setattr(onnx_engine, "keras_sees_gpu", lambda: False)
    messages = []
    engine = onnx_engine.choose_engine("auto", log=messages.append)
    blocker = onnx_engine.export_blocker()
    if expected is None:
        assert engine == "onnx" and blocker is None and messages == []
    else:
        assert engine == "keras" and expected in blocker
        assert len(messages) == 1 and expected in messages[0] and "\n" not in messages[0]
    assert onnx_engine.choose_engine("onnx") == "onnx"  # explicit: a stored file may still serve


@pytest.fixture
def no_onnxruntime(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails


def test_engine_onnx_without_onnxruntime_is_a_clear_error(no_onnxruntime, tmp_path):
    data = write_photos(tmp_path / "data", per_class=2)
    args = ["--weights", "none", "--alpha", "0.35", "--image-size", "32", "--engine", "onnx"]
    cmd = ["extract", str(data), "--cache", str(tmp_path / "c.h5"), *args]
    result = CliRunner().invoke(cli, cmd)
    assert_one_line_error(result, "pip install 'featx[onnx]'", "--engine keras")
    assert not (tmp_path / "c.h5").exists()  # refused before anything was written


def test_auto_without_onnxruntime_falls_back_to_keras_with_one_line(no_onnxruntime, tmp_path):
    data = write_photos(tmp_path / "data", per_class=2)
    messages = []
    summary = extract(data, tmp_path / "c.h5", **TINY, engine="auto", log=messages.append)
    assert summary["engine"] == "keras" and summary["extracted"] == 4
    hints = [m for m in messages if "featx[onnx]" in m]
    assert len(hints) == 1 and len(hints[0].splitlines()) == 1
    assert store.read_cache(tmp_path / "c.h5", features=False).fingerprint["engine"] == "keras"


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real photos not found at {REAL_DATA}")
@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason=f"ImageNet weights not in {WEIGHTS_FILE}")
def test_real_weights_onnx_features_match_keras_within_1e4_on_real_photos(tmp_path):
    from featx.images.decoder import load_image

    photos = real_photos("validation", 8)
    batch = np.stack([load_image(p) for p in photos])
    got = onnx_engine.OnnxEngine(BackboneSpec("imagenet", 224, 1.0), onnx_dir=tmp_path).features(
        batch
    )
    expected = mobilenet.KerasEngine(BackboneSpec("imagenet", 224, 1.0)).features(batch)
    assert got.shape == (16, 1280) and expected.max() > 1.0  # real, non-trivial features
    np.testing.assert_allclose(got, expected, atol=1e-4)
