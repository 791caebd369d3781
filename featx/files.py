"""Small file helpers shared by the stages: the one atomic writer, JSON records, file hashes."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from featx.errors import FeatxError


def temporary_path(path: Path, suffix: str = "") -> Path:
    """The one naming rule of featx's temporary files: `.NAME.tmp-PID[suffix]` beside NAME."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def temporary_glob(name_pattern: str) -> str:
    """The glob of the temporary files of the files named by `name_pattern` ("part-*.npz")."""
    return f".{name_pattern}.tmp-*"


def temporary_pid(candidate: Path, of: Path) -> int | None:
    """The PID in `candidate`'s name when it is a temporary file of `of`, else None."""
    prefix = f".{of.name}.tmp-"
    if not candidate.name.startswith(prefix):
        return None
    pid = candidate.name[len(prefix) :].split(".")[0]
    return int(pid) if pid.isdigit() else None


@contextmanager
def replaced_atomically(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary file beside `path` to write; a normal exit renames it onto `path` in one
    step, an error removes it. Readers (and a run killed half-way) see the old file or the new
    one, never half of one. `suffix` ends the temporary name (Keras wants ".keras")."""
    path = Path(path)
    tmp = temporary_path(path, suffix)
    try:
        yield tmp
        _fsync(tmp)  # the data is on disk before the name points at it
        os.replace(tmp, path)
        _fsync(path.parent)  # and the rename survives a power cut
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a folder written by a library (SavedModel) or a platform without O_RDONLY dirs
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (see replaced_atomically)."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_keras_atomic(model, path: str | Path) -> Path:
    """`model.save(path)` atomically: a process killed while saving leaves the previous file (a
    checkpoint, an export), never a truncated one."""
    with replaced_atomically(path, suffix=".keras") as tmp:
        model.save(tmp)
    return Path(path)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's content, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | Path, missing: str):
    """The JSON content of `path`; FeatxError(`missing`) when it does not exist, and a one-line
    error naming the file when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FeatxError(missing) from None
    except (OSError, ValueError) as e:
        raise FeatxError(
            f"'{path}' is not readable JSON ({e}). Re-run the command that wrote it."
        ) from None
