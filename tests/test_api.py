"""The package's face (#24): `import featx` is instant, the commands are top-level functions with
the CLI's options and defaults, and `featx.load(MODEL_DIR)` classifies images an application
already holds exactly as `featx predict` classifies files."""

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

COMMANDS = ("extract", "merge", "info", "fit_head", "finetune", "predict", "export", "audit")
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
