"""Stage 2: `featx fit-head` on small synthetic feature caches (no image model), and once on real
photos with the real weights."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import REAL_DATA, WEIGHTS_FILE, assert_one_line_error

from featx import config
from featx.cache import store
from featx.cli import cli
from featx.commands.fit_head import default_output_dir, fit_head
from featx.config import VERSION
from featx.errors import FeatxError
from featx.heads import estimators
from featx.reports import evaluation

# What backbone.fingerprint() records for the real cache (without building or hashing anything).
FINGERPRINT = {
    "backbone": "MobileNetV2",
    "alpha": 1.0,
    "image_size": 224,
    "weights": "imagenet",
    "weights_file": "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    "weights_sha256": "71e4c4ec4aa24c9c951b9265d6de42e1336dcf614c2214fa6a989208615e232c",
    "preprocessing": config.PREPROCESSING,
    "resize": config.RESIZE,
    "engine": "keras",
    "featx_version": VERSION,
    "keras_version": "3.15.1",
    "keras_backend": "tensorflow",
}
SPLIT_KEYS = {
    "n",
    "accuracy",
    "accuracy_interval",
    "balanced_accuracy",
    "balanced_accuracy_interval",
    "macro_f1",
    "log_loss",
    "per_class",
    "confusion_matrix",
    "calibration",
}
TOP_KEYS = {
    "fit_seconds",
    "head",
    "options",
    "fitted",
    "cache",
    "class_names",
    "output",
    "novelty",
    "warnings",
}
DENSE = {"epochs": 10, "learning_rate": 0.05}  # 80 images are one batch: few, larger steps


def write_synthetic_cache(
    path: Path,
    counts: dict | None = None,
    class_names=("cats", "dogs"),
    dim: int = 16,
    distance: float = 5.0,
    shuffle_labels: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    flip_noise: float | None = None,
) -> Path:
    """A featx cache of Gaussian-cluster "features", one cluster per class.

    counts: {split: images per class}; default train 40, validation 15, test 10 per class.
    shuffle_labels: permute the labels within each split (nothing left to learn).
    flip_noise: also write /features_flip ("mirror images"): the features plus this much noise.
    """
    counts = counts or {"train": (40, 40), "validation": (15, 15), "test": (10, 10)}
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(class_names), dim))
    centres *= distance / np.linalg.norm(centres, axis=1, keepdims=True)
    features, labels, splits, paths = [], [], [], []
    for split, per_class in counts.items():
        split_labels = np.repeat(np.arange(len(class_names)), per_class)
        if shuffle_labels:
            split_labels = rng.permutation(split_labels)
        for i, label in enumerate(np.repeat(np.arange(len(class_names)), per_class)):
            features.append(centres[label] + rng.normal(size=dim))
            labels.append(split_labels[i])
            splits.append(split)
            paths.append(f"{split}/{class_names[label]}/{class_names[label]}.{i:04d}.jpg")
    n = len(paths)
    cache = store.Cache(
        fingerprint=FINGERPRINT,
        class_names=list(class_names),
        features=np.asarray(features, dtype=dtype).reshape(n, dim),
        labels=np.asarray(labels, np.int32),
        splits=np.array(splits, dtype=object),
        rows=store.Rows(
            paths, np.full(n, 20_000, np.int64), np.arange(n, dtype=np.int64), ["0" * 64] * n
        ),
        attrs={"data_dir": "/data/pets", "layout": "splits", "val_split": 0.2, "seed": 0},
    )
    if flip_noise is not None:
        noise = flip_noise * rng.normal(size=cache.features.shape)
        cache.features_flip = (cache.features + noise).astype(dtype)
    store.write_cache(path, cache)
    return path


@pytest.fixture
def cache_path(tmp_path):
    return write_synthetic_cache(tmp_path / "pets.h5")


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("fit_seconds", "output")}


@pytest.mark.parametrize("head", estimators.HEADS)
def test_fit_head_writes_the_head_and_a_complete_report(head, cache_path, tmp_path):
    out = tmp_path / "out"
    options = DENSE if head == "dense" else {}
    m = fit_head(cache_path, head, out, **options)

    assert set(m) == {"train", "validation", "test"} | TOP_KEYS
    for split, n in (("train", 80), ("validation", 30), ("test", 20)):
        assert set(m[split]) == SPLIT_KEYS and m[split]["n"] == n
        assert set(m[split]["per_class"]) == {"cats", "dogs"}
        assert set(m[split]["per_class"]["cats"]) == {"precision", "recall", "f1", "support"}
        assert np.sum(m[split]["confusion_matrix"]) == n
    assert m["validation"]["accuracy"] >= 0.95
    assert m["head"] == head and m["class_names"] == ["cats", "dogs"]
    assert m["cache"]["fingerprint"] == FINGERPRINT and m["cache"]["feature_dim"] == 16
    assert m["options"]["seed"] == 0 and m["fit_seconds"] > 0 and m["output"] == str(out)
    assert json.loads((out / "metrics.json").read_text()) == m

    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert (out / "training_curves.png").exists() == (head == "dense")
    assert (out / ("head.npz" if head == "logreg" else "head.keras")).is_file()
    with open(out / "misclassified.csv") as fh:
        assert fh.readline().strip() == "path,true,predicted,probability,split"

    # the saved head scores exactly what metrics.json says, and knows where it came from
    loaded, meta = estimators.load_head(out)
    assert meta["fingerprint"] == FINGERPRINT and meta["class_names"] == ["cats", "dogs"]
    cache = store.read_cache(cache_path)
    X, y = cache.split("validation")
    assert evaluation.evaluate(y, loaded.predict_proba(X), cache.class_names) == m["validation"]


@pytest.mark.parametrize("head", estimators.HEADS)
def test_the_same_seed_gives_the_same_metrics(head, cache_path, tmp_path):
    options = DENSE if head == "dense" else {}
    a = fit_head(cache_path, head, tmp_path / "a", seed=7, **options)
    b = fit_head(cache_path, head, tmp_path / "b", seed=7, **options)
    assert without_timing(a) == without_timing(b)


def test_shuffled_labels_stay_near_chance_and_fill_misclassified_csv(tmp_path):
    counts = {"train": (60, 60), "validation": (50, 50)}
    path = write_synthetic_cache(tmp_path / "noise.h5", counts, shuffle_labels=True)
    m = fit_head(path, "logreg", tmp_path / "out")
    assert "test" not in m
    assert 0.35 <= m["validation"]["accuracy"] <= 0.65
    with open(tmp_path / "out" / "misclassified.csv") as fh:
        rows = list(csv.DictReader(fh))
    wrong = sum(m[s]["n"] - np.trace(m[s]["confusion_matrix"]) for s in ("train", "validation"))
    assert len(rows) == wrong > 0
    probabilities = [float(r["probability"]) for r in rows]
    assert probabilities == sorted(probabilities, reverse=True)  # most confidently wrong first
    assert all(r["true"] != r["predicted"] for r in rows)
    # relative to the data folder, as the cache holds them (#26); metrics.json says where it is
    cache = store.read_cache(path, features=False)
    assert {r["path"] for r in rows} <= set(cache.paths)
    assert m["cache"]["data_dir"] == "/data/pets"  # ready to open: data_dir / path


def test_balanced_class_weight_raises_minority_recall(tmp_path):
    counts = {"train": (200, 20), "validation": (50, 50)}
    path = write_synthetic_cache(tmp_path / "uneven.h5", counts, distance=2.0, dim=8)
    recall = {
        cw: fit_head(path, "logreg", tmp_path / cw, C=1.0, class_weight=cw)["validation"][
            "per_class"
        ]["dogs"]["recall"]
        for cw in ("none", "balanced")
    }
    assert recall["balanced"] > recall["none"] + 0.1, recall


def test_the_test_split_is_only_evaluated(tmp_path):
    with_test = write_synthetic_cache(tmp_path / "a.h5")
    counts = {"train": (40, 40), "validation": (15, 15)}
    without = write_synthetic_cache(tmp_path / "b.h5", counts)  # same seed: same rows up to test
    a = fit_head(with_test, "logreg", tmp_path / "a")
    b = fit_head(without, "logreg", tmp_path / "b")
    assert a["validation"] == b["validation"] and a["fitted"] == b["fitted"]
    assert "test" in a and "test" not in b


def test_float16_caches_are_fitted_in_float32(tmp_path):
    path = write_synthetic_cache(tmp_path / "half.h5", dtype="float16")
    m = fit_head(path, "logreg", tmp_path / "out")
    assert m["cache"]["dtype"] == "float16" and m["validation"]["accuracy"] >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("head", estimators.HEADS)
def test_mirror_images_are_training_rows_and_validation_is_scored_on_the_mean_of_both(
    head, tmp_path
):
    path = write_synthetic_cache(tmp_path / "flip.h5", flip_noise=1.0)
    options = DENSE if head == "dense" else {}
    m = fit_head(path, head, tmp_path / "out", **options)  # used when the cache has them
    assert m["fitted"]["flip"] is True
    loaded, meta = estimators.load_head(tmp_path / "out")
    assert meta["flip"] is True and loaded.flip_
    cache = store.read_cache(path)
    views = cache.splits == "validation"
    X = estimators.flip_views(cache.features[views], cache.features_flip[views])
    proba = loaded.predict_proba(X)
    assert evaluation.evaluate(cache.labels[views], proba, cache.class_names) == m["validation"]
    if head == "logreg":  # trained on 160 rows: both views of the 80 training images
        refit = estimators.LogRegHead(**m["options"]).fit(
            *cache.split("train"), X_flip=cache.features_flip[cache.splits == "train"]
        )
        np.testing.assert_allclose(refit.predict_proba(X), proba, atol=1e-12)

    without = fit_head(path, head, tmp_path / "no-flip", flip=False, **options)
    assert (
        without["fitted"]["flip"] is False
        and not estimators.load_head(tmp_path / "no-flip")[0].flip_
    )
    assert without["validation"] != m["validation"]
    plain = fit_head(write_synthetic_cache(tmp_path / "plain.h5"), head, tmp_path / "p", **options)
    assert plain["fitted"]["flip"] is False
    with pytest.raises(FeatxError, match="has no features of mirror images.*extract --flip"):
        fit_head(tmp_path / "plain.h5", head, tmp_path / "x", flip=True)


def test_the_scaling_is_an_option_and_the_choice_is_in_metrics(cache_path, tmp_path):
    m = fit_head(cache_path, "logreg", tmp_path / "auto")
    assert m["options"]["scaling"] == config.SCALING == "auto"
    assert m["fitted"]["scaling"] in config.SCALING_CHOICES
    assert set(m["fitted"]["cv"]["log_loss"]) == set(config.SCALING_CHOICES)
    l2 = fit_head(cache_path, "logreg", tmp_path / "l2", scaling="l2")
    assert l2["options"]["scaling"] == l2["fitted"]["scaling"] == "l2"
    assert list(l2["fitted"]["cv"]["log_loss"]) == ["l2"]
    assert l2["fitted"]["cv"]["log_loss"]["l2"] == m["fitted"]["cv"]["log_loss"]["l2"]
    dense = fit_head(cache_path, "dense", tmp_path / "dense", **DENSE)
    assert dense["options"]["scaling"] == config.DENSE_SCALING == dense["fitted"]["scaling"]
    result = CliRunner().invoke(
        cli, ["fit-head", str(cache_path), "--output", str(tmp_path / "cli"), "--scaling", "none"]
    )
    assert result.exit_code == 0, result.output
    assert "scaling none" in result.stdout
    assert (
        json.loads((tmp_path / "cli" / "metrics.json").read_text())["fitted"]["scaling"] == "none"
    )


def test_the_default_output_is_next_to_the_cache(cache_path):
    assert default_output_dir(cache_path, "dense") == cache_path.parent / "pets-dense"
    m = fit_head(cache_path)
    assert m["head"] == config.HEAD == "logreg"
    assert (cache_path.parent / "pets-logreg" / "head.json").is_file()


def _set_format_version(path: Path, version: int) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = version


BAD_CACHES = {
    "no train split": (
        {"validation": (15, 15)},
        "has no train images; fit-head needs a train and a validation split",
    ),
    "no validation split": (
        {"train": (40, 40), "test": (5, 5)},
        "has no validation images",
    ),
    "a class without training images": (
        {"train": (40, 0), "validation": (15, 15)},
        r"The class 'dogs' has no training image in .*train counts: \{'cats': 40, 'dogs': 0\}",
    ),
}


@pytest.mark.parametrize("case", BAD_CACHES)
def test_bad_caches_are_refused_with_their_message(case, tmp_path):
    counts, message = BAD_CACHES[case]
    path = write_synthetic_cache(tmp_path / "bad.h5", counts)
    with pytest.raises(FeatxError, match=message):
        fit_head(path, "logreg", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_caches_of_another_featx_version_or_no_cache_are_refused(cache_path, tmp_path):
    _set_format_version(cache_path, store.FORMAT_VERSION + 1)
    with pytest.raises(FeatxError, match="format version 3, this featx reads versions 1 and 2"):
        fit_head(cache_path, "logreg", tmp_path / "out")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(FeatxError, match="is not a featx cache"):
        fit_head(tmp_path / "plain.h5", "logreg", tmp_path / "out")
    with pytest.raises(FeatxError, match="Cache not found"):
        fit_head(tmp_path / "missing.h5", "logreg", tmp_path / "out")
    with pytest.raises(FeatxError, match="Unknown head 'svm'"):
        fit_head(cache_path, "svm")
    assert not (tmp_path / "out").exists()


def test_cli_prints_a_readable_summary(cache_path, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["fit-head", str(cache_path), "--output", str(out)])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "logreg head fitted in" in text and f"wrote {out}" in text
    for word in ("train", "validation", "test", "per class (validation)", "cats", "dogs"):
        assert word in text
    assert (out / "metrics.json").is_file() and (out / "confusion_matrix.png").is_file()


def test_options_of_the_other_head_are_reported_as_ignored(cache_path, tmp_path):
    notes = []
    fit_head(cache_path, "logreg", tmp_path / "a", C=1.0, epochs=3, hidden=8, log=notes.append)
    assert [n for n in notes if "ignored" in n] == [
        "note: --epochs, --hidden applies to the other head, not to --head logreg; ignored."
    ]
    notes.clear()
    fit_head(cache_path, "dense", tmp_path / "b", C=1.0, epochs=2, log=notes.append)
    assert [n for n in notes if "ignored" in n] == [
        "note: --C applies to the other head, not to --head dense; ignored."
    ]
    notes.clear()
    fit_head(cache_path, "logreg", tmp_path / "c", C=1.0, log=notes.append)
    assert not [n for n in notes if "ignored" in n]


def test_cli_dense_options_json_and_min_accuracy(cache_path, tmp_path):
    out = tmp_path / "dense"
    args = ["fit-head", str(cache_path), "--head", "dense", "--output", str(out), "--json"]
    args += ["--epochs", "10", "--learning-rate", "0.05", "--dropout", "0.1", "--hidden", "8"]
    args += ["--class-weight", "balanced", "--seed", "3", "--min-accuracy", "0.9"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)
    assert m == json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"train", "validation", "test"} | TOP_KEYS
    assert (
        m["options"]
        | {
            "epochs": 10,
            "learning_rate": 0.05,
            "dropout": 0.1,
            "hidden": 8,
            "class_weight": "balanced",
            "seed": 3,
        }
        == m["options"]
    )
    assert (out / "training_curves.png").stat().st_size > 1000


def test_cli_min_accuracy_fails_a_weak_head(tmp_path):
    counts = {"train": (30, 30), "validation": (20, 20)}
    path = write_synthetic_cache(tmp_path / "noise.h5", counts, shuffle_labels=True)
    args = ["fit-head", str(path), "--output", str(tmp_path / "out"), "--C", "1"]
    result = CliRunner().invoke(cli, [*args, "--min-accuracy", "0.9"])
    assert_one_line_error(result, "is below --min-accuracy 0.9")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())  # the report is still there
    assert m["options"]["C"] == 1.0


def test_cli_refuses_a_bad_cache_in_one_line(tmp_path):
    path = write_synthetic_cache(tmp_path / "bad.h5", {"train": (10, 10)})
    result = CliRunner().invoke(cli, ["fit-head", str(path)])
    assert_one_line_error(result, "has no validation images")
    assert len(result.output.strip().splitlines()) == 1


def test_cli_an_unwritable_output_is_one_line_not_a_traceback(cache_path, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(cli, ["fit-head", str(cache_path), "--output", str(blocker / "x")])
    assert_one_line_error(result, str(blocker), "writable")
    assert len(result.output.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder"


# --- real photos, real weights ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.skipif(
    not (REAL_DATA / "train").is_dir(), reason=f"real photos not found at {REAL_DATA}"
)
@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason=f"ImageNet weights not in {WEIGHTS_FILE}")
def test_real_photos_give_at_least_095_validation_accuracy(tmp_path):
    from featx.commands.extract import extract

    data = tmp_path / "photos"  # 150 train and 50 validation photos per class
    for split, n in (("train", 150), ("validation", 50)):
        for c in ("cats", "dogs"):
            (data / split / c).mkdir(parents=True)
            for p in sorted((REAL_DATA / split / c).glob("*.jpg"))[:n]:
                shutil.copy(p, data / split / c / p.name)
    extract(data, tmp_path / "real.h5", weights="imagenet", engine="keras")
    for head in estimators.HEADS:
        m = fit_head(tmp_path / "real.h5", head, tmp_path / head)
        assert m["train"]["n"] == 300 and m["validation"]["n"] == 100
        assert m["validation"]["accuracy"] >= 0.95, (head, m["validation"])
