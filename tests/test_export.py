"""featx export: keras, SavedModel, TFLite and ONNX files that give the in-process probabilities
(tiny generated images, random MobileNetV2 at 32 px, and small conv models for quantization and
for a model with two outputs)."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_one_line_error

from featx.backbone import mobilenet
from featx.cache import store
from featx.cli import cli
from featx.commands import export as export_mod
from featx.commands.export import export
from featx.commands.fit_head import fit_head
from featx.commands.predict import predict
from featx.errors import FeatxError
from featx.heads import estimators
from featx.images import decoder

INFO_KEYS = {
    "format",
    "featx_version",
    "model_format",
    "quantize",
    "model_file",
    "labels_file",
    "model_card",
    "class_names",
    "image_size",
    "novelty",
    "input",
    "output",
    "preprocessing",
    "source",
    "check",
    "validation",
    "size_bytes",
    "created",
}


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """The session's tiny model (a data folder, its cache, a logistic-regression head in
    root/logreg) and its validation images as pixels and cached features."""
    cache = store.read_cache(tiny_model.cache)
    mask = cache.splits == "validation"
    paths = [str(tiny_model.data / p) for p, m in zip(cache.paths, mask) if m]
    return {
        "root": tiny_model.root,
        "cache": tiny_model.cache,
        "accuracy": tiny_model.metrics["validation"]["accuracy"],
        "pixels": np.stack([decoder.load_image(p, 32) for p in paths]).astype(np.float32),
        "features": cache.features[mask],
        "labels": cache.labels[mask],
    }


def run_exported(path: Path, model_format: str, pixels: np.ndarray) -> np.ndarray:
    """Probabilities from the exported file with that format's own runtime, not featx (a head's
    export also has the output "novelty": the probabilities are then the output so named)."""
    if model_format == "keras":
        out = keras.saving.load_model(path, safe_mode=True).predict(pixels, verbose=0)
        return out["probabilities"] if isinstance(out, dict) else out
    if model_format == "onnx":
        return run_onnx(path, pixels)["probabilities"]
    import tensorflow as tf

    if model_format == "savedmodel":
        loaded = tf.saved_model.load(str(path))  # kept: serve needs its variables alive
        out = loaded.serve(tf.constant(pixels))
        return (out["probabilities"] if isinstance(out, dict) else out).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(path))
    if len(interpreter.get_output_details()) > 1:  # named outputs
        return interpreter.get_signature_runner()(image=pixels)["probabilities"]
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, pixels.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, pixels)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def run_onnx(path: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of an ONNX file by name, run by ONNX Runtime alone."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: pixels})))


@pytest.mark.slow
@pytest.mark.parametrize(
    "head, model_format",
    [
        ("logreg", "keras"),
        ("logreg", "savedmodel"),
        ("logreg", "tflite"),
        ("logreg", "onnx"),
        ("dense", "keras"),
    ],
)
def test_float_exports_give_the_heads_probabilities(tiny, tiny_dense, tmp_path, head, model_format):
    head_dir = {"logreg": tiny["root"] / "logreg", "dense": tiny_dense}[head]
    out = tmp_path / "exported"
    result = export(head_dir, model_format, output=out, cache=tiny["cache"])
    model_file = out / {"keras": "model.keras", "savedmodel": "saved_model"}.get(
        model_format, f"model.{model_format}"
    )
    assert result["model"] == str(model_file) and model_file.exists()
    assert (out / "labels.txt").read_text() == "cats\ndogs\n"
    assert (out / "README.md").read_text().startswith("<!-- featx model card")
    info = json.loads((out / "export.json").read_text())
    assert set(info) == INFO_KEYS and info["class_names"] == ["cats", "dogs"]
    assert info["image_size"] == 32 and info["input"]["shape"] == [None, 32, 32, 3]
    assert info["source"]["kind"] == "head" and info["source"]["head"] == head
    assert info["check"]["source"] == "8 validation images" and info["check"]["images"] == 8
    assert info["check"]["max_abs_diff"] <= 1e-4

    # The exported file alone, on decoded pixels, against the head on the cached features.
    expected = estimators.load_head(head_dir)[0].predict_proba(tiny["features"])
    got = run_exported(model_file, model_format, tiny["pixels"])
    assert got.shape == (8, 2)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    accuracy = float(np.mean(got.argmax(1) == tiny["labels"]))
    assert info["validation"]["n"] == 8 and info["validation"]["accuracy"] == accuracy
    if head == "logreg":
        assert accuracy == info["validation"]["reference_accuracy"] == tiny["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("model_format", ["keras", "tflite", "onnx"])
def test_a_head_fitted_with_mirror_images_exports_the_mean_of_both_views(
    model_format, tiny_flip, tmp_path
):
    data, cache_path = tiny_flip.data, tiny_flip.cache
    metrics = fit_head(cache_path, "logreg", tmp_path / "head", C=1.0, scaling="l2")
    result = export(tmp_path / "head", model_format, output=tmp_path / "out", cache=cache_path)
    assert result["source"]["flip"] is True and result["check"]["max_abs_diff"] <= 1e-4

    cache = store.read_cache(cache_path)
    mask = cache.splits == "validation"
    pixels = [decoder.load_image(data / p, 32) for p, m in zip(cache.paths, mask) if m]
    got = run_exported(Path(result["model"]), model_format, np.stack(pixels).astype(np.float32))
    head = estimators.load_head(tmp_path / "head")[0]
    expected = head.predict_proba(
        estimators.flip_views(cache.features[mask], cache.features_flip[mask])
    )
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(head.predict_proba(cache.features[mask]) - expected).max() > 1e-3
    accuracy = metrics["validation"]["accuracy"]
    assert (
        result["validation"]["accuracy"] == result["validation"]["reference_accuracy"] == accuracy
    )


@pytest.mark.slow
def test_a_finetune_output_exports_without_its_augmentation_layers(tiny, tmp_path):
    from featx.commands.finetune import finetune

    ft_dir = tmp_path / "ft"
    finetune(tiny["cache"], tiny["root"] / "logreg", ft_dir, epochs=0, batch_size=8)
    result = export(ft_dir, "keras", output=tmp_path / "out")
    # No --cache: the check uses the validation images of the cache recorded in finetune.json.
    assert result["check"]["source"] == "8 validation images"
    assert result["check"]["max_abs_diff"] <= 1e-4 and result["validation"] is None
    loaded = keras.saving.load_model(tmp_path / "out" / "model.keras")
    layers = [type(layer).__name__ for layer in loaded.layers]
    assert not [n for n in layers if n.startswith("Random")], layers
    trained = keras.saving.load_model(ft_dir / "model.keras")
    assert any(type(layer).__name__.startswith("Random") for layer in trained.layers)
    outputs = loaded.predict(tiny["pixels"], verbose=0)  # the probabilities and the novelty
    assert sorted(outputs) == ["novelty", "probabilities"]
    np.testing.assert_allclose(
        outputs["probabilities"], trained.predict(tiny["pixels"], verbose=0), atol=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize("model_format", ["keras", "tflite", "onnx"])
def test_a_finetune_export_gives_the_novelty_and_flags_of_predict_on_the_folder(
    tiny_model, tiny_finetune, tmp_path, model_format
):
    out = tmp_path / model_format
    result = export(tiny_finetune, model_format, output=out)
    threshold = json.loads((tiny_finetune / "finetune.json").read_text())["novelty"]["threshold"]
    assert result["novelty"]["threshold"] == pytest.approx(threshold)
    # verified after writing, output by output: the novelty too
    assert sorted(result["check"]["outputs"]) == ["novelty", "probabilities"]
    assert max(result["check"]["outputs"].values()) <= 1e-4
    assert json.loads((out / "export.json").read_text())["novelty"]["threshold"] == threshold
    paths = [str(tiny_model.data)]
    folder, exported = predict(tiny_finetune, paths), predict(out, paths)
    np.testing.assert_allclose(
        [r["novelty"] for r in exported["rows"]], [r["novelty"] for r in folder["rows"]], atol=1e-4
    )
    assert [r["unknown"] for r in exported["rows"]] == [r["unknown"] for r in folder["rows"]]
    assert [r["predicted"] for r in exported["rows"]] == [r["predicted"] for r in folder["rows"]]
    assert exported["novelty_threshold"] == pytest.approx(folder["novelty_threshold"])


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory):
    """A finetune-style folder holding a small conv net with sizeable weights: quantization has
    a measurable effect on it (the random MobileNetV2's features are ~1e-11, too small for it)."""
    root = tmp_path_factory.mktemp("conv")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.RandomFlip("horizontal", name="augment_flip")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(64, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(64)(x))
    keras.Model(inputs, outputs).save(root / "model.keras")
    info = {"kind": "finetune", "class_names": ["a", "b", "c"], "image_size": 32}
    (root / "finetune.json").write_text(json.dumps(info))
    return root


def test_quantized_tflite_is_smaller_and_close(conv_model, tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3)).astype(np.float32)
    expected = keras.saving.load_model(conv_model / "model.keras").predict(pixels, verbose=0)
    assert expected.max() - expected.min() > 0.05  # the outputs are not flat
    sizes, diffs = {}, {}
    for quantize in ("none", "float16", "dynamic"):
        result = export(conv_model, "tflite", quantize, output=tmp_path / quantize)
        assert (
            result["quantize"] == quantize and result["check"]["source"] == "8 random-pixel images"
        )
        sizes[quantize] = (tmp_path / quantize / "model.tflite").stat().st_size
        got = run_exported(tmp_path / quantize / "model.tflite", "tflite", pixels)
        diffs[quantize] = float(np.abs(got - expected).max())
        assert result["check"]["max_abs_diff"] <= result["check"]["tolerance"]
    assert diffs["none"] <= 1e-5
    assert diffs["float16"] <= 1e-2 and diffs["dynamic"] <= 5e-2  # loosely
    assert sizes["float16"] < 0.65 * sizes["none"] and sizes["dynamic"] < 0.45 * sizes["none"]
    assert json.loads((tmp_path / "float16" / "export.json").read_text())["quantize"] == "float16"


def test_bad_requests_are_refused_with_clear_messages(tiny, conv_model, tmp_path, monkeypatch):
    head = tiny["root"] / "logreg"
    with pytest.raises(FeatxError, match="--quantize float16 applies to --format tflite only"):
        export(head, "keras", "float16", output=tmp_path / "x")
    with pytest.raises(FeatxError, match="Unknown format 'coreml'"):
        export(head, "coreml", output=tmp_path / "x")
    with pytest.raises(FeatxError, match="--output is the folder to write model.tflite"):
        export(head, "tflite", output=tmp_path / "model.tflite")
    with pytest.raises(FeatxError, match="has the classes"):
        export(conv_model, "keras", output=tmp_path / "x", cache=tiny["cache"])
    with pytest.raises(FeatxError, match="neither head.json"):
        export(tmp_path, "keras", output=tmp_path / "x")
    monkeypatch.setattr(mobilenet, "keras_backend", lambda: "jax")
    for model_format in ("savedmodel", "tflite"):
        with pytest.raises(FeatxError, match=f"--format {model_format} needs the TensorFlow"):
            export(head, model_format, output=tmp_path / "x")
    monkeypatch.setattr(mobilenet, "keras_backend", lambda: "torch")
    with pytest.raises(FeatxError, match="--format onnx cannot run here: featx exports ONNX"):
        export(head, "onnx", output=tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before writing anything


@pytest.fixture(scope="module")
def two_outputs(tmp_path_factory):
    """Finetune-style folders whose Keras model has two outputs, the class probabilities and a
    novelty score (a value > 1, so it is compared relative to its size): one model returns them
    as a dict, one as a list of named layers."""
    root = tmp_path_factory.mktemp("two")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    proba = keras.layers.Dense(3, activation="softmax", name="probabilities")(x)
    novelty = keras.layers.Dense(1, name="novelty_raw")(x)
    novelty = keras.layers.Rescaling(50.0, offset=10.0, name="novelty")(novelty)
    info = {"kind": "finetune", "class_names": ["a", "b", "c"], "image_size": 32}
    folders = {}
    for kind, outputs in (
        ("dict", {"probabilities": proba, "novelty": novelty}),
        ("list", [proba, novelty]),
    ):
        folders[kind] = root / kind
        folders[kind].mkdir()
        keras.Model(inputs, outputs).save(folders[kind] / "model.keras")
        (folders[kind] / "finetune.json").write_text(json.dumps(info))
    return folders


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dict", "list"])
def test_an_onnx_export_keeps_every_output_of_the_model_by_name(two_outputs, kind, tmp_path):
    folder = two_outputs[kind]
    result = export(folder, "onnx", output=tmp_path / "onnx")
    pixels = np.random.default_rng(2).integers(0, 256, (6, 32, 32, 3)).astype(np.float32)
    expected = keras.saving.load_model(folder / "model.keras").predict(pixels, verbose=0)
    if kind == "list":
        expected = dict(zip(["probabilities", "novelty"], expected))
    assert np.abs(expected["novelty"]).max() > 5  # not a probability: compared relatively
    got = run_onnx(tmp_path / "onnx" / "model.onnx", pixels)
    assert sorted(got) == ["novelty", "probabilities"]
    for name in got:
        assert got[name].shape == expected[name].shape
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5)
    check = result["check"]
    assert sorted(check["outputs"]) == ["novelty", "probabilities"]
    assert max(check["outputs"].values()) <= 1e-4
    assert check["max_abs_diff"] == check["outputs"]["probabilities"]
    card = (tmp_path / "onnx" / "README.md").read_text()
    assert "also the model's other outputs, `novelty`" in card
    # featx predict runs the file on the probabilities output
    photo = tmp_path / "photo.png"
    keras.utils.save_img(photo, pixels[0])
    row = predict(tmp_path / "onnx", [str(photo)])["rows"][0]
    decoded = decoder.load_image(photo, 32)[None].astype(np.float32)
    want = run_onnx(tmp_path / "onnx" / "model.onnx", decoded)
    assert row["probability"] == pytest.approx(float(want["probabilities"].max()), abs=1e-5)


@pytest.mark.slow
def test_predict_with_a_tflite_export_prints_no_xnnpack_line(tiny, tmp_path):
    """#26 item 5: TFLite's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." is start-up
    noise the CLI hides (featx.quiet), like TensorFlow's own."""
    out = tmp_path / "tflite"
    export(tiny["root"] / "logreg", "tflite", output=out)
    photo = tmp_path / "photo.png"
    keras.utils.save_img(photo, tiny["pixels"][0])
    raw = (
        "import numpy as np; from featx.artifacts.classifier import exported_outputs; "
        f"exported_outputs({str(out / 'model.tflite')!r}, 'tflite')(np.zeros((1, 32, 32, 3)))"
    )
    runs = {
        "raw": [sys.executable, "-c", raw],
        "cli": [sys.executable, "-m", "featx", "predict", str(out), str(photo)],
    }
    stderr = {}
    for name, args in runs.items():
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        stderr[name] = done.stderr
    if "XNNPACK" not in stderr["raw"]:
        pytest.skip("this TFLite runtime printed no XNNPACK line: nothing to hide")
    assert "XNNPACK" not in stderr["cli"], stderr["cli"]


def test_the_check_compares_each_output_by_name_and_requires_every_one_in_onnx():
    p = np.array([[0.2, 0.8], [0.6, 0.4]])
    novelty = np.array([[40.0], [12.0]])
    expected = {"probabilities": p, "novelty": novelty}
    diffs = export_mod._differences(
        expected, {"novelty": novelty + 0.4, "probabilities": p + 1e-3}, every_output=True
    )
    assert diffs == pytest.approx({"probabilities": 1e-3, "novelty": 0.01})  # 0.4 / 40
    with pytest.raises(FeatxError, match=r"lacks the model's outputs \['novelty'\]"):
        export_mod._differences(expected, {"probabilities": p}, every_output=True)
    # keras, SavedModel and TFLite give the probabilities: those are compared
    assert export_mod._differences(expected, {"probabilities": p}, every_output=False) == {
        "probabilities": 0.0
    }
    with pytest.raises(FeatxError, match="output 'novelty' has the shape \\(2,\\)"):
        export_mod._differences(expected, {**expected, "novelty": novelty[:, 0]}, True)


def test_a_float_export_that_disagrees_is_an_error_and_is_removed(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod.config, "EXPORT_TOLERANCE", -1.0)  # nothing can pass
    with pytest.raises(FeatxError, match="differ from the in-process model's.*was removed"):
        export(tiny["root"] / "logreg", "keras", output=tmp_path / "x")
    assert not (tmp_path / "x" / "model.keras").exists()


@pytest.mark.slow
def test_cli_export_reports_the_check_and_prints_json(tiny, tmp_path):
    out = tmp_path / "cli"
    args = ["export", str(tiny["root"] / "logreg"), "--output", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "largest probability difference" in res.output and "model.keras" in res.output
    res = CliRunner().invoke(cli, [*args, "--json", "--cache", str(tiny["cache"])])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["model_format"] == "keras" and data["validation"]["n"] == 8
    assert data["check"]["max_abs_diff"] <= 1e-4
    res = CliRunner().invoke(cli, [*args, "--quantize", "dynamic"])
    assert_one_line_error(res, "applies to --format tflite only")


def test_default_output_is_inside_the_model_folder(tmp_path):
    assert export_mod.default_output_dir(tmp_path, "tflite") == tmp_path / "export-tflite"
    assert export_mod.default_output_dir(tmp_path, "tflite", "float16") == (
        tmp_path / "export-tflite-float16"
    )
