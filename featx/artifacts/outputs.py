"""Output folders written again: remove what featx wrote there before, and nothing else.

fit-head and finetune record the files they wrote in `featx-files.json` in their output folder.
When a later run writes to the same folder, the files of the earlier run that this run did not
write (a Dense head's head.keras and training_curves.png after a logistic-regression refit) are
removed, so that the folder never mixes two models. A file featx did not write is never touched.
"""

from __future__ import annotations

import json
from pathlib import Path

from featx.files import write_text_atomic

MANIFEST = "featx-files.json"
MANIFEST_FORMAT = "featx-files"
# What fit-head and finetune wrote before they kept a manifest; recognised only in a folder that
# holds their head.json or finetune.json.
OLD_NAMES = (
    "head.json",
    "head.npz",
    "head.keras",
    "finetune.json",
    "model.keras",
    "metrics.json",
    "confusion_matrix.png",
    "training_curves.png",
    "misclassified.csv",
    "report.html",
)


def _plain(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def written_before(folder: str | Path) -> set[str]:
    """Names of the files an earlier featx run wrote in `folder` (that are still there)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
            names = data["files"] if data.get("format") == MANIFEST_FORMAT else []
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            names = []
    elif (folder / "head.json").is_file() or (folder / "finetune.json").is_file():
        names = OLD_NAMES  # a folder written before manifests existed
    else:
        names = []
    return {n for n in names if _plain(n) and (folder / n).is_file()}


def record(folder: str | Path, written, log=None) -> list[str]:
    """After a run wrote `written` (paths or names) into `folder`: remove the files an earlier run
    wrote there that this one did not, and record this run's files. Returns the removed names."""
    folder = Path(folder)
    names = sorted({Path(p).name for p in written})
    stale = sorted(written_before(folder) - set(names) - {MANIFEST})
    for name in stale:
        (folder / name).unlink(missing_ok=True)
    text = json.dumps({"format": MANIFEST_FORMAT, "files": names}, indent=2) + "\n"
    write_text_atomic(folder / MANIFEST, text)
    if stale and log is not None:
        log(f"removed {', '.join(stale)}: written to {folder} by an earlier run")
    return stale
