"""Small file helpers shared by the stages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary file beside `path` to write; a normal exit renames it onto `path` in one
    step, an error removes it. Readers (and a run killed half-way) see the old file or the new
    one, never half of one. `suffix` ends the temporary name (Keras wants ".keras")."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
