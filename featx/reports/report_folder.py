"""The files of a fit-head or finetune folder that show its results: metrics.json, the plots,
misclassified.csv and report.html."""

from __future__ import annotations

import json
from pathlib import Path

from featx import config
from featx.files import write_csv_atomic, write_text_atomic
from featx.reports import html_report
from featx.reports.evaluation import (
    best_and_start,
    has_matrix,
    misclassified,
    required_class_names,
)
from featx.reports.plots import plot_confusion_matrices, plot_training_curves


def write_report(
    out_dir: str | Path,
    metrics: dict,
    predictions: dict | None = None,
    *,
    history: dict | None = None,
    class_names: list[str] | None = None,
    shown_as: str | Path | None = None,
) -> dict[str, Path]:
    """Write metrics.json, confusion_matrix.png, training_curves.png (with `history`) and
    misclassified.csv (with `predictions`) to `out_dir`; returns {name: path} of what it wrote.

    Args:
        metrics: {split: evaluate(...) result, ...anything else JSON-serialisable}.
        predictions: {split: (y_true, proba, paths)} for misclassified.csv.
        history: {"loss": [...], "val_loss": [...], "accuracy": [...], ...} per epoch.
        class_names: default metrics["class_names"], else the per_class keys of a split.
        shown_as: the folder report.html names, when `out_dir` is where it is staged.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(class_names) if class_names else required_class_names(metrics)
    written = {"metrics.json": out / "metrics.json"}
    write_text_atomic(written["metrics.json"], json.dumps(metrics, indent=2, default=str) + "\n")
    matrices = {s: metrics[s]["confusion_matrix"] for s in config.SPLITS if has_matrix(metrics, s)}
    shown = {s: m for s, m in matrices.items() if s != "train"} or matrices
    if shown:
        written["confusion_matrix.png"] = plot_confusion_matrices(
            shown, names, out / "confusion_matrix.png"
        )
    if history and any(len(v) for v in history.values()):
        written["training_curves.png"] = plot_training_curves(
            history, out / "training_curves.png", *best_and_start(metrics)
        )
    if predictions is not None:
        path = out / "misclassified.csv"
        columns = ["path", "true", "predicted", "probability", "split"]
        rows = misclassified(predictions, names)
        write_csv_atomic(path, columns, [[r[c] for c in columns] for r in rows])
        written["misclassified.csv"] = path

    written[html_report.REPORT_FILE] = html_report.write_html_report(out, shown_as)
    return written
