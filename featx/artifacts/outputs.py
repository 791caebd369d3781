"""Output folders, written whole: every command that writes a folder (fit-head, finetune, export,
audit, report) writes it through `writing()`, and every reader loads it through `read_whole()`.

- A run writes its files into a staging folder `.NAME.tmp-PID` beside the output folder NAME,
  and `featx-files.json` (the manifest: the files, what made them, a generation id) last. Then
  the staging folder is swapped in: `renameat2(RENAME_EXCHANGE)` on Linux, one atomic step; where
  that is unavailable, two renames that keep the old folder until the new one is in place. The
  old folder is then removed. A run killed at any moment leaves the old folder or the new one,
  never a mix; the staging folders of dead runs are removed by the next run.
- One writer at a time per output folder (a filelock on `.NAME.lock` beside it): a second run is
  refused in one line naming the first.
- featx writes only into a new or empty folder or one it wrote (its manifest, or the records of
  a featx from before manifests); a folder holding anything else is refused. Re-running the same
  command on the same input replaces its own output and says so; anything else needs
  `--overwrite`. Files a user added to a featx folder are carried into the new one (hard links),
  and featx exports inside a model folder that is replaced are removed, and the run says so.
- Readers refuse an incomplete folder (a file its manifest lists is missing) in one line, and
  load again when a swap happened while they read (the manifest's generation changed).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from featx.errors import FeatxError
from featx.files import (
    dead_temporaries,
    exclusive_lock,
    fsync_folder,
    fsync_tree,
    is_url,
    temporary_path,
    write_text_atomic,
)

MANIFEST = "featx-files.json"
MANIFEST_FORMAT = "featx-files"
# Records that mark a folder written by a featx from before manifests, and the names it wrote.
OLD_RECORDS = ("head.json", "finetune.json", "export.json", "audit.json")
OLD_NAMES = (
    *OLD_RECORDS,
    "head.npz",
    "head.keras",
    "model.keras",
    "metrics.json",
    "confusion_matrix.png",
    "training_curves.png",
    "misclassified.csv",
    "report.html",
    "labels.txt",
    "README.md",
    "saved_model",
    "model.tflite",
    "duplicates.csv",
    "label_issues.csv",
    "outliers.csv",
    "duplicates.png",
    "label_issues.png",
    "outliers.png",
)
READ_TRIES = 5  # a folder swapped this many times while one reader loads it is refused


def _plain(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of `folder`, None when it has none; an unreadable one is {}."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return {}
    if not isinstance(data.get("files"), list):
        return {}
    return data


def written_before(folder: str | Path) -> set[str]:
    """Names of the entries an earlier featx run wrote in `folder` (that are still there)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is not None:
        names = manifest.get("files", [])
    elif any((folder / n).is_file() for n in OLD_RECORDS):
        names = OLD_NAMES  # a folder written before manifests existed
    else:
        names = []
    return {n for n in names if _plain(n) and (folder / n).exists()}


def made_by(command: str, target: str | Path, source: str | Path, **options) -> dict:
    """What an output folder is of (its manifest's "made_by"): the command, its input as a path
    relative to the folder's parent (so a project moved or copied whole keeps its outputs' owners)
    and the options that make another output."""
    parent = Path(target).resolve().parent
    return {"command": command, "source": relative(source, parent), **options}


def relative(path: str | Path, start: Path) -> str:
    """`path` as made_by records it: relative to `start` (a URL as given)."""
    return str(path).rstrip("/") if is_url(path) else os.path.relpath(Path(path).resolve(), start)


def describe(made_by: dict | None) -> str:
    """`made_by` as the command line that made it ("`featx fit-head /x/c.h5 --head logreg`")."""
    if not made_by:
        return "an earlier featx (its manifest does not say which command)"
    made_by = dict(made_by)
    command = made_by.pop("command", "?")
    source = made_by.pop("source", None)
    options = [f"--{k.replace('_', '-')} {v}" for k, v in made_by.items()]
    return "`" + " ".join(["featx", str(command), *([source] if source else []), *options]) + "`"


# --- the checks before any work -------------------------------------------------------------------


def check_target(target: str | Path, made_by: dict, overwrite: bool = False) -> str:
    """Whether a run that makes `made_by` may write the folder `target`: "new" (absent or empty),
    "same" (its own earlier output), "overwrite" (another featx output, with overwrite); a
    FeatxError in one line otherwise. Called before any work, and again under the lock."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FeatxError(
            f"--output '{target}' is a file; pass a folder (featx writes several files there)."
        )
    if not target.is_dir() or not any(target.iterdir()):
        return "new"
    manifest = read_manifest(target)
    if manifest is None and not any((target / n).is_file() for n in OLD_RECORDS):
        names = sorted(p.name for p in target.iterdir())
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise FeatxError(
            f"'{target}' holds files featx did not write ({shown}); featx writes only into a new "
            "or empty folder or one it wrote. Pass another --output folder."
        )
    old = (manifest or {}).get("made_by")
    if old == made_by:
        return "same"
    if overwrite:
        return "overwrite"
    raise FeatxError(
        f"'{target}' holds the output of {describe(old)}, not of this run; pass --overwrite to "
        "replace it, or another --output folder."
    )


# --- writing --------------------------------------------------------------------------------------


@contextmanager
def writing(
    target: str | Path,
    made_by: dict,
    *,
    overwrite: bool = False,
    update: bool = False,
    log=None,
) -> Iterator[Path]:
    """Yields a staging folder to write every file of the output folder `target` into; a normal
    exit commits it as one unit (see the module's docstring), an error removes it and leaves
    `target` as it was. `made_by` ({"command": ..., "source": ..., options}) is recorded in the
    manifest and decides whether `target` may be replaced (check_target). featx exports inside
    the old folder are removed (they describe its model), unless `update`: then the staging
    folder starts as a copy of the old folder's files, for a run that rewrites some of them.
    """
    target = Path(target)
    log = log or (lambda message: None)
    check_target(target, made_by, overwrite)  # before the lock: a clear refusal comes first
    lock_file = target.with_name(f".{target.name}.lock")
    refusal = (
        f"Another featx run ({{holder}}) is writing '{target}'. Wait for it to finish, or pass "
        "another --output folder."
    )
    with exclusive_lock(lock_file, refusal):
        _recover(target)
        state = check_target(target, made_by, overwrite)
        staging = temporary_path(target)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            for name in sorted(written_before(target)) if update else []:
                _link_tree(target / name, staging / name)
            yield staging
            _commit(staging, target, made_by, not update, log)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if state == "same":
        log(f"replaced {target}: the output of an earlier {describe(made_by)}")
    elif state == "overwrite":
        log(f"replaced {target} (--overwrite)")


def _commit(staging: Path, target: Path, made_by: dict, replaces_model: bool, log) -> None:
    """Carry the user's entries of the old folder over, write the manifest, swap the folders."""
    new_names = sorted(p.name for p in staging.iterdir() if p.name != MANIFEST)
    if target.is_dir():
        ours = written_before(target)
        stale_exports = []
        for entry in sorted(target.iterdir()):
            if entry.name in ours or entry.name in (MANIFEST, *new_names) or _ours(entry.name):
                continue
            if replaces_model and _is_export(entry):
                stale_exports.append(entry.name)
                continue
            _link_tree(entry, staging / entry.name)
        stale = sorted(ours - set(new_names) - {MANIFEST})
        if stale:
            log(f"removed {', '.join(stale)}: written to {target} by an earlier run")
        if stale_exports:
            log(
                f"removed {', '.join(stale_exports)} from {target}: exports of the model this "
                "run replaced"
            )
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": new_names,
        "made_by": made_by,
        "generation": uuid.uuid4().hex,
    }
    for name in new_names:  # on disk before the manifest says they are there
        fsync_tree(staging / name, target)
    write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last
    fsync_folder(staging, target)
    _swap(staging, target)
    fsync_folder(target.parent, target)


def _ours(name: str) -> bool:
    """A lock or a staging folder of an output folder inside this one (an export's): never
    carried into the new folder."""
    return name.startswith(".") and (name.endswith(".lock") or ".tmp-" in name)


def _is_export(entry: Path) -> bool:
    """Whether `entry` is an export of the folder it is in (its made_by's source is "."): an
    export of another model that a user put there is theirs to keep."""
    if not entry.is_dir() or entry.is_symlink():
        return False
    manifest = read_manifest(entry)
    if manifest is not None:
        made_by = manifest.get("made_by") or {}
        return made_by.get("command") == "export" and made_by.get("source") == "."
    return (entry / "export.json").is_file()


def _link_tree(source: Path, dest: Path) -> None:
    """`source` copied to `dest` as hard links (a copy where links fail): the old folder stays
    whole until the swap, and no byte is copied."""
    if source.is_symlink():
        os.symlink(os.readlink(source), dest)
    elif source.is_dir():
        dest.mkdir()
        for child in source.iterdir():
            _link_tree(child, dest / child.name)
    else:
        try:
            os.link(source, dest)
        except OSError:
            shutil.copy2(source, dest)


# --- the swap -------------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2(old: str, new: str) -> bool:
    """Swap the paths `old` and `new` in one step (Linux renameat2 RENAME_EXCHANGE); False where
    the C library or the file system cannot."""
    if not sys.platform.startswith("linux"):
        return False  # (CDLL(None) is a TypeError on Windows)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = call(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), new)


def _swap(staging: Path, target: Path) -> None:
    """Put `staging` at `target`; afterwards `staging` holds the old folder (or nothing)."""
    if not target.exists():
        os.rename(staging, target)
        return
    if _renameat2(str(staging), str(target)):
        return
    old = temporary_path(target, ".old")  # two renames; _recover finishes a killed one
    os.rename(target, old)
    os.rename(staging, target)
    os.rename(old, staging)


def _recover(target: Path) -> None:
    """The staging folders of dead runs go; a run killed between the two renames of the
    fallback swap left `target` absent and its old folder aside: put it back first."""
    leftovers = sorted(dead_temporaries(target), key=lambda p: not p.name.endswith(".old"))
    for path in leftovers:
        if path.name.endswith(".old") and path.is_dir() and not target.exists():
            os.rename(path, target)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


# --- reading --------------------------------------------------------------------------------------


def generation(folder: str | Path, rebuilt: tuple = ()) -> str | None:
    """The generation id of a complete folder (None: a folder without manifest, from a featx
    before manifests or a copy); FeatxError when its manifest is unreadable or a file it lists
    is missing (but for the `rebuilt` names, that the reader writes again)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    listed = [n for n in manifest.get("files", []) if n not in rebuilt]
    missing = [n for n in listed if not _plain(n) or not (folder / n).exists()]
    if manifest == {} or missing:
        what = f"{missing[0]}, listed in {MANIFEST}, is missing" if missing else f"bad {MANIFEST}"
        raise FeatxError(
            f"'{folder}' is incomplete ({what}). Re-run the featx command that wrote it."
        )
    return str(manifest.get("generation", ""))


def read_whole(folder: str | Path, load, rebuilt: tuple = ()):
    """`load()` of a complete folder: again when the folder was swapped while it read
    (`rebuilt`: see generation)."""
    for _ in range(READ_TRIES):
        before = generation(folder, rebuilt)
        result = load()
        if generation(folder, rebuilt) == before:
            return result
    raise FeatxError(
        f"'{folder}' was replaced {READ_TRIES} times while it was read (another featx run is "
        "writing it). Re-run when that run is done."
    )
