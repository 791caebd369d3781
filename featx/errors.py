"""The one exception featx raises for bad user input.

It subclasses ValueError (Keras' convention for bad input); the CLI prints its message as one line,
without a traceback. Messages say what happened, what was expected and how to fix it.
"""


class FeatxError(ValueError):
    pass
