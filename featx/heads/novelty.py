"""How unlike its training images a photo is: the novelty score stored with every head (#23).

The score fuses two signals, each divided by its own value at the 1 - rate quantile on known
held-out images (so "1" means "as unusual as the rate's worst known images" for both):

- the cosine distance from the image's features to the nearest training image's features
  (L2-normalised; Sun et al. 2022): far from everything seen, as a photo of another domain is;
- 1 - the head's highest probability (max-softmax): between classes, as a new class of the same
  domain often is.

novelty = max(distance / distance_scale, (1 - max probability) / confidence_scale), and an image is
unknown when novelty > threshold, the 1 - rate quantile of the known held-out images' novelty (a
false-rejection rate of `rate` on images like the validation split). bench/unknown.py measured it
against either signal alone and against Mahalanobis (docs/benchmarks.md has the table).

The memory is the training features, L2-normalised, stored as float16 (2 bytes per dimension),
a seeded random MEMORY_CAP of them when there are more. Everything here is numpy: predict with a
logistic-regression head imports neither scikit-learn nor TensorFlow. Saved without pickle as
novelty.npz (the memory) beside the head, the numbers in head.json's "novelty" (finetune.json's
for a finetune model, whose memory holds the finetuned backbone's features).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from featx import config
from featx.errors import FeatxError, check_fraction

DEFAULT_RATE = config.UNKNOWN_RATE
MEMORY_FILE = "novelty.npz"
_CHUNK = 2048  # rows per similarity product: 2048 x 5000 float32 = 40 MB


def _unit(X) -> np.ndarray:
    X = np.asarray(X, np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def memory(X, cap: int = config.NOVELTY_MEMORY_CAP, seed: int = config.SEED) -> np.ndarray:
    """The training features to remember: L2-normalised float16 rows, at most `cap` (a seeded
    random subset, in their original order, when there are more)."""
    X = np.asarray(X)
    if len(X) > cap:
        keep = np.sort(np.random.default_rng(seed).choice(len(X), cap, replace=False))
        X = X[keep]
    return _unit(X).astype(np.float16)


def nearest_distance(bank: np.ndarray, X) -> np.ndarray:
    """Cosine distance (1 - similarity) from each row of X to its nearest row of the memory."""
    bank32 = np.asarray(bank, np.float32)
    Z = _unit(X)
    out = np.empty(len(Z))
    for lo in range(0, len(Z), _CHUNK):
        out[lo : lo + _CHUNK] = 1.0 - (Z[lo : lo + _CHUNK] @ bank32.T).max(axis=1)
    return out


def _fused(distance, proba, distance_scale: float, confidence_scale: float) -> np.ndarray:
    doubt = 1.0 - np.asarray(proba, np.float64).max(axis=1)
    return np.maximum(np.asarray(distance) / distance_scale, doubt / confidence_scale)


def _quantile(values, rate: float) -> float:
    return float(np.quantile(np.asarray(values, np.float64), 1.0 - rate))


def threshold_at(known, rate: float) -> float:
    """The threshold that flags `rate` of the known images' novelty `known`."""
    return _quantile(known, check_rate(rate))


@dataclass
class Novelty:
    """A head's novelty score: memory (float16 unit rows), the two scales, the threshold and the
    false-rejection rate it was calibrated at."""

    memory: np.ndarray
    distance_scale: float
    confidence_scale: float
    threshold: float
    rate: float
    known: np.ndarray  # the known held-out images' novelty, sorted: re-calibrates at another rate
    calibrated_on: str = "validation"

    def score(self, features, proba) -> np.ndarray:
        """Novelty of each image from its head features and the head's probabilities."""
        return score(self, nearest_distance(self.memory, features), proba)

    def with_rate(self, rate: float) -> Novelty:
        """The same score, its threshold calibrated again on the same known images at `rate`."""
        if rate == self.rate:
            return self
        return replace(self, threshold=threshold_at(self.known, rate), rate=rate)

    def info(self) -> dict:
        """What head.json records (the memory goes to novelty.npz)."""
        return {
            "method": "max(nearest-neighbour cosine distance, 1 - max probability), each scaled",
            "file": MEMORY_FILE,
            "memory_rows": int(len(self.memory)),
            "distance_scale": self.distance_scale,
            "confidence_scale": self.confidence_scale,
            "threshold": self.threshold,
            "rate": self.rate,
            "calibrated_on": self.calibrated_on,
            "known_images": int(len(self.known)),
        }


def calibrate(bank, distance, proba, rate: float = DEFAULT_RATE, calibrated_on="validation"):
    """A Novelty from known held-out images: their distances to the memory and their probabilities.
    Each signal's scale is its 1 - rate quantile; the threshold that of the fused score."""
    check_rate(rate)
    if len(distance) == 0:
        raise FeatxError("Cannot calibrate the unknown threshold on 0 known images.")
    doubt = 1.0 - np.asarray(proba, np.float64).max(axis=1)
    d_scale = max(_quantile(distance, rate), 1e-6)
    c_scale = max(_quantile(doubt, rate), 1e-6)
    fused = np.sort(_fused(distance, proba, d_scale, c_scale))
    threshold = _quantile(fused, rate)
    return Novelty(np.asarray(bank), d_scale, c_scale, threshold, rate, fused, calibrated_on)


def score(state: Novelty, distance, proba) -> np.ndarray:
    """The fused score from distances already computed (bench/unknown.py)."""
    return _fused(distance, proba, state.distance_scale, state.confidence_scale)


def keras_score(state: Novelty):
    """The score as Keras layers, for an exported model: a function (features, probabilities)
    -> (n,) novelty tensor. The memory is a constant matmul over the L2-normalised features
    (a frozen Dense layer without bias), so the model holds it as float32 weights."""
    import keras

    bank = np.asarray(state.memory, np.float32)
    d_scale, c_scale = float(state.distance_scale), float(state.confidence_scale)

    def build(features, proba):
        unit = keras.layers.UnitNormalization(name="novelty_unit_length")(features)
        memory = keras.layers.Dense(len(bank), use_bias=False, name="novelty_memory")
        similarity = memory(unit)
        memory.set_weights([bank.T])
        memory.trainable = False
        distance = 1.0 - keras.ops.max(similarity, axis=1)
        doubt = 1.0 - keras.ops.max(proba, axis=1)
        return keras.ops.maximum(distance / d_scale, doubt / c_scale)

    return build


def auroc(known, unknown) -> float:
    """P(an unknown image scores above a known one), ties counting half (Mann-Whitney U)."""
    known, unknown = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    both = np.concatenate([known, unknown])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2  # ties share their mean rank
    ranks = mid_rank[inverse]
    u = ranks[len(known) :].sum() - len(unknown) * (len(unknown) + 1) / 2
    return float(u / (len(known) * len(unknown)))


def leave_one_class_out(X_train, y_train, X_val, y_val, proba_val, rate=DEFAULT_RATE):
    """How well the score tells a class it never saw from the others, on the head's own data:
    for each class c, the memory holds the training images of the other classes, the known
    images are the validation images of the other classes, the unknown ones those of c, and the
    head's probabilities are renormalised over the other classes (the head is not refitted: an
    estimate, measured against refitted heads in bench/unknown.py). Returns the mean AUROC over
    the classes, or None with fewer than 3 classes or a class without validation images."""
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    k = int(proba_val.shape[1])
    if k < 3 or any(not (y_val == c).any() for c in range(k)):
        return None
    aurocs = []
    for c in range(k):
        bank = memory(np.asarray(X_train)[y_train != c])
        others = np.delete(np.asarray(proba_val, np.float64), c, axis=1)
        others /= np.maximum(others.sum(axis=1, keepdims=True), 1e-12)
        distance = nearest_distance(bank, X_val)
        known = y_val != c
        state = calibrate(bank, distance[known], others[known], rate)
        fused = score(state, distance, others)
        aurocs.append(auroc(fused[known], fused[~known]))
    return float(np.mean(aurocs))


def fit(train: tuple, validation: tuple, proba_val) -> tuple[Novelty, dict]:
    """The novelty score of a model from the features its head sees: `train` and `validation`
    are (features, labels), proba_val the model's validation probabilities. The memory of the
    training features, the threshold calibrated on the validation images at
    config.UNKNOWN_RATE, and the summary metrics.json reports (with the leave-one-class-out
    AUROC estimate). fit-head and finetune both build theirs here."""
    (X_train, y_train), (X_val, y_val) = train, validation
    bank = memory(X_train)
    state = calibrate(bank, nearest_distance(bank, X_val), proba_val)
    loco = leave_one_class_out(X_train, y_train, X_val, y_val, proba_val)
    summary = {
        "threshold": round(state.threshold, 6),
        "rate": state.rate,
        "calibrated_on": state.calibrated_on,
        "memory_rows": int(len(bank)),
        "leave_one_class_out_auroc": None if loco is None else round(loco, 4),
    }
    return state, summary


def check_rate(rate) -> float:
    """--unknown-rate: a share of known images in (0, 1); 5 gets "did you mean 0.05?"."""
    check_fraction("--unknown-rate", rate)
    if rate == 0:
        raise FeatxError("--unknown-rate must be > 0 (0.05 flags 1 in 20 known images), got 0.")
    return float(rate)


def save(state: Novelty, folder: str | Path) -> Path:
    """novelty.npz (the memory, no pickle) in `folder`."""
    path = Path(folder) / MEMORY_FILE
    with open(path, "wb") as f:
        np.savez(f, memory=np.asarray(state.memory, np.float16), known=state.known)
    return path


def load(folder: str | Path, info: dict) -> Novelty:
    """The Novelty recorded in head.json's "novelty" (`info`) and novelty.npz in `folder`."""
    path = Path(folder) / info.get("file", MEMORY_FILE)
    try:
        with np.load(path, allow_pickle=False) as data:
            bank, known = data["memory"], data["known"]
    except (OSError, KeyError, ValueError) as e:
        raise FeatxError(
            f"Could not read the novelty memory '{path}' ({type(e).__name__}). Re-run "
            "`featx fit-head` (or `featx finetune`), or predict with --no-unknown."
        ) from None
    return Novelty(
        bank,
        float(info["distance_scale"]),
        float(info["confidence_scale"]),
        float(info["threshold"]),
        float(info["rate"]),
        known,
        info.get("calibrated_on", "validation"),
    )
