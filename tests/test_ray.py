"""The Ray executor (#15) on a local Ray of 2 CPUs: the same features as the in-process engine,
every path exactly once, a dead worker survived. Skipped where Ray is not installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, write_images

from featx import backbone, images, ray_executor
from featx.errors import FeatxError

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is optional: pip install 'featx[ray]'"
)
SPEC = backbone.BackboneSpec(**TINY)
BATCH = 8


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (starting one costs seconds); run() uses it and leaves it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[str]]:
    """~40 generated images and one corrupt file; (root, relative paths)."""
    root = write_images(tmp_path_factory.mktemp("ray-data"), {"cats": 20, "dogs": 20})
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    return root, files


def in_process_features(root: Path, paths: list[str]) -> np.ndarray:
    pixels = np.stack([images.load_image(root / p, SPEC.image_size) for p in paths])
    return backbone.KerasEngine(SPEC).features(pixels)


@needs_ray
@pytest.mark.slow
def test_ray_parts_equal_the_in_process_features_once_per_path(local_ray, data, tmp_path):
    root, files = data
    gone = "dogs/deleted-since-listing.jpg"  # a file that vanished must not fail the run
    parts = tmp_path / "parts"
    written = ray_executor.run([*files, gone], root, SPEC, parts, batch_size=BATCH, flip=True)
    assert written and all(p.parent == parts for p in written)
    rows = ray_executor.read_parts(parts, dim=SPEC.feature_dim)

    good = [p for p in files if p != "cats/broken.jpg"]
    assert rows.paths == good  # each once, sorted
    assert rows.rejected_paths == ["cats/broken.jpg", gone]
    assert rows.rejected_reasons == [  # extract's reasons, word for word
        "not an image (format not recognised)",
        "unreadable: No such file or directory",
    ]
    np.testing.assert_allclose(rows.features, in_process_features(root, good), atol=1e-5)
    mirrored = backbone.KerasEngine(SPEC).features(
        np.stack([images.load_image(root / p, SPEC.image_size)[:, ::-1] for p in good])
    )
    np.testing.assert_allclose(rows.features_flip, mirrored, atol=1e-5)
    assert rows.sha256[0] == images.read_file(root / good[0])[1]
    assert not list(parts.glob(".*"))  # no temporary file left behind


@needs_ray
@pytest.mark.slow
def test_a_worker_that_dies_mid_run_loses_and_duplicates_nothing(
    local_ray, data, tmp_path, monkeypatch
):
    root, files = data
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(ray_executor.CRASH_ONCE_ENV, str(marker))  # the actors' runtime_env
    ray_executor.run(files, root, SPEC, tmp_path / "parts", batch_size=BATCH, dtype="float16")
    assert marker.exists(), "no worker died: the test proved nothing"

    rows = ray_executor.read_parts(tmp_path / "parts")
    assert rows.paths == [p for p in files if p != "cats/broken.jpg"]  # each once, sorted
    assert rows.rejected_paths == ["cats/broken.jpg"]
    assert rows.features.dtype == np.float16 and rows.features_flip is None


def test_a_block_written_again_replaces_its_part_and_read_parts_keeps_one_row(tmp_path):
    # What a retried Ray task does: the same block again (same name), or the same paths in
    # another bundling (another name). No Ray needed.
    def block(paths, value):
        return {
            "path": np.array(paths),
            "sha256": np.array(["x"] * len(paths)),
            "reason": np.array([""] * len(paths)),
            "features": np.full((len(paths), 4), value, np.float32),
        }

    first = ray_executor.write_part(tmp_path, block(["a.jpg", "b.jpg"], 1.0), flip=False)
    again = ray_executor.write_part(tmp_path, block(["a.jpg", "b.jpg"], 1.0), flip=False)
    ray_executor.write_part(tmp_path, block(["b.jpg", "c.jpg"], 1.0), flip=False)
    assert first == again and len(list(tmp_path.glob(ray_executor.PART_GLOB))) == 2
    rows = ray_executor.read_parts(tmp_path, dim=4)
    assert rows.paths == ["a.jpg", "b.jpg", "c.jpg"]
    with pytest.raises(FeatxError, match="shape"):
        ray_executor.read_parts(tmp_path, dim=8)


def test_a_part_with_non_finite_features_is_refused_by_name(tmp_path):
    bad = {
        "path": np.array(["a.jpg"]),
        "sha256": np.array(["x"]),
        "reason": np.array([""]),
        "features": np.array([[np.nan, 0.0]], np.float32),
    }
    part = ray_executor.write_part(tmp_path, bad, flip=False)
    with pytest.raises(FeatxError, match=f"{part.name}.*non-finite"):
        ray_executor.read_parts(tmp_path)


def test_missing_ray_is_a_one_line_error_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(FeatxError) as e:
        ray_executor.run(["a.jpg"], tmp_path, SPEC, tmp_path / "parts")
    message = str(e.value)
    assert "pip install 'featx[ray]'" in message and "\n" not in message


def test_actors_get_the_backend_and_grow_gpu_memory_instead_of_preallocating(monkeypatch):
    monkeypatch.setenv("FEATX_HOME", "/somewhere/featx")
    env = ray_executor.worker_env("jax")
    assert env["KERAS_BACKEND"] == "jax" and env["FEATX_HOME"] == "/somewhere/featx"
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert ray_executor.worker_env()["KERAS_BACKEND"] == backbone.keras_backend()


def test_a_cluster_gets_one_actor_per_gpu_share_else_per_cpu_but_one():
    assert ray_executor._cluster_workers({"CPU": 64.0, "GPU": 8.0}, 0.5) == 16
    assert ray_executor._cluster_workers({"CPU": 64.0, "GPU": 8.0}, 0) == 63
    assert ray_executor._cluster_workers({"CPU": 1.0}, 0) == 1


def test_nothing_to_extract_starts_no_ray(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # would fail if run() imported it
    assert ray_executor.run([], tmp_path, SPEC, tmp_path / "parts") == []


def test_importing_the_executor_loads_neither_ray_nor_keras():
    code = (
        "import sys, featx.ray_executor; "
        "print([m for m in ('ray', 'keras', 'tensorflow') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
