"""Use a trained classifier on new images: `featx predict MODEL_DIR PATH...`.

MODEL_DIR is a fit-head output (head.json: the head, its class names and the fingerprint of the
backbone that made its training features), a finetune output (finetune.json and model.keras, raw
pixels to probabilities) or an export folder (export.json beside the exported model). For a head,
the backbone is rebuilt from that fingerprint and refused when the weights found now differ.
Images go through the loader of extraction (`images.load_image`), decoded a few batches ahead on a
thread pool, and through the model in fixed-size batches. A file that cannot be read or decoded
gets a row with the reason instead of a prediction.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx import backbone, config, images
from featx.errors import FeatxError
from featx.files import write_text_atomic

HEAD_INFO = "head.json"  # written by fit-head (heads.save_head)
FINETUNE_INFO = "finetune.json"  # written by finetune, next to FINETUNE_MODEL
FINETUNE_MODEL = "model.keras"
EXPORT_INFO = "export.json"  # written by export, next to the exported model and labels.txt
OUTPUT_SUFFIXES = (".csv", ".json")


# --- which files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One file to predict, as the user will see it."""

    path: str  # the user's spelling: PATH itself, or PATH joined with the path found below it
    folders: tuple[str, ...]  # enclosing folder names that may name its class, nearest first
    error: str | None = None  # why it cannot be predicted, known before decoding


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _folder_targets(folder: Path) -> list[Target]:
    """Every non-hidden file below `folder`, recursively (the same walk as extraction)."""
    top = folder.name or Path(os.path.abspath(folder)).name
    found = []
    files, skipped = images.walk_files(folder)
    for f in files:
        inner = f.relative_to(folder).parent.parts[::-1]  # nearest folder first
        found.append(Target(str(f), (*inner, top)))
    # Links back into the folder, broken links, FIFOs, unreadable folders: a row with the reason.
    return found + [Target(str(p), (), reason) for p, reason in skipped]


def expand_paths(paths) -> list[Target]:
    """Image files, folders (recursively, hidden files and folders skipped) and glob patterns
    ('photos/*.jpg', 'data/**/*.png') -> one Target per file, in order, each file once.

    A path that does not exist, or a pattern that matches nothing, becomes a Target with an error.
    Files are not opened here; whether they are images is found out when decoding.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    targets: list[Target] = []
    for p in map(str, paths):
        if os.path.isdir(p):
            targets += _folder_targets(Path(p))
        elif os.path.isfile(p):
            targets.append(Target(p, (Path(os.path.abspath(p)).parent.name,)))
        elif os.path.exists(p):
            targets.append(Target(p, (), "not a regular file"))
        elif _has_magic(p):
            matches = sorted(glob.glob(p, recursive=True))
            if not matches:
                targets.append(Target(p, (), "no file matches this pattern"))
            for m in matches:
                if os.path.isdir(m):
                    targets += _folder_targets(Path(m))
                elif os.path.isfile(m):
                    targets.append(Target(m, (Path(os.path.abspath(m)).parent.name,)))
                else:
                    targets.append(Target(m, (), "not a regular file"))
        else:
            targets.append(Target(p, (), "file not found"))
    seen: set[str] = set()
    unique = []
    for t in targets:
        key = os.path.abspath(t.path) if t.error is None else f"\0{t.path}"
        if key not in seen:
            seen.add(key)
            unique.append(t)
    return unique


# --- which model ---------------------------------------------------------------------------------


def model_kind(model_dir: str | Path) -> str:
    """The kind of MODEL_DIR: "head" (fit-head output), "finetune" or "export"; FeatxError
    otherwise."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise FeatxError(
            f"Model folder not found: '{model_dir}'. Pass the output folder of `featx fit-head`, "
            "`featx finetune` or `featx export`."
        )
    if (folder / FINETUNE_INFO).is_file():
        return "finetune"
    if (folder / HEAD_INFO).is_file():
        return "head"
    if (folder / EXPORT_INFO).is_file():
        return "export"
    raise FeatxError(
        f"'{model_dir}' holds neither {HEAD_INFO} (a `featx fit-head` output) nor "
        f"{FINETUNE_INFO} (a `featx finetune` output) nor {EXPORT_INFO} (a `featx export` "
        "output). Pass one of those folders."
    )


def read_export_info(model_dir: str | Path) -> dict:
    """export.json of an export folder, checked: its model file is there."""
    folder = Path(model_dir)
    try:
        info = json.loads((folder / EXPORT_INFO).read_text())
    except (OSError, ValueError) as e:
        raise FeatxError(f"Cannot read '{folder / EXPORT_INFO}': {e}.") from None
    keys = ("model_format", "model_file", "class_names", "image_size")
    if (
        not isinstance(info, dict)
        or info.get("format") != "featx-export"
        or any(k not in info for k in keys)
    ):
        raise FeatxError(
            f"'{folder / EXPORT_INFO}' is not a featx export record (format='featx-export' with "
            f"{', '.join(keys)}). Re-run `featx export`."
        )
    if not (folder / info["model_file"]).exists():
        raise FeatxError(
            f"'{folder / info['model_file']}', the model of {folder / EXPORT_INFO}, is missing. "
            "Re-run `featx export`."
        )
    return info


def check_backbone(fp: dict, what: str) -> None:
    """Refuse when the backbone weights available now are not those that made the features."""
    try:
        now = backbone.fingerprint(
            fp["weights"],
            int(fp["image_size"]),
            float(fp["alpha"]),
            precision=fp.get("precision", "fp32"),
            int8_sha256=fp.get("int8_sha256"),
        )
    except KeyError as e:
        raise FeatxError(f"{what} records no complete backbone fingerprint (no {e}).") from None
    except FeatxError as e:
        raise FeatxError(
            f"{what} needs the backbone weights '{fp['weights']}' it was trained with, which "
            f"cannot be used here: {e}"
        ) from None
    backbone.check_compatible(
        fp,
        now,
        what,
        f"The weights found now ('{fp['weights']}', sha256 {now['weights_sha256'][:12]}) are "
        f"not those of its training features (sha256 {str(fp.get('weights_sha256'))[:12]}). "
        "Restore those weights, or re-run `featx extract` and `featx fit-head` with these.",
    )


def read_finetune_info(model_dir: str | Path) -> dict:
    folder = Path(model_dir)
    try:
        info = json.loads((folder / FINETUNE_INFO).read_text())
    except (OSError, ValueError) as e:
        raise FeatxError(f"Cannot read '{folder / FINETUNE_INFO}': {e}.") from None
    missing = [k for k in ("class_names", "image_size") if k not in info]
    if info.get("kind") != "finetune" or missing:
        raise FeatxError(
            f"'{folder / FINETUNE_INFO}' is not a featx finetune record (kind='finetune' with "
            f"class_names and image_size). Re-run `featx finetune`."
        )
    if not (folder / FINETUNE_MODEL).is_file():
        raise FeatxError(
            f"'{folder / FINETUNE_MODEL}', the model of {folder / FINETUNE_INFO}, is missing. "
            "Re-run `featx finetune`."
        )
    return info


def load_finetune_model(model_dir: str | Path):
    """model.keras of a finetune output, loaded in safe mode (no code runs from the file)."""
    import keras

    path = Path(model_dir) / FINETUNE_MODEL
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:
        raise FeatxError(f"Could not load '{path}' ({type(e).__name__}: {e}).") from None


@dataclass
class Classifier:
    """A loaded MODEL_DIR: (n, size, size, 3) uint8 pixels -> (n, C) probabilities."""

    kind: str  # "head" or "finetune"
    class_names: list[str]
    image_size: int
    engine: str  # what computes the backbone: "keras" or "onnx"
    meta: dict  # head.json or finetune.json
    _run: object

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(batch), np.float64)


def load_classifier(model_dir: str | Path, engine: str = config.ENGINE, log=None) -> Classifier:
    """The classifier of a fit-head or finetune output folder.

    For a head, the backbone runs on `engine` ("keras", "onnx" or "auto", see
    extract.make_engine); a finetune model is one Keras model and always runs in Keras.
    """
    log = log or (lambda message: None)
    kind = model_kind(model_dir)
    if kind == "export":
        from featx.export import load_exported

        info = read_export_info(model_dir)
        if engine == "onnx":
            log("note: an export runs as exported; --engine onnx applies to fit-head models.")
        path = Path(model_dir) / info["model_file"]
        try:
            run = load_exported(path, info["model_format"])
        except Exception as e:  # a damaged file, or a format this installation cannot run
            raise FeatxError(
                f"Could not load '{path}' ({type(e).__name__}: {e}). Re-run `featx export`."
            ) from None
        runs_on = {"keras": "keras", "savedmodel": "tensorflow"}.get(info["model_format"], "tflite")
        size = int(info["image_size"])
        return Classifier(kind, list(info["class_names"]), size, runs_on, info, run)
    if kind == "finetune":
        info = read_finetune_info(model_dir)
        if engine == "onnx":
            log("note: a finetune model runs in Keras; --engine onnx applies to fit-head models.")
        model = load_finetune_model(model_dir)
        size = int(info["image_size"])
        if tuple(model.input_shape[1:]) != (size, size, 3):
            raise FeatxError(
                f"'{Path(model_dir) / FINETUNE_MODEL}' takes inputs of shape "
                f"{model.input_shape}, {FINETUNE_INFO} says {size}x{size} RGB. Re-run "
                "`featx finetune`."
            )

        def run(batch):
            return model.predict_on_batch(np.asarray(batch, np.float32))

        return Classifier(kind, list(info["class_names"]), size, "keras", info, run)

    from featx import heads
    from featx.engines import make_engine

    head, meta = heads.load_head(model_dir)
    fp = meta.get("fingerprint") or {}
    check_backbone(fp, f"The head in '{model_dir}'")
    size, alpha = int(fp["image_size"]), float(fp["alpha"])
    if fp.get("precision", "fp32") == "int8":
        runner = _int8_runner(engine, fp, model_dir, meta, log)
    else:
        runner = make_engine(
            engine,
            fp["weights"],
            size,
            alpha,
            onnx_dir=config.ONNX_DIR,
            log=log,
            search=_onnx_dirs(model_dir, meta),
        )

    def run(batch):
        features = runner.features(batch)
        if head.flip_:  # fitted with mirror images: predict from the mean of both views
            mirrored = runner.features(np.ascontiguousarray(batch[:, :, ::-1]))
            features = heads.flip_views(features, mirrored)
        return head.predict_proba(features)

    return Classifier(kind, list(meta["class_names"]), size, runner.name, meta, run)


def _int8_runner(engine: str, fp: dict, model_dir, meta: dict, log):
    """The quantized backbone a head fitted on an int8 cache needs: that exact file, found next
    to its cache, next to the model folder, or in the default cache folder."""
    from featx import int8

    if engine == "keras":
        raise FeatxError(
            f"The head in '{model_dir}' was fitted on INT8 features, which only the onnx engine "
            "computes; pass --engine onnx (or auto)."
        )
    folders = [Path(meta["cache"]).resolve().parent] if meta.get("cache") else []
    folders += [Path(model_dir).resolve().parent, Path(config.ONNX_DIR or config.CACHE_DIR)]
    folders = list(dict.fromkeys(f for f in folders if f.is_dir()))
    return int8.engine(fp, folders or [Path(model_dir)], log=log)[0]


def _onnx_dirs(model_dir, meta: dict) -> list[Path]:
    """Where older versions of extract stored the backbone's .onnx file (now kept per user): the
    folder of the cache the head was fitted on, and the model folder's parent (fit-head's default
    output is cache/<name>-<head>/); those that exist."""
    folders = [Path(meta["cache"]).resolve().parent] if meta.get("cache") else []
    folders.append(Path(model_dir).resolve().parent)
    return list(dict.fromkeys(f for f in folders if f.is_dir()))


# --- decoding and running in batches --------------------------------------------------------------


def _load(path: str, image_size: int):
    """(pixels, None) or (None, reason) for one file; runs in a worker thread."""
    try:
        return images.load_image(path, image_size), None
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    except Exception as e:  # any decoder failure: the reason, never a crash
        return None, str(e) or type(e).__name__


def run_batches(
    predict_proba,
    paths: list[str],
    image_size: int,
    num_classes: int,
    batch_size: int = config.BATCH_SIZE,
    progress=None,
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode `paths` with the loader of extraction, a few batches ahead on a thread pool, and
    run `predict_proba` on fixed-size uint8 batches (the last one padded, so models trace once).

    Returns (probabilities (n, num_classes) with NaN rows for files that failed,
    {index: reason} of those files). `progress(done, total, images_per_second)` after each batch.
    """
    if batch_size < 1:
        raise FeatxError(f"batch_size must be >= 1, got {batch_size}.")
    n = len(paths)
    proba = np.full((n, num_classes), np.nan)
    errors: dict[int, str] = {}
    size = min(batch_size, n) or 1  # a handful of images is not padded to a whole batch
    chunks = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    ahead = config.PREFETCH_BATCHES
    t0 = time.perf_counter()
    done = 0
    pending: deque = deque()
    with ThreadPoolExecutor(config.DECODE_THREADS, thread_name_prefix="featx-predict") as pool:

        def submit(chunk):
            pending.append((chunk, [pool.submit(_load, paths[i], image_size) for i in chunk]))

        try:
            for chunk in chunks[:ahead]:
                submit(chunk)
            for index in range(len(chunks)):
                chunk, futures = pending.popleft()
                if index + ahead < len(chunks):
                    submit(chunks[index + ahead])
                batch = np.zeros((size, image_size, image_size, 3), np.uint8)
                ok = []
                for i, fut in zip(chunk, futures):
                    pixels, reason = fut.result()
                    if reason is None:
                        batch[len(ok)] = pixels
                        ok.append(i)
                    else:
                        errors[i] = reason
                if ok:
                    proba[ok] = np.asarray(predict_proba(batch))[: len(ok)]
                done += len(chunk)
                if progress is not None:
                    progress(done, n, done / max(time.perf_counter() - t0, 1e-9))
        except BaseException:  # Ctrl-C or a model error: stop decoding what is queued
            for _, futures in pending:
                for fut in futures:
                    fut.cancel()
            raise
    return proba, errors


# --- the command ---------------------------------------------------------------------------------


def predict(
    model_dir: str | Path,
    paths,
    *,
    output: str | Path | None = None,
    top_k: int = config.PREDICT_TOP_K,
    batch_size: int = config.BATCH_SIZE,
    engine: str = config.ENGINE,
    min_confidence: float | None = None,
    progress=None,
    log=None,
) -> dict:
    """Classify image files with a fit-head, finetune or export output folder.

    Args:
        model_dir: a `featx fit-head`, `featx finetune` or `featx export` output folder.
        paths: image files, folders (searched recursively; hidden files skipped) or glob patterns.
        output: write the result to this file too: .csv (one flat row per image) or .json (the
            returned object, as `--json` prints it).
        top_k: classes listed per image, most probable first (at most the number of classes).
        batch_size: images per model call.
        engine: what runs the backbone of a fit-head model: "keras", "onnx" or "auto".
        min_confidence: rows whose most probable class has a lower probability get
            config.UNKNOWN_CLASS as "predicted" (their probabilities and top_k stay); such rows
            count as wrong in the accuracy.
        progress: called as progress(done, total, images_per_second) after each batch, from
            config.PREDICT_PROGRESS_MIN images on.
        log: called with one-line notes; default: silent.
    Returns:
        {"rows": [{"path", "predicted", "probability", "top_k": [{"class", "probability"}],
        "label", "error"}, ...], "class_names", "kind", "engine", "images", "predicted",
        "errors", "unknown" (rows below min_confidence), "min_confidence", "accuracy" (None
        unless some images sit in folders named after the classes), "labelled", "correct",
        "seconds", "images_per_second", "output"}. "label" is the class
        named by the image's folder, or None. Files that fail have "error" set and no prediction.
    Raises:
        FeatxError when no image at all could be predicted (after writing `output`).
    """
    t0 = time.perf_counter()
    if not isinstance(top_k, int) or top_k < 1:
        raise FeatxError(f"top_k must be an integer >= 1, got {top_k!r}.")
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise FeatxError(
            f"--min-confidence is a probability between 0 and 1, got {min_confidence!r}."
        )
    if output is not None and Path(output).suffix.lower() not in OUTPUT_SUFFIXES:
        raise FeatxError(
            f"Cannot tell the format of --output '{output}'; name it .csv or .json "
            "(e.g. predictions.csv)."
        )
    targets = expand_paths(paths)
    if not targets:
        raise FeatxError(
            "No image files found in the given paths (hidden files are skipped). "
            "Pass image files, folders or glob patterns such as 'photos/*.jpg'."
        )
    model = load_classifier(model_dir, engine, log)
    todo = [i for i, t in enumerate(targets) if t.error is None]
    show = progress if progress is not None and len(todo) >= config.PREDICT_PROGRESS_MIN else None
    proba, failed = run_batches(
        model.predict_proba,
        [targets[i].path for i in todo],
        model.image_size,
        len(model.class_names),
        batch_size,
        show,
    )
    rows = [_row(t, model.class_names, None, t.error, top_k) for t in targets]
    for j, i in enumerate(todo):
        rows[i] = _row(targets[i], model.class_names, proba[j], failed.get(j), top_k)
    unknown = 0
    for r in rows:
        if min_confidence is not None and r["error"] is None and r["probability"] < min_confidence:
            r["predicted"] = config.UNKNOWN_CLASS
            unknown += 1

    predicted = [r for r in rows if r["error"] is None]
    labelled = [r for r in predicted if r["label"] is not None]
    correct = sum(r["predicted"] == r["label"] for r in labelled)
    seconds = time.perf_counter() - t0
    result = {
        "model_dir": str(model_dir),
        "kind": model.kind,
        "head": model.meta.get("head") if model.kind == "head" else None,
        "class_names": model.class_names,
        "engine": model.engine,
        "images": len(rows),
        "predicted": len(predicted),
        "errors": len(rows) - len(predicted),
        "unknown": unknown,
        "min_confidence": min_confidence,
        "accuracy": correct / len(labelled) if labelled else None,
        "labelled": len(labelled),
        "correct": int(correct),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(predicted) / seconds, 2) if predicted else 0.0,
        "output": str(output) if output is not None else None,
        "rows": rows,
    }
    if output is not None and Path(output).suffix.lower() == ".json":
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output, json.dumps(result, indent=2, default=str) + "\n")
    elif output is not None:
        write_rows(output, rows, top_k=min(top_k, len(model.class_names)))
    if not predicted:
        first = "; ".join(f"{r['path']}: {r['error']}" for r in rows[:3])
        more = f" (and {len(rows) - 3} more)" if len(rows) > 3 else ""
        raise FeatxError(
            f"None of the {len(rows)} files could be predicted: {first}{more}. "
            "Pass readable image files (JPEG, PNG, GIF, BMP, WebP, TIFF, HEIC, AVIF)."
        )
    return result


def _row(target: Target, class_names, p, error, top_k) -> dict:
    label = next((f for f in target.folders if f in class_names), None)
    row = {"path": target.path, "predicted": None, "probability": None, "top_k": []}
    if error is None and p is not None:
        order = np.argsort(-p, kind="stable")[:top_k]
        row["top_k"] = [
            {"class": class_names[k], "probability": round(float(p[k]), 6)} for k in order
        ]
        row["predicted"] = row["top_k"][0]["class"]
        row["probability"] = row["top_k"][0]["probability"]
    row["label"] = label
    row["error"] = error
    return row


def csv_columns(top_k: int) -> list[str]:
    """path, predicted, probability, top1, top1_probability, ..., label, error."""
    tops = [c for k in range(1, top_k + 1) for c in (f"top{k}", f"top{k}_probability")]
    return ["path", "predicted", "probability", *tops, "label", "error"]


def write_rows(output: str | Path, rows: list[dict], top_k: int) -> None:
    """Write rows to a .csv file (flat columns, see csv_columns)."""
    output = Path(output)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_columns(top_k))
    for r in rows:
        tops = []
        for k in range(top_k):
            t = r["top_k"][k] if k < len(r["top_k"]) else {}
            tops += [t.get("class", ""), t.get("probability", "")]
        writer.writerow(
            [
                r["path"],
                r["predicted"] or "",
                "" if r["probability"] is None else r["probability"],
                *tops,
                r["label"] or "",
                r["error"] or "",
            ]
        )
    text = buffer.getvalue()
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, text)


def format_table(result: dict) -> str:
    """One line per image: path, predicted class and probability, the runners-up; or the error."""
    rows = result["rows"]
    width = min(max((len(r["path"]) for r in rows), default=4), 60)
    lines = []
    for r in rows:
        if r["error"] is not None:
            lines.append(f"{r['path']:<{width}}  error: {r['error']}")
            continue
        tops = "  ".join(f"{t['class']} {t['probability']:.4f}" for t in r["top_k"])
        lines.append(f"{r['path']:<{width}}  {tops}")
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    """Counts, the accuracy on images in class folders when there are any, and timings."""
    lines = [
        f"predicted {result['predicted']} of {result['images']} images"
        + (f" ({result['errors']} failed, see their error rows)" if result["errors"] else "")
        + f" in {result['seconds']:.1f} s with the {result['kind']} model ({result['engine']})"
    ]
    if result.get("unknown"):
        lines.append(
            f"{result['unknown']} below --min-confidence {result['min_confidence']:g}: predicted "
            f"'{config.UNKNOWN_CLASS}'"
        )
    if result["accuracy"] is not None:
        lines.append(
            f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['labelled']} "
            "images in folders named after their class)"
        )
    if result["output"]:
        lines.append(f"wrote {result['output']}")
    return "\n".join(lines)
