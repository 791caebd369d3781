"""Stage 2: train a classifier head on cached features in seconds, and report honest metrics.

The head learns from the train split. The validation split recorded in the cache is the one every
number is reported on (and the Dense head's early stopping watches); a test split, if the cache
has one, is only evaluated. The logistic regression chooses its C by cross-validation inside the
train split, so its validation accuracy is an honest estimate too.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from featx import config
from featx.artifacts import outputs
from featx.cache import remote_cache, store
from featx.errors import FeatxError, Messages
from featx.files import absolute
from featx.heads import estimators, novelty
from featx.quality import duplicates
from featx.reports import evaluation, report_folder
from featx.reports.display import Result


def default_output_dir(cache_path: str | Path, head: str) -> Path:
    """`<cache folder>/<cache name>-<head>/`, next to the cache (cache/cats_and_dogs-logreg/),
    like finetune's output; predict finds the backbone's ONNX file there too. A cache at a URL:
    cache/<cache name>-<head>/."""
    cache_path = remote_cache.beside(cache_path)
    return cache_path.with_name(f"{cache_path.stem}-{head}")


def check_cache(cache: store.Cache, cache_path) -> None:
    """Refuse a cache the head cannot be fitted and honestly evaluated on."""
    for split in ("train", "validation"):
        if not (cache.splits == split).any():
            raise FeatxError(
                f"The cache '{cache_path}' has no {split} images; fit-head needs a train and a "
                "validation split. Re-run `featx extract` on DATA/CLASS/* (split by --val-split) "
                "or on DATA/{train,validation}/CLASS/*."
            )
    counts = cache.counts()["train"]
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise FeatxError(
            f"The class{'es' if len(empty) > 1 else ''} {', '.join(repr(c) for c in empty)} "
            f"{'have' if len(empty) > 1 else 'has'} no training image in '{cache_path}' "
            f"(train counts: {counts}). Add images of it to the train folder and re-run "
            "`featx extract`, or remove the class folder."
        )
    if len(cache.class_names) < 2:
        raise FeatxError(
            f"The cache '{cache_path}' has one class ({cache.class_names}); a classifier needs "
            "at least two class folders."
        )


def fit_head(
    cache_path: str | Path,
    head: str = config.HEAD,
    output: str | Path | None = None,
    *,
    C: float | None = None,
    scaling: str | None = None,
    flip: bool | None = None,
    epochs: int = config.DENSE_EPOCHS,
    learning_rate: float = config.DENSE_LEARNING_RATE,
    dropout: float = config.DENSE_DROPOUT,
    hidden: int = config.DENSE_HIDDEN,
    class_weight: str = config.CLASS_WEIGHT,
    seed: int = config.SEED,
    exclude_duplicates: bool = False,
    overwrite: bool = False,
    log=None,
) -> dict:
    """Fit a head on the train split of a feature cache, evaluate it, and write it with a report.

    Args:
        cache_path: a cache written by `featx extract`.
        head: "logreg" (multinomial logistic regression) or "dense" (a small Keras head); see
            featx.heads.estimators.
        output: folder to write to; default <cache folder>/<cache name>-<head>/.
        C: logistic regression only; None chooses it by cross-validation on the train split.
        scaling: "auto", "standard", "none" or "l2" (heads.estimators.fit_scaling); None: the head's
            default (config.SCALING, config.DENSE_SCALING).
        flip: train on the mirror images too and predict from the mean of an image's and its
            mirror image's features; needs a cache made with `featx extract --flip`. None: when
            the cache has them.
        epochs, learning_rate, dropout, hidden: Dense head only (see heads.estimators.DenseHead).
        class_weight: "none" or "balanced".
        seed: the same seed gives the same head and the same metrics.
        exclude_duplicates: leave out train images that are exact or near copies of validation
            or test images (see commands.audit); metrics.json lists them as "excluded_duplicates".
        overwrite: replace an output folder that holds another featx output (another head, another
            cache); the same head's output on the same cache is replaced without it, and a folder
            with files featx did not write never is (see featx.artifacts.outputs).
        log: called with one-line messages (notes, warnings); default: logging.getLogger(
            "featx"), and warnings as featx.FeatxWarning (also in metrics.json's "warnings").
    Returns:
        The metrics written to metrics.json (see featx.reports.evaluation for the keys).
    """
    log = Messages(log)
    dense = {"epochs": epochs, "learning_rate": learning_rate, "dropout": dropout, "hidden": hidden}
    options = _head_options(head, C, scaling, dense, {"class_weight": class_weight, "seed": seed})
    _note_ignored(head, dense, C, log)
    estimator = estimators.make_head(head, **options)
    out = Path(output) if output else default_output_dir(cache_path, head)
    made_by = outputs.made_by("fit-head", out, cache_path, head=head)  # same head, same cache
    outputs.check_target(out, made_by, overwrite)  # before any work
    cache, excluded = _load(cache_path, exclude_duplicates, log)
    train, data, train_flip = _views(cache, cache_path, flip)
    if head == "dense":
        import keras  # noqa: F401  (its start-up, seconds, is not part of fit_seconds)

    t0 = time.perf_counter()  # fit_seconds: the whole fit, the cross-validation included
    estimator.fit(*train, *data["validation"], X_flip=train_flip)
    fit_seconds = time.perf_counter() - t0
    metrics, predictions, unknown = _evaluate(estimator, cache, data)
    metrics.update(_details(estimator, cache, cache_path, round(fit_seconds, 3), out))
    if excluded is not None:
        metrics["excluded_duplicates"] = excluded
    found = _warnings(cache_path, metrics, exclude_duplicates)
    metrics["warnings"] = log.warnings + [text for text, _ in found]
    with outputs.writing(out, made_by, overwrite=overwrite, log=log) as stage:
        _record(estimator, cache, cache_path, (stage, out), (metrics, predictions, unknown))
    for text, summary_shows in found:  # after the files: an error that stops them comes alone
        log.warning(text, summary_shows=summary_shows)
    return Result(metrics, "metrics")


def _details(estimator, cache: store.Cache, cache_path, fit_seconds: float, out: Path) -> dict:
    """What metrics.json records beside the metrics: the head, its options, the cache."""
    return {
        "fit_seconds": fit_seconds,
        "head": estimator.kind,
        "options": {k: estimators._jsonable(v) for k, v in estimator.get_params().items()},
        "fitted": estimators._jsonable_tree(estimator.summary()),
        "cache": {  # data_dir: the folder misclassified.csv's paths are relative to
            "path": str(cache_path),
            "data_dir": cache.attrs.get("data_dir"),
            "feature_dim": int(cache.features.shape[1]),
            "dtype": str(cache.features.dtype),
            "counts": cache.counts(),
            "fingerprint": cache.fingerprint,
        },
        "class_names": list(cache.class_names),
        "output": str(out),
    }


def _warnings(cache_path, metrics: dict, exclude_duplicates: bool) -> list[tuple[str, bool]]:
    """The data problems found once the head is evaluated, for metrics.json's "warnings": near
    copies across the splits (unless excluded) and uneven classes, each with whether the CLI's
    summary already shows it."""
    found = []
    leaking = None if exclude_duplicates else duplicates.leakage_line(cache_path)
    if leaking:
        found.append((leaking, False))
    hint = evaluation.imbalance_hint(metrics)
    if hint:
        found.append((hint.removeprefix("hint: "), True))
    return found


def _head_options(head: str, C, scaling, dense: dict, common: dict) -> dict:
    """The parameters of the head asked for; the other head's options are left out."""
    if head not in estimators.HEADS:
        raise FeatxError(f"Unknown head {head!r}; expected one of {estimators.HEADS}.")
    if head == "logreg":
        return {"C": C, "scaling": scaling or config.SCALING, **common}
    return {"scaling": scaling or config.DENSE_SCALING, **dense, **common}


def _note_ignored(head: str, dense: dict, C, log) -> None:
    """One line when an option of the other head was given: a silent no-op would let users
    believe they tuned something."""
    defaults = {
        "epochs": config.DENSE_EPOCHS,
        "learning_rate": config.DENSE_LEARNING_RATE,
        "dropout": config.DENSE_DROPOUT,
        "hidden": config.DENSE_HIDDEN,
    }
    if head == "logreg":
        ignored = [k for k, value in dense.items() if value != defaults[k]]
    else:
        ignored = ["C"] if C is not None else []
    if ignored:
        names = ", ".join(f"--{k.replace('_', '-')}" for k in ignored)
        log(f"note: {names} applies to the other head, not to --head {head}; ignored.")


def _load(cache_path, exclude_duplicates: bool, log):
    """The cache, checked, optionally without the train copies of validation/test images:
    (cache, excluded paths or None)."""
    cache = store.read_cache(cache_path)  # refuses non-featx files and other format versions
    check_cache(cache, cache_path)
    excluded = None
    if exclude_duplicates:
        cache, excluded = duplicates.exclude_leaking(cache)
        log(f"excluded {len(excluded)} train copies of validation or test images.")
        check_cache(cache, cache_path)
    for name, n in cache.counts().get("validation", {}).items():
        if n == 0:
            log(f"warning: class '{name}' has no validation image; its recall is not measured.")
    return cache, excluded


def _views(cache: store.Cache, cache_path, flip: bool | None):
    """(plain train (X, y), {split: (X, y)} to evaluate on, mirrored train features or None).

    With flip, training sees the plain and the mirrored train rows, and every split is evaluated
    on the mean of both views, as predict and export compute it."""
    features = cache.features.astype(np.float32, copy=False)  # float16 caches too
    if flip is None:
        flip = cache.features_flip is not None
    elif flip and cache.features_flip is None:
        raise FeatxError(
            f"The cache '{cache_path}' has no features of mirror images, which --flip needs. "
            "Re-run `featx extract --flip` on its data folder (or drop --flip)."
        )
    data = {
        s: (features[cache.splits == s], cache.labels[cache.splits == s]) for s in config.SPLITS
    }
    if not flip:
        return data["train"], data, None
    mirrored = cache.features_flip.astype(np.float32, copy=False)
    views = {
        s: (estimators.flip_views(X, mirrored[cache.splits == s]), y) for s, (X, y) in data.items()
    }
    return data["train"], views, mirrored[cache.splits == "train"]


def _evaluate(estimator, cache: store.Cache, data: dict):
    """({split: metrics, "novelty": its summary}, {split: (labels, probabilities, paths)}, the
    head's novelty score) of the fitted head."""
    metrics, predictions = {}, {}
    for split, (X, y) in data.items():
        if len(y):
            proba = estimator.predict_proba(X)
            metrics[split] = evaluation.evaluate(y, proba, cache.class_names)
            paths = [p for p, s in zip(cache.paths, cache.splits) if s == split]
            predictions[split] = (y, proba, paths)
    # the score from the views the head predicts from (heads.novelty.fit)
    proba_val = predictions["validation"][1]
    unknown, metrics["novelty"] = novelty.fit(data["train"], data["validation"], proba_val)
    return metrics, predictions, unknown


def _record(estimator, cache: store.Cache, cache_path, folders: tuple, results: tuple) -> None:
    """The head, its novelty memory, head.json, metrics.json and the report files, into the
    staging folder of `folders` (staging, output folder)."""
    (stage, out), (metrics, predictions, unknown) = folders, results
    cache_file = absolute(cache_path)  # predict/export may run elsewhere
    novelty.save(unknown, stage)  # before head.json, which names it
    extra = {"cache": cache_file, "novelty": unknown.info()}
    estimators.save_head(estimator, stage, cache.class_names, cache.fingerprint, extra)
    report_folder.write_report(
        stage,
        metrics,
        predictions,
        history=getattr(estimator, "history_", None),
        class_names=cache.class_names,
        shown_as=out,
    )
