"""Small file helpers shared by the stages: the one atomic writer, JSON records, file hashes."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from featx.errors import FeatxError


def is_url(path) -> bool:
    """Whether `path` is a URL ("s3://bucket/prefix", "gs://...", any fsspec protocol) rather
    than a local path; "file://" counts as a URL too (fsspec reads it)."""
    text = str(path)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isascii() and scheme.replace("+", "").isalnum()


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
        _fsync(tmp, path)  # the data is on disk before the name points at it
        os.replace(tmp, path)
        _fsync(path.parent, path, folder=True)  # and the rename survives a power cut
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path, target: Path, folder: bool = False) -> None:
    """fsync `path`; an error (EIO, EDQUOT, ENOSPC: where NFS and quota file systems report a
    full disk) is a FeatxError naming `target`, so that no unsynced file replaces a good one.
    Only a folder's fsync may be unsupported (EINVAL), and a folder written by a library
    (SavedModel) may not open read-only."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if folder and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            return
        raise FeatxError(
            f"Could not write '{target}' to disk ({e.strerror or e}); "
            + ("the previous file is kept. " if not folder else "")
            + "Free space (or quota) on that disk, or check it, and re-run."
        ) from None
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (see replaced_atomically)."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text)
    return Path(path)


# A cell a spreadsheet would run as a formula (OWASP's "CSV injection"): a file or class name
# such as "=HYPERLINK(...)" or "@SUM(A1)". Such cells are written with a leading "'", as
# spreadsheet-safe CSV writers do; numbers are written as they are.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(cell):
    """`cell`, with a leading "'" when it is a text a spreadsheet would run as a formula."""
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS):
        return "'" + cell
    return cell


def write_csv_atomic(path: str | Path, header: list[str], rows, lineterminator="\r\n") -> Path:
    """The one CSV writer of featx (predictions, misclassified.csv, the audit's tables): written
    atomically, every text cell made spreadsheet-safe (csv_safe)."""
    with replaced_atomically(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator=lineterminator)
        writer.writerow(header)
        writer.writerows([csv_safe(c) for c in row] for row in rows)
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
