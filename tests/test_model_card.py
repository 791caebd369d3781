"""The model card (README.md) of every export: its numbers are the model's, and its Python code
runs (tiny generated images, random MobileNetV2 at 32 px)."""

import json
import re
import subprocess
import sys

import pytest

from featx.commands.export import export
from featx.commands.predict import predict
from featx.errors import FeatxError
from featx.reports import model_card
from featx.reports.evaluation import with_interval


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """The session's tiny logistic-regression head, exported once as a Keras model."""
    root = tmp_path_factory.mktemp("card")
    result = export(tiny_model.logreg, "keras", output=root / "export")
    return {
        "export": root / "export",
        "head": tiny_model.logreg,
        "data": tiny_model.data,
        "metrics": tiny_model.metrics,
        "result": result,
    }


def test_the_card_states_the_classes_data_metrics_and_input_contract(exported):
    card = (exported["export"] / "README.md").read_text()
    m = exported["metrics"]
    assert card.startswith(model_card.MARKER)
    assert "1. cats\n2. dogs" not in card and "0. cats\n1. dogs" in card  # output order
    assert "| cats | 10 | 4 |" in card and "| **total** | 20 | 8 |" in card
    v = m["validation"]
    assert (
        f"| validation | {v['n']} | {with_interval(v, 'accuracy')} | "
        f"{with_interval(v, 'balanced_accuracy')} | "
        f"{v['macro_f1']:.4f} | {v['log_loss']:.4f} |" in card
    )
    assert "float32 tensor of shape `(batch, 32, 32, 3)`" in card and "**not normalised**" in card
    assert "`(batch, 2)` softmax probabilities in the order of `labels.txt`" in card
    assert 'keras.saving.load_model("model.keras")' in card
    assert "--format tflite" in card  # how to get a file for Android
    assert json.loads((exported["export"] / "export.json").read_text())["model_card"] == (
        "README.md"
    )


@pytest.mark.slow
@pytest.mark.parametrize("model_format", ["keras", "savedmodel", "tflite", "onnx"])
def test_the_python_code_of_each_card_runs_as_printed_and_agrees_with_predict(
    exported, model_format, tmp_path
):
    """#26 item 5: the snippet runs where featx is installed (TFLite: LiteRT when installed, else
    TensorFlow's interpreter; ONNX: ONNX Runtime, of the onnx extra)."""
    if model_format == "keras":
        folder = exported["export"]
    else:
        folder = tmp_path / model_format
        export(exported["head"], model_format, output=folder)
    card = (folder / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", card, re.S)
    photo = exported["data"] / "validation" / "dogs" / "dogs01.jpg"
    (folder / "photo.jpg").write_bytes(photo.read_bytes())
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    label, probability = out.stdout.split()[-2:]
    row = predict(folder, [str(photo)], engine="keras")["rows"][0]
    assert label == row["predicted"]
    assert float(probability) == pytest.approx(row["probability"], abs=1e-3)


def test_a_tflite_card_shows_the_interpreter_and_android_code(exported):
    info = json.loads((exported["export"] / "export.json").read_text())
    info.update(model_format="tflite", model_file="model.tflite", quantize="dynamic")
    card = model_card.render(info, exported["head"])
    assert "dynamic quantized" in card and 'Interpreter(model_path="model.tflite")' in card
    assert "```kotlin" in card and "ByteBuffer.allocateDirect(4 * 32 * 32 * 3)" in card
    assert "FloatArray(2)" in card and "no TFLite metadata" in card


def test_a_readme_of_the_user_in_the_output_folder_is_never_replaced(exported, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    with pytest.raises(FeatxError, match="holds files featx did not write"):
        export(exported["head"], "keras", output=out)
    assert (out / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]  # refused before any work
    with pytest.raises(FeatxError, match="is already an export"):
        export(exported["export"], "keras", output=tmp_path / "again")


def test_html_in_a_class_name_is_escaped_in_the_card(exported):
    """#27 item 7: Markdown renders raw HTML, so a class name never reaches the card as HTML."""
    info = json.loads((exported["export"] / "export.json").read_text())
    info["class_names"] = ["<img src=x onerror=alert(1)>", "dogs|cats"]
    card = model_card.render(info, exported["head"])
    assert "<img" not in card and "&lt;img src=x onerror=alert(1)&gt;" in card
    assert "0. &lt;img" in card and "1. dogs&#124;cats" in card
