"""The ONNX Runtime engine: the same frozen backbone, exported once to ONNX, ~2-3x faster on a CPU.

The exact Keras backbone (weights, alpha, image size, preprocessing inside the graph) is exported
once with `model.export(path, format="onnx")` and stored as `backbone-<key>.onnx` in the per-user
folder (`user_dir()`: every project of the user shares it), where <key> hashes the backbone
fingerprint's model keys, so other weights get another file; a valid file that older versions left
next to a cache is used too. A sidecar `<file>.json` records the fingerprint and the file's
sha256: a stale, truncated or corrupt .onnx file is rebuilt, never trusted. With a valid file on
disk, running it needs neither Keras nor TensorFlow (start-up stays well under a second).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from featx import config
from featx.backbone import mobilenet
from featx.errors import FeatxError
from featx.files import file_sha256, replaced_atomically, write_text_atomic

ENGINES = config.ENGINES
INSTALL_HINT = "pip install 'featx[onnx]'"


def import_onnxruntime():
    """onnxruntime, or a FeatxError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise FeatxError(
            f"--engine onnx needs ONNX Runtime, which is not installed ({e}). "
            f"Run `{INSTALL_HINT}`, or pass --engine keras."
        ) from None
    return onnxruntime


def onnxruntime_available() -> bool:
    try:
        import_onnxruntime()
    except FeatxError:
        return False
    return True


def _nvidia_device_present() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.isdir("/proc/driver/nvidia/gpus")


def keras_sees_gpu() -> bool:
    """Whether Keras would run the backbone on a GPU.

    Cheap where it matters: without an NVIDIA device (or Apple's tensorflow-metal) the answer is
    no, without importing TensorFlow; otherwise the active backend is asked.
    """
    name = mobilenet.keras_backend()
    if name == "tensorflow" and "tensorflow" not in sys.modules:
        metal = sys.platform == "darwin" and _distribution_installed("tensorflow-metal")
        if not (metal or _nvidia_device_present()):
            return False
    elif name != "tensorflow" and not _nvidia_device_present():
        return False
    try:
        if name == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if name == "jax":
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
        if name == "torch":
            import torch

            return bool(torch.cuda.is_available())
    except Exception:  # a broken GPU stack: Keras would not use it either
        return False
    return False


def _distribution_installed(name: str) -> bool:
    """Whether the distribution `name` is installed (a plug-in with no module of its own)."""
    import importlib.metadata

    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _installed(module: str) -> bool:
    """Whether `module` can be imported (found, not imported: importlib.metadata would cost a
    one-image predict 10 ms of imports)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# The converter Keras' `model.export(format="onnx")` needs under each backend.
ONNX_CONVERTERS = {"tensorflow": "tf2onnx", "jax": "jax2onnx"}


def export_blocker() -> str | None:
    """Why the backbone cannot be exported to ONNX under the active Keras backend, or None."""
    name = mobilenet.keras_backend()
    converter = ONNX_CONVERTERS.get(name)
    if converter is None:
        return (
            f"featx exports ONNX under the tensorflow or jax Keras backend, not {name!r}; "
            "set KERAS_BACKEND=tensorflow"
        )
    if not _installed(converter):
        return f"the {name} Keras backend needs `pip install {converter}` to export ONNX"
    return None


def choose_engine(name: str, log=None) -> str:
    """Resolve "auto" to "onnx" or "keras"; check that an explicit "onnx" can run."""
    if name not in ENGINES:
        raise FeatxError(f"Unknown engine {name!r}; expected one of {', '.join(ENGINES)}.")
    if name == "onnx":
        import_onnxruntime()
        return "onnx"
    if name == "keras":
        return "keras"
    if not onnxruntime_available():
        if log is not None:
            log(f"note: using the Keras engine; `{INSTALL_HINT}` gives a ~2x faster CPU engine.")
        return "keras"
    if keras_sees_gpu():
        return "keras"
    blocker = export_blocker()
    if blocker is not None:  # the export would fail: auto must never be worse than keras
        if log is not None:
            log(f"note: using the Keras engine; {blocker}.")
        return "keras"
    return "onnx"


def user_dir() -> Path:
    """featx's per-user folder for files shared by all projects (the exported backbones):
    $FEATX_HOME, else $XDG_CACHE_HOME/featx, else ~/.cache/featx."""
    if os.environ.get(config.HOME_ENV):
        return Path(os.environ[config.HOME_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "featx"


def model_key(fingerprint: dict) -> str:
    """sha256 of the fingerprint's model keys: equal keys, equal features (and .onnx file)."""
    return mobilenet.model_key(fingerprint, mobilenet.FLOAT_MODEL_KEYS)


def session_options(threads: int | None = None):
    """The ONNX Runtime settings featx runs with (the benchmark uses the same)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or config.ONNX_THREADS or config.cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ONNX Runtime threads would spin and take the cores the decoding threads need.
    options.add_session_config_entry("session.intra_op.allow_spinning", config.ONNX_SPIN)
    return options


def providers() -> list[str]:
    """CUDA when this onnxruntime build has it (onnxruntime-gpu), then the CPU."""
    available = import_onnxruntime().get_available_providers()
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


class OnnxEngine:
    """Runs the backbone with ONNX Runtime; same interface as mobilenet.KerasEngine.

    Args:
        spec: the backbone (mobilenet.BackboneSpec); its fp32 graph is what is exported.
        onnx_dir: folder of the exported .onnx files (default: config.ONNX_DIR, else the
            per-user folder, `user_dir()`); a missing or invalid file is exported there.
        threads: ONNX Runtime intra-op threads (default: every core this process may use).
        log: called with one-line messages (the one-time export); default: silent.
        search: more folders where a valid file may already be (older versions stored it next
            to each cache); used when `onnx_dir` has none.
    """

    name = "onnx"

    def __init__(
        self,
        spec: mobilenet.BackboneSpec,
        *,
        onnx_dir: str | Path | None = None,
        threads: int | None = None,
        log=None,
        search=(),
    ):
        self.spec = spec
        self.onnx_dir = Path(onnx_dir or config.ONNX_DIR or user_dir())
        self.search = [Path(folder) for folder in search]
        self.threads = threads
        self.log = log or (lambda message: None)
        self._session = None
        self._input = None
        self.prepared_seconds = 0.0  # spent building the .onnx file (once per backbone and user)

    @property
    def path(self) -> Path:
        """The .onnx file of this backbone (it may not exist yet)."""
        return self._locate()[1]

    def _locate(self) -> tuple[dict, Path]:
        spec = self.spec
        fp = mobilenet.fingerprint(
            spec.weights, spec.image_size, spec.alpha, engine=self.name, versions=False
        )
        key = model_key(fp)
        path = self.onnx_dir / f"backbone-{key[:16]}.onnx"
        if check_stored(path, key) is not None:  # else: an older version's file, if valid
            for folder in self.search:
                if check_stored(folder / path.name, key) is None:
                    return fp, folder / path.name
        return fp, path

    def cannot_export_here(self) -> str | None:
        """Why this engine would fail before its first batch (no valid stored file and a folder it
        cannot write the export to), or None."""
        fp, path = self._locate()
        if check_stored(path, model_key(fp)) is None:
            return None
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent  # the export creates the missing folders below this one
        if not os.access(folder, os.W_OK):
            return f"'{folder}' is not writable, so the ONNX export cannot be stored there"
        return None

    def prepare(self) -> float:
        """Load the session now, building the .onnx file first when it is not stored: the
        seconds spent building it (0.0 when it was stored), which extract leaves out of images/s."""
        if self._session is None:
            self._session = self.load()
            self._input = self._session.get_inputs()[0].name
        return self.prepared_seconds

    def features(self, batch: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8 or float pixels -> (n, dim) float32 features."""
        self.prepare()
        out = self._session.run(None, {self._input: np.asarray(batch, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def load(self):
        """An InferenceSession of the stored .onnx file, exported first if missing or invalid."""
        ort = import_onnxruntime()
        fp, path = self._locate()
        problem = check_stored(path, model_key(fp))
        if problem is None:
            try:
                return ort.InferenceSession(str(path), session_options(self.threads), providers())
            except Exception as e:  # valid hash, unusable file (another onnxruntime?): rebuild
                problem = f"ONNX Runtime cannot load it: {e}"
        if path.exists():
            self.log(f"note: rebuilding {path} ({problem}).")
        fp = mobilenet.fingerprint(  # with the versions, for the sidecar
            self.spec.weights, self.spec.image_size, self.spec.alpha, engine=self.name
        )
        self.prepared_seconds = export(path, fp, self.spec, log=self.log)
        return ort.InferenceSession(str(path), session_options(self.threads), providers())


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def check_stored(path: Path, key: str) -> str | None:
    """None when `path` is a complete export of the backbone with model key `key`; else why not."""
    if not path.is_file():
        return "missing"
    try:
        meta = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return "no readable sidecar file"
    if not isinstance(meta, dict) or meta.get("model_key") != key:
        return "made for another backbone"
    if mobilenet.cached_sha256(path) != meta.get("onnx_sha256"):
        return "its sha256 does not match the sidecar: incomplete or modified"
    return None


def export(path: Path, fp: dict, spec: mobilenet.BackboneSpec, log=None) -> float:
    """Prepare the ONNX backbone at `path` atomically, check it, write the sidecar; the seconds
    it took. ImageNet weights and other MobileNetV2 .h5 files are built into ONNX directly
    (backbone.onnx_builder: ~1 s, no TensorFlow); random weights, or a file the builder cannot
    read, are converted from the Keras model by tf2onnx (~15 s, mostly TensorFlow's start)."""
    log = log or (lambda message: None)
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = mobilenet.resolve_weights(spec.weights, spec.image_size, spec.alpha)
    with replaced_atomically(path) as tmp:
        made_by = _built(weights, spec, tmp)
        if made_by is None:
            log("preparing the fast engine (ONNX Runtime) from the Keras model, once per backbone")
            made_by = _converted(spec, tmp)
        sha = file_sha256(tmp)
    meta = {
        "model_key": model_key(fp),
        "onnx_sha256": sha,
        "fingerprint": {k: v for k, v in fp.items() if k != "engine"},
        "made_by": made_by,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_text_atomic(sidecar_path(path), json.dumps(meta, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    log(f"prepared the fast engine (ONNX Runtime) in {seconds:.1f} s, once per backbone: {path}")
    return seconds


def _probe(spec: mobilenet.BackboneSpec) -> np.ndarray:
    size = spec.image_size
    return np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)


def _built(weights: str | None, spec: mobilenet.BackboneSpec, tmp: Path) -> str | None:
    """ "featx onnx_builder" when the graph was built from the weights file into `tmp` and runs,
    giving features of the backbone's width; None when it cannot be (random weights, no `onnx`,
    a file of another layout): the caller converts the Keras model then."""
    if weights is None:
        return None
    from featx.backbone import onnx_builder

    try:
        onnx_builder.build(weights, spec.image_size, spec.alpha, tmp)
    except (FeatxError, ValueError, KeyError, OSError):
        return None
    ort = import_onnxruntime()
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: _probe(spec)})[0]
    if got.shape != (2, spec.feature_dim) or not np.isfinite(got).all():
        return None
    return "featx onnx_builder"


def _converted(spec: mobilenet.BackboneSpec, tmp: Path) -> str:
    """Convert the Keras backbone into `tmp` with Keras' own export (tf2onnx under TensorFlow),
    checked against Keras on a probe batch; the converter's name."""
    model = mobilenet.build_backbone(spec.weights, spec.image_size, spec.alpha)
    probe = _probe(spec)
    expected = np.asarray(model(probe, training=False))  # export needs a model called once
    try:
        with warnings.catch_warnings():  # tf2onnx's numpy deprecation noise
            warnings.simplefilter("ignore", FutureWarning)
            model.export(str(tmp), format="onnx", verbose=False)
    except Exception as e:
        blocker = export_blocker()
        why = f"{blocker}, or" if blocker else f"check that `{INSTALL_HINT}` is installed, or"
        raise FeatxError(
            f"Could not export the backbone to ONNX ({type(e).__name__}: {e}). "
            f"To fix: {why} pass --engine keras."
        ) from None
    ort = import_onnxruntime()
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: probe})[0]
    scale = float(np.abs(expected).max()) or 1.0
    if got.shape != expected.shape or np.abs(got - expected).max() > 1e-3 * scale:
        raise FeatxError(
            f"The ONNX export of the backbone disagrees with Keras (largest difference "
            f"{np.abs(got - expected).max():.3g} for features up to {scale:.3g}). "
            "Pass --engine keras, and report this with your keras/onnx versions."
        )
    return ONNX_CONVERTERS.get(mobilenet.keras_backend(), "keras")
