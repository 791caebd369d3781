"""Stage 3: fine-tuning end to end (tiny generated images, random MobileNetV2 at 32 px)."""

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import TINY, assert_one_line_error, write_split_data

import featx
from featx.backbone import finetune_keras as ftk
from featx.cache import store
from featx.cli import cli
from featx.commands import finetune as ft
from featx.commands.extract import extract
from featx.errors import FeatxError
from featx.heads import estimators

FAST = dict(batch_size=8, epochs=2, learning_rate=1e-3)  # a large step: changes are visible


def fit_head(cache_path: Path, folder: Path, kind="logreg") -> tuple[Path, estimators._Head]:
    cache = store.read_cache(cache_path)
    X, y = cache.split("train")
    head = (
        estimators.LogRegHead(C=1.0)
        if kind == "logreg"
        else estimators.DenseHead(epochs=20, learning_rate=1e-2)
    )
    head.fit(X, y, *cache.split("validation"))
    estimators.save_head(head, folder, cache.class_names, cache.fingerprint)
    return folder, head


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """The session's tiny model: its data folder, cache and logistic-regression head."""
    head, _ = estimators.load_head(tiny_model.logreg)
    return {
        "root": tiny_model.root,
        "data": tiny_model.data,
        "cache": tiny_model.cache,
        "head_dir": tiny_model.logreg,
        "head": head,
    }


def split_pixels(cache_path, split="validation"):
    cache = store.read_cache(cache_path)
    mask = cache.splits == split
    paths = [p for p, m in zip(cache.paths, mask) if m]
    data = ftk.ImageBatches(cache.attrs["data_dir"], paths, cache.labels[mask], 32, 64)
    x, y, _ = data.load(0)
    return x, y, cache.features[mask]


def weights_by_path(layer) -> dict[str, np.ndarray]:
    return {w.path: keras.ops.convert_to_numpy(w).copy() for w in layer.weights}


@pytest.mark.parametrize("kind", ["logreg", pytest.param("dense", marks=pytest.mark.slow)])
def test_the_warm_started_model_reproduces_the_head(tiny, kind, tmp_path):
    head_dir, head = fit_head(tiny["cache"], tmp_path / kind, kind)
    cache = store.read_cache(tiny["cache"])
    model = ft.build_model(cache.fingerprint, estimators.load_head(head_dir)[0].to_keras())
    x, y, features = split_pixels(tiny["cache"])
    proba = model.predict_on_batch(x)  # raw pixels through the whole rebuilt model
    expected = head.predict_proba(features)  # the head on the cached features
    np.testing.assert_allclose(proba, expected, atol=1e-3)
    accuracy = np.mean(proba.argmax(1) == y)
    assert abs(accuracy - np.mean(expected.argmax(1) == y)) <= 0.005
    if kind == "logreg":
        # The head is no coin flip, so the comparison means something. (The dense head cannot
        # learn these random-weight features of ~1e-12: its Normalization floors the scale at
        # 1e-7. For it, the test proves the nested Normalization and Dropout layers rebuild.)
        assert accuracy >= 0.75


@pytest.mark.slow
def test_training_changes_only_unfrozen_layers_no_batchnorm_statistic_and_saves_safely(
    tiny, tmp_path
):
    cache = store.read_cache(tiny["cache"])
    model = ft.build_model(cache.fingerprint, tiny["head"].to_keras())
    unfrozen = ft.set_trainable(model, 12)  # block_16_expand ... global pooling
    assert unfrozen[0] == "block_16_expand" and len(unfrozen) == 12
    ft.compile_model(model, learning_rate=1e-2)
    base = ft.base_of(model)
    before = weights_by_path(base)
    head_before = keras.ops.convert_to_numpy(model.layers[-1].weights[0]).copy()
    mask = cache.splits == "train"
    train = ftk.ImageBatches(
        cache.attrs["data_dir"],
        [p for p, m in zip(cache.paths, mask) if m],
        cache.labels[mask],
        32,
        8,
        shuffle=True,
    )
    model.fit(train, epochs=1, verbose=0)
    after = weights_by_path(base)

    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    bn_layers = {
        layer.name for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)
    }
    trainable_layers = set(unfrozen) - bn_layers
    for path in before:
        layer = path.split("/")[0]
        if layer in bn_layers:
            assert path not in changed, f"BatchNormalization weight {path} changed"
        elif layer not in trainable_layers:
            assert path not in changed, f"frozen weight {path} changed"
    convs = {p for p in before if p.split("/")[0] in trainable_layers}
    assert convs and convs <= changed  # every unfrozen kernel moved
    assert any("moving_mean" in p for p in before) and any("moving_variance" in p for p in before)
    assert not np.array_equal(head_before, keras.ops.convert_to_numpy(model.layers[-1].weights[0]))

    # the trained model saves and loads in safe mode (no Lambda layers) with the same predictions
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    x, _, _ = split_pixels(tiny["cache"])
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6)
    as_uint8 = loaded.predict(x.astype(np.uint8), verbose=0)  # raw uint8 pixels work too
    np.testing.assert_allclose(as_uint8, model.predict_on_batch(x), atol=1e-6)


def test_unfreeze_zero_trains_only_the_head_and_bad_counts_are_refused(tiny):
    cache = store.read_cache(tiny["cache"])
    model = ft.build_model(cache.fingerprint, tiny["head"].to_keras())
    assert ft.set_trainable(model, 0) == []
    assert ft.base_of(model).trainable_weights == []
    assert [w.path for w in model.trainable_weights] == [
        w.path for w in model.layers[-1].trainable_weights
    ]
    with pytest.raises(FeatxError, match="unfreeze_layers must be between 0 and 154"):
        ft.set_trainable(model, 155)


def test_augmentation_is_active_only_in_training(tiny):
    cache = store.read_cache(tiny["cache"])
    model = ft.build_model(cache.fingerprint, tiny["head"].to_keras(), augment=True)
    x, _, _ = split_pixels(tiny["cache"])
    np.testing.assert_array_equal(model.predict_on_batch(x), model.predict_on_batch(x))
    augmented = keras.Model(model.input, model.get_layer("augment_contrast").output)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(augmented(x, training=False)), x)
    assert not np.allclose(keras.ops.convert_to_numpy(augmented(x, training=True)), x)
    plain = ft.build_model(cache.fingerprint, tiny["head"].to_keras(), augment=False)
    assert not any(layer.name.startswith("augment") for layer in plain.layers)


@pytest.mark.slow
def test_finetune_writes_a_complete_result_never_worse_than_the_warm_start(tiny, tmp_path):
    out = tmp_path / "out"
    lines = []
    m = ft.finetune(tiny["cache"], tiny["head_dir"], out, log=lines.append, **FAST)

    for name in ("model.keras", "finetune.json", "metrics.json", "misclassified.csv"):
        assert (out / name).is_file(), name
    assert (out / "training_curves.png").stat().st_size > 1000
    written = json.loads((out / "featx-files.json").read_text())["files"]
    assert sorted(p.name for p in out.iterdir() if p.name != "featx-files.json") == written
    assert "report.html" in written and "warm start" in (out / "report.html").read_text()
    info = json.loads((out / "finetune.json").read_text())
    assert info["kind"] == "finetune" and info["class_names"] == ["cats", "dogs"]
    assert info["complete"] is True and info["cache"] == str(Path(tiny["cache"]).resolve())
    assert info["image_size"] == 32 and info["head_dir"] == str(tiny["head_dir"])
    assert info["fingerprint"] == store.read_cache(tiny["cache"], features=False).fingerprint
    assert info["epochs_run"] == m["epochs_run"] and 1 <= m["epochs_run"] <= 2
    assert info["best_epoch"] == m["best_epoch"] and 0 <= m["best_epoch"] <= m["epochs_run"]
    assert info["options"]["unfreeze_layers"] == 39 and info["options"]["augment"] is True

    written = json.loads((out / "metrics.json").read_text())
    assert set(written) >= {"train", "validation", "before", "options", "fit_seconds"}
    assert set(written["before"]) == {"train", "validation"}
    for split in ("train", "validation"):
        assert written[split]["n"] == (20 if split == "train" else 8)
        assert {"accuracy", "log_loss", "confusion_matrix"} <= set(written[split])
    v, b = written["validation"], written["before"]["validation"]
    assert v["accuracy"] >= b["accuracy"]
    if m["best_epoch"] == 0:  # no epoch beat the warm start: it is what was kept
        assert written["validation"] == b
    # epoch 0 is the head: the warm start scores what the head scores on the cached features
    x, y, features = split_pixels(tiny["cache"])
    assert b["accuracy"] == pytest.approx(np.mean(tiny["head"].predict(features) == y), abs=0.005)
    assert any(line.startswith("epoch 1/2:") for line in lines)

    # the saved model is the final one: it scores what metrics.json says
    loaded = keras.saving.load_model(out / "model.keras")
    assert np.mean(loaded.predict(x, verbose=0).argmax(1) == y) == pytest.approx(v["accuracy"])

    # its novelty score: the memory of the training images' features as the final model's head
    # sees them, calibrated on the validation images, whose novelty predict gives again
    assert info["novelty"]["memory_rows"] == 20 and info["novelty"]["known_images"] == 8
    assert m["novelty"]["threshold"] == pytest.approx(info["novelty"]["threshold"], abs=1e-6)
    assert any(line.startswith("novelty score: a memory of 20 training images") for line in lines)
    known = np.load(out / "novelty.npz", allow_pickle=False)["known"]
    scores = featx.load(out).scores_of_pixels(x)
    np.testing.assert_allclose(np.sort(scores[:, -1]), known, atol=1e-4)


def test_an_epoch_must_beat_the_warm_start_and_the_best_epoch_wins(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    warm = model.get_weights()
    keep = ftk._KeepBest(tmp_path / "model.keras", n_val=10, correct=9, loss=0.3, weights=warm)
    keep.set_model(model)

    def epoch(i, accuracy, loss):
        model.set_weights([w + i + 1 for w in warm])  # the weights this epoch ends with
        keep.on_epoch_end(i, {"val_accuracy": accuracy, "val_loss": loss})

    epoch(0, 0.9, 0.4)  # as many right, higher loss: worse
    epoch(1, 0.8, 0.1)  # fewer right, even with a lower loss: worse
    assert keep.best_epoch == 0 and keep.weights is warm
    assert not (tmp_path / "model.keras").exists()
    epoch(2, 0.9, 0.2)  # as many right, lower loss: better
    epoch(3, 1.0, 0.5)  # more right: better, whatever the loss
    epoch(4, 0.9, 0.01)  # a later, worse epoch does not replace it
    assert keep.best_epoch == 4
    np.testing.assert_array_equal(keep.weights[1], warm[1] + 4)
    saved = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(saved.get_weights()[1], warm[1] + 4)


@pytest.mark.slow
def test_ctrl_c_keeps_the_best_weights_and_still_writes_everything(tiny, tmp_path, monkeypatch):
    original = ftk._EpochLog.on_epoch_end

    def interrupt_after_first_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ftk._EpochLog, "on_epoch_end", interrupt_after_first_epoch)
    out = tmp_path / "out"
    m = ft.finetune(tiny["cache"], tiny["head_dir"], out, **{**FAST, "epochs": 5})
    assert m["interrupted"] and m["epochs_run"] == 1
    assert m["validation"]["accuracy"] >= m["before"]["validation"]["accuracy"]
    assert json.loads((out / "finetune.json").read_text())["epochs_run"] == 1
    loaded = keras.saving.load_model(out / "model.keras")
    x, y, _ = split_pixels(tiny["cache"])
    accuracy = np.mean(loaded.predict(x, verbose=0).argmax(1) == y)
    assert accuracy == pytest.approx(m["validation"]["accuracy"])


def test_files_gone_since_extraction_are_skipped_and_reported(tiny, tmp_path):
    moved = shutil.copytree(tiny["data"], tmp_path / "moved")
    (moved / "train" / "dogs" / "dogs03.jpg").unlink()
    (moved / "validation" / "cats" / "cats01.jpg").write_bytes(b"no longer a jpeg")
    m = ft.finetune(
        tiny["cache"], tiny["head_dir"], tmp_path / "out", data_dir=moved, epochs=0, batch_size=8
    )
    skipped = {s["path"]: s["reason"] for s in m["skipped"]}
    assert skipped.keys() == {"train/dogs/dogs03.jpg", "validation/cats/cats01.jpg"}
    assert skipped["train/dogs/dogs03.jpg"] == "file not found"
    assert m["train"]["n"] == 19 and m["validation"]["n"] == 7
    assert m["epochs_run"] == 0 and m["best_epoch"] == 0


def test_bad_inputs_give_clear_errors(tiny, tmp_path):
    with pytest.raises(FeatxError, match="Head folder not found: .*fit-head"):
        ft.finetune(tiny["cache"], tmp_path / "nowhere")
    other_data = write_split_data(tmp_path / "other")
    other_cache = tmp_path / "other.h5"
    extract(other_data, other_cache, batch_size=8, **{**TINY, "image_size": 40})
    other_head, _ = fit_head(other_cache, tmp_path / "other-logreg")
    fitted_elsewhere = r"another backbone \(image_size: 40 vs 32\)\. It was fitted on another"
    with pytest.raises(FeatxError, match=fitted_elsewhere):
        ft.finetune(tiny["cache"], other_head, tmp_path / "out")
    with pytest.raises(FeatxError, match="not a folder here. Pass --data-dir"):
        ft.finetune(tiny["cache"], tiny["head_dir"], data_dir=tmp_path / "gone")
    with pytest.raises(FeatxError, match="learning_rate must be > 0"):
        ft.finetune(tiny["cache"], tiny["head_dir"], learning_rate=0)
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked


def test_cli_finetune_prints_json_and_refuses_bad_input_in_one_line(tiny, tmp_path):
    out = tmp_path / "cli"
    args = ["finetune", str(tiny["cache"]), "--head", str(tiny["head_dir"]), "--output", str(out)]
    result = CliRunner().invoke(
        cli, [*args, "--epochs", "0", "--unfreeze-layers", "0", "--no-augment", "--json"]
    )
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert m["options"]["augment"] is False and m["options"]["unfreeze_layers"] == 0
    assert m["epochs_run"] == 0 and m["validation"] == m["before"]["validation"]
    assert json.loads((out / "metrics.json").read_text())["validation"] == m["validation"]
    bad = CliRunner().invoke(cli, ["finetune", str(tiny["cache"]), "--head", str(tmp_path / "x")])
    assert_one_line_error(bad, "Head folder not found")
