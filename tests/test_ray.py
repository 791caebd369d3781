"""`featx extract --executor ray` (#15) on a local Ray of 2 CPUs: the cache a local run writes, a
worker that dies survived, a driver killed with kill -9 resumed. The Ray tests skip where Ray is
not installed (`pip install 'featx[ray]'`); the rest need no Ray."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import TINY, assert_one_line_error, assert_same_cache, write_images

import featx
from featx.backbone import mobilenet
from featx.cache import parts, ray_executor
from featx.cli import cli
from featx.commands.extract import extract
from featx.errors import FeatxError

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is optional: pip install 'featx[ray]'"
)
SPEC = mobilenet.BackboneSpec(**TINY)
RUN = dict(engine="keras", batch_size=4, **TINY)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (starting one costs seconds); extract uses it, leaves it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def make_data(root: Path) -> Path:
    """40 generated images and one corrupt file."""
    data = write_images(root, {"cats": 20, "dogs": 20}, noise=40)
    (data / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return data


def parts_folder(cache: Path) -> Path:
    return cache.with_name(cache.name + ".parts")


@needs_ray
@pytest.mark.slow
def test_ray_writes_the_cache_a_local_run_writes(local_ray, tmp_path):
    data = make_data(tmp_path / "data")
    local = tmp_path / "local.h5"
    extract(data, local, flip=True, **RUN)
    messages, progress = [], []
    cache = tmp_path / "ray.h5"
    summary = extract(
        data, cache, flip=True, executor="ray", log=messages.append,
        progress=lambda done, total, rate: progress.append((done, total)), **RUN,
    )  # fmt: skip
    assert progress[-1] == (41, 41) and progress == sorted(progress)
    assert summary["extracted"] == 40 and summary["images"] == 40
    assert summary["rejected"] == [
        {"path": "cats/broken.jpg", "reason": "not an image (format not recognised)"}
    ]
    assert any(m.startswith("ray: 41 images on a local Ray") for m in messages), messages
    assert_same_cache(cache, local)
    # Nothing left over: only the parts the cache names, and no temporary file.
    with h5py.File(cache, "r") as f:
        named = sorted(f["sources/names"].asstr()[()])
    left = sorted(f"{parts_folder(cache).name}/{p.name}" for p in parts_folder(cache).iterdir())
    assert left == sorted([*named, f"{parts_folder(cache).name}/{parts.Journal.MARKER}"])

    # Incremental, as a local run: 3 new images extracted, the rest kept.
    write_images(data, {"dogs": 3}, name="new{i}.jpg", noise=40, seed=7)
    again = extract(data, cache, executor="ray", **RUN)
    assert again["extracted"] == 3 and again["kept"] == 41
    extract(data, local, **RUN)
    assert_same_cache(cache, local)


@needs_ray
@pytest.mark.slow
def test_a_worker_that_dies_mid_run_loses_and_duplicates_nothing(local_ray, tmp_path, monkeypatch):
    data = make_data(tmp_path / "data")
    marker = tmp_path / "crashed-once"
    monkeypatch.setattr(ray_executor, "FAULTS", ray_executor.Faults(crash_once=str(marker)))
    cache = tmp_path / "ray.h5"
    summary = extract(data, cache, executor="ray", dtype="float16", **RUN)
    assert marker.exists(), "no worker died: the test proved nothing"
    assert summary["extracted"] == 40 and len(summary["rejected"]) == 1
    monkeypatch.setattr(ray_executor, "FAULTS", ray_executor.NO_FAULTS)
    local = tmp_path / "local.h5"
    extract(data, local, dtype="float16", **RUN)
    assert_same_cache(cache, local)  # every path once (and paths == a local run's)


@needs_ray
@pytest.mark.slow
def test_a_changed_file_takes_its_new_features_not_an_older_journal_part(local_ray, tmp_path):
    data = make_data(tmp_path / "data")
    cache = tmp_path / "ray.h5"
    extract(data, cache, executor="ray", **RUN)
    # An interrupted run's part that still holds the old version of a file, named to be read
    # last: the file then changes, so the next run must extract it again and use that.
    (first,) = sorted(parts_folder(cache).glob("features-*.h5"))[:1]
    stale = parts_folder(cache) / ("features-" + "f" * 16 + ".h5")
    shutil.copyfile(first, stale)
    with h5py.File(first, "r") as f:
        changed = f["paths"].asstr()[0]
    write_images(tmp_path / "other", {"x": 1}, noise=40, seed=99)
    shutil.copyfile(next((tmp_path / "other" / "x").iterdir()), data / changed)

    summary = extract(data, cache, executor="ray", **RUN)
    assert summary["extracted"] == 1 and not stale.exists()
    local = tmp_path / "local.h5"
    extract(data, local, **RUN)
    assert_same_cache(cache, local)


KILLABLE = textwrap.dedent(
    """
    import sys
    from featx.cache import ray_executor
    from featx.commands.extract import extract
    ray_executor.FAULTS = ray_executor.Faults(delay=1.0)  # each block takes a second or more
    extract(sys.argv[1], sys.argv[2], engine="keras", batch_size=4, executor="ray", workers=1,
            weights="none", alpha=0.35, image_size=32)
    """
)


@needs_ray
@pytest.mark.slow
def test_a_driver_killed_mid_run_resumes_to_the_same_cache(local_ray, tmp_path):
    data = make_data(tmp_path / "data")
    cache = tmp_path / "ray.h5"
    env = dict(os.environ)
    # Its own session: the Ray it starts is killed with it after the test, whatever happens.
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(data), str(cache)], env=env, start_new_session=True
    )
    try:
        deadline = time.time() + 240
        while not list(parts_folder(cache).glob("features-*.h5")):
            assert proc.poll() is None, "the Ray run ended before it could be killed"
            assert time.time() < deadline, "no part written after 240 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only
        proc.wait()
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if _group_alive(proc.pid) else None
    assert featx.info(cache)["images"] == 0  # the cache opens: empty, but valid
    written = sorted(parts_folder(cache).glob("features-*.h5"))
    assert 1 <= len(written) < 4, written  # mid-run: 4 blocks of 12 (41 images, 1 actor)
    rows = rejected = 0
    for part in written:
        with h5py.File(part, "r") as f:
            rows, rejected = rows + len(f["paths"]), rejected + len(f["rejected/paths"])

    summary = extract(data, cache, executor="ray", **RUN)
    # Everything in the parts written before the kill is resumed, the rest extracted (Ray may run
    # the blocks in any order: the broken file may be in either).
    assert summary["resumed"] == rows + rejected >= 11 and summary["extracted"] == 40 - rows
    local = tmp_path / "local.h5"
    extract(data, local, **RUN)
    assert_same_cache(cache, local)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


# --- without Ray ---------------------------------------------------------------------------------


def job(tmp_path: Path, **kwargs) -> ray_executor.RayJob:
    folder = tmp_path / "c.h5.parts"  # the journal's folder (parts.Journal.start makes it)
    return ray_executor.RayJob(tmp_path, SPEC, folder, "key", **{"run_id": "run-1", **kwargs})


def block(paths, value=1.0, reasons=None, dim=SPEC.feature_dim) -> dict:
    n = len(paths)
    return {
        "path": np.array(paths),
        "size": np.arange(n, dtype=np.int64) + 100,
        "mtime_ns": np.arange(n, dtype=np.int64) + 10**18,
        "sha256": np.array(["ab" * 32] * n),
        "reason": np.array(reasons or [""] * n),
        "features": np.full((n, dim), value, np.float32),
    }


def test_a_block_is_a_part_the_journal_resumes_and_a_retried_block_replaces_it(tmp_path):
    journal = parts.Journal(tmp_path / "c.h5", "key", SPEC.feature_dim)
    journal.start()
    j = job(tmp_path)
    first = ray_executor.write_block(j, block(["a.jpg", "b.jpg", "c.png"], reasons=["", "", "bad"]))
    again = ray_executor.write_block(j, block(["a.jpg", "b.jpg", "c.png"], reasons=["", "", "bad"]))
    assert first == again and len(list(j.folder.glob("features-*.h5"))) == 1
    done, rejected = journal.load()
    assert sorted(done) == ["a.jpg", "b.jpg"] and done["b.jpg"][:3] == (101, 10**18 + 1, "ab" * 32)
    assert done["a.jpg"][3] == (f"c.h5.parts/{first}", 0)  # a reference, not the features
    assert rejected == {"c.png": (102, 10**18 + 2, "bad")}

    # Another run's block of the same paths is another part: a committed part is never rewritten.
    other = ray_executor.write_block(job(tmp_path, run_id="run-2"), block(["a.jpg", "b.jpg"]))
    assert other != first
    # Another backbone's parts are not resumed.
    assert parts.Journal(tmp_path / "c.h5", "other", SPEC.feature_dim).load() == ({}, {})


def test_blocks_keep_every_actor_busy_and_stay_within_a_part(tmp_path):
    assert ray_executor.block_rows(41, job(tmp_path, batch_size=4, workers=1)) == 12
    assert ray_executor.block_rows(10**6, job(tmp_path, batch_size=32, workers=8)) == 4096
    assert ray_executor.block_rows(3, job(tmp_path, batch_size=32, workers=8)) == 32


def test_options_of_the_ray_executor_are_checked_before_any_work(tmp_path):
    data = write_images(tmp_path / "data", {"a": 2, "b": 2})
    with pytest.raises(FeatxError, match="--ray-address is an option of the Ray executor"):
        extract(data, tmp_path / "c.h5", ray_address="auto", **RUN)
    with pytest.raises(FeatxError, match="--gpus-per-worker is an option"):
        extract(data, tmp_path / "c.h5", gpus_per_worker=1, **RUN)
    with pytest.raises(FeatxError, match="gpus_per_worker must be a number >= 0"):
        extract(data, tmp_path / "c.h5", executor="ray", gpus_per_worker=-1, **RUN)
    with pytest.raises(FeatxError, match="needs --precision fp32"):
        extract(data, tmp_path / "c.h5", executor="ray", precision="int8", **TINY)
    with pytest.raises(FeatxError, match="Unknown executor 'spark'"):
        extract(data, tmp_path / "c.h5", executor="spark", **RUN)
    assert not (tmp_path / "c.h5").exists()


def test_cli_ray_options_without_the_ray_executor_are_one_line_errors(tmp_path):
    data = write_images(tmp_path / "data", {"a": 2, "b": 2})
    args = ["extract", str(data), "--cache", str(tmp_path / "c.h5"), "--weights", "none"]
    result = CliRunner().invoke(cli, [*args, "--gpus-per-worker", "0.5"])
    assert_one_line_error(result, "--gpus-per-worker", "--executor ray")
    result = CliRunner().invoke(cli, [*args, "--executor", "ray", "--gpus-per-worker", "-1"])
    assert_one_line_error(result, "--gpus-per-worker must be a number >= 0")


def test_missing_ray_is_a_one_line_error_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    data = write_images(tmp_path / "data", {"a": 2, "b": 2})
    result = CliRunner().invoke(
        cli, ["extract", str(data), "--cache", str(tmp_path / "c.h5"), "--executor", "ray"]
    )
    assert_one_line_error(result, "pip install 'featx[ray]'")
    assert not (tmp_path / "c.h5").exists()  # refused before any work


def test_actors_get_the_backend_and_grow_gpu_memory_instead_of_preallocating(monkeypatch):
    monkeypatch.setenv("FEATX_HOME", "/somewhere/featx")
    env = ray_executor.worker_env("jax")
    assert env["KERAS_BACKEND"] == "jax" and env["FEATX_HOME"] == "/somewhere/featx"
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert ray_executor.worker_env()["KERAS_BACKEND"] == mobilenet.keras_backend()


def test_a_cluster_gets_one_actor_per_gpu_share_else_per_cpu_but_one():
    assert ray_executor._cluster_workers({"CPU": 64.0, "GPU": 8.0}, 0.5) == 16
    assert ray_executor._cluster_workers({"CPU": 64.0, "GPU": 8.0}, 0) == 63
    assert ray_executor._cluster_workers({"CPU": 1.0}, 0) == 1


def test_nothing_to_extract_starts_no_ray(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # would fail if run() imported it
    assert ray_executor.run([], job(tmp_path)) == 0


def test_importing_the_executor_loads_neither_ray_nor_keras():
    code = (
        "import sys, featx.cache.ray_executor; "
        "print([m for m in ('ray', 'keras', 'tensorflow') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
