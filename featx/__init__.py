"""featx: cache MobileNetV2 features once, train classifier heads on them in seconds.

The Python API mirrors the CLI: `featx COMMAND` calls the function of the same name in
`featx.commands`. `import featx` alone stays instant: nothing heavy loads until a command runs.
"""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) is noise to CLI users; errors show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from featx.config import VERSION as __version__  # noqa: E402
from featx.errors import FeatxError  # noqa: E402

__all__ = ["FeatxError", "__version__"]
