"""report.html: a model's results on one self-contained page (`featx report MODEL_DIR`).

Written by fit-head and finetune next to metrics.json, and rebuilt from the files there by
`featx report`. Everything is inside the one file, so it opens from disk, without a server, and can
be mailed: the headline metrics of every split, per split the confusion matrix as counts beside the
row-normalised one, precision/recall/F1 per class for validation and test, the most-confused class
pairs, the training curves, and a grid of the worst misclassified images (fastai's "top losses":
most confidently wrong first), each a small JPEG thumbnail embedded as base64.

Read from MODEL_DIR: metrics.json (required), misclassified.csv and training_curves.png (optional).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import time
from pathlib import Path

import numpy as np

from featx import config
from featx.config import VERSION
from featx.errors import FeatxError
from featx.files import read_json, write_text_atomic
from featx.images import decoder, finder
from featx.reports.evaluation import class_names_of, imbalance_hint, novelty_line, with_interval

REPORT_FILE = "report.html"
SHOWN_SPLITS = ("validation", "test")  # the splits a reader judges the model on

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1200px; padding: 0 16px; color: #1d1d1f; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.meta { color: #555; margin: 0 0 12px; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { padding: 3px 8px; border: 1px solid #ddd; text-align: right; }
th { background: #f4f4f6; } td.name, th.name { text-align: left; }
.pair { display: flex; gap: 28px; flex-wrap: wrap; align-items: flex-start; }
.scroll { overflow-x: auto; max-width: 100%; }
table.matrix td, table.matrix th { padding: 2px 5px; font-size: 12px; }
table.matrix th.vertical { writing-mode: vertical-rl; transform: rotate(180deg);
                           text-align: left; vertical-align: bottom; }
.headline td.big { font-size: 18px; font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 6px; font-size: 12px; }
.card img { display: block; margin: 0 auto 4px; max-width: 100%; }
.card .missing { height: 96px; display: flex; align-items: center; justify-content: center;
                 color: #999; background: #f4f4f6; }
.card .path { color: #666; word-break: break-all; }
.wrong { color: #b00020; font-weight: 600; }
.note { color: #555; font-size: 13px; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.warnings { background: #fff3cd; border: 1px solid #e0c36b; border-radius: 6px; padding: 2px 12px;
            margin: 8px 0; }
.warnings p { margin: 6px 0; }
"""

# Counts the thumbnails the browser could decode; a check for people and for tests alike.
SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img.thumb");
  var ok = 0;
  imgs.forEach(function (img) { if (img.complete && img.naturalWidth > 0) ok += 1; });
  var el = document.getElementById("thumbs-status");
  if (el) el.textContent = ok + " of " + imgs.length + " thumbnails shown";
});
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _read_metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    metrics = read_json(
        path,
        f"No metrics.json in '{folder}'. Pass the output folder of `featx fit-head` or "
        "`featx finetune`.",
    )
    if not isinstance(metrics, dict) or not any(
        isinstance(metrics.get(s), dict) for s in config.SPLITS
    ):
        raise FeatxError(f"'{path}' holds no split metrics; it is not a featx metrics file.")
    return metrics


def _read_misclassified(folder: Path) -> list[dict]:
    path = folder / "misclassified.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _shown(metrics: dict) -> list[tuple[str, dict]]:
    """(split, its metrics) of the splits a reader judges the model on that have images."""
    return [
        (split, metrics[split])
        for split in SHOWN_SPLITS
        if isinstance(metrics.get(split), dict) and metrics[split].get("n")
    ]


def thumbnail(path: str | Path, size: int = config.REPORT_THUMBNAIL) -> str | None:
    """A data: URI of a small JPEG of the image at `path` (orientation applied, aspect ratio
    kept), or None when it cannot be read. Decoded like extraction, so HEIC works too."""
    from PIL import ImageOps

    try:
        with decoder.open_image(path) as img:
            img.draft("RGB", (size, size))  # JPEG: decode at reduced scale
            img = decoder._to_rgb(ImageOps.exif_transpose(img))
            img.thumbnail((size, size))
            buffer = io.BytesIO()
            img.save(buffer, "JPEG", quality=80)
    except Exception:  # gone, unreadable or corrupt: the card says so instead
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _png_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def _headline(metrics: dict) -> str:
    rows = []
    splits = [s for s in config.SPLITS if isinstance(metrics.get(s), dict) and metrics[s].get("n")]
    before = metrics.get("before") or {}
    for split in splits:
        m = metrics[split]
        rows.append(
            f"<tr><td class='name'>{_e(split)}</td><td>{m['n']}</td>"
            f"<td class='big'>{_e(with_interval(m, 'accuracy'))}</td>"
            f"<td>{_e(with_interval(m, 'balanced_accuracy'))}</td>"
            f"<td>{_fmt(m['macro_f1'])}</td><td>{_fmt(m['log_loss'])}</td></tr>"
        )
        if isinstance(before.get(split), dict) and split != "train":
            b = before[split]
            rows.append(
                f"<tr class='note'><td class='name'>{_e(split)}, warm start</td><td>{b['n']}</td>"
                f"<td>{_fmt(b['accuracy'])}</td><td>{_fmt(b['balanced_accuracy'])}</td>"
                f"<td>{_fmt(b['macro_f1'])}</td><td>{_fmt(b['log_loss'])}</td></tr>"
            )
    return (
        "<table class='headline'><tr><th class='name'>split</th><th>images</th>"
        "<th>accuracy [95 % interval]</th><th>balanced accuracy</th><th>macro F1</th>"
        "<th>log loss</th></tr>" + "".join(rows) + "</table>"
    )


def _calibration(metrics: dict) -> list[str]:
    """The reliability diagram of the validation (else test) split: how often the predicted
    class is right against how sure the model was, in bins of confidence; and its expected
    calibration error. An SVG, drawn here: no plot file to lose."""
    split = next((s for s in ("validation", "test") if "calibration" in (metrics.get(s) or {})),
                 None)  # fmt: skip
    if split is None:
        return []
    cal = metrics[split]["calibration"]
    size, pad = 260, 30  # the plot's side and margin, in pixels
    bars = []
    for low, high, confidence, accuracy, count in cal["bins"]:
        if not count:
            continue
        x0, width = pad + low * size, (high - low) * size
        top = pad + size - accuracy * size
        bars.append(
            f"<rect x='{x0:.1f}' y='{top:.1f}' width='{width:.1f}' height='{accuracy * size:.1f}' "
            f"fill='#4a7bd0' opacity='0.8'><title>confidence {confidence:.3f}: {accuracy:.3f} "
            f"right of {count}</title></rect>"
        )
    svg = (
        f"<svg width='{size + 2 * pad}' height='{size + 2 * pad}' role='img' "
        "aria-label='reliability diagram'>"
        f"<rect x='{pad}' y='{pad}' width='{size}' height='{size}' fill='none' stroke='#999'/>"
        f"{''.join(bars)}<line x1='{pad}' y1='{pad + size}' x2='{pad + size}' y2='{pad}' "
        "stroke='#b00020' stroke-dasharray='4 3'/>"
        f"<text x='{pad}' y='{size + 2 * pad - 6}' font-size='11'>confidence (predicted class)"
        f"</text><text x='4' y='{pad - 8}' font-size='11'>share right</text></svg>"
    )
    return [
        f"<h2>Calibration: {_e(split)}</h2>",
        f"<p class='note'>Expected calibration error {cal['ece']:.3f}: the mean gap between how "
        "sure the model is and how often it is right (bars on the dashed line: calibrated; "
        "below it: over-confident).</p>",
        svg,
    ]


def _matrix_tables(cm: np.ndarray, names: list[str]) -> str:
    rows_sum = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows_sum, out=np.zeros(cm.shape), where=rows_sum > 0)
    vertical = " class='vertical'" if len(names) > 6 else ""  # many classes: narrow columns
    head = "".join(f"<th{vertical}>{_e(n)}</th>" for n in names)

    def table(title: str, cell) -> str:
        body = "".join(
            f"<tr><th class='name'>{_e(name)}</th>"
            + "".join(cell(i, j) for j in range(len(names)))
            + "</tr>"
            for i, name in enumerate(names)
        )
        return (
            f"<div class='scroll'><div class='note'>{title}</div><table class='matrix'><tr>"
            f"<th class='name'>true \\ predicted</th>{head}</tr>{body}</table></div>"
        )

    def shade(i, j, text):
        a = share[i, j]
        color = "#fff" if a > 0.55 else "#1d1d1f"
        return f"<td style='background: rgba(31, 119, 180, {a:.3f}); color: {color}'>{text}</td>"

    counts = table("counts", lambda i, j: shade(i, j, int(cm[i, j])))
    normalised = table(
        "normalised per true class (each row sums to 1)",
        lambda i, j: shade(i, j, f"{share[i, j]:.2f}" if cm[i, j] else "·"),
    )
    return f"<div class='pair'>{counts}{normalised}</div>"


def _per_class(metrics: dict, names: list[str]) -> str:
    parts = []
    for split, m in _shown(metrics):
        body = "".join(
            f"<tr><td class='name'>{_e(n)}</td><td>{_fmt(c['precision'])}</td>"
            f"<td>{_fmt(c['recall'])}</td><td>{_fmt(c['f1'])}</td><td>{c['support']}</td></tr>"
            for n, c in ((n, m["per_class"][n]) for n in names if n in m["per_class"])
        )
        parts.append(
            f"<div><div class='note'>{_e(split)}</div><table><tr><th class='name'>class</th>"
            "<th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
            f"{body}</table></div>"
        )
    return f"<div class='pair'>{''.join(parts)}</div>"


def confused_pairs(cm, names: list[str], n: int = config.REPORT_CONFUSED_PAIRS) -> list[dict]:
    """The off-diagonal cells of a confusion matrix with the most images, largest first:
    [{"true", "predicted", "count", "share" (of the true class's images)}]."""
    cm = np.asarray(cm)
    support = cm.sum(axis=1)
    cells = [
        (int(cm[i, j]), i, j)
        for i in range(len(names))
        for j in range(len(names))
        if i != j and cm[i, j] > 0
    ]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [
        {
            "true": names[i],
            "predicted": names[j],
            "count": count,
            "share": round(count / support[i], 4) if support[i] else 0.0,
        }
        for count, i, j in cells[:n]
    ]


def _confused(metrics: dict, names: list[str]) -> str:
    parts = []
    for split, m in _shown(metrics):
        pairs = confused_pairs(m["confusion_matrix"], names)
        if not pairs:
            parts.append(f"<p>{_e(split)}: no image was confused.</p>")
            continue
        body = "".join(
            f"<tr><td class='name'>{_e(p['true'])}</td><td class='name'>{_e(p['predicted'])}</td>"
            f"<td>{p['count']}</td><td>{p['share']:.1%}</td></tr>"
            for p in pairs
        )
        parts.append(
            f"<div><div class='note'>{_e(split)}</div><table><tr><th class='name'>true</th>"
            "<th class='name'>predicted as</th><th>images</th><th>of the true class</th></tr>"
            f"{body}</table></div>"
        )
    return f"<div class='pair'>{''.join(parts)}</div>"


def image_path(path: str, data_dir: str | None) -> str | Path:
    """Where the image of a misclassified.csv row is: its path (relative to the data folder, as
    the cache holds it) inside `data_dir` (metrics.json's cache.data_dir); an absolute path, as
    older folders hold, as it is."""
    if Path(path).is_absolute() or not data_dir:
        return path
    return finder.inside(Path(data_dir), path) or path


def _top_losses(
    rows: list[dict], data_dir: str | None, n: int = config.REPORT_TOP_LOSSES
) -> tuple[str, int]:
    """The grid of the `n` most confidently wrong validation/test images, and how many exist."""
    shown = [r for r in rows if r.get("split") in SHOWN_SPLITS]
    shown.sort(key=lambda r: -float(r.get("probability") or 0))
    cards = []
    for r in shown[:n]:
        uri = thumbnail(image_path(r["path"], data_dir))
        picture = (
            f"<img class='thumb' src='{uri}' alt='{_e(Path(r['path']).name)}'>"
            if uri
            else "<div class='missing'>image not found</div>"
        )
        cards.append(
            f"<div class='card'>{picture}<div>true <b>{_e(r['true'])}</b></div>"
            f"<div>predicted <span class='wrong'>{_e(r['predicted'])}</span> "
            f"{float(r['probability']):.3f}</div>"
            f"<div class='path' title='{_e(r['path'])}'>{_e(r['split'])}: "
            f"{_e('/'.join(Path(r['path']).parts[-2:]))}</div></div>"
        )
    return f"<div class='grid'>{''.join(cards)}</div>", len(shown)


def render(model_dir: str | Path, shown_as: str | Path | None = None) -> str:
    """The HTML of the report of MODEL_DIR (see the module docstring); `shown_as`: the folder
    named on the page, when MODEL_DIR is where it is staged."""
    folder = Path(model_dir)
    metrics = _read_metrics(folder)
    names = class_names_of(metrics)
    kind = "finetune" if "before" in metrics else f"{metrics.get('head', '')} head".strip()
    title = f"featx report: {kind}, {len(names)} classes"
    cache = metrics.get("cache") or {}
    meta = [f"model folder <code>{_e(Path(shown_as or folder).resolve())}</code>"]
    if cache.get("path"):
        meta.append(f"cache <code>{_e(cache['path'])}</code>")
    if "best_epoch" in metrics:
        kept = "the warm start" if not metrics["best_epoch"] else f"epoch {metrics['best_epoch']}"
        meta.append(f"{metrics.get('epochs_run', 0)} epochs run, kept {kept}")
    elif metrics.get("fitted"):
        fitted = metrics["fitted"]
        meta.append(
            ", ".join(
                f"{k} {v}" for k, v in fitted.items() if v is not None and not isinstance(v, dict)
            )
        )

    hint = imbalance_hint(metrics) if metrics.get("head") else None

    sections = [
        f"<h1>{_e(title)}</h1><p class='meta'>{' · '.join(meta)}</p>",
        "<h2>Headline metrics</h2>",
        _headline(metrics),
    ]
    warnings = metrics.get("warnings")
    if warnings:  # data problems the numbers above depend on: leakage, uneven classes, ...
        boxes = "".join(f"<p>warning: {_e(w)}</p>" for w in warnings)
        sections.insert(1, f"<div class='warnings'>{boxes}</div>")
    if hint:
        sections.append(f"<p class='note'>{_e(hint)}</p>")
    sections += _calibration(metrics)
    if metrics.get("novelty"):
        sections += ["<h2>Unknown images</h2>", f"<p>{_e(novelty_line(metrics['novelty']))}.</p>"]
    shown = [split for split, _ in _shown(metrics)]
    for split in shown or ["train"]:
        cm = np.asarray(metrics[split]["confusion_matrix"])
        sections += [f"<h2>Confusion matrix: {_e(split)}</h2>", _matrix_tables(cm, names)]
    sections += ["<h2>Per class</h2>", _per_class(metrics, names)]
    sections += ["<h2>Most-confused pairs</h2>", _confused(metrics, names)]
    curves = _png_uri(folder / "training_curves.png")
    if curves:
        sections += [
            "<h2>Training curves</h2>",
            f"<img class='plot' src='{curves}' alt='training curves'>",
        ]
    data_dir = (metrics.get("cache") or {}).get("data_dir")
    grid, wrong = _top_losses(_read_misclassified(folder), data_dir)
    n = min(wrong, config.REPORT_TOP_LOSSES)
    sections += [
        "<h2>Top losses: the most confidently wrong images</h2>",
        f"<p class='note'>{n} of {wrong} misclassified validation and test images, most "
        "confident first (probability of the predicted class). All of them are in "
        "misclassified.csv. <span id='thumbs-status'></span></p>",
        grid,
    ]
    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sections.append(f"<p class='note'>featx {_e(VERSION)}, {created}.</p>")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head>"
        f"<body>{''.join(sections)}</body></html>\n"
    )


def write_html_report(model_dir: str | Path, shown_as: str | Path | None = None) -> Path:
    """Write MODEL_DIR/report.html (atomically) and return its path (`shown_as`: see render)."""
    path = Path(model_dir) / REPORT_FILE
    write_text_atomic(path, render(model_dir, shown_as))
    return path
