"""Stage 3: rebuild one end-to-end Keras model, warm-start it from a stage-2 head, fine-tune it.

The model takes raw RGB pixels (0..255) and chains, all as standard Keras layers (so model.keras
loads in safe mode): augmentation (active only in training) -> the backbone's own preprocessing
layer -> the MobileNetV2 base called with training=False (BatchNormalization stays in inference
mode even where the base is unfrozen) -> dropout -> the stage-2 head as a Keras model. Warm-started
this way, the model starts at the stage-2 accuracy, which is measured first ("before") and kept
unless an epoch beats it on the validation split: fine-tuning never ends worse than it started.

Images are decoded from disk by the shared loader, with exactly the split recorded in the cache,
a few batches ahead of the model on a thread pool (keras.utils.PyDataset), so memory does not grow
with the data set.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featx import config
from featx.artifacts import model_dirs, outputs
from featx.backbone import mobilenet
from featx.cache import store
from featx.errors import FeatxError, Messages
from featx.files import absolute, save_keras_atomic, write_text_atomic
from featx.images import decoding, finder
from featx.options import FinetuneOptions, build_options, takes_options
from featx.reports import evaluation, report_folder
from featx.reports.display import Result
from featx.reports.progress import reporter

if TYPE_CHECKING:
    from featx.backbone.finetune_keras import ImageBatches

# Keras is imported inside the functions (and the Keras subclasses live in backbone.finetune_keras),
# so `featx finetune` answers a wrong path at once instead of after loading TensorFlow.

MODEL_FILE = model_dirs.FINETUNE_MODEL
INFO_FILE = model_dirs.FINETUNE_INFO


def default_output_dir(cache_path: str | Path) -> Path:
    """`<cache folder>/<cache name>-finetune/`, next to the cache (cache/cats_and_dogs-finetune)."""
    cache_path = Path(cache_path)
    return cache_path.with_name(f"{cache_path.stem}-finetune")


# --- the data --------------------------------------------------------------------------------


def predict_batches(model, data: ImageBatches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities and head features of every image that decodes, in order: (proba, row
    indices, features). `model` gives [features, probabilities] (see `mobilenet.scoring_model`).

    Decodes a few batches ahead (decoding.prefetch); batches are padded to a fixed size so the
    model is traced once.
    """
    probas, rows, features = [], [], []
    ahead, workers = max(1, data.max_queue_size), max(1, data.workers)
    batches = decoding.prefetch(([i] for i in range(len(data))), data.load, ahead, workers)
    try:
        for _, [(x, _, kept)] in batches:
            batch = np.zeros((data.batch_size, *x.shape[1:]), np.float32)
            batch[: len(x)] = x
            f, p = model.predict_on_batch(batch)
            features.append(np.asarray(f, np.float32)[: len(x)])
            probas.append(np.asarray(p, np.float32)[: len(x)])
            rows.append(kept)
    finally:
        batches.close()
    return np.concatenate(probas), np.concatenate(rows), np.concatenate(features)


# --- the model -------------------------------------------------------------------------------


def build_model(
    fingerprint: dict,
    head_model,
    *,
    augment: bool = True,
    dropout: float = config.FINETUNE_DROPOUT,
    seed: int = config.SEED,
):
    """The end-to-end model: raw RGB pixels (0..255, uint8 or float) -> class probabilities.

    Args:
        fingerprint: the cache's fingerprint; the base is rebuilt with its weights, image size
            and alpha, and must give the same fingerprint (else FeatxError).
        head_model: the stage-2 head as a Keras model, (None, D) features -> probabilities; its
            weights are the warm start.
        augment: put the augmentation layers in front (they do nothing at inference).
        dropout: rate of the Dropout between the pooled features and the head.
    The whole base starts frozen; see `set_trainable`.
    """
    spec = mobilenet.BackboneSpec.from_fingerprint(fingerprint)
    mobilenet.check_compatible(
        fingerprint,
        spec.fingerprint(),
        "The cache",
        f"The weights '{spec.weights}' found now differ from those that made the cache; re-run "
        "`featx extract` (with --overwrite) so features and fine-tuning use the same backbone.",
    )
    return mobilenet.compose(
        spec, head_model, augment=augment, dropout=dropout, seed=seed, name="featx_finetune"
    )


def base_of(model):
    """The MobileNetV2 base inside an end-to-end model (also after keras.saving.load_model)."""
    for layer in model.layers:
        if layer.name.startswith("mobilenetv2"):
            return layer
    raise FeatxError(f"'{model.name}' has no MobileNetV2 base; it is not a featx finetune model.")


def set_trainable(model, unfreeze_layers: int) -> list[str]:
    """Unfreeze the top `unfreeze_layers` layers of the base, except BatchNormalization.

    The head always trains. Returns the names of the unfrozen base layers. Compile (again)
    afterwards: Keras reads `trainable` when it compiles.
    """
    import keras

    base = base_of(model)
    layers = [layer for layer in base.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not 0 <= unfreeze_layers <= len(layers):
        raise FeatxError(
            f"unfreeze_layers must be between 0 and {len(layers)} (the layers of the base), "
            f"got {unfreeze_layers}."
        )
    base.trainable = True  # lets the flags of the layers below decide
    top = layers[len(layers) - unfreeze_layers :] if unfreeze_layers else []
    for layer in layers:
        layer.trainable = layer in top and not isinstance(layer, keras.layers.BatchNormalization)
    return [layer.name for layer in top]


def compile_model(model, learning_rate: float = config.FINETUNE_LEARNING_RATE) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    # Build the optimizer's slots now, so that every saved model.keras (also one saved before
    # any step) holds the full optimizer state and loads without warnings.
    model.optimizer.build(model.trainable_variables)


# --- the stage -------------------------------------------------------------------------------


def _keras_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Keras' sparse categorical cross-entropy (probabilities clipped at 1e-7), to compare the
    warm start with the epochs' val_loss on one scale."""
    p = np.clip(proba[np.arange(len(y)), y], 1e-7, 1.0)
    return float(-np.mean(np.log(p)))


def _split_rows(cache: store.Cache, root: Path, log) -> tuple[dict, list[dict]]:
    """{split: (paths, labels)} of the files still on disk, and the missing ones."""
    out, missing = {}, []
    for split in config.SPLITS:
        idx = np.flatnonzero(cache.splits == split)
        if not len(idx):
            continue
        paths, labels = [], []
        for i in idx:
            path = finder.inside(root, cache.paths[i])
            if path is not None and path.is_file():
                paths.append(cache.paths[i])
                labels.append(cache.labels[i])
            else:
                reason = "file not found" if path else "outside the data folder; not read"
                missing.append({"path": cache.paths[i], "reason": reason})
        out[split] = (paths, np.asarray(labels, np.int32))
    for m in missing[:5]:
        log(f"warning: skipping {m['path']}: {m['reason']}")
    if len(missing) > 5:
        log(f"warning: ... and {len(missing) - 5} more missing files")
    return out, missing


def _load_inputs(cache_path, head_dir, data_dir):
    from featx.heads import estimators

    cache = store.read_cache(cache_path, features=False)  # paths, labels, splits
    for split in ("train", "validation"):
        if not (cache.splits == split).any():
            raise FeatxError(
                f"The cache '{cache_path}' has no {split} split; fine-tuning needs train and "
                "validation images. Re-run `featx extract` on a folder with both."
            )
    head_dir = Path(head_dir)
    if not head_dir.is_dir():
        raise FeatxError(
            f"Head folder not found: '{head_dir}'. Fit one first with "
            f"`featx fit-head {cache_path}`, and pass its output folder to --head."
        )
    head, meta = outputs.read_whole(head_dir, lambda: estimators.load_head(head_dir))
    mobilenet.require_float(meta["fingerprint"], f"The head in '{head_dir}'", "finetune")
    mobilenet.check_compatible(
        meta["fingerprint"],
        cache.fingerprint,
        f"The head in '{head_dir}'",
        f"It was fitted on another cache than '{cache_path}'; fit a head on this cache with "
        f"`featx fit-head {cache_path}`.",
    )
    if list(meta["class_names"]) != list(cache.class_names):
        raise FeatxError(
            f"The head in '{head_dir}' predicts the classes {list(meta['class_names'])}, the "
            f"cache '{cache_path}' has {list(cache.class_names)}. Fit a head on this cache with "
            f"`featx fit-head {cache_path}`."
        )
    root = Path(data_dir) if data_dir else Path(str(cache.attrs.get("data_dir", "")))
    if not root.is_dir():
        raise FeatxError(
            f"The images of the cache '{cache_path}' were read from '{root}', which is not a "
            "folder here. Pass --data-dir with the folder's new location."
        )
    return cache, head, meta, root


def _head_validation_accuracy(head_dir: Path) -> float | None:
    try:
        return float(json.loads((head_dir / "metrics.json").read_text())["validation"]["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class _Job:
    """One fine-tuning run: its inputs, its model and its data, as _prepare builds them."""

    cache: store.Cache
    cache_path: Path
    head_dir: Path
    root: Path
    out: Path
    opts: FinetuneOptions
    rows: dict  # split -> (paths, labels) of the files on disk
    missing: list  # [{"path", "reason"}] of the cache's files that are not
    made_by: dict = field(default_factory=dict)  # the output folder's manifest "made_by"
    stage: Path | None = None  # where the output folder is staged (outputs.writing)
    model: object = None
    scorer: object = None  # mobilenet.scoring_model(model)
    unfrozen: list = field(default_factory=list)
    data: dict = field(default_factory=dict)  # split -> ImageBatches (evaluation order)


@takes_options(FinetuneOptions)
def finetune(
    cache_path: str | Path,
    head_dir: str | Path,
    output: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    progress=True,
    log=None,
    **options,
) -> dict:
    """Fine-tune the backbone and the stage-2 head end to end on the cache's images.

    Args:
        cache_path: the feature cache; its fingerprint fixes the backbone, and its recorded
            train/validation(/test) split and paths fix the images.
        head_dir: a `featx fit-head` output folder fitted on this cache (the warm start).
        output: where to write; default `<cache folder>/<cache name>-finetune/`.
        unfreeze_layers: how many top layers of the base train (BatchNormalization never does);
            0 trains only the head, with augmentation.
        epochs, patience: at most `epochs` epochs; stops after `patience` epochs without a lower
            validation loss. The weights kept are the best epoch's on validation (more images
            right, or as many with a lower loss), or the warm start's when no epoch beats it.
        learning_rate: AdamW's learning rate (keep it low: 1e-5 adapts, 1e-3 destroys).
        augment: random flip/rotation/zoom/contrast in training.
        dropout: dropout rate in front of the head.
        reduce_lr_on_plateau: divide the learning rate by 5 when the validation loss stalls.
        data_dir: where the images are now, if they moved since extraction.
        overwrite: replace an output folder that holds another featx output; the same finetune
            of the same cache and head is replaced without it (see featx.artifacts.outputs).
        progress: True: a progress bar over the training batches (tqdm); False: none; a
            function: called as progress(done, total, batches_per_second).
        log: called with one-line progress messages; default: logging.getLogger("featx").
    Returns:
        The metrics written to metrics.json: one object per split for the final model, "before"
        with the warm-started model's, plus epochs, timings and options.
    """
    t_start = time.perf_counter()
    log = Messages(log)
    opts = build_options(FinetuneOptions, options)  # every option checked, before any work
    job, head = _prepare(cache_path, head_dir, (output, overwrite), data_dir, opts, log)
    log(f"evaluating the warm-started model on {', '.join(job.rows)} ...")
    warm = _evaluate_all(job)  # (metrics, predictions, features) of the warm start
    before = warm[0]
    head_accuracy = _head_validation_accuracy(job.head_dir)
    log(
        f"warm start: validation accuracy {before['validation']['accuracy']:.4f}"
        + (f" (stage-2 head: {head_accuracy:.4f})" if head_accuracy is not None else "")
    )
    with outputs.writing(job.out, job.made_by, overwrite=overwrite, log=log) as job.stage:
        return Result(_run(job, warm, head_accuracy, t_start, log, progress), "metrics")


def _run(job: _Job, warm: tuple, head_accuracy, t_start: float, log, progress) -> dict:
    """Training, the best weights and every file, into the staging folder: the metrics."""
    before, before_preds, _ = warm
    info = _start_record(job)
    trained = _train(job, before_preds["validation"], log, progress)
    after, after_preds, features, best_epoch = _keep_best(job, trained, warm, log)
    metrics = {
        **after,
        "before": before,
        "head_validation_accuracy": head_accuracy,
        "epochs_run": len(trained["history"].get("val_loss", [])),
        "best_epoch": best_epoch,
        "interrupted": trained["interrupted"],
        "fit_seconds": round(trained["fit_seconds"], 3),
        "epoch_seconds": [round(s, 3) for s in trained["epoch_seconds"]],
        "history": {k: [round(v, 6) for v in vs] for k, vs in trained["history"].items()},
    }
    info["novelty"], metrics["novelty"] = _novelty(job, after_preds, features, log)
    metrics["seconds"] = round(time.perf_counter() - t_start, 3)
    return _record(job, info, metrics, after_preds, trained)


def _novelty(job: _Job, preds: dict, features: dict, log) -> tuple[dict, dict]:
    """The final model's novelty score (heads.novelty.fit), as fit-head builds a head's: from
    the features its head sees, which the last evaluation already computed (no image is decoded
    again). Saves novelty.npz; returns (finetune.json's "novelty", metrics.json's)."""
    from featx.heads import novelty

    t0 = time.perf_counter()
    (y_train, _, _), (y_val, proba_val, _) = preds["train"], preds["validation"]
    state, summary = novelty.fit(
        (features["train"], y_train), (features["validation"], y_val), proba_val
    )
    novelty.save(state, job.stage)
    log(
        f"novelty score: a memory of {len(state.memory)} training images, unknown above "
        f"{state.threshold:.4g} ({state.rate:.0%} of validation images); "
        f"{time.perf_counter() - t0:.2f} s, from the features of the last evaluation"
    )
    return state.info(), summary


def _prepare(cache_path, head_dir, output: tuple, data_dir, opts: FinetuneOptions, log):
    """Inputs checked (`output`: (folder, overwrite)), the model built (warm-started, top
    unfrozen, compiled) and the data sets: (job, head)."""
    head_dir = Path(head_dir)
    output, overwrite = output
    out = Path(output) if output else default_output_dir(cache_path)
    if out.resolve() == head_dir.resolve():
        raise FeatxError(
            f"--output '{out}' is the --head folder; fine-tuning would replace the head it "
            "starts from. Pass another --output folder."
        )
    head_path = outputs.relative(head_dir, out.resolve().parent)  # as made_by's source
    made_by = outputs.made_by("finetune", out, cache_path, head=head_path)
    outputs.check_target(out, made_by, overwrite)  # before any work
    cache, head, _meta, root = _load_inputs(cache_path, head_dir, data_dir)
    from featx.backbone.finetune_keras import ImageBatches

    rows, missing = _split_rows(cache, root, log)
    for split in ("train", "validation"):
        if not rows[split][0]:
            raise FeatxError(
                f"None of the {split} images of '{cache_path}' is in '{root}'. Pass --data-dir "
                "with the folder the cache was extracted from."
            )
    job = _Job(cache, Path(cache_path), head_dir, root, out, opts, rows, missing, made_by)
    job.model = build_model(
        cache.fingerprint,
        head.to_keras(),
        augment=opts.augment,
        dropout=opts.dropout,
        seed=opts.seed,
    )
    job.scorer = mobilenet.scoring_model(job.model)
    job.unfrozen = set_trainable(job.model, opts.unfreeze_layers)
    compile_model(job.model, opts.learning_rate)
    log(
        f"model: {len(job.unfrozen)} base layers unfrozen"
        + (f" (from {job.unfrozen[0]})" if job.unfrozen else "")
        + f", {sum(int(np.prod(w.shape)) for w in job.model.trainable_weights):,} trainable weights"
    )
    size = int(cache.fingerprint["image_size"])
    for split, (paths, labels) in rows.items():
        job.data[split] = ImageBatches(root, paths, labels, size, opts.batch_size, seed=opts.seed)
    return job, head


def _evaluate_all(job: _Job) -> tuple[dict, dict, dict]:
    """({split: metrics}, {split: (labels, probabilities, paths)}, {split: head features}) of
    the model as it is now."""

    result, preds, features = {}, {}, {}
    for split, data in job.data.items():
        proba, kept, features[split] = predict_batches(job.scorer, data)
        paths, labels = job.rows[split]
        result[split] = evaluation.evaluate(labels[kept], proba, job.cache.class_names)
        preds[split] = (labels[kept], proba, [paths[i] for i in kept])
    return result, preds, features


def _start_record(job: _Job) -> dict:
    """finetune.json's content; the warm-started model.keras, the checkpoint before the first
    epoch (in the staging folder: a killed run leaves the old output folder whole)."""
    info = {
        "kind": "finetune",
        "complete": False,  # true once training ended; before, model.keras is the best so far
        "class_names": list(job.cache.class_names),
        "image_size": int(job.cache.fingerprint["image_size"]),
        "fingerprint": job.cache.fingerprint,
        "head_dir": str(job.head_dir),
        "cache": absolute(job.cache_path),
        "options": job.opts.record(),
    }
    save_keras_atomic(job.model, job.stage / MODEL_FILE)
    return info


def _train(job: _Job, warm_validation: tuple, log, progress=False) -> dict:
    """Train with early stopping; `keep` checkpoints the best epoch. Ctrl-C ends training and
    keeps the best weights so far."""
    import keras

    from featx.backbone.finetune_keras import BatchProgress, ImageBatches, _EpochLog, _KeepBest

    opts = job.opts
    y_val, proba_val, _ = warm_validation
    correct = int(np.sum(proba_val.argmax(1) == y_val))
    warm_weights = job.model.get_weights()
    keep = _KeepBest(
        job.stage / MODEL_FILE, len(y_val), correct, _keras_loss(y_val, proba_val), warm_weights
    )
    epoch_log = _EpochLog(log, opts.epochs)
    callbacks = [
        # Stops when the validation loss stalls; `keep` decides which weights win.
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=opts.patience),
        keep,
        epoch_log,
    ]
    if opts.reduce_lr_on_plateau:
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=config.FINETUNE_LR_FACTOR, patience=1
            )
        )
    paths, labels = job.rows["train"]
    size = int(job.cache.fingerprint["image_size"])
    train = ImageBatches(
        job.root, paths, labels, size, opts.batch_size,
        shuffle=True, drop_remainder=True, seed=opts.seed,
    )  # fmt: skip
    interrupted, t_fit = False, time.perf_counter()
    bar = reporter(progress, "fine-tuning", unit="batches")
    callbacks.append(BatchProgress(bar, opts.epochs, len(train)))
    if opts.epochs:
        try:
            job.model.fit(
                train,
                validation_data=job.data["validation"],
                epochs=opts.epochs,
                shuffle=False,  # ImageBatches shuffles images, seeded, every epoch
                callbacks=callbacks,
                verbose=0,
            )
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: keeping the best weights so far")
        finally:
            bar.close()
    return {
        "keep": keep,
        "warm_weights": warm_weights,
        "train": train,
        "interrupted": interrupted,
        "fit_seconds": time.perf_counter() - t_fit,
        "history": epoch_log.history,
        "epoch_seconds": epoch_log.seconds,
    }


def _keep_best(job: _Job, trained: dict, warm: tuple, log):
    """Never end worse than the warm start (`warm`: its metrics, predictions and features):
    the best epoch must have beaten it (see _KeepBest). Returns (metrics, predictions,
    features, best_epoch) of the weights kept; saves them."""
    keep = trained["keep"]
    job.model.set_weights(keep.weights)
    best_epoch = keep.best_epoch
    before = warm[0]
    after, after_preds, features = warm
    if best_epoch:
        after, after_preds, features = _evaluate_all(job)
        if after["validation"]["accuracy"] < before["validation"]["accuracy"]:  # float noise
            best_epoch, (after, after_preds, features) = 0, warm
            job.model.set_weights(trained["warm_weights"])
    else:
        log("no epoch beat the warm start on validation; keeping the warm-start weights")
    save_keras_atomic(job.model, job.stage / MODEL_FILE)
    return after, after_preds, features, best_epoch


def _record(job: _Job, info: dict, metrics: dict, after_preds: dict, trained: dict) -> dict:
    """metrics.json, the plots, report.html and finetune.json, into the staging folder."""

    skipped = job.missing + [
        {"path": p, "reason": r}
        for ds in (trained["train"], *job.data.values())
        for p, r in sorted(ds.failed.items())
    ]
    metrics.update(
        unfrozen={"layers": len(job.unfrozen), "from": job.unfrozen[0] if job.unfrozen else None},
        skipped=list({s["path"]: s for s in skipped}.values()),
        options=job.opts.record(),
        cache={
            "path": str(job.cache_path),
            "data_dir": str(job.root.resolve()),  # misclassified.csv's paths are in it
            "counts": job.cache.counts(),
            "fingerprint": job.cache.fingerprint,
        },
        head_dir=str(job.head_dir),
        class_names=list(job.cache.class_names),
        output=str(job.out),
    )
    report_folder.write_report(
        job.stage,
        metrics,
        after_preds,
        history=trained["history"],
        class_names=job.cache.class_names,
        shown_as=job.out,
    )
    info.update(complete=True, epochs_run=metrics["epochs_run"], best_epoch=metrics["best_epoch"])
    write_text_atomic(job.stage / INFO_FILE, json.dumps(info, indent=2, default=str))
    return metrics
