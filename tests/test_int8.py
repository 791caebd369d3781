"""--precision int8: a quantized ONNX backbone pinned by sha256 in the fingerprint
(tiny generated images, random MobileNetV2 at 32 px)."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import TINY, assert_one_line_error, write_split_data

from featx.backbone import int8
from featx.cache import store
from featx.cli import cli
from featx.commands.export import export
from featx.commands.extract import extract
from featx.commands.finetune import finetune
from featx.commands.fit_head import fit_head
from featx.commands.predict import predict
from featx.errors import FeatxError
from featx.heads import estimators
from featx.images import finder

pytest.importorskip("onnxruntime", reason="--precision int8 needs `pip install 'featx[onnx]'`")


def int8_files(folder):
    return sorted(folder.glob("backbone-*-int8-*.onnx"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    data = write_split_data(root / "data")
    cache_path = root / "cache" / "tiny.h5"
    summary = extract(data, cache_path, engine="onnx", precision="int8", batch_size=8, **TINY)
    head = root / "cache" / "tiny-logreg"
    fit_head(cache_path, "logreg", head, C=1.0)
    return {"root": root, "data": data, "cache": cache_path, "head": head, "summary": summary}


def test_an_int8_cache_records_its_quantized_file(tiny):
    fp = store.read_cache(tiny["cache"], features=False).fingerprint
    (path,) = int8_files(tiny["cache"].parent)
    assert fp["precision"] == "int8" and fp["engine"] == "onnx"
    assert fp["int8_sha256"] == int8.onnx_engine.file_sha256(path)
    meta = json.loads(int8.onnx_engine.sidecar_path(path).read_text())
    assert meta["int8_sha256"] == fp["int8_sha256"] and meta["calibration_images"] == 20
    cache = store.read_cache(tiny["cache"])
    assert cache.features.shape == (28, 1280) and np.isfinite(cache.features).all()


def test_later_runs_reuse_the_same_file_and_never_mix_with_fp32(tiny, tmp_path):
    (path,) = int8_files(tiny["cache"].parent)
    stamp = path.stat().st_mtime_ns
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)  # copy2: same mtimes, so nothing counts as changed
    shutil.copy(data / "validation" / "cats" / "cats00.jpg", data / "train" / "cats" / "new.jpg")
    cache_path = tmp_path / "c.h5"
    for p in (path, int8.onnx_engine.sidecar_path(path)):
        shutil.copy2(p, tmp_path / p.name)
    shutil.copy2(tiny["cache"], cache_path)  # a cache is its main file and its part files
    parts = tiny["cache"].with_name(tiny["cache"].name + ".parts")
    shutil.copytree(parts, tmp_path / parts.name)
    summary = extract(data, cache_path, engine="auto", precision="int8", batch_size=8, **TINY)
    assert summary["extracted"] == 1 and summary["kept"] == 28  # the new training image only
    assert (
        store.read_cache(cache_path, features=False).fingerprint["int8_sha256"]
        == store.read_cache(tiny["cache"], features=False).fingerprint["int8_sha256"]
    )
    assert path.stat().st_mtime_ns == stamp and len(int8_files(tmp_path)) == 1
    with pytest.raises(FeatxError, match="precision: 'int8' vs 'fp32'.*--overwrite"):
        extract(data, cache_path, engine="onnx", batch_size=8, **TINY)
    with pytest.raises(FeatxError, match="--precision int8 runs on ONNX Runtime"):
        extract(data, cache_path, engine="keras", precision="int8", **TINY)
    for p in int8_files(tmp_path):
        p.unlink()
    with pytest.raises(FeatxError, match="The INT8 backbone this was made with .* --overwrite"):
        extract(data, cache_path, engine="onnx", precision="int8", **TINY)


def test_predict_uses_the_same_int8_file_and_the_float_commands_refuse(tiny, tmp_path):
    result = predict(tiny["head"], [str(tiny["data"] / "validation")])
    cache = store.read_cache(tiny["cache"])
    head = estimators.load_head(tiny["head"])[0]
    expected = head.predict_proba(cache.features[cache.splits == "validation"])
    got = np.array([r["probability"] for r in sorted(result["rows"], key=lambda r: r["path"])])
    paths = [p for p, s in zip(cache.paths, cache.splits) if s == "validation"]
    want = expected[np.argsort(paths)].max(1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert result["engine"] == "onnx"
    with pytest.raises(FeatxError, match="only the onnx engine computes"):
        predict(tiny["head"], [str(tiny["data"] / "validation")], engine="keras")
    with pytest.raises(FeatxError, match="fitted on int8 features; `featx finetune`"):
        finetune(tiny["cache"], tiny["head"], tmp_path / "ft", epochs=1)
    with pytest.raises(FeatxError, match="fitted on int8 features; `featx export`"):
        export(tiny["head"], "keras", output=tmp_path / "exp")


def test_cli_precision_option(tmp_path):
    data = write_split_data(tmp_path / "data", train=4, validation=2)
    args = ["extract", str(data), "--cache", str(tmp_path / "c.h5"), "--precision", "int8"]
    args += ["--weights", "none", "--alpha", "0.35", "--image-size", "32", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert store.read_cache(tmp_path / "c.h5", features=False).fingerprint["precision"] == "int8"
    assert json.loads(result.stdout)["precision"] == "int8"
    result = CliRunner().invoke(cli, [*args[:-1], "--engine", "keras"])
    assert_one_line_error(result, "--precision int8 runs on ONNX Runtime")


def test_calibration_never_uses_validation_images_of_a_flat_folder(tiny, tmp_path):

    for c in ("cats", "dogs"):  # a flat folder: featx splits it into train and validation
        shutil.copytree(tiny["data"] / "train" / c, tmp_path / "flat" / c)
    listing = finder.find_images(tmp_path / "flat")
    # The split a real extraction writes, not the same call the code makes.
    extract(tmp_path / "flat", tmp_path / "flat.h5", engine="keras", val_split=0.2, seed=0, **TINY)
    cache = store.read_cache(tmp_path / "flat.h5")
    validation = {p for p, s in zip(cache.paths, cache.splits) if s == "validation"}
    chosen = int8.calibration_files(listing, 100, 0.2, 0)
    assert len(validation) == 4 and len(chosen) == 16  # 20 images, 20 % held out
    assert not validation & {f.path for f in chosen}
    assert len(int8.calibration_files(listing, 5, 0.2, 0)) == 5  # capped, evenly spread
