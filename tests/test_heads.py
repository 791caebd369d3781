"""The two heads: one estimator interface, honest fits, save/load without pickle, to_keras().

Synthetic features only (Gaussian clusters, small D): no image model, a few seconds per Dense fit.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.base import clone

from featx.errors import FeatxError
from featx.heads import estimators

# Few epochs and small data keep every Dense fit around a second.
DENSE = {"epochs": 10, "batch_size": 32, "learning_rate": 1e-2, "patience": 3}


def blobs(per_class=(60, 60), dim=16, spread=1.0, distance=4.0, seed=0):
    """Gaussian clusters, one per class, centres `distance` apart along random directions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(per_class), dim))
    centres *= distance / np.linalg.norm(centres, axis=1, keepdims=True)
    X = np.concatenate(
        [c + spread * rng.normal(size=(n, dim)) for c, n in zip(centres, per_class)]
    ).astype(np.float32)
    y = np.repeat(np.arange(len(per_class)), per_class).astype(np.int32)
    order = rng.permutation(len(y))
    return X[order], y[order]


def make(kind, **options):
    return estimators.make_head(kind, **({**DENSE, **options} if kind == "dense" else options))


@pytest.fixture(scope="module")
def fitted():
    """{kind: (head, X_val)} for a 3-class problem, fitted once for the read-only tests."""
    X, y = blobs((50, 40, 30), seed=1)
    Xv, yv = blobs((20, 20, 20), seed=1)  # same centres (same seed), new points below
    Xv = Xv + np.random.default_rng(2).normal(scale=0.1, size=Xv.shape).astype(np.float32)
    return {k: (make(k).fit(X, y, Xv, yv), Xv) for k in estimators.HEADS}


@pytest.mark.parametrize("kind", estimators.HEADS)
def test_separable_classes_reach_high_validation_accuracy(kind):
    X, y = blobs((80, 80, 80), seed=3)
    Xv, yv = blobs((40, 40, 40), seed=3)
    head = make(kind).fit(X[:240], y[:240], Xv, yv)
    assert head.predict_proba(Xv).shape == (120, 3)
    assert np.mean(head.predict(Xv) == yv) >= 0.95
    assert list(head.classes_) == [0, 1, 2] and head.num_classes == 3


@pytest.mark.parametrize("kind", estimators.HEADS)
def test_shuffled_labels_stay_near_chance(kind):
    X, y = blobs((150, 150), dim=16, seed=4)
    rng = np.random.default_rng(0)
    y_shuffled = rng.permutation(y)
    Xv, yv = X[:100] + rng.normal(size=X[:100].shape).astype(np.float32), y_shuffled[:100]
    head = make(kind).fit(X[100:], y_shuffled[100:], Xv, yv)
    accuracy = np.mean(head.predict(Xv) == yv)
    assert 0.3 <= accuracy <= 0.7, accuracy


@pytest.mark.parametrize("kind", estimators.HEADS)
def test_balanced_class_weight_raises_minority_recall(kind):
    # overlapping classes, 10:1 in training; validation is balanced
    X, y = blobs((300, 30), dim=8, distance=2.0, seed=5)
    Xv, yv = blobs((100, 100), dim=8, distance=2.0, seed=5)
    options = {"C": 1.0} if kind == "logreg" else {}
    recall = {}
    for cw in ("none", "balanced"):
        head = make(kind, class_weight=cw, **options).fit(X, y, Xv, yv)
        recall[cw] = np.mean(head.predict(Xv[yv == 1]) == 1)
    assert recall["balanced"] > recall["none"] + 0.1, recall


def test_logreg_chooses_scaling_and_C_together_by_cross_validation_on_the_training_data():
    X, y = blobs((60, 60), seed=6)
    head = estimators.LogRegHead(Cs=(0.01, 1.0), cv_folds=3).fit(X, y)
    curves = head.cv_results_["log_loss"]
    assert head.cv_results_["C"] == [0.01, 1.0] and list(curves) == ["none", "standard", "l2"]
    losses = np.array([curves[s] for s in curves])  # (scalings, Cs)
    s, j = np.unravel_index(np.argmin(losses), losses.shape)
    assert (head.scaling_, head.C_) == (list(curves)[s], [0.01, 1.0][j])
    one = estimators.LogRegHead(Cs=(0.01, 1.0), cv_folds=3, scaling="standard").fit(X, y)
    assert list(one.cv_results_["log_loss"]) == ["standard"] and one.scaling_ == "standard"
    assert one.cv_results_["log_loss"]["standard"] == curves["standard"]  # same folds
    fixed = estimators.LogRegHead(C=0.5, scaling="standard").fit(X, y)
    assert fixed.C_ == 0.5 and fixed.cv_results_ is None
    # a fixed C still lets the cross-validation choose the scaling
    auto_at_C = estimators.LogRegHead(C=0.5).fit(X, y).cv_results_["log_loss"]
    assert list(auto_at_C) == ["none", "standard", "l2"]
    # the validation data never changes a logistic regression (no choice is made with it)
    with_val = estimators.LogRegHead(C=0.5, scaling="standard").fit(X, y, X[:10], 1 - y[:10])
    np.testing.assert_array_equal(with_val.coef_, fixed.coef_)


def test_logreg_matches_scikit_learn_binary_and_multiclass():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    for per_class in ((40, 50), (30, 30, 30)):
        X, y = blobs(per_class, seed=7)
        ours = estimators.LogRegHead(C=0.3, scaling="standard").fit(X, y)
        ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=500)).fit(X, y)
        np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-6)


@pytest.mark.parametrize("scaling", ["none", "l2"])
def test_scaling_none_and_l2_are_plain_logistic_regression_with_C_in_other_units(scaling):
    # Centring and one global scale s change no model (the intercept is not penalised): the
    # head at C equals scikit-learn's LogisticRegression at C / s**2 on the raw (or unit) rows.
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    X, y = blobs((40, 50, 30), seed=7)
    X = X + 3.0  # features that are not centred, like pooled ReLU activations
    rows = normalize(X.astype(np.float64)) if scaling == "l2" else X.astype(np.float64)
    s = np.sqrt(np.mean((rows - rows.mean(axis=0)) ** 2))
    ours = estimators.LogRegHead(C=0.3, scaling=scaling).fit(X, y)
    assert ours.scaling_ == scaling and np.allclose(ours.scale_, s)
    ref = LogisticRegression(C=0.3 / s**2, max_iter=5000, tol=1e-10).fit(rows, y)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(rows), atol=2e-3)
    if scaling == "l2":  # only the direction of a row counts
        np.testing.assert_allclose(ours.predict_proba(5 * X), ours.predict_proba(X), atol=1e-6)


def test_auto_scaling_avoids_standardising_rare_features_and_wins_on_validation():
    # 40 informative dense features plus 400 rare ones: each rare feature fires on one or two
    # training images only, so standardising multiplies it by ~10 and lets noise dominate.
    rng = np.random.default_rng(0)

    def data(n):
        y = rng.integers(0, 2, n)
        dense = rng.normal(size=(n, 40)) + 0.35 * (2 * y[:, None] - 1)
        rare = (rng.random((n, 400)) < 0.004) * rng.uniform(1, 3, (n, 400))
        return np.hstack([dense, rare]).astype(np.float32), y.astype(np.int32)

    X, y = data(400)
    Xv, yv = data(2000)
    standard = estimators.LogRegHead(scaling="standard").fit(X, y)
    auto = estimators.LogRegHead().fit(X, y)
    assert auto.scaling_ != "standard"
    curves = auto.cv_results_["log_loss"]
    assert min(curves[auto.scaling_]) < min(curves["standard"])
    assert auto.score(Xv, yv) > standard.score(Xv, yv) + 0.02, (
        auto.score(Xv, yv),
        standard.score(Xv, yv),
    )


@pytest.mark.parametrize("kind", estimators.HEADS)
def test_save_and_load_give_identical_probabilities(kind, fitted, tmp_path):
    head, Xv = fitted[kind]
    fp = {"backbone": "MobileNetV2", "weights_sha256": "abc"}
    path = estimators.save_head(
        head, tmp_path, ["cats", "dogs", "owls"], fp, extra={"cache": "c.h5"}
    )
    meta = json.loads(path.read_text())
    assert meta["head"] == kind and meta["class_names"] == ["cats", "dogs", "owls"]
    assert meta["fingerprint"] == fp and meta["cache"] == "c.h5" and meta["feature_dim"] == 16
    assert (tmp_path / meta["file"]).suffix == (".npz" if kind == "logreg" else ".keras")
    loaded, loaded_meta = estimators.load_head(tmp_path)
    assert type(loaded) is type(head) and loaded_meta == meta
    assert loaded.get_params() == head.get_params()
    np.testing.assert_array_equal(loaded.predict_proba(Xv), head.predict_proba(Xv))


def test_the_logreg_file_loads_without_pickle(fitted, tmp_path):
    head, _ = fitted["logreg"]
    estimators.save_head(head, tmp_path, ["a", "b", "c"], {})
    with np.load(tmp_path / "head.npz", allow_pickle=False) as z:
        assert set(z.files) == {"mean", "scale", "coef", "intercept", "C", "scaling"}
        assert all(z[k].dtype == np.float64 for k in z.files if k != "scaling")
        assert str(z["scaling"]) == head.scaling_ and z["scaling"].dtype.kind == "U"


def test_a_head_saved_before_scaling_was_a_choice_loads_as_standardised(tmp_path):
    X, y = blobs((30, 30, 30), seed=15)
    head = estimators.LogRegHead(C=0.5, scaling="standard").fit(X, y)
    estimators.save_head(head, tmp_path, ["a", "b", "c"], {})
    meta = json.loads((tmp_path / "head.json").read_text())
    with np.load(tmp_path / "head.npz") as z:  # the files as featx wrote them before #17
        np.savez(tmp_path / "head.npz", **{k: z[k] for k in z.files if k != "scaling"})
    del meta["flip"], meta["options"]["scaling"], meta["fitted"]["scaling"], meta["fitted"]["flip"]
    (tmp_path / "head.json").write_text(json.dumps({**meta, "format_version": 1}))
    loaded, _ = estimators.load_head(tmp_path)
    assert loaded.scaling_ == "standard" and loaded.flip_ is False
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))


@pytest.mark.parametrize("kind", estimators.HEADS)
def test_to_keras_reproduces_predict_proba(kind, fitted):
    head, Xv = fitted[kind]
    model = head.to_keras()
    assert model.input_shape == (None, 16) and model.output_shape == (None, 3)
    out = np.asarray(model.predict(Xv, verbose=0))
    np.testing.assert_allclose(out, head.predict_proba(Xv), atol=1e-5)


@pytest.mark.parametrize("kind", estimators.HEADS)
@pytest.mark.parametrize("scaling", ["none", "standard", "l2"])
def test_every_scaling_is_saved_loaded_and_folded_into_keras(kind, scaling, tmp_path):
    import keras

    X, y = blobs((40, 30, 30), seed=16)
    X = np.abs(X) * np.linspace(0.1, 3, 16, dtype=np.float32)  # uneven, positive features
    options = {"C": 0.5} if kind == "logreg" else {}
    head = make(kind, scaling=scaling, **options).fit(X, y, X, y)
    assert head.scaling_ == scaling and head.summary()["scaling"] == scaling
    model = head.to_keras()
    units = [layer for layer in model.layers if isinstance(layer, keras.layers.UnitNormalization)]
    assert len(units) == (scaling == "l2")
    np.testing.assert_allclose(model.predict(X, verbose=0), head.predict_proba(X), atol=1e-5)
    estimators.save_head(head, tmp_path, ["a", "b", "c"], {})
    loaded, meta = estimators.load_head(tmp_path)
    assert loaded.scaling_ == scaling and meta["fitted"]["scaling"] == scaling
    np.testing.assert_allclose(loaded.predict_proba(X), head.predict_proba(X), atol=1e-12)


def test_dense_head_with_auto_scaling_takes_the_logistic_regressions_choice():
    X, y = blobs((40, 40), seed=17)
    X = X + 5.0
    dense = make("dense", scaling="auto").fit(X, y)
    assert dense.scaling_ == estimators.LogRegHead().fit(X, y).scaling_
    assert dense.get_params()["scaling"] == "auto"  # the parameter stays what was asked


def test_mirror_images_are_extra_training_rows_kept_in_the_same_fold():
    # With mirror features equal to the originals, training on both is training on each image
    # twice, which is the plain fit at twice the C. The cross-validation must keep an image and
    # its mirror in the same fold: then its curve is the plain curve shifted by a factor 2 in C
    # (were they split apart, held-out images would be in training and their loss far lower).
    X, y = blobs((40, 40, 40), distance=2.0, seed=18)
    Cs = (0.05, 0.1, 0.2, 0.4, 0.8)
    plain = estimators.LogRegHead(Cs=Cs, scaling="standard").fit(X, y)
    both = estimators.LogRegHead(Cs=Cs, scaling="standard").fit(X, y, X_flip=X)
    assert both.flip_ and not plain.flip_ and both.summary()["flip"] is True
    np.testing.assert_allclose(
        both.cv_results_["log_loss"]["standard"][:-1],
        plain.cv_results_["log_loss"]["standard"][1:],
        rtol=2e-3,
    )
    same_c = estimators.LogRegHead(C=0.2, scaling="standard")
    np.testing.assert_allclose(
        same_c.fit(X, y, X_flip=X).predict_proba(X),
        estimators.LogRegHead(C=0.4, scaling="standard").fit(X, y).predict_proba(X),
        atol=1e-4,
    )


@pytest.mark.parametrize("kind", estimators.HEADS)
def test_a_head_fitted_with_mirror_images_says_so_in_head_json(kind, tmp_path):
    X, y = blobs((30, 30), seed=19)
    F = X + np.random.default_rng(0).normal(scale=0.3, size=X.shape).astype(np.float32)
    head = make(kind).fit(X, y, estimators.flip_views(X, F), y, X_flip=F)
    assert head.flip_
    path = estimators.save_head(head, tmp_path, ["a", "b"], {})
    assert json.loads(path.read_text())["flip"] is True
    assert estimators.load_head(tmp_path)[0].flip_ is True
    np.testing.assert_allclose(estimators.flip_views(X, F), (X + F) / 2)
    with pytest.raises(FeatxError, match="mirror images' features have shape"):
        make(kind).fit(X, y, X_flip=F[:10])


def test_dense_to_keras_leaves_out_dropout_and_l2_but_keeps_the_weights(fitted):
    import keras

    head, Xv = fitted["dense"]
    model = head.to_keras()
    assert model is not head.model_  # a copy: training it (finetune) leaves the head alone
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    assert any(isinstance(layer, keras.layers.Dropout) for layer in head.model_.layers)
    assert model.losses == [] and head.model_.losses != []  # no L2 term in finetune's loss
    before = head.predict_proba(Xv)
    np.testing.assert_allclose(model.predict(Xv, verbose=0), before, atol=1e-5)
    model.layers[-1].kernel.assign(np.zeros(model.layers[-1].kernel.shape))
    np.testing.assert_array_equal(head.predict_proba(Xv), before)  # the head's weights are its own


def test_a_killed_save_never_leaves_a_torn_head_or_a_stale_head_json(fitted, tmp_path, monkeypatch):
    head, Xv = fitted["logreg"]
    estimators.save_head(head, tmp_path, ["a", "b", "c"], {"backbone": "x"})
    before = (tmp_path / "head.npz").read_bytes()

    def killed(folder):
        (folder / "head.npz").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(head, "_save", killed)
    with pytest.raises(KeyboardInterrupt):
        estimators.save_head(head, tmp_path, ["a", "b", "c"], {"backbone": "x"})
    assert (tmp_path / "head.npz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "head.npz"]


def test_to_keras_of_a_binary_logreg_is_a_two_class_softmax():
    X, y = blobs((40, 40), distance=1.5, seed=8)
    head = estimators.LogRegHead(C=1.0).fit(X, y)
    assert head.coef_.shape == (1, 16)  # scikit-learn's binary form
    model = head.to_keras()
    assert model.output_shape == (None, 2)
    np.testing.assert_allclose(model.predict(X, verbose=0), head.predict_proba(X), atol=1e-5)


def test_dense_head_is_reproducible_and_stops_at_the_best_validation_loss():
    # overlapping classes and a hidden layer: the validation loss turns up within a few epochs
    X, y = blobs((60, 60), distance=1.0, seed=9)
    Xv, yv = blobs((30, 30), distance=1.0, seed=9)
    options = {**DENSE, "epochs": 30, "patience": 2, "hidden": 32, "learning_rate": 0.05}
    options["l2"] = 0.0  # so the validation loss is the plain log loss checked below
    a = estimators.DenseHead(seed=3, **options).fit(X, y, Xv, yv)
    b = estimators.DenseHead(seed=3, **options).fit(X, y, Xv, yv)
    np.testing.assert_array_equal(a.predict_proba(Xv), b.predict_proba(Xv))
    assert a.history_ == b.history_ and a.best_epoch_ == b.best_epoch_

    assert set(a.history_) >= {"loss", "val_loss", "accuracy", "val_accuracy"}
    assert a.epochs_run_ == len(a.history_["loss"]) < 30  # stopped early
    assert a.best_epoch_ == int(np.argmin(a.history_["val_loss"])) + 1
    assert a.epochs_run_ == a.best_epoch_ + 2  # patience 2
    p = a.predict_proba(Xv)  # the best epoch's weights were restored
    loss = -np.mean(np.log(p[np.arange(len(yv)), yv]))
    assert loss == pytest.approx(min(a.history_["val_loss"]), rel=1e-3)


def test_heads_follow_the_scikit_learn_estimator_contract():
    X, y = blobs((30, 30), seed=12)
    for head in (estimators.LogRegHead(C=1.0), estimators.DenseHead(**DENSE)):
        assert not [k for k in vars(head) if k.endswith("_")]  # __init__ stores parameters only
        assert clone(head).get_params() == head.get_params()
        assert head.fit(X, y) is head
        assert head.predict(X).shape == (60,) and head.score(X, y) > 0.9


def test_float16_features_are_computed_in_float32():
    X, y = blobs((40, 40), seed=13)
    head = estimators.LogRegHead(C=1.0).fit(X.astype(np.float16), y)
    np.testing.assert_allclose(
        head.predict_proba(X.astype(np.float16)), head.predict_proba(X), atol=1e-3
    )


def test_bad_input_gives_clear_errors(fitted, tmp_path):
    X, y = blobs((20, 20), seed=14)
    with pytest.raises(FeatxError, match=r"Classes \[1\] have no training example"):
        estimators.LogRegHead(C=1.0).fit(X, np.where(y == 1, 2, y))
    with pytest.raises(FeatxError, match="at least 2 classes"):
        estimators.LogRegHead(C=1.0).fit(X, np.zeros_like(y))
    with pytest.raises(FeatxError, match="Expected 40 labels"):
        estimators.LogRegHead().fit(X, y[:10])
    with pytest.raises(FeatxError, match="class_weight must be one of"):
        estimators.LogRegHead(class_weight="auto").fit(X, y)
    with pytest.raises(FeatxError, match="C must be > 0, got 0"):
        estimators.LogRegHead(C=0).fit(X, y)
    with pytest.raises(FeatxError, match="scaling must be one of .* got 'minmax'"):
        estimators.LogRegHead(scaling="minmax").fit(X, y)
    with pytest.raises(FeatxError, match="scaling must be one of"):
        estimators.DenseHead(scaling="minmax").fit(X, y)
    with pytest.raises(FeatxError, match=r"dropout must be in \[0, 1\), got 1.5"):
        estimators.DenseHead(dropout=1.5).fit(X, y)
    with pytest.raises(FeatxError, match="Unknown head 'svm'"):
        estimators.make_head("svm")
    with pytest.raises(FeatxError, match="not fitted yet"):
        estimators.LogRegHead().predict(X)
    head, _ = fitted["logreg"]
    with pytest.raises(FeatxError, match="trained on 16-d features, got 8-d"):
        head.predict(X[:, :8])
    with pytest.raises(FeatxError, match="3 outputs but 2 class names"):
        estimators.save_head(head, tmp_path, ["a", "b"], {})
    with pytest.raises(FeatxError, match="No head.json in"):
        estimators.load_head(tmp_path / "nowhere")
    estimators.save_head(head, tmp_path, ["a", "b", "c"], {})
    meta = json.loads((tmp_path / "head.json").read_text())
    (tmp_path / "head.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(FeatxError, match="format version 99, this featx reads versions 1, 2"):
        estimators.load_head(tmp_path)
