"""The import budget of each command (#25): what a command loads is what its user waits for.

Each case runs one command in a fresh Python process and reads `sys.modules` when it is done:
not a timing test (the machine is too noisy for one), a test of which heavy libraries load.
- `--help`, `info`, `report`, `merge` and every argument error load none of TensorFlow, Keras,
  scikit-learn, SciPy or ONNX Runtime;
- `predict` and `featx.load` of a logistic-regression head on the ONNX engine load no TensorFlow,
  Keras, scikit-learn or SciPy: the head's scaling and coefficients are applied with numpy;
- `audit` loads no TensorFlow or Keras.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import TINY, write_images

from featx.artifacts import model_dirs

HEAVY = ("tensorflow", "keras", "sklearn", "scipy", "onnxruntime")
NO_TF = ("tensorflow", "keras")
PREDICT_HEAVY = ("tensorflow", "keras", "sklearn", "scipy")

# Runs `featx ARGS` (or, with "--api", featx.load on a head and one image) and writes
# {"code": exit status, "loaded": the top-level packages in sys.modules} to the file OUT.
RUN = textwrap.dedent(
    """
    import json, sys
    out, args = sys.argv[1], json.loads(sys.argv[2])
    code = 0
    try:
        if args[0] == "--api":
            import featx
            import numpy as np
            classifier = featx.load(args[1], engine="onnx")
            size = classifier.image_size
            classifier.predict_proba(np.zeros((1, size, size, 3), np.uint8))
        else:
            from featx.cli import main
            sys.argv = ["featx", *args]
            main()
    except SystemExit as e:
        code = e.code
    loaded = sorted({name.split(".")[0] for name in sys.modules})
    with open(out, "w") as f:
        json.dump({"code": code, "loaded": loaded}, f)
    """
)


def loaded_by(tmp_path, *args) -> tuple[int, set[str]]:
    """(exit status, top-level modules loaded) of one command in a fresh process."""
    out = tmp_path / "modules.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}
    done = subprocess.run(
        [sys.executable, "-c", RUN, str(out), json.dumps([str(a) for a in args])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.is_file(), done.stderr[-2000:]
    result = json.loads(out.read_text())
    return result["code"], set(result["loaded"])


def assert_none_of(loaded: set[str], heavy: tuple[str, ...]) -> None:
    assert not loaded & set(heavy), f"loaded {sorted(loaded & set(heavy))}"


@pytest.fixture(scope="module")
def onnx_backbone(tiny_model, featx_home):
    """The tiny backbone's .onnx file in this session's FEATX_HOME (made once, here)."""
    pytest.importorskip("onnxruntime")
    from featx.backbone import onnx_engine
    from featx.backbone.mobilenet import BackboneSpec

    engine = onnx_engine.OnnxEngine(BackboneSpec(**TINY))
    engine.load()
    return engine.path


def test_help_and_version_load_nothing_heavy(tmp_path):
    for args in (["--help"], ["--version"], ["predict", "--help"], ["extract", "--help"]):
        code, loaded = loaded_by(tmp_path, *args)
        assert code == 0, args
        assert_none_of(loaded, HEAVY)


def test_info_loads_nothing_heavy(tmp_path, tiny_model):
    code, loaded = loaded_by(tmp_path, "info", tiny_model.cache)
    assert code == 0
    assert_none_of(loaded, HEAVY)


def test_report_loads_nothing_heavy(tmp_path, tiny_model):
    import shutil

    folder = shutil.copytree(tiny_model.logreg, tmp_path / "logreg")
    code, loaded = loaded_by(tmp_path, "report", folder)
    assert code == 0 and (folder / "report.html").is_file()
    assert_none_of(loaded, HEAVY)


def test_merge_loads_nothing_heavy(tmp_path, fake_engine):
    from featx.commands.extract import extract

    data = write_images(tmp_path / "data", {"cats": 4, "dogs": 4}, noise=30)
    shards = [tmp_path / f"s{k}.h5" for k in range(2)]
    for k, path in enumerate(shards):
        extract(data, path, engine="keras", batch_size=8, shard=f"{k}/2", **TINY)
    code, loaded = loaded_by(tmp_path, "merge", tmp_path / "merged.h5", *shards)
    assert code == 0 and (tmp_path / "merged.h5").is_file()
    assert_none_of(loaded, HEAVY)


@pytest.mark.parametrize(
    "args",
    [
        ["extract", "no-such-folder"],
        ["extract", "{data}", "--batch-size", "0"],
        ["fit-head", "no-such.h5"],
        ["fit-head", "{cache}", "--head", "dense", "--dropout", "50"],
        ["fit-head", "{cache}", "--head", "logreg", "--C", "-1"],
        ["finetune", "no-such-folder"],
        ["predict", "no-such-folder", "x.jpg"],
        ["predict", "{logreg}", "no-such.jpg", "--top-k", "0"],
        ["audit", "no-such.h5"],
        ["export", "no-such-folder", "--output", "out"],
        ["info", "no-such.h5"],
    ],
    ids=lambda args: " ".join(args),
)
def test_an_argument_error_loads_nothing_heavy(tmp_path, tiny_model, args):
    paths = {"data": tiny_model.data, "cache": tiny_model.cache, "logreg": tiny_model.logreg}
    code, loaded = loaded_by(tmp_path, *[a.format(**paths) for a in args])
    assert code not in (0, None), args
    assert_none_of(loaded, HEAVY)


def test_predict_of_a_logreg_head_on_onnx_loads_no_tensorflow_or_scikit_learn(
    tmp_path, tiny_model, onnx_backbone
):
    image = next((tiny_model.data / "validation" / "cats").glob("*.jpg"))
    args = ["predict", tiny_model.logreg, image, "--engine", "onnx", "--output", tmp_path / "p.csv"]
    code, loaded = loaded_by(tmp_path, *args)
    assert code == 0 and (tmp_path / "p.csv").is_file()
    assert "onnxruntime" in loaded  # the backbone did run
    assert_none_of(loaded, PREDICT_HEAVY)
    assert "pillow_heif" not in loaded  # a JPEG needs no HEIF plugin (20 ms of ~300)


def test_featx_load_of_a_logreg_head_on_onnx_loads_no_tensorflow_or_scikit_learn(
    tmp_path, tiny_model, onnx_backbone
):
    assert model_dirs.model_kind(tiny_model.logreg) == "head"
    code, loaded = loaded_by(tmp_path, "--api", tiny_model.logreg)
    assert code == 0 and "onnxruntime" in loaded
    assert_none_of(loaded, PREDICT_HEAVY)


def test_audit_loads_no_tensorflow(tmp_path, tiny_model):
    code, loaded = loaded_by(tmp_path, "audit", tiny_model.cache, "--output", tmp_path / "audit")
    assert code == 0
    assert_none_of(loaded, NO_TF)
