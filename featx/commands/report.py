"""`featx report MODEL_DIR`: rebuild report.html of a fit-head or finetune output folder."""

from __future__ import annotations

from pathlib import Path

from featx.errors import FeatxError


def report(model_dir: str | Path) -> Path:
    """`featx report MODEL_DIR`: rebuild report.html from the metrics.json and misclassified.csv
    of a fit-head or finetune output folder (see featx.reports.html_report); returns its path.
    The folder is committed whole again, as its command wrote it (featx.artifacts.outputs)."""
    from featx.artifacts import outputs
    from featx.files import write_text_atomic
    from featx.reports import html_report

    folder = Path(model_dir)
    if not folder.is_dir():
        raise FeatxError(
            f"Model folder not found: '{model_dir}'. Pass the output folder of `featx fit-head` "
            "or `featx finetune`."
        )
    page = outputs.read_whole(
        folder, lambda: html_report.render(folder), (html_report.REPORT_FILE,)
    )
    made_by = (outputs.read_manifest(folder) or {}).get("made_by")
    with outputs.writing(folder, made_by, update=True) as stage:
        write_text_atomic(stage / html_report.REPORT_FILE, page)
    return folder / html_report.REPORT_FILE
