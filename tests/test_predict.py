"""featx predict: files, folders and globs through the extraction pipeline and a trained model
(tiny generated images, random MobileNetV2 at 32 px; one test with the real weights and photos)."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import COLOURS, REAL_DATA, assert_one_line_error, link_real_photos, write_split_data

from featx import config
from featx.backbone import mobilenet
from featx.cache import store
from featx.cli import cli
from featx.commands.extract import extract
from featx.commands.fit_head import fit_head
from featx.commands.predict import csv_columns, expand_paths, predict
from featx.errors import FeatxError
from featx.heads import estimators

ROW_KEYS = ["path", "predicted", "probability", "top_k", "unknown", "novelty", "label", "error"]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """The session's tiny model: its data folder, cache and fit-head logistic regression."""
    return {
        "root": tiny_model.root,
        "data": tiny_model.data,
        "cache": tiny_model.cache,
        "head": tiny_model.logreg,
        "metrics": tiny_model.metrics,
    }


def run(model_dir, paths, **kwargs):
    return predict(model_dir, paths, engine="keras", batch_size=4, **kwargs)


def cached_proba(tiny) -> dict[str, np.ndarray]:
    """The head's probabilities on the cached features, by absolute image path."""
    cache = store.read_cache(tiny["cache"])
    head, _ = estimators.load_head(tiny["head"])
    proba = head.predict_proba(cache.features)
    return {str(tiny["data"] / p): proba[i] for i, p in enumerate(cache.paths)}


def test_files_folders_and_globs_give_one_row_per_file_like_the_cached_features(tiny):
    data = tiny["data"]
    one = data / "train" / "cats" / "cats03.jpg"
    result = run(
        tiny["head"],
        [str(one), str(data / "validation"), str(data / "train" / "dogs" / "dogs0[0-2].jpg")],
    )
    paths = [r["path"] for r in result["rows"]]
    validation = sorted(str(p) for p in (data / "validation").rglob("*.jpg"))
    globbed = [str(data / "train" / "dogs" / f"dogs0{i}.jpg") for i in range(3)]
    assert paths == [str(one), *validation, *globbed]
    assert result["images"] == result["predicted"] == 12 and result["errors"] == 0
    expected = cached_proba(tiny)  # extraction's loader, preprocessing and backbone
    for r in result["rows"]:
        assert list(r) == ROW_KEYS and r["error"] is None
        probs = [t["probability"] for t in r["top_k"]]
        assert [t["class"] for t in r["top_k"]] == sorted(
            COLOURS, key=lambda c: -expected[r["path"]][list(COLOURS).index(c)]
        )
        np.testing.assert_allclose(probs, sorted(expected[r["path"]], reverse=True), atol=1e-4)
        assert r["predicted"] == r["top_k"][0]["class"] and r["probability"] == probs[0]
    assert [r["label"] for r in result["rows"]] == [Path(p).parent.name for p in paths]


def test_a_file_given_twice_is_predicted_once_and_hidden_files_are_skipped(tiny, tmp_path):
    folder = tmp_path / "new"
    shutil.copytree(tiny["data"] / "validation" / "cats", folder / "cats")
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / ".hidden").mkdir()
    shutil.copy(folder / "cats" / "cats00.jpg", folder / ".hidden" / "x.jpg")
    result = run(tiny["head"], [str(folder), str(folder / "cats" / "cats00.jpg")])
    assert [Path(r["path"]).name for r in result["rows"]] == [f"cats{i:02d}.jpg" for i in range(4)]


def test_bad_and_missing_files_get_error_rows_and_the_rest_is_predicted(tiny, tmp_path):
    folder = tmp_path / "mixed" / "cats"
    shutil.copytree(tiny["data"] / "validation" / "cats", folder)
    good = (folder / "cats00.jpg").read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not pixels")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = run(tiny["head"], [str(folder), str(tmp_path / "gone.jpg"), str(tmp_path / "*.png")])
    rows = {Path(r["path"]).name: r for r in result["rows"]}
    assert result["predicted"] == 4 and result["errors"] == 5
    assert rows["empty.jpg"]["error"] == "empty file (0 bytes)"
    assert "not an image" in rows["notes.jpg"]["error"]
    assert "truncated" in rows["truncated.jpg"]["error"]
    assert rows["gone.jpg"]["error"] == "file not found"
    assert rows["*.png"]["error"] == "no file matches this pattern"
    for name in ("empty.jpg", "notes.jpg", "truncated.jpg", "gone.jpg", "*.png"):
        assert rows[name]["predicted"] is None and rows[name]["top_k"] == []
    assert all(rows[f"cats{i:02d}.jpg"]["predicted"] == "cats" for i in range(4))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # never modified

    ok = CliRunner().invoke(cli, ["predict", str(tiny["head"]), str(folder), "--engine", "keras"])
    assert ok.exit_code == 0, ok.output
    assert "error: empty file (0 bytes)" in ok.output
    assert "predicted 4 of 7 images (3 failed" in ok.output


def test_nothing_predictable_fails_with_the_reasons_after_writing_the_rows(tiny, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("no")
    out = tmp_path / "rows.csv"
    with pytest.raises(FeatxError, match=r"None of the 2 files.*bad\.jpg: not an image"):
        run(tiny["head"], [str(bad), str(tmp_path / "gone.jpg")], output=out)
    assert len(list(csv.DictReader(out.open()))) == 2
    res = CliRunner().invoke(cli, ["predict", str(tiny["head"]), str(bad), "--engine", "keras"])
    assert_one_line_error(res, "None of the 1 files")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(FeatxError, match="No image files found"):
        run(tiny["head"], [str(empty)])


def test_csv_output_has_one_flat_row_per_image(tiny, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("no")
    out = tmp_path / "out" / "preds.csv"
    result = run(tiny["head"], [str(tiny["data"] / "validation"), str(bad)], output=out, top_k=5)
    with out.open() as fh:
        reader = csv.DictReader(fh)
        assert (
            reader.fieldnames
            == csv_columns(2)
            == [
                "path",
                "predicted",
                "probability",
                "unknown",
                "novelty",
                "top1",
                "top1_probability",
                "top2",
                "top2_probability",
                "label",
                "error",
            ]
        )  # top_k=5 is capped at the 2 classes
        lines = list(reader)
    assert len(lines) == 9
    for line, row in zip(lines, result["rows"]):
        assert line["path"] == row["path"]
        if row["error"]:
            assert line["predicted"] == line["probability"] == line["top1"] == ""
            assert line["error"] == row["error"]
            continue
        assert line["predicted"] == line["top1"] == row["predicted"] == line["label"]
        p1, p2 = float(line["top1_probability"]), float(line["top2_probability"])
        assert float(line["probability"]) == p1 == row["probability"] and p1 >= p2
        assert p1 + p2 == pytest.approx(1.0, abs=2e-6)


def test_the_json_file_holds_the_object_that_json_prints(tiny, tmp_path):
    out = tmp_path / "preds.json"
    folder = str(tiny["data"] / "validation" / "dogs")
    result = run(tiny["head"], [folder], output=out, top_k=1)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result)) and written["output"] == str(out)
    assert len(written["rows"]) == 4 and written["predicted"] == 4
    for r in written["rows"]:
        assert list(r) == ROW_KEYS
        assert r["label"] == r["predicted"] == "dogs" and r["error"] is None
        assert r["top_k"] == [{"class": "dogs", "probability": r["probability"]}]
    args = ["predict", str(tiny["head"]), folder, "--engine", "keras", "--top-k", "1"]
    printed = CliRunner().invoke(cli, [*args, "--json", "--output", str(tmp_path / "cli.json")])
    assert printed.exit_code == 0, printed.output
    from_file = json.loads((tmp_path / "cli.json").read_text())
    from_stdout = json.loads(printed.output)
    for d in (from_file, from_stdout):
        d.pop("seconds"), d.pop("images_per_second")
    assert from_file == from_stdout and from_file["rows"] == written["rows"]
    res = CliRunner().invoke(cli, ["predict", str(tiny["head"]), "x.jpg", "--output", "p.txt"])
    assert res.exit_code == 1 and "name it .csv or .json" in res.output


def test_min_confidence_predicts_unknown_below_it_and_keeps_the_probabilities(tiny, tmp_path):
    folder = [str(tiny["data"] / "validation")]
    plain = run(tiny["head"], folder)
    top = sorted(r["probability"] for r in plain["rows"])
    cut = (top[3] + top[4]) / 2  # between the 4th and 5th most uncertain of 8 rows
    result = run(tiny["head"], folder, min_confidence=cut)
    assert result["below_min_confidence"] == 4 and result["min_confidence"] == cut
    for a, b in zip(plain["rows"], result["rows"]):
        assert a["probability"] == b["probability"] and a["top_k"] == b["top_k"]
        assert b["predicted"] == (
            config.UNKNOWN_CLASS if a["probability"] < cut else a["predicted"]
        )
    # Unknown rows count as wrong: at most the 4 confident rows can be right.
    assert result["correct"] == sum(
        r["predicted"] == r["label"] for r in plain["rows"] if r["probability"] >= cut
    )
    assert result["accuracy"] == result["correct"] / 8
    out = tmp_path / "p.csv"
    args = ["predict", str(tiny["head"]), *folder, "--engine", "keras", "--output", str(out)]
    res = CliRunner().invoke(cli, [*args, "--min-confidence", str(cut)])
    assert res.exit_code == 0, res.output
    assert f"4 below --min-confidence {cut:g}: predicted 'unknown'" in res.output
    lines = list(csv.DictReader(out.open()))
    assert sum(line["predicted"] == "unknown" for line in lines) == 4
    assert all(float(line["probability"]) > 0 for line in lines)
    res = CliRunner().invoke(cli, ["predict", str(tiny["head"]), *folder, "--min-confidence", "2"])
    assert isinstance(res.exception, SystemExit) and res.exit_code == 1
    assert "--min-confidence is a probability between 0 and 1, got 2.0" in res.output


@pytest.mark.slow
def test_an_export_folder_predicts_like_the_model_it_was_exported_from(tiny, tmp_path):
    from featx.commands.export import export

    export(tiny["head"], "keras", output=tmp_path / "exported")
    folder = [str(tiny["data"] / "validation")]
    exported, head = run(tmp_path / "exported", folder), run(tiny["head"], folder)
    assert exported["kind"] == "export" and exported["engine"] == "keras"
    for a, b in zip(exported["rows"], head["rows"]):
        assert a["path"] == b["path"] and a["predicted"] == b["predicted"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)
    assert exported["accuracy"] == head["accuracy"]
    (tmp_path / "exported" / "model.keras").unlink()
    with pytest.raises(
        FeatxError, match="incomplete .model.keras, listed in featx-files.json, is missing"
    ):
        run(tmp_path / "exported", folder)


def test_accuracy_is_printed_for_class_folders_and_matches_the_validation_metrics(tiny, tmp_path):
    args = ["predict", str(tiny["head"]), str(tiny["data"] / "validation"), "--engine", "keras"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    n = tiny["metrics"]["validation"]["n"]
    correct = round(tiny["metrics"]["validation"]["accuracy"] * n)
    assert f"accuracy {correct / n:.4f} ({correct}/{n} images" in res.output
    assert len([line for line in res.output.splitlines() if ".jpg" in line]) == n

    # Folders that are not class names: no accuracy.
    elsewhere = tmp_path / "inbox"
    shutil.copytree(tiny["data"] / "validation" / "cats", elsewhere)
    res = CliRunner().invoke(
        cli, ["predict", str(tiny["head"]), str(elsewhere), "--engine", "keras"]
    )
    assert res.exit_code == 0 and "predicted 4 of 4" in res.output
    assert not [line for line in res.output.splitlines() if line.startswith("accuracy")]
    # A wrong folder name counts as wrong: dogs filed under cats.
    wrong = tmp_path / "sorted" / "cats"
    shutil.copytree(tiny["data"] / "validation" / "dogs", wrong)
    result = run(tiny["head"], [str(tmp_path / "sorted")])
    assert result["accuracy"] == 0.0 and result["labelled"] == 4


def test_a_head_fitted_with_mirror_images_predicts_from_the_mean_of_both_views(tiny_flip, tmp_path):
    data, cache_path = tiny_flip.data, tiny_flip.cache
    metrics = fit_head(cache_path, "logreg", tmp_path / "head", C=1.0, scaling="standard")
    assert metrics["fitted"]["flip"] is True
    result = run(tmp_path / "head", [str(data / "validation")])
    cache = store.read_cache(cache_path)
    head, _ = estimators.load_head(tmp_path / "head")
    both = head.predict_proba(estimators.flip_views(cache.features, cache.features_flip))
    one = head.predict_proba(cache.features)
    assert np.abs(both - one).max() > 1e-3  # the views differ enough for this test to tell
    row = {str(data / p): i for i, p in enumerate(cache.paths)}
    for r in result["rows"]:
        expected = both[row[r["path"]]]
        got = [t["probability"] for t in r["top_k"]]
        np.testing.assert_allclose(got, sorted(expected, reverse=True), atol=1e-4)
    assert result["accuracy"] == metrics["validation"]["accuracy"]


def test_cli_json_and_progress_on_large_inputs(tiny, monkeypatch):
    args = ["predict", str(tiny["head"]), str(tiny["data"] / "train"), "--engine", "keras"]
    res = CliRunner().invoke(cli, [*args, "--json", "--top-k", "1"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["predicted"] == 20 and result["kind"] == "head" and result["engine"] == "keras"
    assert all(len(r["top_k"]) == 1 for r in result["rows"])

    calls = []
    monkeypatch.setattr(config, "PREDICT_PROGRESS_MIN", 10)
    run(tiny["head"], [str(tiny["data"] / "train")], progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(k, 20) for k in range(4, 21, 4)]
    calls.clear()
    run(tiny["head"], [str(tiny["data"] / "validation")], progress=lambda *a: calls.append(a))
    assert calls == []  # 8 images: below the threshold, no bar


@pytest.mark.slow
def test_a_finetune_output_predicts_like_its_warm_start_head(tiny, tmp_path):
    from featx.commands.finetune import finetune

    out = tmp_path / "ft"
    finetune(tiny["cache"], tiny["head"], out, epochs=0, batch_size=8)  # the warm start only
    assert (out / "finetune.json").is_file() and (out / "model.keras").is_file()
    folder = [str(tiny["data"] / "validation")]
    tuned, head = run(out, folder), run(tiny["head"], folder)
    assert tuned["kind"] == "finetune" and [r["path"] for r in tuned["rows"]] == [
        r["path"] for r in head["rows"]
    ]
    for a, b in zip(tuned["rows"], head["rows"]):
        assert a["predicted"] == b["predicted"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-3)
    assert tuned["accuracy"] == head["accuracy"]


def test_the_onnx_engine_predicts_the_same_without_importing_tensorflow(tiny):
    folder = [str(tiny["data"] / "validation")]
    onnx = predict(tiny["head"], folder, engine="onnx")  # exports the backbone once per user
    assert onnx["engine"] == "onnx"
    assert list(Path(os.environ["FEATX_HOME"]).glob("backbone-*.onnx"))  # shared with extract
    assert not list(tiny["root"].glob("backbone-*.onnx"))
    for a, b in zip(onnx["rows"], run(tiny["head"], folder)["rows"]):
        assert a["path"] == b["path"] and a["predicted"] == b["predicted"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-3)
    code = (
        "import json, sys; from featx.commands.predict import predict; "
        f"r = predict({str(tiny['head'])!r}, {folder!r}, engine='onnx'); "
        "print(json.dumps([r['accuracy'], 'tensorflow' in sys.modules, 'keras' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [onnx["accuracy"], False, False]


def test_an_onnx_file_of_an_older_version_is_looked_for_next_to_the_heads_cache(tiny, tmp_path):
    from featx.artifacts.classifier import _onnx_dirs

    moved = tmp_path / "models" / "cats"  # a head moved away from its cache
    shutil.copytree(tiny["head"], moved)
    meta = json.loads((moved / "head.json").read_text())
    assert meta["cache"] == str(Path(tiny["cache"]).resolve())
    assert _onnx_dirs(moved, meta) == [Path(tiny["cache"]).resolve().parent, moved.parent]
    assert _onnx_dirs(moved, {**meta, "cache": str(tmp_path / "gone" / "c.h5")}) == [moved.parent]


@pytest.mark.slow
def test_a_head_is_refused_when_the_backbone_weights_changed(tmp_path):
    weights = tmp_path / "mine.weights.h5"
    base = mobilenet.build_base("none", 32, 0.35)
    base.save_weights(weights)
    data = write_split_data(tmp_path / "data")
    cache_path = tmp_path / "c.h5"
    extract(data, cache_path, weights=str(weights), alpha=0.35, image_size=32, engine="keras")
    fit_head(cache_path, "logreg", tmp_path / "head", C=1.0)
    image = str(data / "validation" / "cats" / "cats00.jpg")
    assert run(tmp_path / "head", [image])["predicted"] == 1

    kernel = base.layers[1]  # Conv1: change one weight, keep the file name
    kernel.set_weights([w + 0.01 for w in kernel.get_weights()])
    base.save_weights(weights)
    with pytest.raises(FeatxError, match="made with another backbone.*weights_sha256"):
        run(tmp_path / "head", [image])
    res = CliRunner().invoke(cli, ["predict", str(tmp_path / "head"), image, "--engine", "keras"])
    assert res.exit_code == 1 and "Restore those weights" in res.output
    os.remove(weights)
    with pytest.raises(FeatxError, match="needs the backbone weights.*not found"):
        run(tmp_path / "head", [image])


def test_bad_model_folders_and_options_are_clear_errors(tiny, tmp_path):
    image = str(tiny["data"] / "validation" / "cats" / "cats00.jpg")
    with pytest.raises(FeatxError, match="Model folder not found"):
        run(tmp_path / "nope", [image])
    with pytest.raises(FeatxError, match="neither head.json.*nor finetune.json"):
        run(tiny["data"], [image])
    with pytest.raises(FeatxError, match="top_k must be an integer >= 1"):
        run(tiny["head"], [image], top_k=0)
    res = CliRunner().invoke(cli, ["predict", str(tiny["head"])])
    assert res.exit_code == 2 and "Missing argument" in res.output


def test_expand_paths_recurses_keeps_order_and_names_the_class_folders(tmp_path):
    for rel in ("a/cats/x.jpg", "a/cats/deep/y.jpg", "a/dogs/z.png", "b.jpg", "a/.h/q.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    found = expand_paths([str(tmp_path / "a"), str(tmp_path / "*.jpg"), str(tmp_path / "b.jpg")])
    rel = [os.path.relpath(t.path, tmp_path) for t in found]
    assert rel == ["a/cats/x.jpg", "a/cats/deep/y.jpg", "a/dogs/z.png", "b.jpg"]
    assert [t.folders for t in found] == [
        ("cats", "a"),
        ("deep", "cats", "a"),
        ("dogs", "a"),
        (tmp_path.name,),
    ]
    recursive = expand_paths([str(tmp_path / "**" / "*.jpg")])
    assert {os.path.relpath(t.path, tmp_path) for t in recursive} == {
        "a/cats/x.jpg",
        "a/cats/deep/y.jpg",
        "b.jpg",
    }
    os.mkfifo(tmp_path / "pipe.jpg")  # reading it would block: refused up front
    assert expand_paths([str(tmp_path / "pipe.jpg")])[0].error == "not a regular file"


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"real photos not found at {REAL_DATA}")
def test_real_validation_folder_accuracy_equals_the_fit_head_metrics(tmp_path):
    """60+60 train and 40+40 validation real photos: extract, fit-head, predict the folder."""
    try:
        mobilenet.resolve_weights("imagenet", 224, 1.0)
    except FeatxError as e:
        pytest.skip(f"ImageNet weights unavailable: {e}")
    data = link_real_photos(tmp_path / "data", {"train": 60, "validation": 40})
    extract(data, tmp_path / "real.h5", engine="keras")
    metrics = fit_head(tmp_path / "real.h5", "logreg", tmp_path / "head")
    result = predict(tmp_path / "head", [str(data / "validation")], engine="keras")
    assert result["labelled"] == metrics["validation"]["n"] == 80
    assert round(result["accuracy"], 6) == metrics["validation"]["accuracy"]
    assert result["accuracy"] >= 0.9  # real features separate cats from dogs
    wrong = {r["path"] for r in result["rows"] if r["predicted"] != r["label"]}
    listed = (tmp_path / "head" / "misclassified.csv").read_text()
    assert all(Path(p).name in listed for p in wrong)  # the same images are wrong
