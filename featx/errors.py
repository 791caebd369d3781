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
