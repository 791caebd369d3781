"""`featx report MODEL_DIR`: rebuild report.html of a fit-head or finetune output folder."""

from __future__ import annotations

from pathlib import Path

from featx.errors import FeatxError


def report(model_dir: str | Path) -> Path:
    """`featx report MODEL_DIR`: rebuild report.html from the metrics.json and misclassified.csv
    of a fit-head or finetune output folder (see featx.reports.html_report); returns its path."""
    from featx.reports import html_report

    folder = Path(model_dir)
    if not folder.is_dir():
        raise FeatxError(
            f"Model folder not found: '{model_dir}'. Pass the output folder of `featx fit-head` "
            "or `featx finetune`."
        )
    return html_report.write_html_report(folder)
