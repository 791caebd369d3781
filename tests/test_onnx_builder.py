"""The ONNX backbone built straight from MobileNetV2 weights (#25): Keras' features without
TensorFlow, in about a second instead of tf2onnx's 15-22, a visible step left out of images/s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import REAL_DATA, WEIGHTS_FILE, real_photos, write_images

from featx.backbone import mobilenet, onnx_builder, onnx_engine
from featx.backbone.mobilenet import BackboneSpec

pytest.importorskip("onnxruntime", reason="the onnx engine needs `pip install 'featx[onnx]'`")
pytest.importorskip("onnx", reason="the builder needs `pip install 'featx[onnx]'`")

HEAVY = ("tensorflow", "keras", "tf2onnx")


def write_legacy_weights(path, alpha: float = 0.35, seed: int = 0):
    """A MobileNetV2 no-top weights file in the layout Keras publishes (legacy .h5: the layer
    names, each layer's weight names and arrays), with random weights and BatchNorm statistics
    that make features of order 1, so differences are measured against a real scale."""
    import h5py
    import keras

    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=alpha, include_top=False, pooling="avg", weights=None
    )
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        for layer in model.layers:
            group = f.create_group(layer.name)
            names = [f"{layer.name}/{w.path.rsplit('/', 1)[-1]}" for w in layer.weights]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for name, w in zip(names, layer.weights):
                shape = tuple(w.shape)
                short = name.rsplit("/", 1)[-1]
                if short == "moving_variance":
                    value = rng.uniform(0.5, 2.0, shape)
                elif short == "gamma":
                    value = rng.uniform(0.5, 1.5, shape)
                elif short in ("beta", "moving_mean"):
                    value = rng.normal(0, 0.2, shape)
                else:  # kernels: He-like, so activations keep their scale through the blocks
                    fan_in = 9 if "depthwise" in name else np.prod(shape[:-1])
                    value = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
                group.create_dataset(name, data=value.astype(np.float32))
    return path


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    return write_legacy_weights(tmp_path_factory.mktemp("weights") / "mobilenet_v2_0.35.h5")


@pytest.mark.parametrize("size", [32, 37])  # even and odd sizes pad differently
def test_the_built_backbone_gives_keras_features(weights_file, tmp_path, size):
    spec = BackboneSpec(str(weights_file), size, 0.35)
    messages = []
    engine = onnx_engine.OnnxEngine(spec, onnx_dir=tmp_path, log=messages.append)
    batch = np.random.default_rng(1).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    got = engine.features(batch)
    expected = mobilenet.KerasEngine(spec).features(batch)
    assert got.shape == expected.shape == (4, 1280)
    assert np.abs(expected).max() > 0.1  # features of a real scale, not ~0
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    assert not np.allclose(got[1:], expected[:-1], atol=1e-3)  # other images, other features
    meta = json.loads(onnx_engine.sidecar_path(engine.path).read_text())
    assert meta["made_by"] == "featx onnx_builder"
    assert engine.prepared_seconds > 0
    (line,) = [m for m in messages if m.startswith("prepared the fast engine (ONNX Runtime) in ")]
    assert "once per backbone" in line


def test_a_file_that_is_no_mobilenet_v2_is_refused_by_the_builder(weights_file, tmp_path):
    layers = onnx_builder.read_weights(weights_file)
    with pytest.raises(ValueError, match="MobileNetV2 has 104"):
        onnx_builder.build_model(layers[:-2], 32, 0.35)
    with pytest.raises(ValueError, match="at alpha 1.0"):  # Keras refuses another width's file
        onnx_builder.build_model(layers, 32, 1.0)
    wrong = [dict(layer) for layer in layers]
    wrong[2] = {"kernel": np.zeros((3, 3, 5, 1), np.float32)}  # 5 channels, its BN has 16
    with pytest.raises(ValueError):
        onnx_builder.build_model(wrong, 32, 0.35)


def test_random_weights_are_still_converted_from_keras(tmp_path):
    """The builder reads a weights file; random weights have none and go through tf2onnx."""
    messages = []
    spec = BackboneSpec("none", 32, 0.35)
    engine = onnx_engine.OnnxEngine(spec, onnx_dir=tmp_path, log=messages.append)
    engine.prepare()
    meta = json.loads(onnx_engine.sidecar_path(engine.path).read_text())
    assert meta["made_by"] == "tf2onnx"
    assert any("from the Keras model" in m for m in messages)


FIRST_RUN = textwrap.dedent(
    """
    import json, sys
    from featx.commands.extract import extract
    s = extract(sys.argv[1], sys.argv[2], weights=sys.argv[3], alpha=0.35, image_size=32,
                batch_size=4, engine="onnx", log=lambda m: print("LOG", m))
    heavy = [m for m in sys.argv[4].split(",") if m in sys.modules]
    keys = ("extracted", "seconds", "prepare_seconds", "images_per_second", "engine")
    print(json.dumps({**{k: s[k] for k in keys}, "heavy": heavy}))
    """
)


def test_a_first_extract_prepares_the_engine_without_tensorflow_and_says_so(weights_file, tmp_path):
    data = write_images(tmp_path / "data", {"cats": 3, "dogs": 3}, noise=60)
    env = {**os.environ, "FEATX_HOME": str(tmp_path / "home"), "CUDA_VISIBLE_DEVICES": "-1"}
    out = subprocess.run(
        [sys.executable, "-c", FIRST_RUN, data, tmp_path / "c.h5", weights_file, ",".join(HEAVY)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    s = json.loads(lines[-1])
    assert s["heavy"] == [] and s["engine"] == "onnx" and s["extracted"] == 6
    assert any(line.startswith("LOG prepared the fast engine (ONNX Runtime) in") for line in lines)
    assert 0 < s["prepare_seconds"] < s["seconds"]
    # the rate leaves the one-time preparation out
    rate = s["extracted"] / (s["seconds"] - s["prepare_seconds"])
    assert s["images_per_second"] == pytest.approx(rate, rel=0.01)
    assert list((tmp_path / "home").glob("backbone-*.onnx"))  # kept once per user


REAL_FEATURES = textwrap.dedent(
    """
    import sys
    import numpy as np
    from featx.backbone import onnx_engine
    from featx.backbone.mobilenet import BackboneSpec
    from featx.images.decoder import load_image
    engine = onnx_engine.OnnxEngine(BackboneSpec("imagenet", 224, 1.0), onnx_dir=sys.argv[1])
    batch = np.stack([load_image(p) for p in sys.argv[3:]])
    np.save(sys.argv[2], engine.features(batch))
    print(",".join(m for m in ("tensorflow", "keras", "tf2onnx") if m in sys.modules))
    """
)


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real photos not found at {REAL_DATA}")
@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason=f"ImageNet weights not in {WEIGHTS_FILE}")
def test_real_weights_built_without_tensorflow_give_keras_features_within_1e4(tmp_path):
    from featx.images.decoder import load_image

    photos = real_photos("validation", 8)
    out = subprocess.run(
        [sys.executable, "-c", REAL_FEATURES, tmp_path, tmp_path / "f.npy", *photos],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""  # no TensorFlow, Keras or tf2onnx loaded
    got = np.load(tmp_path / "f.npy")
    batch = np.stack([load_image(p) for p in photos])
    expected = mobilenet.KerasEngine(BackboneSpec("imagenet", 224, 1.0)).features(batch)
    assert got.shape == (16, 1280) and expected.max() > 1.0
    np.testing.assert_allclose(got, expected, atol=1e-4)
