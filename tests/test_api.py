"""The package's face (#24): `import featx` is instant, the commands are top-level functions with
the CLI's options and defaults, and `featx.load(MODEL_DIR)` classifies images an application
already holds exactly as `featx predict` classifies files."""

import html
import importlib
import inspect
import json
import pkgutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import COLOURS, write_image
from PIL import Image

import featx
from featx.errors import FeatxError
from featx.options import ExtractOptions, FinetuneOptions
from featx.reports.evaluation import with_interval

COMMANDS = ("extract", "merge", "info", "fit_head", "finetune", "predict", "export", "audit")
TINY_KERAS = dict(weights="none", alpha=0.35, image_size=32, engine="keras", batch_size=8)
HEAVY = ("tensorflow", "keras", "h5py", "sklearn", "scipy", "onnxruntime", "jax", "torch")


def test_import_featx_loads_nothing_heavy():
    code = (
        "import sys, json, featx; featx.__version__; featx.FeatxError; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_every_name_is_a_function_even_after_every_module_is_imported():
    # A module named like a command would replace the function with itself once imported.
    for info in pkgutil.walk_packages(featx.__path__, "featx."):
        importlib.import_module(info.name)
    for name in (*COMMANDS, "report", "load"):
        value = getattr(featx, name)
        assert inspect.isfunction(value), f"featx.{name} is {value!r}"
        assert value.__doc__ and len(value.__doc__) > 40, f"featx.{name} has no docstring"
    assert set(featx.__all__) >= {*COMMANDS, "report", "load", "FeatxError", "FeatxWarning"}
    assert issubclass(featx.FeatxWarning, UserWarning)
    with pytest.raises(AttributeError, match="no attribute 'extrct'"):
        featx.extrct  # noqa: B018


@pytest.mark.parametrize(("function", "options"), [("extract", ExtractOptions),
                                                   ("finetune", FinetuneOptions)])  # fmt: skip
def test_a_command_signature_lists_every_option_with_its_one_default(function, options):
    params = inspect.signature(getattr(featx, function)).parameters
    for field in options.__dataclass_fields__.values():
        assert params[field.name].default == field.default, field.name
        assert params[field.name].kind is inspect.Parameter.KEYWORD_ONLY
    assert "log" in params


def test_a_mistyped_option_is_one_error_with_the_near_match(tmp_path):
    with pytest.raises(FeatxError, match="Unknown option 'image_sise'; did you mean image_size"):
        featx.extract(tmp_path, image_sise=64)
    assert not list(tmp_path.iterdir())  # refused before any work


@pytest.fixture(scope="module")
def classifier(tiny_model):
    return featx.load(tiny_model.logreg)


def test_load_gives_the_probabilities_featx_predict_gives(tiny_model, classifier):
    files = sorted((tiny_model.data / "validation").rglob("*.jpg"))
    result = featx.predict(tiny_model.logreg, [str(f) for f in files], top_k=2)
    by_path = {r["path"]: r for r in result["rows"]}
    proba = classifier.predict_proba([str(f) for f in files])
    assert proba.shape == (len(files), 2) and np.allclose(proba.sum(axis=1), 1)
    names = list(classifier.classes_)
    for f, p in zip(files, proba):
        row = by_path[str(f)]
        expected = {c["class"]: c["probability"] for c in row["top_k"]}
        assert max(abs(p[names.index(c)] - q) for c, q in expected.items()) <= 1e-4
    assert list(classifier.predict([str(f) for f in files])) == [
        by_path[str(f)]["predicted"] for f in files
    ]


def test_paths_pil_images_and_arrays_agree(tmp_path, classifier):
    # PNG: lossless, so a PIL image and its array are the file's exact pixels.
    path = write_image(tmp_path / "cat.png", COLOURS["cats"], seed=3, size=(40, 40), fmt="PNG")
    image = Image.open(path)
    before = np.asarray(image).copy()
    from_path = classifier.predict_proba(str(path))
    from_pil = classifier.predict_proba(image)
    from_array = classifier.predict_proba(np.asarray(Image.open(path)))
    assert from_path.shape == (1, 2)
    assert np.abs(from_path - from_pil).max() <= 1e-4
    assert np.abs(from_path - from_array).max() <= 1e-4
    assert np.array_equal(np.asarray(image), before)  # the caller's image is not changed
    many = classifier.predict_proba([path, image, np.asarray(image)] * 7)  # several batches
    assert many.shape == (21, 2) and np.abs(many - from_path).max() <= 1e-4
    assert classifier.predict(path)[0] in classifier.classes_


def test_grey_and_rgba_arrays_are_images_too(classifier):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (30, 50), dtype=np.uint8)
    rgba = rng.integers(0, 255, (30, 50, 4), dtype=np.uint8)
    assert classifier.predict_proba([grey, rgba]).shape == (2, 2)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("no/such/photo.jpg", "Image not found: 'no/such/photo.jpg'"),
        (np.zeros((8, 8, 3), np.float32), "uint8 pixels"),
        (np.zeros((8, 8, 2), np.uint8), "HxW, HxWx3 or HxWx4"),
        (42, "Cannot classify a int: pass a path, a PIL image"),
    ],
)
def test_bad_images_are_one_line_errors(classifier, image, message):
    with pytest.raises(FeatxError, match=message):
        classifier.predict_proba([image])


def test_a_broken_file_names_itself(tmp_path, classifier):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(FeatxError, match=r"Cannot classify '.*broken.jpg': not an image"):
        classifier.predict(str(broken))


def test_the_classifier_says_what_it_is(tiny_model, classifier):
    text = repr(classifier)
    assert str(tiny_model.logreg) in text and "cats" in text and "kind='head'" in text
    assert list(classifier.classes_) == tiny_model.metrics["class_names"]
    with pytest.raises(FeatxError, match="batch_size must be"):
        featx.load(tiny_model.logreg, batch_size=0)


# --- warnings, logging, progress and display ------------------------------------------------------


def leaky_data(root):
    """train/validation folders where one validation photo is a byte copy of a train photo."""
    from helpers import write_split_data

    data = write_split_data(root, train=6, validation=3)
    source = data / "train" / "cats" / "cats00.jpg"
    (data / "validation" / "cats" / "copy-of-cats00.jpg").write_bytes(source.read_bytes())
    return data


def test_a_copy_across_the_splits_is_a_featx_warning_and_in_the_result(tmp_path):
    data = leaky_data(tmp_path / "data")
    featx.extract(data, tmp_path / "c.h5", progress=False, **TINY_KERAS)
    with pytest.warns(featx.FeatxWarning, match="in both train and validation"):
        metrics = featx.fit_head(tmp_path / "c.h5", output=tmp_path / "head", C=1.0)
    assert any("in both train and validation" in w for w in metrics["warnings"])
    written = json.loads((tmp_path / "head" / "metrics.json").read_text())
    assert written["warnings"] == metrics["warnings"]


def test_messages_go_to_logging_and_warnings_or_to_the_callers_log(caplog):
    from featx.errors import Messages

    quiet = Messages()
    with caplog.at_level("INFO", logger="featx"):
        quiet("note: something worth knowing")
    assert caplog.records[-1].getMessage() == "note: something worth knowing"
    with pytest.warns(featx.FeatxWarning, match="^a data problem$"):
        quiet("warning: a data problem")
    assert quiet.warnings == ["a data problem"]
    lines = []
    cli_like = Messages(lines.append)
    cli_like("warning: shown once")
    cli_like.warning("the summary says it", summary_shows=True)
    assert lines == ["warning: shown once"]
    assert cli_like.warnings == ["shown once", "the summary says it"]


def test_progress_true_false_and_a_function(tmp_path, capsys):
    from helpers import write_split_data

    data = write_split_data(tmp_path / "data", train=4, validation=2)
    calls = []
    featx.extract(data, tmp_path / "a.h5", progress=lambda *a: calls.append(a), **TINY_KERAS)
    assert calls and calls[-1][:2] == (12, 12) and calls[-1][2] > 0
    capsys.readouterr()
    featx.extract(data, tmp_path / "b.h5", progress=False, **TINY_KERAS)
    assert "extracting" not in capsys.readouterr().err
    featx.extract(data, tmp_path / "c.h5", **TINY_KERAS)  # the default: a bar (here: a line)
    err = capsys.readouterr().err
    assert "extracting 12/12, " in err and "images/s" in err
    with pytest.raises(FeatxError, match="progress must be True, False or a function"):
        featx.extract(data, tmp_path / "d.h5", progress="yes", **TINY_KERAS)


def test_results_are_dicts_that_show_themselves_in_a_notebook(tiny_model, tmp_path):
    summary = featx.extract(tiny_model.data, tmp_path / "c.h5", progress=False, **TINY_KERAS)
    assert isinstance(summary, dict) and json.loads(json.dumps(summary))["images"] == 28
    page = summary._repr_html_()
    assert "<table>" in page and "validation" in page and "extracted 28" in page
    metrics = featx.fit_head(tmp_path / "c.h5", output=tmp_path / "head", C=1.0)
    page = metrics._repr_html_()
    assert "balanced accuracy" in page and "predicted cats" in page and "true dogs" in page
    assert html.escape(with_interval(metrics["validation"], "accuracy")) in page
    for w in metrics["warnings"]:
        assert html.escape(w) in page
    result = featx.predict(tmp_path / "head", [str(tiny_model.data / "validation")], progress=False)
    assert "predicted" in result._repr_html_() and len(result["rows"]) == 8
    import pickle

    again = pickle.loads(pickle.dumps(metrics))
    assert again == metrics and again._repr_html_() == page
