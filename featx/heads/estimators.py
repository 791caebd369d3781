"""Classifier heads on cached features: logistic regression and a small Keras Dense head.

Both are scikit-learn-style estimators, interchangeable (tests/test_estimator_contract.py checks
exactly this; they are not check_estimator-compliant: labels are 0..C-1, errors are featx's).
They implement scikit-learn's estimator protocol themselves (get_params, set_params, clone,
score, tags) and import scikit-learn only to fit: a loaded logistic regression predicts with
numpy alone, so `featx predict` never pays the seconds scikit-learn and SciPy take to import (#25).
    head = LogRegHead() or DenseHead()             # __init__ stores parameters only
    head.fit(X, y, X_val=None, y_val=None)         # returns self; learned state ends in "_"
    head.predict_proba(X) -> (n, num_classes)      # float64 rows that sum to 1
    head.predict(X) -> (n,) int                    # argmax of predict_proba
    head.to_keras() -> keras model, (None, D) features -> softmax probabilities
Labels are integers 0..C-1 (indices into the cache's class_names) and every class must appear in y.

Both scale the features first ("standard", "none" or "l2", see fit_scaling; "auto" lets the
logistic regression's cross-validation choose). `fit(..., X_flip=F)` adds the features of the
mirror images as training rows; the head then predicts from flip_views(X, F), the mean of an
image's and its mirror image's features, and says so (flip_ True, "flip" in head.json).

`to_keras()` is the seam for the later stages (finetune's warm start, predict, export): it gives the
same probabilities as predict_proba (to float32 rounding) as a Keras model that can sit on top of
the backbone. `save_head` / `load_head` store a head without pickle: the Dense head as a .keras
file, the logistic regression as arrays in an .npz file, both next to a head.json that records the
class names and the fingerprint of the cache the head was trained on.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from featx import config
from featx.config import VERSION
from featx.errors import FeatxError, fraction_hint
from featx.files import read_json, temporary_path, write_text_atomic

HEAD_FORMAT = "featx-head"
# 2: the logistic regression's scaling ("scaling" in head.npz) and "flip" in head.json. Version 1
# heads (standardised, no mirror images) still load; older featx refuses version 2 heads.
HEAD_FORMAT_VERSION = 2
READABLE_HEAD_VERSIONS = (1, 2)
HEADS = config.HEADS
CLASS_WEIGHTS = config.CLASS_WEIGHTS


# --- input checks shared by both heads ----------------------------------------------------------


def _features(X, n_features: int | None = None) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise FeatxError(f"Features must be a 2-d array (images, dims), got shape {X.shape}.")
    if X.shape[1] == 0:  # Keras' oneDNN kernels abort the process on 0-column inputs
        raise FeatxError(
            "Features have 0 columns; expected the backbone's features (images, dims)."
        )
    if n_features is not None and X.shape[1] != n_features:
        raise FeatxError(
            f"The head was trained on {n_features}-d features, got {X.shape[1]}-d. "
            "Use features from the same backbone as the training cache."
        )
    return X.astype(np.float32, copy=False)  # float16 caches are computed in float32


def _labels(y, n: int) -> tuple[np.ndarray, int]:
    """(labels as int64, number of classes); every class 0..C-1 must occur."""
    y = np.asarray(y)
    if y.shape != (n,):
        raise FeatxError(f"Expected {n} labels (one per feature row), got shape {y.shape}.")
    if n == 0:
        raise FeatxError("Cannot fit a head on 0 images.")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise FeatxError(f"Labels must be class indices 0..C-1, got {y.dtype} {y[:5]}...")
    y = y.astype(np.int64)
    k = int(y.max()) + 1
    missing = sorted(set(range(k)) - set(np.unique(y).tolist()))
    if missing:
        raise FeatxError(f"Classes {missing} have no training example; every class needs one.")
    if k < 2:
        raise FeatxError("A classifier needs at least 2 classes, got 1.")
    return y, k


def _class_weight(class_weight: str | None) -> str:
    cw = "none" if class_weight is None else str(class_weight).lower()
    if cw not in CLASS_WEIGHTS:
        raise FeatxError(f"class_weight must be one of {CLASS_WEIGHTS}, got {class_weight!r}.")
    return cw


def _balanced_weights(y: np.ndarray, k: int) -> np.ndarray:
    """scikit-learn's "balanced": n / (k * count(class))."""
    return len(y) / (k * np.bincount(y, minlength=k).astype(np.float64))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class _Head:
    """scikit-learn's estimator protocol, without importing scikit-learn: the parameters are the
    arguments of __init__, stored unchanged (what get_params, set_params and sklearn.base.clone
    rely on); score is the accuracy, as ClassifierMixin's."""

    kind = ""
    _estimator_type = "classifier"  # scikit-learn < 1.6 reads this; later ones the tags below

    @classmethod
    def _get_param_names(cls) -> list[str]:
        parameters = inspect.signature(cls.__init__).parameters
        return sorted(name for name in parameters if name != "self")

    def get_params(self, deep: bool = True) -> dict:
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params):
        valid = self._get_param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"Invalid parameter {name!r} for estimator {type(self).__name__}. "
                    f"Valid parameters are: {valid!r}."
                )
            setattr(self, name, value)
        return self

    def __sklearn_tags__(self):
        # Asked for by scikit-learn only (so it is loaded): the tags its own classifiers have.
        from sklearn.base import BaseEstimator, ClassifierMixin

        class Classifier(ClassifierMixin, BaseEstimator):
            pass

        return Classifier().__sklearn_tags__()

    def __repr__(self) -> str:
        defaults = inspect.signature(type(self).__init__).parameters
        changed = [
            f"{name}={value!r}"
            for name, value in self.get_params().items()
            if defaults[name].default is inspect.Parameter.empty or value != defaults[name].default
        ]
        return f"{type(self).__name__}({', '.join(changed)})"

    def score(self, X, y, sample_weight=None) -> float:
        """Accuracy on (X, y), as scikit-learn's classifiers score."""
        hits = self.predict(X) == np.asarray(y)
        return float(np.average(hits, weights=sample_weight))

    def predict(self, X) -> np.ndarray:
        return np.argmax(self.predict_proba(X), axis=1)

    @property
    def num_classes(self) -> int:
        return len(self.classes_)

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise FeatxError(f"This {type(self).__name__} is not fitted yet; call fit() first.")


# --- feature scaling, shared by both heads ------------------------------------------------------

SCALINGS = config.SCALINGS


def _scaling(scaling: str | None) -> str:
    s = "auto" if scaling is None else str(scaling).lower()
    if s not in SCALINGS:
        raise FeatxError(
            f"scaling must be one of {SCALINGS}, got {scaling!r}. 'auto' lets the "
            "cross-validation choose."
        )
    return s


def _unit_rows(X: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (keras.layers.UnitNormalization computes the same)."""
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def fit_scaling(X, scaling: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) of the affine step of a feature scaling, fitted on the rows of X:

    - "standard": per-feature mean and standard deviation (scikit-learn's StandardScaler; 1 for
      a constant feature). Gives rare features the weight of common ones, which can hurt when a
      feature is active on only a few training images.
    - "none": per-feature mean and one scale for all features (the root-mean-square of the
      centred features): the raw features in other units. With an unpenalised intercept this is
      the same model as scikit-learn's LogisticRegression on the raw features, only C is in the
      units of the other scalings and lbfgs converges faster.
    - "l2": the same, on each row divided by its L2 norm first (see apply_scaling).
    """
    Z = np.asarray(X, np.float64)
    if scaling == "l2":
        Z = _unit_rows(Z)
    mean = Z.mean(axis=0)
    if scaling == "standard":
        scale = Z.std(axis=0)
    else:
        scale = np.full(Z.shape[1], np.sqrt(np.mean((Z - mean) ** 2)))
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0  # constant features: as StandardScaler
    return mean, scale


def apply_scaling(X, scaling: str, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(X - mean) / scale, on unit-length rows for "l2"; float64."""
    Z = np.asarray(X, np.float64)
    if scaling == "l2":
        Z = _unit_rows(Z)
    return (Z - mean) / scale


def _with_flips(X, y, X_flip):
    """Training rows: the images, then (with X_flip) their mirror images with the same labels."""
    if X_flip is None:
        return X, y
    return np.concatenate([X, X_flip]), np.concatenate([y, y])


def _mirrored(X: np.ndarray, X_flip) -> np.ndarray | None:
    """X_flip checked against X (row for row the same images), as float32; None stays None."""
    if X_flip is None:
        return None
    X_flip = _features(X_flip)
    if X_flip.shape != X.shape:
        raise FeatxError(
            f"The mirror images' features have shape {X_flip.shape}, the features {X.shape}; "
            "they must be row for row the same images. Re-run `featx extract --flip`."
        )
    return X_flip


def flip_views(X, X_flip) -> np.ndarray:
    """What a head fitted with mirror images (flip_ True) predicts from: the mean of each
    image's features and those of its mirror image, row for row (float32)."""
    X = _features(X)
    return (X + _mirrored(X, X_flip)) / 2


# --- logistic regression ------------------------------------------------------------------------


class LogRegHead(_Head):
    """Feature scaling + multinomial LogisticRegression (L2, lbfgs); scaling and C chosen together
    by cross-validation.

    Args:
        C: inverse regularisation strength; None chooses it from `Cs` by stratified k-fold
            cross-validation on the training data only (lowest mean held-out log loss, ties go to
            the smaller C). The scaling is refitted inside every fold.
        Cs: the grid searched when C is None.
        scaling: "standard", "none", "l2" (see fit_scaling) or "auto": each of
            config.SCALING_CHOICES in the same cross-validation, the pair (scaling, C) with the
            lowest held-out log loss wins (ties: the earlier scaling).
        cv_folds: folds of that cross-validation (fewer when a class has fewer images).
        max_iter: lbfgs iterations per fit.
        class_weight: "none" or "balanced" (weights n / (classes * count) per class).
        seed: seeds the folds.

    fit(X, y, X_flip=...) also trains on the features of the mirror images (same labels), keeps
    an image and its mirror in the same fold, and scores held-out images on flip_views(); such
    a head (flip_ True) expects flip_views() features from then on.

    Learned: classes_, n_features_in_, C_, scaling_, flip_, cv_results_ ({"C": [...],
    "log_loss": {scaling: [...]}} or None), mean_, scale_ (the affine step of the scaling),
    coef_ ((C, D), or (1, D) for two classes like scikit-learn), intercept_. predict_proba needs
    only these, so a loaded head is the fitted one.
    """

    kind = "logreg"

    def __init__(
        self,
        C: float | None = None,
        Cs=config.LOGREG_CS,
        scaling: str = config.SCALING,
        cv_folds: int = config.LOGREG_CV_FOLDS,
        max_iter: int = config.LOGREG_MAX_ITER,
        class_weight: str = config.CLASS_WEIGHT,
        seed: int = config.SEED,
    ):
        self.C = C
        self.Cs = Cs
        self.scaling = scaling
        self.cv_folds = cv_folds
        self.max_iter = max_iter
        self.class_weight = class_weight
        self.seed = seed

    def _model(self, C: float, warm_start: bool = False):
        from sklearn.linear_model import LogisticRegression

        cw = "balanced" if _class_weight(self.class_weight) == "balanced" else None
        return LogisticRegression(
            C=C, class_weight=cw, max_iter=self.max_iter, warm_start=warm_start, tol=1e-4
        )

    def check_params(self) -> None:
        """Each parameter's value, checked before any work (FeatxError naming the bad one)."""
        _class_weight(self.class_weight)
        _scaling(self.scaling)
        if self.C is not None and not float(self.C) > 0:
            raise FeatxError(f"C must be > 0, got {self.C!r}.")

    def fit(self, X, y, X_val=None, y_val=None, X_flip=None) -> LogRegHead:
        """Fit on (X, y), and on the mirror images' features X_flip when given. X_val/y_val are
        accepted for the common interface and not used: every choice (the scaling, C) is made on
        the training data."""
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from threadpoolctl import threadpool_limits

        X = _features(X)
        y, k = _labels(y, len(X))
        X_flip = _mirrored(X, X_flip)
        self.check_params()
        # One BLAS thread: on these small matrices OpenBLAS threads only add overhead, and
        # on a busy 2-core machine they spin against each other (measured: 0.7 s vs 8-15 s).
        with threadpool_limits(config.LOGREG_BLAS_THREADS), warnings.catch_warnings():
            # On separable features lbfgs may stop at max_iter; the fit is still usable.
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.scaling_, self.C_, self.cv_results_ = self._cross_validate(X, y, k, X_flip)
            A, yA = _with_flips(X, y, X_flip)
            self.mean_, self.scale_ = fit_scaling(A, self.scaling_)
            model = self._model(self.C_).fit(
                apply_scaling(A, self.scaling_, self.mean_, self.scale_), yA
            )
        self.classes_ = np.arange(k)
        self.n_features_in_ = X.shape[1]
        self.flip_ = X_flip is not None
        self.coef_ = model.coef_.astype(np.float64)
        self.intercept_ = model.intercept_.astype(np.float64)
        return self

    def _cross_validate(self, X, y, k, X_flip=None) -> tuple[str, float, dict | None]:
        """(scaling, C, the cross-validation curves or None when nothing was chosen)."""
        from sklearn.model_selection import StratifiedKFold

        scaling = _scaling(self.scaling)
        scalings = list(config.SCALING_CHOICES) if scaling == "auto" else [scaling]
        if self.C is not None:
            Cs = [float(self.C)]
        else:
            Cs = sorted(float(c) for c in self.Cs)
            if not Cs or Cs[0] <= 0:
                raise FeatxError(f"Cs must be a non-empty list of values > 0, got {self.Cs!r}.")
        if len(scalings) * len(Cs) == 1:
            return scalings[0], Cs[0], None
        folds = min(int(self.cv_folds), int(np.bincount(y, minlength=k).min()))
        if folds < 2:  # a class with one image: nothing to validate on
            C = Cs[0] if len(Cs) == 1 else config.LOGREG_FALLBACK_C
            return scalings[0], C, None
        splitter = StratifiedKFold(folds, shuffle=True, random_state=self.seed)
        tasks = [
            (fold, name) for fold in splitter.split(X, y) for name in scalings
        ]  # each task: one scaling's path over the Cs on one fold; threads share them out
        workers = min(len(tasks), config.LOGREG_CV_THREADS or config.cores())
        with ThreadPoolExecutor(workers, thread_name_prefix="featx-cv") as pool:
            paths = list(pool.map(lambda t: self._cv_path(X, y, X_flip, *t, Cs), tasks))
        losses = np.array(paths).reshape(folds, len(scalings), len(Cs)).transpose(1, 0, 2)
        mean_loss = losses.mean(axis=1)  # (scalings, Cs)
        # ties: the earlier scaling, then the smaller C
        best = int(np.flatnonzero(mean_loss.ravel() <= mean_loss.min() + 1e-12)[0])
        s, j = divmod(best, len(Cs))
        curves = {n: [round(float(v), 6) for v in row] for n, row in zip(scalings, mean_loss)}
        return scalings[s], Cs[j], {"C": Cs, "log_loss": curves}

    def _cv_path(self, X, y, X_flip, fold, scaling: str, Cs: list[float]) -> list[float]:
        """Held-out log loss of each C on one fold (train, test) with one scaling; each C
        starts from the previous C's fit. With mirror images, the training rows include those of
        the training images and the held-out images are scored on flip_views()."""
        tr, te = fold
        A, yA = _with_flips(X[tr], y[tr], None if X_flip is None else X_flip[tr])
        held_out = X[te] if X_flip is None else (X[te] + X_flip[te]) / 2
        mean, scale = fit_scaling(A, scaling)
        # float32: half the memory and ~2x faster lbfgs; the final fit is in float64
        Atr = apply_scaling(A, scaling, mean, scale).astype(np.float32)
        Ate = apply_scaling(held_out, scaling, mean, scale).astype(np.float32)
        model = self._model(Cs[0], warm_start=True)
        losses = []
        for C in Cs:
            model.set_params(C=C).fit(Atr, yA)
            p = model.predict_proba(Ate)[np.arange(len(te)), y[te]]
            losses.append(float(-np.mean(np.log(np.clip(p, 1e-15, 1.0)))))
        return losses

    def decision_function(self, X) -> np.ndarray:
        """Logits, (n, C): for two classes [0, z], whose softmax is scikit-learn's sigmoid."""
        self._check_fitted()
        X = _features(X, self.n_features_in_)
        z = apply_scaling(X, self.scaling_, self.mean_, self.scale_) @ self.coef_.T
        z = z + self.intercept_
        return np.hstack([np.zeros_like(z), z]) if self.coef_.shape[0] == 1 else z

    def predict_proba(self, X) -> np.ndarray:
        return _softmax(self.decision_function(X))

    def folded_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """(kernel (D, C), bias (C,)) of one Dense layer that includes the affine step of the
        scaling (for "l2" it takes unit-length rows: to_keras puts a UnitNormalization first)."""
        self._check_fitted()
        coef, intercept = self.coef_, self.intercept_
        if coef.shape[0] == 1:
            coef = np.vstack([np.zeros_like(coef), coef])
            intercept = np.concatenate([[0.0], intercept])
        kernel = (coef / self.scale_).T
        bias = intercept - (self.mean_ / self.scale_) @ coef.T
        return kernel, bias

    def to_keras(self):
        """Sequential([UnitNormalization (scaling "l2" only), Dense(C, softmax)]) on (None, D)
        features, the affine step of the scaling folded into the Dense weights."""
        import keras

        kernel, bias = self.folded_weights()
        layers = [keras.Input((self.n_features_in_,), name="features")]
        if self.scaling_ == "l2":
            layers.append(keras.layers.UnitNormalization(name="unit_length"))
        layers.append(
            keras.layers.Dense(self.num_classes, activation="softmax", name="head_logits")
        )
        model = keras.Sequential(layers, name="featx_logreg_head")
        model.layers[-1].set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
        return model

    def summary(self) -> dict:
        return {"C": self.C_, "scaling": self.scaling_, "flip": self.flip_, "cv": self.cv_results_}

    # NPZ without pickle: only numeric arrays and one unicode string.
    def _save(self, folder: Path) -> str:
        name = "head.npz"
        np.savez(
            folder / name,
            mean=self.mean_,
            scale=self.scale_,
            coef=self.coef_,
            intercept=self.intercept_,
            C=np.float64(self.C_),
            scaling=np.array(self.scaling_),
        )
        return name

    def _load(self, path: Path, meta: dict) -> None:
        with np.load(path, allow_pickle=False) as z:
            self.mean_, self.scale_ = z["mean"], z["scale"]
            self.coef_, self.intercept_ = z["coef"], z["intercept"]
            self.C_ = float(z["C"])
            # heads saved before scaling was a choice were standardised
            self.scaling_ = str(z["scaling"]) if "scaling" in z.files else "standard"
        self.cv_results_ = meta.get("fitted", {}).get("cv")
        self.flip_ = bool(meta.get("flip", False))
        self.classes_ = np.arange(len(meta["class_names"]))
        self.n_features_in_ = int(self.mean_.shape[0])
        self.outputs_ = max(2, int(self.coef_.shape[0]))  # (1, D) for two classes


# --- the Keras Dense head -----------------------------------------------------------------------


class DenseHead(_Head):
    """Scaling -> [Dense(hidden, relu)] -> Dropout -> Dense(C, softmax), trained with AdamW.

    Args:
        scaling: the feature scaling in front ("standard", "none", "l2": see fit_scaling), as
            Keras layers (UnitNormalization for "l2", then Normalization with the fitted mean and
            scale); "auto": the scaling the logistic regression's cross-validation chooses on the
            training data (LogRegHead(scaling="auto")).
        hidden: units of the optional hidden layer; 0 for none (a softmax regression).
        dropout: dropout rate before the output layer (0 for none).
        epochs: most epochs; with validation data, training stops when the validation loss has
            not improved for `patience` epochs and the best epoch's weights are restored.
        batch_size, learning_rate: of AdamW.
        weight_decay: AdamW's decoupled weight decay; 0 uses plain Adam.
        l2: L2 penalty on the Dense kernels, added to the loss (and so to the validation loss
            that early stopping watches); like logreg's C, about 1 / (2 * C * n_train).
        patience: see epochs.
        class_weight: "none" or "balanced" (training loss weights n / (classes * count)).
        seed: keras.utils.set_random_seed(seed) before building: same seed, same head.
        verbose: Keras' fit verbosity.

    fit(X, y, X_val, y_val, X_flip=...) also trains on the mirror images' features; pass X_val
    as flip_views() then, which is what such a head (flip_ True) expects from then on.

    Learned: classes_, n_features_in_, scaling_, flip_, model_ (the Keras model), history_
    ({"loss": [...], "val_loss": [...], "accuracy": [...], "val_accuracy": [...]} per epoch: Keras'
    objective, with the L2 penalty, and the training accuracy with dropout on; plus "log_loss",
    "val_log_loss" and "inference_accuracy": the log loss and training accuracy of the epoch's
    weights without dropout and penalty, as metrics.json reports them), best_epoch_ (1-based),
    epochs_run_.
    """

    kind = "dense"

    def __init__(
        self,
        scaling: str = config.DENSE_SCALING,
        hidden: int = config.DENSE_HIDDEN,
        dropout: float = config.DENSE_DROPOUT,
        epochs: int = config.DENSE_EPOCHS,
        batch_size: int = config.DENSE_BATCH_SIZE,
        learning_rate: float = config.DENSE_LEARNING_RATE,
        weight_decay: float = config.DENSE_WEIGHT_DECAY,
        l2: float = config.DENSE_L2,
        patience: int = config.DENSE_PATIENCE,
        class_weight: str = config.CLASS_WEIGHT,
        seed: int = config.SEED,
        verbose: int = 0,
    ):
        self.scaling = scaling
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.l2 = l2
        self.patience = patience
        self.class_weight = class_weight
        self.seed = seed
        self.verbose = verbose

    def check_params(self) -> None:
        """Each parameter's value, checked before any work (FeatxError naming the bad one)."""
        checks = [
            ("hidden", self.hidden, int(self.hidden) >= 0, "an integer >= 0"),
            ("dropout", self.dropout, 0 <= float(self.dropout) < 1, "in [0, 1)"),
            ("epochs", self.epochs, int(self.epochs) >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size, int(self.batch_size) >= 1, "an integer >= 1"),
            ("learning_rate", self.learning_rate, float(self.learning_rate) > 0, "> 0"),
            ("weight_decay", self.weight_decay, float(self.weight_decay) >= 0, ">= 0"),
            ("l2", self.l2, float(self.l2) >= 0, ">= 0"),
            ("patience", self.patience, int(self.patience) >= 1, "an integer >= 1"),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                hint = fraction_hint(value, "[0, 1)") if name == "dropout" else "."
                raise FeatxError(f"{name} must be {expected}, got {value!r}{hint}")
        _class_weight(self.class_weight)
        _scaling(self.scaling)

    def _build(self, X: np.ndarray, k: int):
        import keras

        mean, scale = fit_scaling(X, self.scaling_)
        scaling = (
            [keras.layers.UnitNormalization(name="unit_length")] if self.scaling_ == "l2" else []
        )
        scaling.append(keras.layers.Normalization(mean=mean, variance=scale**2, name="standardize"))
        l2 = float(self.l2)

        def dense(units, activation, name):
            reg = keras.regularizers.L2(l2) if l2 > 0 else None
            return keras.layers.Dense(units, activation, kernel_regularizer=reg, name=name)

        layers = [keras.Input((X.shape[1],), name="features"), *scaling]
        if int(self.hidden) > 0:
            layers.append(dense(int(self.hidden), "relu", "hidden"))
        if float(self.dropout) > 0:
            layers.append(keras.layers.Dropout(float(self.dropout), seed=self.seed, name="dropout"))
        layers.append(dense(k, "softmax", "probabilities"))
        return keras.Sequential(layers, name="featx_dense_head")

    def fit(self, X, y, X_val=None, y_val=None, X_flip=None) -> DenseHead:
        """Train on (X, y) (and the mirror images' X_flip); with (X_val, y_val), stop early on
        their loss, keep the best epoch."""
        import keras

        self.check_params()
        X = _features(X)
        y, k = _labels(y, len(X))
        X_flip = _mirrored(X, X_flip)
        has_val = X_val is not None and len(X_val) > 0
        if has_val:
            X_val = _features(X_val, X.shape[1])
            y_val = np.asarray(y_val, np.int64)
        self.scaling_ = _scaling(self.scaling)
        if self.scaling_ == "auto":
            logreg = LogRegHead(scaling="auto", class_weight=self.class_weight, seed=self.seed)
            self.scaling_ = logreg.fit(X, y, X_flip=X_flip).scaling_
        self.flip_ = X_flip is not None
        X, y = _with_flips(X, y, X_flip)
        keras.utils.set_random_seed(int(self.seed))
        model = self._build(X, k)
        if float(self.weight_decay) > 0:
            opt = keras.optimizers.AdamW(float(self.learning_rate), float(self.weight_decay))
        else:
            opt = keras.optimizers.Adam(float(self.learning_rate))
        # XLA compiles for seconds and then saves little on a model this small (measured on a
        # CPU: 5.5 s vs 7 s cpu for 2,000 x 1,280); other backends keep their default (jit).
        jit = False if keras.backend.backend() == "tensorflow" else "auto"
        model.compile(opt, "sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=jit)
        callbacks = [_inference_metrics(X, y, X_val if has_val else None, y_val)]
        if has_val:
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    "val_loss", patience=int(self.patience), restore_best_weights=True
                )
            )
        cw = None
        if _class_weight(self.class_weight) == "balanced":
            cw = dict(enumerate(_balanced_weights(y, k).tolist()))
        history = model.fit(
            X,
            y,
            batch_size=int(self.batch_size),
            epochs=int(self.epochs),
            validation_data=(X_val, y_val) if has_val else None,
            class_weight=cw,
            callbacks=callbacks,
            shuffle=True,
            verbose=self.verbose,
        )
        self.model_ = model
        self.history_ = {m: [float(v) for v in vs] for m, vs in history.history.items()}
        self.epochs_run_ = len(self.history_.get("loss", []))
        if has_val:
            self.best_epoch_ = int(np.argmin(self.history_["val_loss"])) + 1
        else:
            self.best_epoch_ = self.epochs_run_
        self.classes_ = np.arange(k)
        self.n_features_in_ = X.shape[1]
        return self

    def predict_proba(self, X) -> np.ndarray:
        self._check_fitted()
        X = _features(X, self.n_features_in_)
        if len(X) == 0:
            return np.zeros((0, self.num_classes))
        import keras

        # Calling the model directly (no tf.function per model, so no retracing warnings).
        p = np.concatenate(
            [
                keras.ops.convert_to_numpy(self.model_(X[i : i + 4096], training=False))
                for i in range(0, len(X), 4096)
            ]
        ).astype(np.float64)
        return p / p.sum(axis=1, keepdims=True)

    def to_keras(self):
        """A copy of the trained model ((None, D) features -> softmax probabilities) without its
        Dropout and L2 penalties: training-only parts that would otherwise stack on finetune's
        own dropout and add to its validation loss."""
        import keras

        self._check_fitted()
        dropout = keras.layers.Dropout
        kept = [layer for layer in self.model_.layers if not isinstance(layer, dropout)]
        copies = []
        for layer in kept:
            layer_config = layer.get_config()
            if "kernel_regularizer" in layer_config:
                layer_config["kernel_regularizer"] = None
            copies.append(type(layer).from_config(layer_config))
        model = keras.Sequential(
            [keras.Input((self.n_features_in_,), name="features"), *copies],
            name=self.model_.name,
        )
        for copy, layer in zip(copies, kept):
            copy.set_weights(layer.get_weights())
            if hasattr(copy, "finalize_state"):  # Normalization: mean/variance from the weights
                copy.finalize_state()
        return model

    def summary(self) -> dict:
        return {
            "scaling": self.scaling_,
            "flip": self.flip_,
            "epochs_run": self.epochs_run_,
            "best_epoch": self.best_epoch_,
            "parameters": int(self.model_.count_params()),
        }

    def _save(self, folder: Path) -> str:
        name = "head.keras"
        self.model_.save(folder / name)
        return name

    def _load(self, path: Path, meta: dict) -> None:
        import keras

        self.model_ = keras.saving.load_model(path, compile=False)  # safe_mode: no lambdas
        fitted = meta.get("fitted", {})
        self.scaling_ = fitted.get("scaling", "standard")  # standardised before it was a choice
        self.flip_ = bool(meta.get("flip", False))
        self.epochs_run_ = fitted.get("epochs_run")
        self.best_epoch_ = fitted.get("best_epoch")
        self.history_ = meta.get("history")
        self.classes_ = np.arange(len(meta["class_names"]))
        self.n_features_in_ = int(meta["feature_dim"])
        self.outputs_ = int(self.model_.output_shape[-1])


def _inference_metrics(X, y, X_val, y_val):
    """A Keras callback adding, after every epoch, what metrics.json reports for those weights:
    "log_loss" and "inference_accuracy" on the training data and "val_log_loss" on the validation
    data, in inference mode (no dropout) and without the L2 penalty that Keras' loss includes."""
    import keras

    def measure(model, X, y):
        p = np.concatenate(
            [
                keras.ops.convert_to_numpy(model(X[i : i + 4096], training=False))
                for i in range(0, len(X), 4096)
            ]
        ).astype(np.float64)
        true = np.clip(p[np.arange(len(y)), y], 1e-15, 1.0)
        return float(-np.log(true).mean()), float((p.argmax(1) == y).mean())

    class InferenceMetrics(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            logs["log_loss"], logs["inference_accuracy"] = measure(self.model, X, y)
            if X_val is not None:
                logs["val_log_loss"] = measure(self.model, X_val, y_val)[0]

    return InferenceMetrics()


# --- construction, saving and loading -----------------------------------------------------------


def make_head(head: str, **options) -> LogRegHead | DenseHead:
    """A new, unfitted head of kind "logreg" or "dense"; `options` are its __init__ arguments,
    checked here (check_params)."""
    classes = {"logreg": LogRegHead, "dense": DenseHead}
    if head not in classes:
        raise FeatxError(f"Unknown head {head!r}; expected one of {HEADS}.")
    estimator = classes[head](**options)
    estimator.check_params()  # before any work: `--dropout 50` costs no cache read (#26)
    return estimator


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def save_head(
    head: LogRegHead | DenseHead,
    folder: str | Path,
    class_names: list[str],
    fingerprint: dict,
    extra: dict | None = None,
) -> Path:
    """Write a fitted head to `folder` (created): head.npz or head.keras, and head.json.

    head.json: {"format": "featx-head", "format_version", "featx_version", "head", "file",
    "class_names", "feature_dim", "options" (the head's parameters), "fitted" (its summary()),
    "flip" (true: it predicts from flip_views() of an image and its mirror image), "fingerprint"
    (of the cache it was trained on), "history" (dense only)} plus `extra`.
    Returns the path of head.json.
    """
    head._check_fitted()
    if len(class_names) != head.num_classes:
        raise FeatxError(
            f"The head has {head.num_classes} outputs but {len(class_names)} class names were "
            "given; pass the class names of the cache it was trained on."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # The head file goes through a temporary folder and a rename, and head.json (written last)
    # names it: a killed save never leaves a torn file. (fit-head calls this on its staging
    # folder, swapped in whole with the rest of its output: featx.artifacts.outputs.)
    staging = temporary_path(folder / "head")
    staging.mkdir(exist_ok=True)
    try:
        name = head._save(staging)
        os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    meta = {
        "format": HEAD_FORMAT,
        "format_version": HEAD_FORMAT_VERSION,
        "featx_version": VERSION,
        "head": head.kind,
        "file": name,
        "class_names": list(class_names),
        "feature_dim": int(head.n_features_in_),
        "options": {k: _jsonable(v) for k, v in head.get_params().items()},
        "fitted": _jsonable_tree(head.summary()),
        "flip": bool(head.flip_),
        "fingerprint": fingerprint,
    }
    if head.kind == "dense":
        meta["history"] = head.history_
    meta.update(extra or {})
    return write_text_atomic(folder / "head.json", json.dumps(meta, indent=2, sort_keys=True))


def _jsonable_tree(obj):
    if isinstance(obj, dict):
        return {k: _jsonable_tree(v) for k, v in obj.items()}
    return _jsonable(obj)


def load_head(folder: str | Path) -> tuple[LogRegHead | DenseHead, dict]:
    """(head, meta) from a folder written by save_head; meta is head.json as a dict."""
    folder = Path(folder)
    path = folder / "head.json"
    meta = read_json(
        path, f"No head.json in '{folder}'. Pass the output folder of `featx fit-head`."
    )
    if meta.get("format") != HEAD_FORMAT:
        raise FeatxError(f"'{path}' is not a featx head (no format='{HEAD_FORMAT}').")
    if meta.get("format_version") not in READABLE_HEAD_VERSIONS:
        raise FeatxError(
            f"'{path}' is a featx head of format version {meta.get('format_version')}, this "
            f"featx reads versions {', '.join(map(str, READABLE_HEAD_VERSIONS))}. Re-run "
            "`featx fit-head` with this featx."
        )
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["options"].items()}
    head = make_head(meta["head"], **options)  # JSON made the tuples (Cs) lists
    file = folder / meta["file"]
    if not file.is_file():
        raise FeatxError(f"'{file}', named in {path}, is missing. Re-run `featx fit-head`.")
    try:
        head._load(file, meta)
    except Exception as e:  # a Lambda layer (refused in safe mode), a truncated or foreign file
        raise FeatxError(
            f"Could not load the head '{file}' ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Re-run `featx fit-head` to write it again."
        ) from None
    if head.outputs_ != len(head.classes_):  # a head.json of one run beside the file of another
        raise FeatxError(
            f"'{path}' lists {len(head.classes_)} classes, but the head '{file}' has "
            f"{head.outputs_} outputs: they were not written together. Re-run `featx fit-head` "
            "to write the folder again."
        )
    return head, meta
