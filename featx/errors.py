"""The one exception featx raises for bad user input, and the one warning category it emits.

FeatxError subclasses ValueError (Keras' convention for bad input); the CLI prints its message as
one line, without a traceback. Messages say what happened, what was expected and how to fix it.

FeatxWarning is what the library warns with from Python (leakage between splits, uneven classes,
a small validation set, many unknown images): `warnings.simplefilter("error", featx.FeatxWarning)`
turns them into errors, `"ignore"` silences them. The CLI prints each as one `warning:` line.
"""


class FeatxError(ValueError):
    pass


class FeatxWarning(UserWarning):
    pass


# The checks of user values, each raising one FeatxError that names the option and the value.


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """`value` is an int in [low, high]; else a FeatxError naming the option `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise FeatxError(f"{name} must be an integer, got {value!r}.")
    if value < low or (high is not None and value > high):
        span = (
            f"an integer between {low} and {high}" if high is not None else f"an integer >= {low}"
        )
        raise FeatxError(f"{name} must be {span}, got {value}.")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise FeatxError(
            f"Unknown {name} {value!r}; expected one of {', '.join(map(str, choices))}."
        )


def fraction_hint(value, span: str = "[0, 1]") -> str:
    """ ": a fraction in [0, 1]; did you mean 0.95?" when `value` looks like a percent (95) given
    for a fraction, else "."."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and 2 <= value <= 100:  # 1.5 is a slip more likely than 1.5 %
        return f": a fraction in {span}; did you mean {value / 100:g}?"
    return "."


def check_fraction(name: str, value, *, closed: bool = False) -> None:
    """`value` is a number in [0, 1) (or [0, 1] with closed=True); a percent (95) is answered
    with the fraction it probably means ("did you mean 0.95?")."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0.0 <= value < 1.0 or (closed and value == 1.0)):
        span = "[0, 1]" if closed else "[0, 1)"
        raise FeatxError(f"{name} must be in {span}, got {value!r}{fraction_hint(value, span)}")


def near_path(path) -> str:
    """ " Did you mean cache/banana.h5?" when a sibling of the missing `path` has a close name
    (`cache/banana` -> `cache/banana.h5`), else ""."""
    import difflib
    import os

    folder, name = os.path.split(os.path.normpath(str(path)))
    try:
        names = [n for n in os.listdir(folder or ".") if not n.startswith(".") and n != name]
    except OSError:
        return ""
    stems = {os.path.splitext(n)[0]: n for n in names}  # `banana` or `banan` for banana.h5
    near = difflib.get_close_matches(name, list(stems), n=1, cutoff=0.75)
    near = [stems[n] for n in near] or difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    return f" Did you mean {os.path.join(folder, near[0])}?" if near else ""


# What a missing path is and what to pass instead: one wording for the CLI's early check (before
# TensorFlow loads) and the library's own checks (#26).
MISSING = {
    "cache": ("Cache", "Create it with `featx extract DATA_DIR`."),
    "data": ("Data folder", "Pass a folder of class folders."),
    "model": (
        "Model folder",
        "Pass the output folder of `featx fit-head`, `featx finetune` or `featx export`.",
    ),
    "head": ("Head folder", "Pass a `featx fit-head` output folder."),
}


def not_found(kind: str, path) -> FeatxError:
    """The error for a missing path of `kind` (a key of MISSING), with the near match."""
    what, fix = MISSING[kind]
    return FeatxError(f"{what} not found: '{path}'.{near_path(path)} {fix}")


def check_exists(path, kind: str) -> None:
    """Before any heavy import: not_found(kind, path) when `path` does not exist."""
    import os

    if "://" in str(path):  # a URL (s3://...): the store answers when it is listed or read
        return
    if not os.path.exists(path):
        raise not_found(kind, path)


class Messages:
    """Where a library call's one-line messages go: `log(message)`.

    With no `log` (a call from Python), a "warning: ..." line is issued as a FeatxWarning and
    everything else goes to `logging.getLogger("featx")` at INFO: featx itself prints nothing.
    With a `log` callable (the CLI's), every line goes to it, as it is. Either way the warnings
    are kept in `.warnings`, for the result a command returns."""

    PREFIX = "warning: "

    def __init__(self, log=None):
        self.log = log.log if isinstance(log, Messages) else log
        self.warnings: list[str] = []

    def warning(self, text: str, summary_shows: bool = False) -> None:
        """A data problem; `summary_shows`: the CLI's summary already says it, so its `log` is
        not given the line again (Python callers still get the FeatxWarning)."""
        if summary_shows and self.log is not None:
            self.warnings.append(text)
        else:
            self(self.PREFIX + text)

    def __call__(self, message: str) -> None:
        if message.startswith(self.PREFIX):
            text = message[len(self.PREFIX) :]
            self.warnings.append(text)
            if self.log is None:
                import warnings

                warnings.warn(text, FeatxWarning, stacklevel=3)
                return
        if self.log is not None:
            self.log(message)
        else:
            import logging

            logging.getLogger("featx").info(message)
