"""Use a trained classifier on new images: `featx predict MODEL_DIR PATH...`.

MODEL_DIR is a fit-head output (head.json: the head, its class names and the fingerprint of the
backbone that made its training features), a finetune output (finetune.json and model.keras, raw
pixels to probabilities) or an export folder (export.json beside the exported model). For a head,
the backbone is rebuilt from that fingerprint and refused when the weights found now differ.
Images go through the loader of extraction (`decoder.load_image`), decoded a few batches ahead on a
thread pool, and through the model in fixed-size batches. A file that cannot be read or decoded
gets a row with the reason instead of a prediction.
"""

from __future__ import annotations

import glob
import json
import os
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx import config
from featx.artifacts.classifier import load_classifier, run_batches
from featx.artifacts.model_dirs import model_kind
from featx.errors import FeatxError, Messages
from featx.files import is_url, write_csv_atomic, write_text_atomic
from featx.images import finder, remote
from featx.options import PredictOptions
from featx.reports.display import Result
from featx.reports.progress import reporter

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
    files, skipped = finder.walk_files(folder)
    for f in files:
        inner = f.relative_to(folder).parent.parts[::-1]  # nearest folder first
        found.append(Target(str(f), (*inner, top)))
    # Links back into the folder, broken links, FIFOs, unreadable folders: a row with the reason.
    return found + [Target(str(p), (), reason) for p, reason in skipped]


def _url_targets(url: str) -> list[Target]:
    """An object, or every non-hidden object below a prefix (images.remote), as local files are."""
    url = url.rstrip("/")
    found = remote.entry(url)
    if found is None:
        return [Target(url, (), "file not found")]
    if found.get("type") != "directory":
        return [Target(url, (url.rsplit("/", 2)[-2],))]  # the enclosing "folder"
    top, targets = url.rsplit("/", 1)[-1], []
    for rel in sorted(remote.list_objects(url)):
        parts = rel.split("/")
        if all(map(finder.visible_name, parts)):
            targets.append(Target(remote.join(url, rel), (*parts[-2::-1], top)))
    return targets


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
        if is_url(p):
            targets += _url_targets(p)
        elif os.path.isdir(p):
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
        key = t.path if is_url(t.path) else os.path.abspath(t.path)
        key = key if t.error is None else f"\0{t.path}"
        if key not in seen:
            seen.add(key)
            unique.append(t)
    return unique


# --- which model ---------------------------------------------------------------------------------


# --- decoding and running in batches --------------------------------------------------------------


# --- the command ---------------------------------------------------------------------------------


def predict(
    model_dir: str | Path,
    paths,
    *,
    output: str | Path | None = None,
    top_k: int = config.PREDICT_TOP_K,
    batch_size: int = config.BATCH_SIZE,
    engine: str | None = None,
    min_confidence: float | None = None,
    unknown: bool = True,
    unknown_rate: float | None = None,
    progress=True,
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
        engine: what runs the backbone of a fit-head model: "keras", "onnx" or "auto" (None:
            config.ENGINE, read when the call starts).
        min_confidence: rows whose most probable class has a lower probability get
            config.UNKNOWN_CLASS as "predicted" (their probabilities and top_k stay); such rows
            count as wrong in the accuracy.
        unknown: rows get "novelty" (featx.heads.novelty) and "unknown" (above the threshold).
        unknown_rate: the share of known validation images flagged; None: the model's own.
        progress: True: a progress bar (tqdm); False: none; a function: called as
            progress(done, total, images_per_second) after each batch. Either from
            config.PREDICT_PROGRESS_MIN images on.
        log: called with one-line notes; default: logging.getLogger("featx"), and warnings as
            featx.FeatxWarning.
    Returns:
        {"rows": [{"path", "predicted", "probability", "top_k": [{"class", "probability"}],
        "unknown", "novelty", "label", "error"}, ...], "class_names", "kind", "engine",
        "images", "predicted", "errors", "unknown" (rows flagged unknown), "novelty_threshold",
        "unknown_rate", "below_min_confidence", "min_confidence", "warnings", "accuracy" (None
        unless some images sit in folders named after the classes), "labelled", "correct",
        "seconds", "images_per_second", "output"}. "label" is the class named by the image's
        folder, or None. Files that fail have "error" set and no prediction.
    Raises:
        FeatxError when no image at all could be predicted (after writing `output`).
    """
    t0 = time.perf_counter()
    opts = PredictOptions(
        top_k=top_k,
        batch_size=batch_size,
        engine=engine,
        min_confidence=min_confidence,
        output=output and str(output),
        unknown=unknown,
        unknown_rate=unknown_rate,
    )
    model_kind(model_dir)  # a wrong MODEL_DIR (a cache, say) is answered before any listing
    targets = expand_paths(paths)
    if not targets:
        raise FeatxError(
            "No image files found in the given paths (hidden files are skipped). "
            "Pass image files, folders or glob patterns such as 'photos/*.jpg'."
        )
    log = Messages(log)
    model = load_classifier(model_dir, opts.engine, log)
    rows = _predict_rows(model, targets, opts, progress, _novelty_on(model, opts, log))
    result = _summary(model_dir, model, rows, opts, time.perf_counter() - t0)
    _warn_unknown(result, log)
    result["warnings"] = log.warnings
    _write(output, result, min(top_k, len(model.class_names)))
    if not result["predicted"]:
        first = "; ".join(f"{r['path']}: {r['error']}" for r in rows[:3])
        more = f" (and {len(rows) - 3} more)" if len(rows) > 3 else ""
        raise FeatxError(
            f"None of the {len(rows)} files could be predicted: {first}{more}. "
            "Pass readable image files (JPEG, PNG, GIF, BMP, WebP, TIFF, HEIC, AVIF)."
        )
    return Result(result, "predict")


def _write(output, result: dict, top_k: int) -> None:
    """The result to `output` when given: .json (the whole result) or .csv (its rows)."""
    if output is not None and Path(output).suffix.lower() == ".json":
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output, json.dumps(result, indent=2, default=str) + "\n")
    elif output is not None:
        write_rows(output, result["rows"], top_k=top_k)


def _novelty_on(model, opts: PredictOptions, log) -> bool:
    """Whether rows get "unknown" and "novelty": asked for and the model has the score (a note
    when it has not); the threshold moved to opts.unknown_rate when given."""
    if not opts.unknown:
        return False
    if not model.has_novelty:
        log(
            f"note: the {model.kind} model in '{model.model_dir}' has no novelty score (saved "
            "by an older featx); no image is checked for being unknown. Re-run `featx fit-head` "
            "or `featx finetune` (and `featx export`) to add it."
        )
        return False
    if opts.unknown_rate is not None:
        model.set_unknown_rate(opts.unknown_rate)
    return True


def _warn_unknown(result: dict, log) -> None:
    """A warning when many more images are unknown than the rate the threshold was set at (more
    than config.UNKNOWN_WARN_SHARE of them, and at least twice that rate)."""
    if result["novelty_threshold"] is None or not result["predicted"]:
        return
    share = result["unknown"] / result["predicted"]
    if share > max(config.UNKNOWN_WARN_SHARE, 2 * result["unknown_rate"]):
        log.warning(
            f"{result['unknown']} of {result['predicted']} images ({share:.0%}) are unlike the "
            f"images the model was trained on (the threshold flags {result['unknown_rate']:.0%} "
            "of its validation images): their classes are guesses. Check that these photos "
            "show the model's classes, or train it on photos like them."
        )


def _predict_rows(model, targets: list[Target], opts, progress, flags: bool) -> list[dict]:
    """One row per target: its prediction, or the reason it has none; rows under
    opts.min_confidence predict config.UNKNOWN_CLASS (their probabilities stay); with `flags`,
    each row's novelty and whether it is above the model's threshold."""
    todo = [i for i, t in enumerate(targets) if t.error is None]
    shown = progress if len(todo) >= config.PREDICT_PROGRESS_MIN else False
    k = len(model.class_names)
    with closing(reporter(shown, "predicting")) as bar:
        scores, failed = run_batches(
            model.scores_of_pixels if flags else model.proba_of_pixels,
            [targets[i].path for i in todo],
            model.image_size,
            k + 1 if flags else k,
            opts.batch_size,
            bar,
        )
    rows = [_row(t, model.class_names, None, t.error, opts.top_k) for t in targets]
    for j, i in enumerate(todo):
        rows[i] = _row(targets[i], model.class_names, scores[j, :k], failed.get(j), opts.top_k)
        if flags and rows[i]["error"] is None:
            rows[i]["novelty"] = round(float(scores[j, k]), 6)
            rows[i]["unknown"] = bool(scores[j, k] > model.threshold)
    for r in rows:
        low = opts.min_confidence is not None and r["error"] is None
        if low and r["probability"] < opts.min_confidence:
            r["predicted"] = config.UNKNOWN_CLASS
    return rows


def _summary(model_dir, model, rows: list[dict], opts: PredictOptions, seconds: float) -> dict:
    predicted = [r for r in rows if r["error"] is None]
    labelled = [r for r in predicted if r["label"] is not None]
    flags = opts.unknown and model.has_novelty  # as _novelty_on decided
    correct = sum(r["predicted"] == r["label"] for r in labelled)
    return {
        "model_dir": str(model_dir),
        "kind": model.kind,
        "head": model.meta.get("head") if model.kind == "head" else None,
        "class_names": model.class_names,
        "engine": model.engine,
        "images": len(rows),
        "predicted": len(predicted),
        "errors": len(rows) - len(predicted),
        "unknown": sum(bool(r["unknown"]) for r in predicted),
        "novelty_threshold": model.threshold if flags else None,
        "unknown_rate": model.unknown_rate if flags else None,
        "below_min_confidence": sum(
            opts.min_confidence is not None and r["probability"] < opts.min_confidence
            for r in predicted
        ),
        "min_confidence": opts.min_confidence,
        "accuracy": correct / len(labelled) if labelled else None,
        "labelled": len(labelled),
        "correct": int(correct),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(predicted) / seconds, 2) if predicted else 0.0,
        "output": opts.output,
        "rows": rows,
    }


def _row(target: Target, class_names, p, error, top_k) -> dict:
    label = next((f for f in target.folders if f in class_names), None)
    path = finder.printable(target.path)  # a name that is not UTF-8 is predicted, shown escaped
    row = {"path": path, "predicted": None, "probability": None, "top_k": []}
    row.update(unknown=None, novelty=None)  # set when the model's novelty score is on
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
    """path, predicted, probability, unknown, novelty, top1, top1_probability, ..., label,
    error."""
    tops = [c for k in range(1, top_k + 1) for c in (f"top{k}", f"top{k}_probability")]
    return ["path", "predicted", "probability", "unknown", "novelty", *tops, "label", "error"]


def write_rows(output: str | Path, rows: list[dict], top_k: int) -> None:
    """Write rows to a .csv file (flat columns, see csv_columns)."""
    output = Path(output)
    table = []
    for r in rows:
        tops = []
        for k in range(top_k):
            t = r["top_k"][k] if k < len(r["top_k"]) else {}
            tops += [t.get("class", ""), t.get("probability", "")]
        table.append(
            [
                r["path"],
                r["predicted"] or "",
                "" if r["probability"] is None else r["probability"],
                "" if r["unknown"] is None else str(r["unknown"]).lower(),
                "" if r["novelty"] is None else r["novelty"],
                *tops,
                r["label"] or "",
                r["error"] or "",
            ]
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(output, csv_columns(top_k), table, lineterminator="\n")


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
        flag = "  UNKNOWN" if r["unknown"] else ""
        lines.append(f"{r['path']:<{width}}  {tops}{flag}")
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    """Counts, the accuracy on images in class folders when there are any, and timings."""
    lines = [
        f"predicted {result['predicted']} of {result['images']} images"
        + (f" ({result['errors']} failed, see their error rows)" if result["errors"] else "")
        + f" in {result['seconds']:.1f} s with the {result['kind']} model ({result['engine']})"
    ]
    if result.get("novelty_threshold") is not None:
        lines.append(
            f"{result['unknown']} unknown: unlike the training images (novelty above "
            f"{result['novelty_threshold']:.4g}, which flags {result['unknown_rate']:.0%} of the "
            "validation images)"
        )
    if result.get("below_min_confidence"):
        lines.append(
            f"{result['below_min_confidence']} below --min-confidence "
            f"{result['min_confidence']:g}: predicted "
            f"'{config.UNKNOWN_CLASS}'"
        )
    if result["accuracy"] is not None:
        lines.append(
            f"accuracy {result['accuracy']:.4f} ({result['correct']}/{result['labelled']} "
            "images in folders named after their class)"
        )
        unlabelled = result["predicted"] - result["labelled"]
        if unlabelled:  # a partial accuracy must say so (#26)
            lines.append(
                f"not counted: {unlabelled} images in folders not named after one of the "
                f"model's classes ({', '.join(result['class_names'])})"
            )
    if result["output"]:
        lines.append(f"wrote {result['output']}")
    return "\n".join(lines)
