"""Unknown images (#23): the novelty score fit-head stores with a head, its threshold, and what
predict and featx.load make of it (tiny generated images; one test with the real weights and
photos: a cats/dogs head flags other domains)."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import REAL_DATA, WEIGHTS_FILE, link_real_photos, write_image

import featx
from featx import config
from featx.commands.predict import predict
from featx.errors import FeatxError
from featx.heads import novelty


def _features(n, d=16, seed=0, shift=0.0):
    return np.random.default_rng(seed).normal(shift, 1.0, (n, d)).astype(np.float32)


def test_memory_is_unit_float16_and_capped_to_a_seeded_subset():
    X = _features(50)
    bank = novelty.memory(X, cap=20, seed=1)
    assert bank.dtype == np.float16 and bank.shape == (20, 16)
    np.testing.assert_allclose(np.linalg.norm(bank.astype(np.float32), axis=1), 1.0, atol=2e-3)
    np.testing.assert_array_equal(bank, novelty.memory(X, cap=20, seed=1))
    assert novelty.memory(X, cap=100).shape == (50, 16)


def test_nearest_distance_is_zero_on_the_training_rows_and_grows_away_from_them():
    X = _features(40)
    bank = novelty.memory(X)
    assert np.abs(novelty.nearest_distance(bank, X)).max() < 2e-3
    far = novelty.nearest_distance(bank, _features(40, seed=2, shift=5.0))
    near = novelty.nearest_distance(bank, X + 0.05 * _features(40, seed=3))
    assert near.max() < far.min()


def test_threshold_flags_the_rate_of_known_images_and_moves_with_the_rate():
    rng = np.random.default_rng(0)
    distance = rng.random(1000)
    proba = rng.dirichlet([1, 1, 1], 1000)
    state = novelty.calibrate(novelty.memory(_features(5)), distance, proba, rate=0.05)
    fused = state.known
    assert (fused > state.threshold).mean() == pytest.approx(0.05, abs=0.002)
    looser = state.with_rate(0.2)
    assert (fused > looser.threshold).mean() == pytest.approx(0.2, abs=0.002)
    assert looser.threshold < state.threshold and looser.rate == 0.2


def test_auroc_matches_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    known = np.array([0.1, 0.2, 0.2, 0.5, 0.9])
    unknown = np.array([0.2, 0.6, 0.9, 1.0])
    y = np.r_[np.zeros(5), np.ones(4)]
    assert novelty.auroc(known, unknown) == pytest.approx(roc_auc_score(y, np.r_[known, unknown]))


@pytest.mark.parametrize("rate", [0, 1, 5, -0.1, "0.05", True])
def test_a_bad_unknown_rate_is_one_clear_error(rate):
    with pytest.raises(FeatxError, match="--unknown-rate"):
        novelty.check_rate(rate)


def test_fit_head_stores_the_score_without_pickle_and_reports_it(tiny_model):
    meta = json.loads((tiny_model.logreg / "head.json").read_text())
    info = meta["novelty"]
    assert info["rate"] == config.UNKNOWN_RATE and info["calibrated_on"] == "validation"
    with np.load(tiny_model.logreg / novelty.MEMORY_FILE, allow_pickle=False) as data:
        assert data["memory"].dtype == np.float16
        assert (
            len(data["memory"])
            == info["memory_rows"]
            == len(data["known"]) * 0 + len(data["memory"])
        )
    reported = tiny_model.metrics["novelty"]
    assert reported["threshold"] == pytest.approx(info["threshold"], rel=1e-5)
    assert "Unknown images" in (tiny_model.logreg / "report.html").read_text()


def test_the_novelty_module_imports_no_scikit_learn_scipy_or_tensorflow(tiny_model):
    code = (
        "import sys, json\n"
        "from featx.heads import novelty\n"
        f"info = json.load(open({str(tiny_model.logreg / 'head.json')!r}))['novelty']\n"
        f"state = novelty.load({str(tiny_model.logreg)!r}, info)\n"
        "import numpy as np\n"
        "X = np.ones((2, state.memory.shape[1]), np.float32)\n"
        "print(state.score(X, np.full((2, 2), 0.5)).shape)\n"
        "heavy = [m for m in ('sklearn', 'scipy', 'tensorflow', 'keras') if m in sys.modules]\n"
        "print('heavy', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "(2,)" in done.stdout and "heavy []" in done.stdout


def test_predict_flags_unknown_rows_counts_them_and_writes_both_columns(tiny_model, tmp_path):
    out = tmp_path / "rows.csv"
    result = predict(
        tiny_model.logreg, [str(tiny_model.data)], engine="keras", batch_size=4, output=out
    )
    rows = [r for r in result["rows"] if r["error"] is None]
    assert all(isinstance(r["unknown"], bool) and r["novelty"] >= 0 for r in rows)
    assert result["unknown"] == sum(r["unknown"] for r in rows)
    assert all(r["unknown"] == (r["novelty"] > result["novelty_threshold"]) for r in rows)
    assert all(r["predicted"] in ("cats", "dogs") for r in rows)  # the class stays
    table = list(csv.DictReader(out.open()))
    assert [t["unknown"] for t in table] == [str(r["unknown"]).lower() for r in result["rows"]]
    assert [float(t["novelty"]) for t in table] == [r["novelty"] for r in result["rows"]]
    model = featx.load(tiny_model.logreg, engine="keras")
    paths = [r["path"] for r in rows]
    np.testing.assert_allclose(model.novelty(paths), [r["novelty"] for r in rows], atol=1e-5)
    assert model.unknown(paths).tolist() == [r["unknown"] for r in rows]


def test_no_unknown_and_unknown_rate_change_the_flags(tiny_model):
    def run(**kw):
        return predict(tiny_model.logreg, [str(tiny_model.data)], engine="keras", **kw)

    off = run(unknown=False)
    assert off["novelty_threshold"] is None and off["unknown"] == 0
    assert all(r["unknown"] is None and r["novelty"] is None for r in off["rows"])
    strict, loose = run(unknown_rate=0.01), run(unknown_rate=0.9)
    assert loose["novelty_threshold"] < strict["novelty_threshold"]
    assert loose["unknown"] > strict["unknown"]


def test_many_unknown_images_warn_in_the_result_and_as_featx_warning(tiny_model, tmp_path):
    for i in range(8):  # yellow squares: no class of the tiny model looks like them
        write_image(tmp_path / f"yellow{i}.png", colour=(250, 250, 20), seed=10 + i, size=(64, 64))
    with pytest.warns(featx.FeatxWarning, match="unlike the images the model was trained on"):
        result = predict(tiny_model.logreg, [str(tmp_path)], engine="keras")
    assert result["unknown"] >= 6
    assert any("unlike the images" in w for w in result["warnings"])
    quiet = predict(tiny_model.logreg, [str(tiny_model.data / "train")], engine="keras")
    assert quiet["unknown"] <= config.UNKNOWN_WARN_SHARE * quiet["predicted"]
    assert not any("unlike the images" in w for w in quiet["warnings"])


def test_a_head_saved_without_the_score_still_predicts_with_a_note(tiny_model, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_model.logreg, old)
    meta = json.loads((old / "head.json").read_text())
    del meta["novelty"]
    (old / "head.json").write_text(json.dumps(meta))
    notes = []
    result = predict(old, [str(tiny_model.data / "train")], engine="keras", log=notes.append)
    assert result["novelty_threshold"] is None and result["unknown"] == 0
    assert any("no novelty score" in n for n in notes)
    with pytest.raises(FeatxError, match="no novelty score"):
        featx.load(old, engine="keras").novelty(
            str(next((tiny_model.data / "train").rglob("*.jpg")))
        )


def test_a_finetune_folder_stores_the_score_and_predict_gives_novelty_and_unknown(
    tiny_model, tiny_finetune, tmp_path
):
    info = json.loads((tiny_finetune / "finetune.json").read_text())["novelty"]
    assert info["memory_rows"] == 20 and info["known_images"] == 8 and info["rate"] == 0.05
    metrics = json.loads((tiny_finetune / "metrics.json").read_text())
    assert metrics["novelty"]["threshold"] == pytest.approx(info["threshold"], abs=1e-6)
    with np.load(tiny_finetune / "novelty.npz", allow_pickle=False) as data:
        memory = data["memory"]
    assert memory.dtype == np.float16 and memory.shape[0] == 20
    # No epoch trained: the finetune model's head sees the cache's features, so its memory and
    # threshold are those fit-head built for the head from the cached features.
    head_info = json.loads((tiny_model.logreg / "head.json").read_text())["novelty"]
    head_memory = novelty.load(tiny_model.logreg, head_info).memory
    np.testing.assert_allclose(memory.astype(np.float32), head_memory, atol=2e-3)
    assert info["threshold"] == pytest.approx(head_info["threshold"], rel=1e-3)

    out = tmp_path / "rows.csv"
    result = predict(tiny_finetune, [str(tiny_model.data)], batch_size=4, output=out)
    rows = [r for r in result["rows"] if r["error"] is None]
    assert len(rows) == 28 and result["novelty_threshold"] == pytest.approx(info["threshold"])
    assert all(isinstance(r["unknown"], bool) and r["novelty"] >= 0 for r in rows)
    assert all(r["unknown"] == (r["novelty"] > result["novelty_threshold"]) for r in rows)
    assert result["unknown"] == sum(r["unknown"] for r in rows)
    table = list(csv.DictReader(out.open()))
    assert [float(t["novelty"]) for t in table] == [r["novelty"] for r in result["rows"]]
    head = predict(tiny_model.logreg, [str(tiny_model.data)], engine="keras", batch_size=4)
    np.testing.assert_allclose(
        [r["novelty"] for r in rows], [r["novelty"] for r in head["rows"]], rtol=1e-3, atol=1e-3
    )
    model = featx.load(tiny_finetune)
    assert model.has_novelty and model.threshold == pytest.approx(info["threshold"])
    paths = [r["path"] for r in rows]
    np.testing.assert_allclose(model.novelty(paths), [r["novelty"] for r in rows], atol=1e-5)
    assert model.unknown(paths).tolist() == [r["unknown"] for r in rows]


def test_a_finetune_threshold_flags_about_the_rate_of_its_validation_images(
    tiny_model, tiny_finetune
):
    validation = [str(tiny_model.data / "validation")]
    known = np.load(tiny_finetune / "novelty.npz", allow_pickle=False)["known"]
    for rate in (0.05, 0.25, 0.5):
        result = predict(tiny_finetune, validation, unknown_rate=rate)
        novelty_of = sorted(r["novelty"] for r in result["rows"])
        np.testing.assert_allclose(novelty_of, known, atol=1e-4)  # calibrated on these images
        flagged = result["unknown"] / len(result["rows"])
        assert rate - 1 / 8 <= flagged <= rate + 1 / 8, (rate, flagged)  # 8 images: steps of 1/8


def test_a_finetune_folder_saved_without_the_score_still_predicts_with_a_note(
    tiny_model, tiny_finetune, tmp_path
):
    old = shutil.copytree(tiny_finetune, tmp_path / "old")
    info = json.loads((old / "finetune.json").read_text())
    del info["novelty"]
    (old / "finetune.json").write_text(json.dumps(info))
    notes = []
    result = predict(old, [str(tiny_model.data / "validation")], log=notes.append)
    assert result["novelty_threshold"] is None and result["unknown"] == 0
    assert any("no novelty score" in n and "featx finetune" in n for n in notes)


OTHER_DOMAINS = ("oxford_flowers17", "neu_surface_defects", "clothing_small")


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(not (REAL_DATA / "train").is_dir(), reason=f"no real photos at {REAL_DATA}")
@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason=f"ImageNet weights not in {WEIGHTS_FILE}")
def test_real_cats_and_dogs_head_flags_other_domains_and_few_of_its_own_photos(tmp_path):
    """#23's done-when on a sample: default options, through `featx predict`."""
    data = link_real_photos(tmp_path / "pets", {"train": 150, "validation": 100})
    other = tmp_path / "other"
    other.mkdir()
    for name in OTHER_DOMAINS:
        found = sorted((REAL_DATA.parent / name).rglob("*.jpg"))
        for f in found[:: max(1, len(found) // 30)][:30]:
            (other / f"{name}-{f.name}").symlink_to(f)
    featx.extract(data, tmp_path / "pets.h5")
    featx.fit_head(tmp_path / "pets.h5", output=tmp_path / "head")
    own = predict(tmp_path / "head", [str(data / "validation")])
    foreign = predict(tmp_path / "head", [str(other)])
    assert own["predicted"] == 200 and foreign["predicted"] == 90
    assert own["unknown"] / own["predicted"] <= 0.05
    assert foreign["unknown"] / foreign["predicted"] >= 0.95


def test_the_keras_graph_of_the_score_gives_numpy_s_novelty(tiny_model):
    """The building block of an exported model's second output (heads.novelty.keras_score)."""
    from featx.backbone import mobilenet
    from featx.heads import estimators

    head, meta = estimators.load_head(tiny_model.logreg)
    state = novelty.load(tiny_model.logreg, meta["novelty"])
    spec = mobilenet.BackboneSpec.from_fingerprint(meta["fingerprint"])
    both = mobilenet.compose(spec, head.to_keras(), novelty=novelty.keras_score(state))
    pixels = np.random.default_rng(0).uniform(0, 255, (5, spec.image_size, spec.image_size, 3))
    out = both.predict_on_batch(pixels.astype(np.float32))
    features = np.asarray(mobilenet.compose(spec).predict_on_batch(pixels.astype(np.float32)))
    proba = head.predict_proba(features)
    np.testing.assert_allclose(np.asarray(out["probabilities"]), proba, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["novelty"]), state.score(features, proba), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("model_format", ["keras", "savedmodel", "tflite", "onnx"])
def test_an_export_gives_the_novelty_and_flags_of_predict(tiny_model, tmp_path, model_format):
    out = tmp_path / model_format
    info = featx.export(tiny_model.logreg, model_format, output=out)
    assert info["novelty"]["threshold"] == pytest.approx(
        json.loads((tiny_model.logreg / "head.json").read_text())["novelty"]["threshold"]
    )
    assert info["check"]["max_abs_diff"] <= config.EXPORT_TOLERANCE
    card = (out / "README.md").read_text()
    assert f"novelty > {info['novelty']['threshold']:.6g}" in card
    paths = [str(tiny_model.data)]
    head = predict(tiny_model.logreg, paths, engine="keras")
    exported = predict(out, paths)
    np.testing.assert_allclose(
        [r["novelty"] for r in exported["rows"]], [r["novelty"] for r in head["rows"]], atol=1e-4
    )
    assert [r["unknown"] for r in exported["rows"]] == [r["unknown"] for r in head["rows"]]
    assert [r["predicted"] for r in exported["rows"]] == [r["predicted"] for r in head["rows"]]
    looser = predict(out, paths, unknown_rate=0.5)
    assert looser["novelty_threshold"] < exported["novelty_threshold"]


def test_cli_prints_the_unknown_count_and_takes_both_options(tiny_model, tmp_path):
    from click.testing import CliRunner
    from helpers import assert_one_line_error

    from featx.cli import cli

    base = ["predict", str(tiny_model.logreg), str(tiny_model.data), "--engine", "keras"]
    res = CliRunner().invoke(cli, base)
    assert res.exit_code == 0, res.output
    assert "unknown: unlike the training images (novelty above" in res.output
    off = CliRunner().invoke(cli, [*base, "--no-unknown", "--output", str(tmp_path / "o.csv")])
    assert off.exit_code == 0 and "unlike the training images" not in off.output
    assert {r["unknown"] for r in csv.DictReader((tmp_path / "o.csv").open())} == {""}
    bad = CliRunner().invoke(cli, [*base, "--unknown-rate", "5"])
    assert_one_line_error(bad, "--unknown-rate")
