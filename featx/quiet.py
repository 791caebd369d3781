"""Keep TensorFlow's start-up chatter off the user's terminal (`featx --verbose` shows it).

TensorFlow >= 2.16 logs through absl before absl is initialised, so TF_CPP_MIN_LOG_LEVEL does not
reach the lines it prints on import and on first use ("All log messages before
absl::InitializeLog()...", "oneDNN custom operations are on", "Could not find cuda drivers",
"failed call to cuInit" on a machine without a GPU): each CLI run that touched Keras printed six
or seven of them. They are written by C++ straight to file descriptor 2, so the CLI points that
descriptor at a pipe read by a thread that drops those lines and passes every other line on.
Python's own sys.stderr keeps the real stream (click's messages, progress bars and tracebacks are
written directly, and a terminal is still seen as a terminal).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import threading

# Lines of the absl format "I0000 00:00:1795519627.457638    6465 port.cc:153] ...": info and
# warnings go; errors and fatal ones are kept unless known to be noise on a CPU-only machine.
NOISE = (
    rb"^WARNING: All log messages before absl::InitializeLog\(\) is called",
    rb"^[IW]\d{4} \d\d:\d\d:",  # any info or warning line of absl
    rb"failed call to cuInit",  # no GPU (or no driver): Keras runs on the CPU, as intended
    rb"Unable to register cu(DNN|FFT|BLAS) factory",
    rb"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU",  # each TFLite model loaded
)
NOISE_LINE = re.compile(b"|".join(NOISE))

_state: dict = {}


def is_noise(line: bytes) -> bool:
    """Whether one line written to stderr by native code is start-up chatter to drop."""
    return bool(NOISE_LINE.search(line))


def configure(verbose: bool) -> None:
    """Called by the CLI before anything imports TensorFlow.

    verbose: TensorFlow logs everything (TF_CPP_MIN_LOG_LEVEL=0), nothing is filtered. Otherwise
    the noise lines above are dropped from file descriptor 2 (only in a real process whose
    sys.stderr is that descriptor: under click's CliRunner nothing is redirected).
    """
    if verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _filter_fd2()


def _filter_fd2() -> None:
    if _state or "tensorflow" in sys.modules:  # once; too late after TensorFlow printed its lines
        return
    try:
        if sys.stderr is None or sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):  # a replaced stream (tests, IDEs)
        return
    sys.stderr.flush()
    real = os.dup(2)  # the terminal (or file) stderr was
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    # Python writes to the real stream from now on, line-buffered like a normal stderr.
    encoding = sys.stderr.encoding
    sys.stderr = open(  # noqa: SIM115 (lives as long as the process)
        real, "w", buffering=1, encoding=encoding, errors="backslashreplace", closefd=False
    )
    thread = threading.Thread(target=_pump, args=(read_end, real), daemon=True, name="featx-stderr")
    thread.start()
    _state.update(real=real, thread=thread)
    atexit.register(_restore)


def _pump(read_end: int, real: int) -> None:
    """Copy the pipe to the real stderr line by line, leaving out the noise."""
    pending = b""
    with open(read_end, "rb", buffering=0) as pipe:
        while True:
            chunk = pipe.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not is_noise(line))
            if kept:
                os.write(real, kept)
    if pending and not is_noise(pending):
        os.write(real, pending)


def _restore() -> None:
    """At exit: give fd 2 back to the real stream and let the thread pass on what is left."""
    real, thread = _state["real"], _state["thread"]
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    os.dup2(real, 2)  # closes the pipe's last write end, so the thread reads to the end
    thread.join(timeout=2.0)
