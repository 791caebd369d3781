"""featx: cache MobileNetV2 features once, train classifier heads on them in seconds.

The Python API mirrors the CLI: `featx extract DATA` is `featx.extract("DATA")`, with the same
options and defaults, and so are fit_head, finetune, predict, audit, export, merge, info and
report; `featx.load(MODEL_DIR)` gives a classifier to call on images an application holds.

`import featx` alone stays instant: each function is imported from `featx.commands` (or
`featx.artifacts`) on first use (PEP 562), so TensorFlow, Keras, h5py and scikit-learn load only
when a command that needs them runs.
"""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) is noise to CLI users; errors show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from featx.config import VERSION as __version__  # noqa: E402
from featx.errors import FeatxError, FeatxWarning  # noqa: E402

# name -> the module that defines it. No module of featx shares one of these names, so importing
# any module can never replace one of these functions with a module (tests/test_api.py checks).
_LAZY = {
    "extract": "featx.commands.extract",
    "merge": "featx.commands.merge",
    "info": "featx.commands.info",
    "fit_head": "featx.commands.fit_head",
    "finetune": "featx.commands.finetune",
    "predict": "featx.commands.predict",
    "export": "featx.commands.export",
    "audit": "featx.commands.audit",
    "report": "featx.commands.report",
    "load": "featx.artifacts.classifier",
}

__all__ = ["FeatxError", "FeatxWarning", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module 'featx' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
