"""Progress bars for the commands, from the CLI and from Python alike, drawn by tqdm.

A command's `progress` argument: True (the default) shows a bar, False or None shows nothing,
and a callable is called as progress(done, total, images_per_second) (an application's own
display). The bar is tqdm.auto's: a widget in Jupyter, a bar on a terminal. Where stderr is no
terminal (a CI log, a pipe) a bar would fill the log with carriage returns, so one plain line
(`extracting 500/2000, 61.3 images/s`) is written every LOG_EVERY seconds and one at the end.
"""

from __future__ import annotations

import sys
import time

from featx.errors import FeatxError

LOG_EVERY = 10.0  # seconds between two plain progress lines when stderr is not a terminal


def _in_notebook() -> bool:
    """Running in a Jupyter kernel (not merely with ipykernel imported)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


class Bar:
    """A callable (done, total, rate) that draws one bar; made on the first call, when the total
    is known. `close()` ends it (also after an error)."""

    def __init__(self, label: str, unit: str = "images"):
        self.label, self.unit = label, unit
        self._bar = None
        self._lines = None  # (started, last line) in plain-line mode
        self._done = 0

    def __call__(self, done: int, total: int, rate: float | None = None) -> None:
        if self._bar is None and self._lines is None:
            self._start(total)
        if self._bar is not None:
            self._bar.total = total
            self._bar.update(done - self._done)
        else:
            now = time.monotonic()
            if done >= total or now - self._lines[1] >= LOG_EVERY:
                self._line(done, total, now)
        self._done = done

    def _start(self, total: int) -> None:
        if _in_notebook() or sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=self.label, unit=f" {self.unit}", leave=True)
        else:
            now = time.monotonic()
            self._lines = (now, now)

    def _line(self, done: int, total: int, now: float) -> None:
        rate = done / max(now - self._lines[0], 1e-9)
        print(f"{self.label} {done}/{total}, {rate:.1f} {self.unit}/s", file=sys.stderr, flush=True)
        self._lines = (self._lines[0], now)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _Silent:
    def __call__(self, done: int, total: int, rate: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class _Callback:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, done: int, total: int, rate: float | None = None) -> None:
        self.fn(done, total, rate)

    def close(self) -> None:
        pass


def reporter(progress, label: str, unit: str = "images"):
    """What a command's `progress` argument becomes: something to call as (done, total, rate)
    after each step, and to close at the end (a context manager too)."""
    if progress is True:
        return Bar(label, unit)
    if callable(progress) and not isinstance(progress, bool):
        return _Callback(progress)
    if progress in (False, None):
        return _Silent()
    raise FeatxError(
        f"progress must be True, False or a function (done, total, rate), got {progress!r}."
    )
