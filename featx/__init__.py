"""featx: cache MobileNetV2 features once, train classifier heads on them in seconds.

The Python API mirrors the CLI: `featx COMMAND` calls the function of the same name in the module
of the same name, e.g. `from featx.extract import extract`, `from featx.store import info`.
Those modules import TensorFlow and h5py; `import featx` alone stays instant.
"""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) is noise to CLI users; errors show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from featx.errors import FeatxError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["FeatxError", "__version__"]
