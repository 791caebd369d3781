"""Honest metrics and the files that show them; shared by fit-head and finetune.

evaluate(y_true, proba, class_names) gives one split's metrics, with these stable keys:
    n                  images evaluated
    accuracy           share of images whose most probable class is the true one
    accuracy_interval  its 95 % Wilson score interval [low, high]
    balanced_accuracy  mean recall over the classes present in the split
    balanced_accuracy_interval  its 95 % interval (per-class Jeffreys posteriors, averaged)
    macro_f1           mean F1 over the classes present in the split
    log_loss           mean -ln(probability of the true class), probabilities clipped at 1e-15
    per_class          {class name: {"precision", "recall", "f1", "support"}}, every class
    confusion_matrix   [[count]]: row = true class, column = predicted class, class_names order
    calibration        {"ece", "bins": [[low, high, mean confidence, share right, images]]}

write_report(out_dir, metrics, predictions, history=...) writes:
    report.html          everything below on one self-contained page (reports.html_report)
    metrics.json         `metrics` as given (fit-head: {"train", "validation", "test" (only when the
                         cache has one): evaluate() results; "fit_seconds", "head", "options",
                         "fitted", "cache", "class_names", "output", "warnings"})
    confusion_matrix.png validation and test matrices (train when they are absent): counts beside
                         the row-normalised matrix
    training_curves.png  loss and accuracy per epoch, as metrics.json measures them, when a
                         history is given
    misclassified.csv    path,true,predicted,probability,split: every wrong prediction of every
                         split, most confidently wrong first (probability = the predicted class's)
"""

from __future__ import annotations

import math

import numpy as np

from featx import config
from featx.errors import FeatxError

EPS = 1e-15


def evaluate(y_true, proba, class_names: list[str]) -> dict:
    """Metrics of one split from its true labels (n,) and predicted probabilities (n, C)."""
    y = np.asarray(y_true, np.int64)
    p = np.asarray(proba, np.float64)
    k = len(class_names)
    if p.ndim != 2 or p.shape != (len(y), k):
        raise FeatxError(
            f"Expected probabilities of shape ({len(y)}, {k}) for {len(y)} labels and {k} "
            f"classes, got {p.shape}."
        )
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise FeatxError(f"Labels must be in 0..{k - 1}, got values {np.unique(y).tolist()}.")
    from sklearn import metrics  # scikit-learn's definitions; imported by the commands that fit

    pred = p.argmax(axis=1) if len(y) else np.zeros(0, np.int64)
    labels = np.arange(k)
    cm = metrics.confusion_matrix(y, pred, labels=labels) if len(y) else np.zeros((k, k), int)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    ) if len(y) else (np.zeros(k),) * 3 + (np.zeros(k, int),)  # fmt: skip
    present = support > 0
    n = int(len(y))
    true_p = np.clip(p[np.arange(n), y], EPS, 1.0) if n else np.ones(0)
    tp = np.diag(cm)
    return {
        "n": n,
        "accuracy": _round(tp.sum() / n) if n else 0.0,
        "accuracy_interval": wilson_interval(int(tp.sum()), n),
        "balanced_accuracy": _round(recall[present].mean()) if present.any() else 0.0,
        "balanced_accuracy_interval": balanced_accuracy_interval(tp[present], support[present]),
        "macro_f1": _round(f1[present].mean()) if present.any() else 0.0,
        "log_loss": _round(-np.log(true_p).mean()) if n else 0.0,
        "per_class": {
            name: {
                "precision": _round(precision[i]),
                "recall": _round(recall[i]),
                "f1": _round(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "calibration": calibration(y, p),
    }


def wilson_interval(correct: int, n: int, level: float = config.INTERVAL_LEVEL) -> list[float]:
    """The Wilson score interval of a proportion (`correct` of `n`): unlike the normal
    approximation it stays inside [0, 1] and is honest at 100 % and for small n."""
    if n == 0:
        return [0.0, 1.0]
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [_round(max(0.0, centre - half)), _round(min(1.0, centre + half))]


def balanced_accuracy_interval(
    correct, support, level: float = config.INTERVAL_LEVEL, draws: int = config.INTERVAL_DRAWS
) -> list[float]:
    """The interval of the mean recall over classes: each class's recall drawn from its Jeffreys
    posterior Beta(correct + 1/2, wrong + 1/2) (the Jeffreys binomial interval, which, like
    Wilson's, stays honest at 100 % and for small classes), the mean of the classes' draws taken
    `draws` times, seeded (the same results give the same interval), and its central `level`."""
    support = np.asarray(support, np.int64)
    if not len(support) or support.sum() == 0:
        return [0.0, 1.0]
    correct = np.asarray(correct, np.float64)
    rng = np.random.default_rng(config.SEED)
    recalls = rng.beta(correct + 0.5, support - correct + 0.5, size=(draws, len(support)))
    low, high = np.quantile(recalls.mean(axis=1), [0.5 - level / 2, 0.5 + level / 2])
    return [_round(low), _round(high)]


def calibration(y, p, bins: int = config.CALIBRATION_BINS) -> dict:
    """How sure against how often right: the confidence (the predicted class's probability) cut
    into equal-width bins, each [low, high, mean confidence, share right, images], and the
    expected calibration error (the images-weighted mean gap, Guo et al. 2017)."""
    n = len(y)
    confidence = p.max(axis=1) if n else np.zeros(0)
    right = (p.argmax(axis=1) == y) if n else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        conf = float(confidence[inside].mean()) if count else 0.0
        acc = float(right[inside].mean()) if count else 0.0
        ece += count / n * abs(conf - acc) if n else 0.0
        rows.append([_round(edges[b]), _round(edges[b + 1]), _round(conf), _round(acc), count])
    return {"ece": _round(ece), "bins": rows}


def with_interval(m: dict, key: str) -> str:
    """`0.95 [0.89, 0.98]`: a metric with its interval, in the digits the interval justifies
    (metrics written before intervals existed: the value alone, 4 decimals)."""
    interval = m.get(f"{key}_interval")
    if not interval:
        return f"{m[key]:.4f}"
    d = digits_for(interval)
    return f"{m[key]:.{d}f} [{interval[0]:.{d}f}, {interval[1]:.{d}f}]"


def digits_for(interval) -> int:
    """Decimals worth printing for a value with this interval: two significant digits of its
    half-width (0.9524 with [0.89, 0.98] prints as 0.95, with [0.948, 0.956] as 0.952)."""
    half = (interval[1] - interval[0]) / 2
    return 4 if half <= 0 else max(2, min(4, math.ceil(-math.log10(half))))


def _round(v) -> float:
    v = float(v)
    return round(v, 6) if math.isfinite(v) else 0.0


def misclassified(predictions: dict, class_names: list[str]) -> list[dict]:
    """Rows {path, true, predicted, probability, split} of every wrong prediction, most
    confidently wrong first. predictions: {split: (y_true, proba, paths)}, the paths as the cache
    holds them (relative to the data folder, which metrics.json records as cache.data_dir)."""
    rows = []
    for split, (y, p, paths) in predictions.items():
        y, p = np.asarray(y), np.asarray(p)
        if not len(y):
            continue
        pred = p.argmax(axis=1)
        for i in np.flatnonzero(pred != y):
            rows.append(
                {
                    "path": str(paths[i]),
                    "true": class_names[int(y[i])],
                    "predicted": class_names[int(pred[i])],
                    "probability": round(float(p[i, pred[i]]), 6),
                    "split": split,
                }
            )
    rows.sort(key=lambda r: (-r["probability"], r["path"]))
    return rows


def class_names_of(metrics: dict) -> list[str]:
    """The class names a metrics dict records ([] when it has none)."""
    if metrics.get("class_names"):
        return list(metrics["class_names"])
    for split in config.SPLITS:
        if isinstance(metrics.get(split), dict) and "per_class" in metrics[split]:
            return list(metrics[split]["per_class"])
    return []


def required_class_names(metrics: dict) -> list[str]:
    names = class_names_of(metrics)
    if not names:
        raise FeatxError("metrics has no class names and no split with per_class results.")
    return names


def best_and_start(metrics: dict) -> tuple[int | None, dict | None]:
    """(the epoch whose weights were kept, the warm start as epoch 0) from a metrics dict:
    finetune's "best_epoch" and "before", or the dense head's fitted["best_epoch"]."""
    if "before" in metrics:
        before = metrics["before"]
        start = {
            "val_loss": before["validation"]["log_loss"],
            "val_accuracy": before["validation"]["accuracy"],
        }
        return metrics.get("best_epoch"), start
    return (metrics.get("fitted") or {}).get("best_epoch"), None


def has_matrix(metrics: dict, split: str) -> bool:
    return isinstance(metrics.get(split), dict) and metrics[split].get("n", 0) > 0


def imbalance_hint(metrics: dict) -> str | None:
    """A hint to use --class-weight balanced, when the largest class has config.IMBALANCE_RATIO
    times the training images of the smallest and the head was fitted without class weights."""
    from featx import config

    counts = ((metrics.get("cache") or {}).get("counts") or {}).get("train") or {}
    weight = (metrics.get("options") or {}).get("class_weight", "none")
    if len(counts) < 2 or weight not in ("none", None) or min(counts.values()) == 0:
        return None
    (big, n_big), (small, n_small) = (
        max(counts.items(), key=lambda c: c[1]),
        min(counts.items(), key=lambda c: c[1]),
    )
    if n_big < config.IMBALANCE_RATIO * n_small:
        return None
    return (
        f"hint: uneven classes: '{big}' has {n_big} training images, '{small}' {n_small} "
        f"({n_big / n_small:.1f}x). Try --class-weight balanced, and compare balanced accuracy."
    )


def novelty_line(unknown: dict) -> str:
    """One line on the unknown-image check: the threshold, its rate, the leave-one-class-out
    AUROC estimate."""
    loco = unknown.get("leave_one_class_out_auroc")
    how = (
        f"; a class it never saw ranks above the known ones with AUROC {loco:.2f} "
        "(leave-one-class-out estimate)"
        if loco is not None
        else ""
    )
    return (
        f"unknown images: novelty > {unknown['threshold']:.4g} flags {unknown['rate']:.0%} of the "
        f"{unknown.get('calibrated_on', 'validation')} images{how}"
    )


def format_summary(metrics: dict) -> str:
    """The readable stdout summary: accuracy per split, then a per-class table."""
    names = required_class_names(metrics)
    splits = [s for s in config.SPLITS if has_matrix(metrics, s)]
    lines = []
    if metrics.get("head"):
        fitted = metrics.get("fitted") or {}
        extra = ", ".join(
            f"{k} {v}" for k, v in fitted.items() if v is not None and not isinstance(v, dict)
        )
        lines.append(
            f"{metrics['head']} head fitted in {metrics.get('fit_seconds', 0):.2f} s"
            + (f" ({extra})" if extra else "")
        )
    lines.append(
        f"{'split':<11}{'n':>7}  {'accuracy [95 % interval]':<26}{'balanced accuracy':<26}"
        f"{'macro F1':>9}{'log loss':>10}"
    )
    for s in splits:
        m = metrics[s]
        lines.append(
            f"{s:<11}{m['n']:>7}  {with_interval(m, 'accuracy'):<26}"
            f"{with_interval(m, 'balanced_accuracy'):<26}"
            f"{m['macro_f1']:>9.4f}{m['log_loss']:>10.4f}"
        )
    table = "validation" if "validation" in splits else (splits[-1] if splits else None)
    if table:
        width = max(12, max(len(n) for n in names) + 2)
        lines.append(f"per class ({table}):")
        lines.append(f"  {'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
        for name in names:
            c = metrics[table]["per_class"][name]
            lines.append(
                f"  {name:<{width}}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}"
                f"{c['support']:>9}"
            )
    hint = imbalance_hint(metrics) if metrics.get("head") else None
    if hint:
        lines.append(hint)
    if metrics.get("novelty"):
        lines.append(novelty_line(metrics["novelty"]))
    if metrics.get("output"):
        lines.append(f"wrote {metrics['output']}")
    return "\n".join(lines)
