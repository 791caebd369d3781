"""Small file helpers shared by the stages: the one atomic writer, temporary names and the
one-writer lock, JSON records, file hashes."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import time
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


def absolute(path: str | Path) -> str:
    """`path` as featx records it for later runs that may start elsewhere: a URL as given (a
    pathlib.Path would fold its "//"), a local path made absolute."""
    return str(path).rstrip("/") if is_url(path) else str(Path(path).resolve())


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


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or unknown): leave its files alone
    return True


def dead_temporaries(path: Path) -> list[Path]:
    """`.NAME.tmp-PID*` entries beside `path` left by runs whose PID is gone (on this machine)."""
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return []
    found = []
    for p in candidates:
        pid = temporary_pid(p, path)
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            found.append(p)
    return found


@contextmanager
def exclusive_lock(lock_file: Path, refusal: str) -> Iterator[None]:
    """Hold `lock_file` while writing; a second writer gets FeatxError(`refusal` with "{holder}"
    replaced by who holds it). filelock (a well-kept cross-platform library) does the locking;
    the holder writes its pid, host and start time into the lock file. Readers never lock."""
    from filelock import FileLock, Timeout

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = lock_file.read_text().strip() or "another process"
        except OSError:
            holder = "another process"
        raise FeatxError(refusal.replace("{holder}", holder)) from None
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        import socket  # (here: only a writer needs it)

        with open(lock_file, "r+") as fh:
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
        yield
    finally:
        lock.release()


def fsync_folder(path: Path, target: Path) -> None:
    """fsync a folder, so that a rename in it survives a power cut (see _fsync)."""
    _fsync(path, target, folder=True)


def fsync_tree(path: Path, target: Path) -> None:
    """fsync every file under `path` (a file or a folder) and every folder, so that what a
    library wrote as it pleased is on disk before a rename names it (see _fsync)."""
    if path.is_symlink():
        return
    if path.is_dir():
        for child in path.iterdir():
            fsync_tree(child, target)
        _fsync(path, target, folder=True)
    else:
        _fsync(path, target)


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
