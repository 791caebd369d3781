"""The model card: README.md next to every export (`featx export`).

What someone receiving the folder needs without featx: the classes in output order, the data the
model was trained and measured on, its validation and test metrics, the input contract (size,
pixel range, what the model does itself), intended use and limits, and how to load it in Python
and on Android. Built from export.json (written beside it) and the model folder's metrics.json.

TFLite metadata (labels and normalisation inside the .tflite file, as MediaPipe Model Maker writes
it) would need the `tflite-support` package, which was last released in 2023 and requires
protobuf < 4, while TensorFlow 2.21 requires protobuf >= 6.31: they cannot be installed together.
So labels.txt and this card carry that information instead.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from featx import config
from featx.reports.evaluation import with_interval

CARD_FILE = "README.md"
MARKER = "<!-- featx model card: written by `featx export`, replaced on the next export -->"


def _md(text: str) -> str:
    """Text from the data (warnings naming files and classes) as Markdown that renders no HTML."""
    return html.escape(str(text), quote=False)


def _metrics(model_dir: str | Path) -> dict:
    try:
        return json.loads((Path(model_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _f(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"


def _text(name) -> str:
    """A class name as text in the card: Markdown renders raw HTML, so it is escaped, and `|`
    would split a table cell."""
    return html.escape(str(name)).replace("|", "&#124;")


def _heading(title: str) -> list[str]:
    return ["", f"## {title}", ""]


def _facts(info: dict) -> tuple:
    """(names, size, source, fingerprint, format, model file, kind) of an export's info."""
    source = info.get("source") or {}
    return (
        list(info["class_names"]),
        info["image_size"],
        source,
        source.get("fingerprint") or {},
        info["model_format"],
        info["model_file"],
        source.get("kind") or "model",
    )


def render(info: dict, model_dir: str | Path) -> str:
    """The model card (Markdown) of an export described by `info` (the content of export.json)."""
    metrics = _metrics(model_dir)
    sections = (_header, _data, _measured, _contract, _android, _provenance)
    return "\n".join(line for section in sections for line in section(info, metrics))


def _header(info: dict, metrics: dict) -> list[str]:
    """Title, what the model is, and its classes in output order."""
    names, size, source, fp, fmt, model_file, kind = _facts(info)
    lines: list[str] = []
    what = "fine-tuned end to end" if kind == "finetune" else f"a {source.get('head')} head"
    lines += [
        MARKER,
        f"# Image classifier: {', '.join(map(_text, names[:6]))}{', …' if len(names) > 6 else ''}",
        "",
        f"`{model_file}` ({fmt}"
        + (f", {info['quantize']} quantized" if info.get("quantize", "none") != "none" else "")
        + f") classifies a {size}x{size} RGB photo into one of {len(names)} classes. It is "
        f"MobileNetV2 (ImageNet weights, alpha {fp.get('alpha', '?')}) with {what}, trained "
        f"with featx {info.get('featx_version', '')} and exported on {info.get('created', '')}.",
        "",
        "## Classes",
        "",
        "In output order (also `labels.txt`, one a line):",
        "",
    ]
    lines += [f"{i}. {_text(name)}" for i, name in enumerate(names)]

    return lines


def _data(info: dict, metrics: dict) -> list[str]:
    """Images per class and split, when the source metrics have them."""
    names, size, source, fp, fmt, model_file, kind = _facts(info)
    lines: list[str] = []
    counts = (metrics.get("cache") or {}).get("counts") or {}
    if counts:
        splits = [s for s in config.SPLITS if s in counts]
        rows = [[_text(name), *(counts[s].get(name, 0) for s in splits)] for name in names]
        rows.append(["**total**", *(sum(counts[s].values()) for s in splits)])
        lines += ["", "## Data", "", "Images per class and split:", ""]
        lines += _table(["class", *splits], rows)

    return lines


def _measured(info: dict, metrics: dict) -> list[str]:
    """Metrics of the source model, and the checks of the exported file."""
    names, size, source, fp, fmt, model_file, kind = _facts(info)
    lines: list[str] = []
    measured = [s for s in ("validation", "test") if isinstance(metrics.get(s), dict)]
    if measured:
        lines += [
            "",
            "## Metrics",
            "",
            "Of the model this export was made from, on images it was not trained on "
            "(95 % intervals in brackets: Wilson's for accuracy, per-class Jeffreys posteriors "
            "for balanced accuracy):",
            "",
        ]
        lines += [f"> **Warning:** {_md(w)}" for w in metrics.get("warnings") or []]
        lines += [""] if metrics.get("warnings") else []
        lines += _table(
            ["split", "images", "accuracy", "balanced accuracy", "macro F1", "log loss"],
            [
                [
                    s,
                    metrics[s]["n"],
                    with_interval(metrics[s], "accuracy"),
                    with_interval(metrics[s], "balanced_accuracy"),
                    _f(metrics[s]["macro_f1"]),
                    _f(metrics[s]["log_loss"]),
                ]
                for s in measured
            ],
        )
        per_class = metrics[measured[0]]["per_class"]
        lines += ["", f"Per class ({measured[0]}):", ""]
        lines += _table(
            ["class", "precision", "recall", "F1", "images"],
            [
                [_text(n), _f(c["precision"]), _f(c["recall"]), _f(c["f1"]), c["support"]]
                for n, c in ((n, per_class[n]) for n in names if n in per_class)
            ],
        )
    check = info.get("check") or {}
    if check:
        lines += [
            "",
            f"The exported file was checked against the in-process model on {check['source']}: "
            f"largest probability difference {check['max_abs_diff']:.2e} (tolerance "
            f"{check['tolerance']:g}), same class for {check['same_predictions']}/"
            f"{check['images']}.",
        ]
    validation = info.get("validation")
    if validation and validation.get("accuracy") is not None:
        lines.append(
            f"The exported file itself scored {validation['accuracy']:.4f} on the "
            f"{validation['n']} validation images."
        )

    return lines


def _novelty_lines(unknown: dict | None) -> list[str]:
    """The `novelty` output, its threshold and how to use it (exports of fit-head models)."""
    if not unknown:
        return []
    return [
        "- Output `novelty`: `(batch,)`, how unlike the training photos each photo is (higher: "
        "less alike; the larger of the cosine distance to the nearest training photo's features "
        "and 1 − the top probability, each scaled). **A photo is unknown when novelty > "
        f"{unknown['threshold']:.6g}**: that threshold flags {unknown['rate']:.0%} of the "
        f"{unknown.get('calibrated_on', 'validation')} photos; a photo of something else gets "
        "a class anyway, so check `novelty` before trusting it (`featx predict` does: its "
        "`unknown` column).",
    ]


def _python_code(fmt: str, model_file: str, unknown) -> list[str]:
    """Lines that load the exported file and compute `probabilities` (and `novelty`)."""
    lines: list[str] = []
    if fmt == "keras":
        lines += [
            "",
            "import keras",
            "",
            f'model = keras.saving.load_model("{model_file}")',
            *(
                [
                    "output = model.predict(x)",
                    'probabilities, novelty = output["probabilities"][0], output["novelty"][0]',
                ]
                if unknown
                else ["probabilities = model.predict(x)[0]"]
            ),
        ]
    elif fmt == "savedmodel":
        lines += [
            "",
            "import tensorflow as tf",
            "",
            f'model = tf.saved_model.load("{model_file}")',
            *(
                [
                    "output = model.serve(tf.constant(x))",
                    'probabilities = output["probabilities"].numpy()[0]',
                    'novelty = output["novelty"].numpy()[0]',
                ]
                if unknown
                else ["probabilities = model.serve(tf.constant(x)).numpy()[0]"]
            ),
        ]
    elif fmt == "onnx":
        names = [config.EXPORT_PROBABILITIES] + (["novelty"] if unknown else [])
        lines += [
            "",
            "import onnxruntime",
            "",
            f'session = onnxruntime.InferenceSession("{model_file}")',
            "feed = {session.get_inputs()[0].name: x}",
            *(
                [f"probabilities, novelty = (o[0] for o in session.run({names}, feed))"]
                if unknown
                else [f'probabilities = session.run(["{names[0]}"], feed)[0][0]']
            ),
        ]
    else:
        lines += [
            "",
            "try:",
            "    from ai_edge_litert.interpreter import Interpreter  # LiteRT, the TFLite runtime",
            "except ImportError:  # TensorFlow's copy of it",
            "    import tensorflow as tf",
            "",
            "    Interpreter = tf.lite.Interpreter",
            "",
            f'interpreter = Interpreter(model_path="{model_file}")',
            *(
                [
                    "output = interpreter.get_signature_runner()(image=x)",
                    'probabilities, novelty = output["probabilities"][0], output["novelty"][0]',
                ]
                if unknown
                else [
                    "interpreter.allocate_tensors()",
                    'interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)',
                    "interpreter.invoke()",
                    'output = interpreter.get_output_details()[0]["index"]',
                    "probabilities = interpreter.get_tensor(output)[0]",
                ]
            ),
        ]
    return lines


def _contract(info: dict, metrics: dict) -> list[str]:
    """Input and output, intended use, and Python code to load it."""
    names, size, source, fp, fmt, model_file, kind = _facts(info)
    unknown = info.get("novelty")
    lines = [
        *_heading("Input and output"),
        f"- Input: a float32 tensor of shape `(batch, {size}, {size}, 3)`, RGB, pixel values "
        "0–255, **not normalised**: the model scales them to [-1, 1] itself "
        "(MobileNetV2's `preprocess_input`).",
        f"- Resize the whole photo to {size}x{size} without keeping the aspect ratio (bilinear, "
        "as in training), after applying its EXIF orientation; transparent pixels on white.",
        f"- Output: `(batch, {len(names)})` softmax probabilities in the order of `labels.txt`"
        + (" (the output named `probabilities`)." if unknown else "."),
        *_novelty_lines(unknown),
        *_onnx_outputs(info),
        "",
        "## Intended use and limits",
        "",
        f"- Sorting photos like the training photos into these {len(names)} classes. The metrics "
        "above hold for photos from the same source; measure again on photos from elsewhere.",
        (
            "- It always answers with one of these classes, also for a photo of something else: "
            "use the `novelty` output (above) to tell those apart."
            if unknown
            else "- It always answers with one of these classes, also for a photo of something "
            'else. Treat a low top probability as "unknown" (as `featx predict --min-confidence` '
            "does)."
        ),
        "- Not for decisions about people, or where a wrong class does harm, without a human "
        "check.",
        "",
        "## Load it in Python",
        "",
        "```python",
        "import numpy as np",
        "from PIL import Image, ImageOps",
        "",
        *_python(fmt, model_file, size, unknown),
    ]
    lines += [
        *(
            [f"print('unknown' if novelty > {unknown['threshold']:.6g} else 'known')"]
            if unknown
            else []
        ),
        "print(labels[int(np.argmax(probabilities))], float(np.max(probabilities)))",
        "```",
        "",
        "With featx installed: `featx predict THIS_FOLDER photos/` (same decoding as training).",
        "",
        "## Use it on Android",
        "",
    ]
    return lines


def _onnx_outputs(info: dict) -> list[str]:
    """An ONNX file names its outputs: which they are (a model may have more than one)."""
    if info["model_format"] != "onnx":
        return []
    names = list((info.get("check") or {}).get("outputs") or [config.EXPORT_PROBABILITIES])
    others = [f"`{_text(name)}`" for name in names if name != config.EXPORT_PROBABILITIES]
    return [
        f"- ONNX outputs, by name: `{config.EXPORT_PROBABILITIES}` (the probabilities above)"
        + (f"; also the model's other outputs, {', '.join(others)}" if others else "")
        + ". Each was checked against the in-process model."
    ]


def _python(fmt: str, model_file: str, size: int, unknown: dict | None) -> list[str]:
    """Python that loads the exported file and classifies photo.jpg: it runs as printed where
    featx is installed (tests/test_model_card.py runs it for each format)."""
    lines = [
        'labels = open("labels.txt").read().splitlines()',
        'image = ImageOps.exif_transpose(Image.open("photo.jpg")).convert("RGB")',
        f"x = np.asarray(image.resize(({size}, {size}), Image.BILINEAR), np.float32)[None]",
    ]
    return lines + _python_code(fmt, model_file, unknown)


def _android(info: dict, metrics: dict) -> list[str]:
    """How to run it on Android (TFLite), or how to get a TFLite file."""
    names, size, source, fp, fmt, model_file, kind = _facts(info)
    lines: list[str] = []
    if fmt == "tflite":
        lines += [
            f"Copy `{model_file}` and `labels.txt` to `app/src/main/assets/` and run it with "
            "LiteRT (`com.google.ai.edge.litert:litert`, the TensorFlow Lite runtime):",
            "",
            "```kotlin",
            'val model = FileUtil.loadMappedFile(context, "' + model_file + '")',
            'val labels = FileUtil.loadLabels(context, "labels.txt")',
            "val interpreter = Interpreter(model)",
            f"// {size}x{size} RGB, float32 0..255 (not normalised), resized without cropping",
            f"val input = ByteBuffer.allocateDirect(4 * {size} * {size} * 3)"
            ".order(ByteOrder.nativeOrder())",
            f"val scaled = Bitmap.createScaledBitmap(bitmap, {size}, {size}, true)",
            f"for (y in 0 until {size}) for (x in 0 until {size}) {{",
            "    val p = scaled.getPixel(x, y)",
            "    input.putFloat(((p shr 16) and 0xFF).toFloat())",
            "    input.putFloat(((p shr 8) and 0xFF).toFloat())",
            "    input.putFloat((p and 0xFF).toFloat())",
            "}",
            f"val output = Array(1) {{ FloatArray({len(names)}) }}",
            *(
                [
                    "val novelty = FloatArray(1)",
                    'interpreter.runSignature(mapOf("image" to input), '
                    'mapOf("probabilities" to output, "novelty" to novelty))',
                ]
                if info.get("novelty")
                else ["interpreter.run(input, output)"]
            ),
            "val best = output[0].indices.maxBy { output[0][it] }",
            'Log.i("classifier", "${labels[best]} ${output[0][best]}")',
            *(
                [f"val unknown = novelty[0] > {info['novelty']['threshold']:.6g}f"]
                if info.get("novelty")
                else []
            ),
            "```",
            "",
            "The .tflite file carries no TFLite metadata (see the note in featx/model_card.py): "
            "the labels are in `labels.txt` and the input contract is above.",
        ]
    else:
        lines += [
            "Export a TFLite file for Android: `featx export MODEL_DIR --format tflite` "
            "(add `--quantize dynamic` for a ~3.6x smaller file); its model card shows the "
            "Kotlin code.",
        ]
    return lines


def _provenance(info: dict, metrics: dict) -> list[str]:
    """Where it came from."""
    names, size, source, fp, fmt, model_file, kind = _facts(info)
    lines = [
        *_heading("Provenance"),
        f"- Made from `{source.get('model_dir')}` ({kind}"
        + (f", {source['head']} head" if source.get("head") else "")
        + ").",
        f"- Backbone: {fp.get('backbone', 'MobileNetV2')}, weights `{fp.get('weights')}` "
        f"(sha256 {str(fp.get('weights_sha256'))[:12]}), alpha {fp.get('alpha')}, image size "
        f"{fp.get('image_size')}, Keras {fp.get('keras_version')}.",
        "- Everything featx recorded is in `export.json`.",
        "",
    ]
    return lines
