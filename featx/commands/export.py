"""Ship the trained classifier: `featx export MODEL_DIR --format keras|savedmodel|tflite|onnx`.

The export is one self-contained model from raw RGB pixels (0..255, float32, NHWC) to class
probabilities: the backbone's preprocessing layer, MobileNetV2 and the head (a logistic regression
becomes one Dense softmax layer with its scaler folded in). Beside it, in the output folder:
labels.txt (one class name a line, in output order), export.json (input size and range,
preprocessing, class names, where it came from, and the checks below) and README.md (the model
card, see featx.reports.model_card).

Every format is converted from the same Keras model (build_model). ONNX (tf2onnx, the onnx extra)
carries every output of that model under its name (the class probabilities as
config.EXPORT_PROBABILITIES when it is the only one).

After writing, the exported file is loaded back and compared with the in-process model on a few
images, output by output (ONNX: all of them, each required); the largest probability difference is
reported. With a cache, the exported model is also
evaluated on the cache's validation split.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from contextlib import closing
from pathlib import Path

import numpy as np

from featx import config
from featx.artifacts import model_dirs, outputs
from featx.artifacts.classifier import (
    exported_outputs,
    keras_outputs,
    load_finetune_model,
    output_names,
    probabilities,
    run_batches,
)
from featx.artifacts.model_dirs import check_backbone, model_kind, read_finetune_info
from featx.backbone import mobilenet, onnx_engine
from featx.cache import store
from featx.config import VERSION
from featx.errors import FeatxError, Messages
from featx.files import replaced_atomically, save_keras_atomic, temporary_path, write_text_atomic
from featx.images import decoder
from featx.options import ExportOptions
from featx.reports import model_card
from featx.reports.progress import reporter

MODEL_FILES = model_dirs.EXPORT_MODEL_FILES
LABELS_FILE = model_dirs.LABELS_FILE
INFO_FILE = model_dirs.EXPORT_INFO
INFO_FORMAT = model_dirs.EXPORT_FORMAT


def default_output_dir(model_dir: str | Path, format: str, quantize: str = "none") -> Path:
    """`<MODEL_DIR>/export-<format>[-<quantize>]/`."""
    suffix = "" if quantize == "none" else f"-{quantize}"
    return Path(model_dir) / f"export-{format}{suffix}"


# --- the end-to-end model ------------------------------------------------------------------------


def inference_model(model, novelty=None):
    """`model` without its augmentation layers (identity at inference; they only weigh down an
    export), with the outputs {"probabilities", "novelty"} when `novelty` is given (a function
    (features, probabilities) -> tensor, heads.novelty.keras_score). The layers are chained again
    in order (mobilenet.rechain), and the result is kept only when it gives the same
    probabilities as `model` on a probe batch; else a model without novelty is returned as it is
    (not a plain chain of layers), and one with novelty refused."""
    import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if novelty is None and not any(mobilenet.is_augmentation(layer) for layer in layers):
        return model

    def both(features, probabilities):
        return {"probabilities": probabilities, "novelty": novelty(features, probabilities)}

    try:
        rebuilt = mobilenet.rechain(model, both if novelty else None)
        probe = np.random.default_rng(config.SEED).uniform(0, 255, (2, *model.input_shape[1:]))
        probe = probe.astype(np.float32)
        expected = np.asarray(model.predict_on_batch(probe))
        got = rebuilt.predict_on_batch(probe)
        got = got["probabilities"] if novelty else got
        same = np.allclose(np.asarray(got), expected, atol=1e-6)
    except Exception:  # not a chain of single-input layers
        same = False
    if same:
        return rebuilt
    if novelty is not None:
        raise FeatxError(
            f"The model '{model.name}' is not the chain of layers `featx finetune` saves, so its "
            "novelty output cannot be added. Re-run `featx finetune`."
        )
    return model


def build_model(model_dir: str | Path) -> tuple[object, dict]:
    """(the end-to-end Keras model of MODEL_DIR, its description), from a complete folder
    (outputs.read_whole).

    The description has "kind", "head" (logreg/dense, for a fit-head output), "class_names",
    "image_size", "fingerprint" (of the backbone), "cache" (the one it was trained on, if
    recorded) and "flip" (the model averages the features of the image and its mirror image).
    """
    return outputs.read_whole(model_dir, lambda: _build_model(model_dir))


def _build_model(model_dir: str | Path) -> tuple[object, dict]:
    kind = model_kind(model_dir)  # a wrong folder is answered before Keras loads
    if kind == "export":
        raise FeatxError(
            f"'{model_dir}' is already an export ({INFO_FILE}). Pass the `featx fit-head` or "
            "`featx finetune` folder it was exported from."
        )
    if kind == "finetune":
        from featx.heads import novelty

        info = read_finetune_info(model_dir)
        state = novelty.load(model_dir, info["novelty"]) if info.get("novelty") else None
        score = novelty.keras_score(state) if state else None
        model = inference_model(load_finetune_model(model_dir), novelty=score)
        return model, {
            "kind": kind,
            "head": None,
            "class_names": list(info["class_names"]),
            "image_size": int(info["image_size"]),
            "fingerprint": info.get("fingerprint"),
            "cache": info.get("cache"),
            "novelty": _novelty_info(state),
        }

    from featx.heads import estimators, novelty

    head, meta = estimators.load_head(model_dir)
    fp = meta.get("fingerprint") or {}
    mobilenet.require_float(fp, f"The head in '{model_dir}'", "export")
    check_backbone(fp, f"The head in '{model_dir}'")
    spec = mobilenet.BackboneSpec.from_fingerprint(fp)
    size = spec.image_size
    state = novelty.load(model_dir, meta["novelty"]) if meta.get("novelty") else None
    score = novelty.keras_score(state) if state else None
    model = mobilenet.compose(
        spec, head.to_keras(), flip=head.flip_, name="featx_classifier", novelty=score
    )
    return model, {
        "kind": kind,
        "head": meta.get("head"),
        "class_names": list(meta["class_names"]),
        "image_size": size,
        "fingerprint": fp,
        "cache": meta.get("cache"),
        "flip": bool(head.flip_),
        "novelty": _novelty_info(state),
    }


def _novelty_info(state) -> dict | None:
    """What export.json records of the model's "novelty" output: the threshold and the known
    images' scores (so `featx predict --unknown-rate` can move it)."""
    if state is None:
        return None
    info = {k: v for k, v in state.info().items() if k != "file"}
    return {**info, "known": [round(float(v), 6) for v in state.known]}


# --- writing and reading the formats -------------------------------------------------------------


def _require_tensorflow(format: str) -> None:
    name = mobilenet.keras_backend()
    if name != "tensorflow":
        raise FeatxError(
            f"--format {format} needs the TensorFlow backend of Keras, but KERAS_BACKEND is "
            f"'{name}'. Run with KERAS_BACKEND=tensorflow, or use --format keras (any backend)."
        )


def _require_onnx() -> None:
    """The converter for the active Keras backend and ONNX Runtime (to check the file)."""
    blocker = onnx_engine.export_blocker()
    if blocker is None and not onnx_engine.onnxruntime_available():
        blocker = "checking the exported file needs ONNX Runtime"
    if blocker is not None:
        raise FeatxError(
            f"--format onnx cannot run here: {blocker}. Run `{onnx_engine.INSTALL_HINT}`, or use "
            "--format keras."
        )


def _write_onnx(model, path: Path, quantize: str = "none") -> None:
    """`model` as one ONNX graph (Keras' export: tf2onnx under TensorFlow), each output named
    as output_names says, so a model with several outputs keeps every one of them by name."""
    import keras

    outputs = model.output  # a dict of outputs keeps its keys (model.outputs sorts them)
    if not isinstance(outputs, dict):
        outputs = dict(zip(output_names(model), model.outputs))
    named = keras.Model(model.inputs, outputs)
    # Keras exports a model only once it has been called
    named([np.zeros((1, *model.input_shape[1:]), np.float32)], training=False)
    with replaced_atomically(path, ".onnx") as tmp:
        try:
            with warnings.catch_warnings():  # tf2onnx's numpy deprecation noise
                warnings.simplefilter("ignore")
                named.export(str(tmp), format="onnx", verbose=False)
        except Exception as e:
            raise FeatxError(
                f"ONNX conversion failed ({type(e).__name__}: {e}). Check that "
                f"`{onnx_engine.INSTALL_HINT}` is installed, or use --format keras."
            ) from None


def _write_keras(model, path: Path, quantize: str = "none") -> None:
    save_keras_atomic(model, path)


def _write_saved_model(model, path: Path, quantize: str = "none") -> None:
    tmp = temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.export(str(tmp), format="tf_saved_model", verbose=False)
        if path.exists():
            if not (path / "saved_model.pb").is_file():
                raise FeatxError(
                    f"'{path}' exists and is not a SavedModel; featx will not replace it. "
                    "Pass another --output folder."
                )
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_tflite(model, path: Path, quantize: str) -> None:
    import tensorflow as tf

    saved = temporary_path(path.with_name(f"{path.stem}.saved_model"))
    try:
        model.export(str(saved), format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        if quantize != "none":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "float16":
            converter.target_spec.supported_types = [tf.float16]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = converter.convert()
        with replaced_atomically(path) as tmp:
            tmp.write_bytes(data)
    except FeatxError:
        raise
    except Exception as e:
        raise FeatxError(f"TFLite conversion failed ({type(e).__name__}: {e}).") from None
    finally:
        shutil.rmtree(saved, ignore_errors=True)


_WRITERS = {
    "keras": _write_keras,
    "savedmodel": _write_saved_model,
    "tflite": _write_tflite,
    "onnx": _write_onnx,
}


# --- checks --------------------------------------------------------------------------------------


def _open_cache(cache_path, described: dict):
    """The cache, its validation (paths, labels) and its data folder; refused if incompatible."""
    cache = store.read_cache(cache_path, features=False)  # paths and labels
    if list(cache.class_names) != described["class_names"]:
        raise FeatxError(
            f"The cache '{cache_path}' has the classes {list(cache.class_names)}, the model "
            f"predicts {described['class_names']}. Pass the cache the model was trained on."
        )
    if described.get("fingerprint"):
        mobilenet.check_compatible(
            cache.fingerprint,
            described["fingerprint"],
            f"The cache '{cache_path}'",
            "Pass the cache the model was trained on.",
        )
    mask = cache.splits == "validation"
    if not mask.any():
        raise FeatxError(f"The cache '{cache_path}' has no validation split to evaluate on.")
    root = Path(str(cache.attrs.get("data_dir", "")))
    if not root.is_dir():
        raise FeatxError(
            f"The images of the cache '{cache_path}' were read from '{root}', which is not a "
            "folder here; the exported model cannot be evaluated on them."
        )
    paths = [str(root / p) for p, m in zip(cache.paths, mask) if m]
    return paths, cache.labels[mask]


def _check_pixels(n: int, size: int, val_paths: list[str] | None):
    """`n` images to compare the models on: spread over the validation split, else random."""
    if val_paths:
        picks = np.linspace(0, len(val_paths) - 1, min(n, len(val_paths))).round().astype(int)
        decoded = []
        for i in dict.fromkeys(picks.tolist()):
            try:
                decoded.append(decoder.load_image(val_paths[i], size))
            except Exception:
                continue
        if decoded:
            return np.stack(decoded), f"{len(decoded)} validation images"
    rng = np.random.default_rng(config.SEED)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), f"{n} random-pixel images"


def _reference_accuracy(model_dir: Path) -> float | None:
    try:
        return float(json.loads((model_dir / "metrics.json").read_text())["validation"]["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_request(model_dir: Path, format: str, quantize: str, output, cache) -> Path:
    """The output folder, once the format's libraries, the folders and the cache are checked:
    every wrong request is answered before Keras loads."""
    if format == "onnx":
        _require_onnx()
    elif format != "keras":
        _require_tensorflow(format)
    out = Path(output) if output is not None else default_output_dir(model_dir, format, quantize)
    suffixes = (".keras", ".tflite", ".onnx", ".h5", ".pb")
    if out.is_file() or (not out.exists() and out.suffix in suffixes):
        raise FeatxError(
            f"--output is the folder to write {MODEL_FILES[format]}, {LABELS_FILE} and "
            f"{INFO_FILE} into, got '{out}'. Pass a folder such as '{out.with_suffix('')}'."
        )
    model_kind(model_dir)  # a wrong folder is answered before Keras loads
    if cache is not None and not Path(cache).is_file():
        raise FeatxError(
            f"Cache not found: '{cache}'. Pass the .h5 file `featx extract` wrote, or drop --cache."
        )
    return out


# --- the command ---------------------------------------------------------------------------------


def export(
    model_dir: str | Path,
    format: str = config.EXPORT_FORMAT,
    quantize: str = config.EXPORT_QUANTIZE,
    output: str | Path | None = None,
    cache: str | Path | None = None,
    *,
    check_images: int = config.EXPORT_CHECK_IMAGES,
    batch_size: int = config.BATCH_SIZE,
    overwrite: bool = False,
    progress=True,
    log=None,
) -> dict:
    """Export a fit-head or finetune output as one model: raw pixels -> class probabilities.

    Args:
        model_dir: a `featx fit-head` or `featx finetune` output folder.
        format: "keras" (model.keras, any backend), "savedmodel" (a TF SavedModel folder whose
            `serve` signature takes the pixels), "tflite" (model.tflite); these two need the
            TensorFlow backend; or "onnx" (model.onnx, every output by name; the onnx extra).
        quantize: TFLite only: "none", "float16" (float16 weights) or "dynamic" (int8 weights).
        output: the folder to write (created): the model, labels.txt and export.json. Default
            `<model_dir>/export-<format>[-<quantize>]/`.
        cache: the feature cache the model was trained on: the check images come from its
            validation split, and the exported model is evaluated on that whole split. Without
            it, the check uses the validation images of the cache recorded with the model when
            it is still there, else random pixels.
        check_images: how many images the exported and in-process models are compared on.
        batch_size, progress: of the evaluation on the cache's validation split (progress: True
            a bar, False none, a function called as (done, total, images_per_second)).
        overwrite: replace an output folder that holds another featx output; the same export
            of the same model folder is replaced without it (see featx.artifacts.outputs).
        log: called with one-line notes; default: logging.getLogger("featx"), and warnings as
            featx.FeatxWarning.
    Returns:
        The content of export.json plus "output", "model" (its path) and "seconds".
    """
    t0 = time.perf_counter()
    log = Messages(log)
    opts = ExportOptions(
        format=format, quantize=quantize, check_images=check_images, batch_size=batch_size
    )
    model_dir = Path(model_dir)
    out = _check_request(model_dir, format, quantize, output, cache)
    quantized = {"quantize": quantize} if quantize != "none" else {}
    made_by = outputs.made_by("export", out, model_dir, format=format, **quantized)
    outputs.check_target(out, made_by, overwrite)  # before any work

    model, described = build_model(model_dir)
    val_paths, val_labels = _open_cache(cache, described) if cache is not None else (None, None)
    log(f"exporting {described['kind']} model to {out / MODEL_FILES[format]} ...")
    with outputs.writing(out, made_by, overwrite=overwrite, log=log) as stage:
        path = stage / MODEL_FILES[format]
        _WRITERS[format](model, path, quantize)
        file_outputs = exported_outputs(path, format)
        check = _verify(model, file_outputs, path, opts, _check_paths(val_paths, described), log)
        validation = None
        if val_paths is not None:
            log(f"evaluating the exported model on {len(val_paths)} validation images ...")
            with closing(reporter(progress, "evaluating")) as bar:
                run = lambda batch: probabilities(file_outputs(batch))  # noqa: E731
                validation = _evaluate(run, val_paths, val_labels, described, opts, bar)
            validation["reference_accuracy"] = _reference_accuracy(model_dir)
        results = {"check": check, "validation": validation}
        info = _record(stage, path, model_dir, described, opts, results)
    path = out / MODEL_FILES[format]
    return {**info, "output": str(out), "model": str(path), "seconds": time.perf_counter() - t0}


def _check_paths(val_paths, described: dict):
    """Images to compare the models on: the --cache's validation split, else that of the cache
    the model was trained on when it is still here, else None (random pixels)."""
    if val_paths is not None or not described.get("cache"):
        return val_paths
    try:
        return _open_cache(described["cache"], described)[0]
    except FeatxError:
        return None


def _verify(model, outputs, path: Path, opts: ExportOptions, check_paths, log) -> dict:
    """Compare the exported file with the in-process model, output by output; a float export that
    differs, or lacks an output, is refused (its staging folder is removed, the output folder is
    left as it was); a quantized one only warned about."""
    pixels, source = _check_pixels(opts.check_images, model.input_shape[1], check_paths)
    expected = keras_outputs(model, pixels.astype(np.float32))
    got = outputs(pixels)
    quantized = opts.quantize != "none"
    tolerance = config.EXPORT_QUANTIZED_TOLERANCE if quantized else config.EXPORT_TOLERANCE
    try:
        diffs = _differences(
            expected, got, every_output=True
        )  # novelty too, where the model has it
    except FeatxError as e:
        raise FeatxError(
            f"{e} {path.name} was removed (its output folder is left as it was). "
            "Report this with your keras versions."
        ) from None
    failed = [name for name, diff in diffs.items() if not diff <= tolerance]  # NaN fails
    if failed:
        what = "probabilities" if failed[0] == config.EXPORT_PROBABILITIES else "values"
        message = (
            f"The exported model's {what} differ from the in-process model's by up to "
            f"{diffs[failed[0]]:.3g} (output '{failed[0]}'; expected <= {tolerance:g})"
        )
        if not quantized:  # a float export must be the same model: never leave a wrong one
            raise FeatxError(
                f"{message}; {path.name} was removed (its output folder is left as it was). "
                "Report this with your keras/tensorflow versions."
            )
        log(f"warning: {message}; quantization costs more than usual for this model.")
    got_p, expected_p = probabilities(got), probabilities(expected)
    return {
        "images": len(pixels),
        "source": source,
        "max_abs_diff": diffs.get(config.EXPORT_PROBABILITIES, max(diffs.values())),
        "tolerance": tolerance,
        "same_predictions": int((got_p.argmax(1) == expected_p.argmax(1)).sum()),
        "outputs": diffs,
    }


def _differences(expected: dict, got: dict, every_output: bool) -> dict[str, float]:
    """{output name: largest difference} between the in-process outputs and the file's, each
    relative to max(1, largest in-process value) (so probabilities: absolute). every_output: the
    file must have each output of the model (ONNX); else those it has are compared."""
    names = list(expected) if every_output else [name for name in expected if name in got]
    missing = [name for name in names if name not in got]
    if missing or not names:
        raise FeatxError(
            f"The exported file lacks the model's outputs {missing or list(expected)} (it has "
            f"{sorted(got)})."
        )
    diffs = {}
    for name in names:
        want, have = np.asarray(expected[name], np.float64), np.asarray(got[name], np.float64)
        if want.shape != have.shape:
            raise FeatxError(
                f"The exported file's output '{name}' has the shape {have.shape}, the in-process "
                f"model's {want.shape}."
            )
        diffs[name] = float(np.abs(have - want).max() / max(1.0, float(np.abs(want).max())))
    return diffs


def _evaluate(run, val_paths, val_labels, described: dict, opts: ExportOptions, progress):
    classes = len(described["class_names"])
    size = described["image_size"]
    proba, failed = run_batches(run, val_paths, size, classes, opts.batch_size, progress)
    ok = np.array([i not in failed for i in range(len(val_paths))], bool)
    correct = int((proba[ok].argmax(1) == val_labels[ok]).sum()) if ok.any() else 0
    return {
        "n": int(ok.sum()),
        "failed": len(failed),
        "accuracy": correct / int(ok.sum()) if ok.any() else None,
    }


def _record(out: Path, path: Path, model_dir: Path, described: dict, opts, results: dict):
    """export.json, labels.txt and the model card; returns export.json's content. `results`
    holds the "check" against the in-process model and the "validation" on the cache."""
    size, class_names = described["image_size"], described["class_names"]
    info = {
        "format": INFO_FORMAT,
        "featx_version": VERSION,
        "model_format": opts.format,
        "quantize": opts.quantize,
        "model_file": MODEL_FILES[opts.format],
        "labels_file": LABELS_FILE,
        "model_card": model_card.CARD_FILE,
        "class_names": class_names,
        "image_size": size,
        "input": {
            "shape": [None, size, size, 3],
            "dtype": "float32",
            "pixels": "RGB, 0..255, not normalised (the preprocessing is inside the model)",
        },
        "output": "softmax probabilities, one per class, in the order of class_names"
        + ('; and "novelty" (see novelty)' if described.get("novelty") else ""),
        "novelty": described.get("novelty"),
        "preprocessing": {
            "inside_model": config.PREPROCESSING,
            "resize": f"{size}x{size}, {config.RESIZE}",
            "background": list(config.BACKGROUND),
            "decoder": "featx.images.decoder.load_image",
        },
        "source": {
            "model_dir": str(model_dir),
            "kind": described["kind"],
            "head": described["head"],
            "flip": described.get("flip", False),
            "fingerprint": described["fingerprint"],
        },
        **results,
        "size_bytes": _size(path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_text_atomic(out / LABELS_FILE, "".join(f"{c}\n" for c in class_names))
    write_text_atomic(out / INFO_FILE, json.dumps(info, indent=2, default=str) + "\n")
    write_text_atomic(out / model_card.CARD_FILE, model_card.render(info, model_dir))
    return info


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def format_summary(result: dict) -> str:
    c = result["check"]
    lines = [
        f"wrote {result['model']} ({_human(result['size_bytes'])}), {LABELS_FILE}, "
        f"{INFO_FILE} and the model card {model_card.CARD_FILE} in {result['output']}",
        f"check on {c['source']}: largest probability difference {c['max_abs_diff']:.2e} "
        f"(tolerance {c['tolerance']:g}), same class for {c['same_predictions']}/{c['images']}",
    ]
    v = result["validation"]
    if v is not None and v["accuracy"] is not None:
        ref = v["reference_accuracy"]
        lines.append(
            f"validation accuracy of the exported model: {v['accuracy']:.4f} on {v['n']} images"
            + (f" (metrics.json: {ref:.4f})" if ref is not None else "")
        )
    lines.append(f"{result['seconds']:.1f} s")
    return "\n".join(lines)
