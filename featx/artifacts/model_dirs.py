"""What featx writes and reads back, without Keras: the files of fit-head, finetune and export
folders, what kind a model folder is, and whether the backbone it needs is the one found now.

Every stage that takes a MODEL_DIR asks here first, so a wrong folder is answered in a fraction of
a second, before any heavy import.
"""

from __future__ import annotations

import json
from pathlib import Path

from featx.backbone import mobilenet
from featx.errors import FeatxError, not_found

HEAD_INFO = "head.json"  # written by fit-head (heads.save_head)
FINETUNE_INFO = "finetune.json"  # written by finetune, next to FINETUNE_MODEL
FINETUNE_MODEL = "model.keras"
EXPORT_INFO = "export.json"  # written by export, next to the exported model and labels.txt
EXPORT_FORMAT = "featx-export"  # the "format" of export.json
EXPORT_MODEL_FILES = {
    "keras": "model.keras",
    "savedmodel": "saved_model",
    "tflite": "model.tflite",
    "onnx": "model.onnx",
}
LABELS_FILE = "labels.txt"


def model_kind(model_dir: str | Path) -> str:
    """The kind of MODEL_DIR: "head" (fit-head output), "finetune" or "export"; FeatxError
    otherwise."""
    folder = Path(model_dir)
    if folder.is_file() and _is_hdf5(folder):
        raise FeatxError(
            f"'{model_dir}' is a feature cache; pass a fit-head output folder such as "
            f"'{folder.with_name(folder.stem + '-logreg')}' (`featx fit-head {model_dir}` "
            "writes it)."
        )
    if not folder.is_dir():
        raise not_found("model", model_dir)
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


def _is_hdf5(path: Path) -> bool:
    """Whether `path` starts with HDF5's signature (a featx cache is an HDF5 file)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def check_backbone(fp: dict, what: str) -> None:
    """Refuse when the backbone weights available now are not those that made the features."""
    try:
        now = mobilenet.fingerprint(
            fp["weights"],
            int(fp["image_size"]),
            float(fp["alpha"]),
            precision=fp.get("precision", "fp32"),
            int8_sha256=fp.get("int8_sha256"),
            versions=False,  # compared by model keys only
        )
    except KeyError as e:
        raise FeatxError(f"{what} records no complete backbone fingerprint (no {e}).") from None
    except FeatxError as e:
        raise FeatxError(
            f"{what} needs the backbone weights '{fp['weights']}' it was trained with, which "
            f"cannot be used here: {e}"
        ) from None
    mobilenet.check_compatible(
        fp,
        now,
        what,
        f"The weights found now ('{fp['weights']}', sha256 {now['weights_sha256'][:12]}) are "
        f"not those of its training features (sha256 {str(fp.get('weights_sha256'))[:12]}). "
        "Restore those weights, or re-run `featx extract` and `featx fit-head` with these.",
    )


def _read_record(folder: Path, name: str, marker: tuple[str, str], keys: tuple, command: str):
    """The JSON record `folder/name`, checked: `marker` is (key, value) it must have, `keys` the
    keys it must hold. A FeatxError naming the file and `featx COMMAND` to write it again."""
    path = folder / name
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FeatxError(f"Cannot read '{path}': {e}.") from None
    key, value = marker
    if not isinstance(info, dict) or info.get(key) != value or any(k not in info for k in keys):
        raise FeatxError(
            f"'{path}' is not a featx {command} record ({key}='{value}' with "
            f"{', '.join(keys)}). Re-run `featx {command}`."
        )
    return info


def _require_model(folder: Path, model_file: str, record: str, command: str) -> None:
    if not (folder / model_file).exists():
        raise FeatxError(
            f"'{folder / model_file}', the model of {folder / record}, is missing. "
            f"Re-run `featx {command}`."
        )


def read_export_info(model_dir: str | Path) -> dict:
    """export.json of an export folder, checked: its model file is there."""
    folder = Path(model_dir)
    keys = ("model_format", "model_file", "class_names", "image_size")
    info = _read_record(folder, EXPORT_INFO, ("format", EXPORT_FORMAT), keys, "export")
    _require_model(folder, info["model_file"], EXPORT_INFO, "export")
    return info


def read_finetune_info(model_dir: str | Path) -> dict:
    """finetune.json of a finetune folder, checked: its model.keras is there."""
    folder = Path(model_dir)
    keys = ("class_names", "image_size")
    info = _read_record(folder, FINETUNE_INFO, ("kind", "finetune"), keys, "finetune")
    if info.get("complete") is False:  # a featx before whole-folder commits, killed mid-run
        raise FeatxError(
            f"'{folder}' is the output of a `featx finetune` that did not finish (\"complete\": "
            f"false in {FINETUNE_INFO}). Re-run `featx finetune`."
        )
    _require_model(folder, FINETUNE_MODEL, FINETUNE_INFO, "finetune")
    return info
