"""What the commands return: plain dicts that also show themselves in a notebook.

`Result` is a dict (indexing, json.dumps and existing code keep working) whose `_repr_html_`
Jupyter calls to display it: the metrics table and the confusion matrix of a fit-head or
finetune result (with a few of its most confidently wrong images), the counts and rejected
files of an extraction, the first rows of a prediction, the counts of an audit; and its
warnings in a box on top.
"""

from __future__ import annotations

import csv
import html
from pathlib import Path

from featx.reports.evaluation import with_interval

SHOWN_ROWS = 10  # rows of a long list (rejected files, predictions, top losses) in a notebook
STYLE = (
    "<style>.featx td,.featx th{padding:2px 8px;text-align:right}.featx th{background:#eee}"
    ".featx .warn{background:#fff3cd;border:1px solid #e0c36b;padding:4px 8px;margin:4px 0}"
    "</style>"
)


class Result(dict):
    """A command's result: a dict, displayed as HTML in a notebook."""

    kind = "result"

    def __init__(self, data: dict, kind: str):
        super().__init__(data)
        self.kind = kind

    def __reduce__(self):  # pickles (multiprocessing, joblib) as a Result of the same kind
        return (Result, (dict(self), self.kind))

    def _repr_html_(self) -> str:
        body = {
            "extract": _extract,
            "metrics": _metrics,
            "predict": _predict,
            "audit": _audit,
        }.get(self.kind, _plain)(self)
        return f'{STYLE}<div class="featx">{_warnings(self)}{body}</div>'


def _e(value) -> str:
    return html.escape(str(value))


def _table(header: list, rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _warnings(result: dict) -> str:
    found = result.get("warnings") or []
    return "".join(f'<div class="warn">warning: {_e(w)}</div>' for w in found)


def _fmt(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _extract(r: dict) -> str:
    classes = sorted({c for per_class in r["counts"].values() for c in per_class})
    rows = [
        [split, sum(per_class.values()), *(per_class.get(c, 0) for c in classes)]
        for split, per_class in r["counts"].items()
    ]
    text = (
        f"<p><b>{_e(r['cache'])}</b>: {r['images']} images; extracted {r['extracted']}, "
        f"kept {r['kept']}, dropped {r['dropped']}, rejected {len(r['rejected'])} "
        f"({r['seconds']:.1f} s, {r['engine']} engine)</p>"
    )
    rejected = [[x["path"], x["reason"]] for x in r["rejected"][:SHOWN_ROWS]]
    shown = _table(["rejected file", "reason"], rejected) if rejected else ""
    return text + _table(["split", "images", *classes], rows) + shown


def _metrics(r: dict) -> str:
    splits = [s for s in ("train", "validation", "test") if isinstance(r.get(s), dict)]
    rows = [
        [
            s,
            r[s]["n"],
            with_interval(r[s], "accuracy"),
            with_interval(r[s], "balanced_accuracy"),
            _fmt(r[s].get("macro_f1")),
            _fmt(r[s].get("log_loss")),
        ]
        for s in splits
    ]
    header = ["split", "images", "accuracy", "balanced accuracy", "macro F1", "log loss"]
    what = r.get("head") or "finetune"
    parts = [f"<p><b>{_e(what)}</b> → {_e(r.get('output', ''))}</p>", _table(header, rows)]
    shown = "validation" if "validation" in splits else splits[-1] if splits else None
    names = r.get("class_names") or []
    if shown and "confusion_matrix" in r[shown] and names:
        cm = r[shown]["confusion_matrix"]
        cells = [[f"true {n}", *row] for n, row in zip(names, cm)]
        parts.append(f"<p>{_e(shown)} confusion matrix</p>")
        parts.append(_table(["", *(f"predicted {n}" for n in names)], cells))
    parts.append(_top_losses(r.get("output")))
    return "".join(parts)


def _top_losses(output) -> str:
    """The most confidently wrong images (misclassified.csv is sorted so)."""
    path = Path(output) / "misclassified.csv" if output else None
    if path is None or not path.is_file():
        return ""
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("split") != "train"][:SHOWN_ROWS]
    if not rows:
        return ""
    cells = [[r["path"], r["true"], r["predicted"], r["probability"]] for r in rows]
    return "<p>most confidently wrong</p>" + _table(
        ["image", "true", "predicted", "probability"], cells
    )


def _predict(r: dict) -> str:
    accuracy = "" if r.get("accuracy") is None else f", accuracy {r['accuracy']:.4f}"
    text = (
        f"<p>{r['predicted']} of {r['images']} images predicted, {r['errors']} errors"
        f"{accuracy} ({r['engine']} engine)</p>"
    )
    rows = [
        [x["path"], x.get("predicted") or "", _fmt(x.get("probability"), 3), x.get("error") or ""]
        for x in r["rows"][:SHOWN_ROWS]
    ]
    more = (
        f"<p>... and {len(r['rows']) - SHOWN_ROWS} more</p>" if len(r["rows"]) > SHOWN_ROWS else ""
    )
    return text + _table(["image", "predicted", "probability", "error"], rows) + more


def _audit(r: dict) -> str:
    s = r["summary"]
    keys = ("images", "exact_groups", "near_groups", "cross_split_groups", "cross_label_groups",
            "label_issues", "outliers")  # fmt: skip
    return f"<p>audit of {_e(s['cache'])} → {_e(s['output'])}</p>" + _table(
        ["", "count"], [[k.replace("_", " "), s[k]] for k in keys]
    )


def _plain(r: dict) -> str:
    return _table(["key", "value"], [[k, v] for k, v in r.items() if not isinstance(v, dict)])
