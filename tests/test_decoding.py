"""Decoding in processes (featx.images.decoding): the same results as threads, pixels through shared
memory, a shared pixel budget, workers that stop with the run (closed, died, or parent killed)."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import COLOURS, TINY, assert_one_line_error, write_images

from featx import config
from featx.backbone import engines
from featx.commands import extract
from featx.errors import FeatxError
from featx.images import decoder, decoding
from featx.options import ExtractOptions

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(COLOURS)


def folder_items(data: Path) -> list[tuple]:
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file())
    return [(f, None) for f in files]


def decode_all(data: Path, items: list, processes: bool, workers: int = 2, batch: int = 5):
    """[(status, value, pixels copy)] of every item, decoding `batch` items a chunk."""
    chunks = [items[i : i + batch] for i in range(0, len(items), batch)]
    out = []
    for chunk, results in decoding.decode(
        chunks, str(data), 32, workers=workers, processes=processes
    ):
        assert len(results) == len(chunk)
        out += [(s, v, None if p is None else p.copy()) for s, v, p in results]
    return out


@pytest.fixture
def data(tmp_path) -> Path:
    root = write_images(tmp_path / "data", dict.fromkeys(COLOURS, 6), noise=50)
    (root / NAMES[0] / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / NAMES[1] / "empty.png").write_bytes(b"")
    return root


def test_processes_decode_exactly_what_threads_decode(data):
    items = folder_items(data)
    # One file unchanged since a previous run (its sha256 given): neither way decodes it.
    unchanged = next(i for i, (p, _) in enumerate(items) if not p.endswith(("broken.jpg", "y.png")))
    sha = decoder.read_file(data / items[unchanged][0])[1]
    items[unchanged] = (items[unchanged][0], sha)
    threads = decode_all(data, items, processes=False)
    procs = decode_all(data, items, processes=True)
    assert [r[:2] for r in procs] == [r[:2] for r in threads]
    statuses = [r[0] for r in procs]
    assert statuses.count("rejected") == 2 and statuses[unchanged] == "same"
    assert statuses.count("ok") == len(items) - 3
    for (s, _, a), (_, _, b) in zip(threads, procs):
        if s == "ok":
            assert b.shape == (32, 32, 3) and b.dtype == np.uint8
            np.testing.assert_array_equal(a, b)


def test_process_pixels_are_each_items_own_with_more_chunks_than_slots(data):
    """Chunks reuse the shared slots (PREFETCH_BATCHES + 1 of them): each chunk's pixels are
    still its own images' when it is yielded, for any chunk size and worker count."""
    items = folder_items(data)
    good = [p for p, _ in items if not p.endswith(("broken.jpg", "empty.png"))]
    expected = {p: decoder.load_image(data / p, 32) for p in good}
    for workers, batch in ((1, 1), (2, 3), (3, 7)):
        out = decode_all(data, items, processes=True, workers=workers, batch=batch)
        for (path, _), (status, _, pixels) in zip(items, out):
            if status == "ok":
                np.testing.assert_array_equal(pixels, expected[path])


def test_closing_the_generator_stops_the_worker_processes_at_once(data):
    items = folder_items(data) * 40
    chunks = [items[i : i + 4] for i in range(0, len(items), 4)]
    batches = decoding.decode(chunks, str(data), 32, workers=2, processes=True)
    next(batches)
    workers = [p for p in multiprocessing.active_children() if "Process" in p.name]
    assert len(workers) >= 2
    t0 = time.perf_counter()
    batches.close()
    assert time.perf_counter() - t0 < 2
    deadline = time.time() + 10
    while any(p.is_alive() for p in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(p.is_alive() for p in workers)


def test_a_worker_that_dies_stops_the_run_with_a_one_line_error(data):
    items = folder_items(data) * 40
    chunks = [items[i : i + 4] for i in range(0, len(items), 4)]
    batches = decoding.decode(chunks, str(data), 32, workers=2, processes=True)
    next(batches)
    for p in multiprocessing.active_children():
        if "Process" in p.name:
            os.kill(p.pid, signal.SIGKILL)
    with pytest.raises(FeatxError, match="a decoding process died") as e:
        for _ in batches:
            pass
    assert "\n" not in str(e.value) and "--decode-in threads" in str(e.value)


CHILD = textwrap.dedent("""
    import multiprocessing, sys, time
    from featx.images import decoding
    root = sys.argv[1]
    items = [(p, None) for p in sys.argv[2:]] * 500
    chunks = [items[i : i + 2] for i in range(0, len(items), 2)]
    batches = decoding.decode(chunks, root, 32, workers=2, processes=True)
    next(batches)
    print(*[p.pid for p in multiprocessing.active_children() if "Process" in p.name], flush=True)
    for _ in batches:
        time.sleep(0.05)  # a slow consumer: the workers wait with chunks decoded
""")


def test_kill_9_of_the_parent_takes_its_decoding_processes_with_it(data):
    files = [p for p, _ in folder_items(data) if not p.endswith(("broken.jpg", "y.png"))][:4]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data), *files], stdout=subprocess.PIPE, text=True,
        env=env,
    )  # fmt: skip
    try:
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        child.kill()
        child.wait(10)
        deadline = time.time() + 10
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids)
    finally:
        child.kill()


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an orphan's zombie is init's to reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_the_shared_pixel_budget_makes_large_images_wait_for_each_other():
    ctx = multiprocessing.get_context("spawn")
    budget = decoder._PixelBudget(100, ctx.Condition(), ctx.RawValue("q", 0))
    budget.acquire(60)
    got = threading.Event()

    def second():
        budget.acquire(60)
        got.set()

    threading.Thread(target=second, daemon=True).start()
    assert not got.wait(0.3)  # 60 + 60 > 100: it waits
    budget.release(60)
    assert got.wait(5) and budget.used == 60
    budget.release(60)
    budget.acquire(500)  # alone, one image over the budget still decodes
    assert budget.used == 500


def test_choose_takes_processes_only_where_they_pay():
    many = config.PROCESS_DECODE_MIN_IMAGES
    assert decoding.choose("auto", 2, many, model_on_gpu=True) == "processes"
    assert decoding.choose("auto", 2, many, model_on_gpu=False) == "threads"  # the model's pace
    assert decoding.choose("auto", 1, many, model_on_gpu=True) == "threads"  # nothing to gain
    assert decoding.choose("auto", 2, many - 1, model_on_gpu=True) == "threads"  # start-up
    assert decoding.choose("threads", 8, 10**6, model_on_gpu=True) == "threads"
    assert decoding.choose("processes", 1, 1, model_on_gpu=False) == "processes"


def read(cache: Path) -> dict:
    with h5py.File(cache, "r") as f:
        return {
            "paths": list(f["paths"].asstr()[()]),
            "features": f["features"][()],
            "rejected": list(f["rejected/paths"].asstr()[()]),
        }


def test_extract_in_processes_writes_the_cache_threads_write(data, tmp_path, fake_engine,
                                                             monkeypatch):  # fmt: skip
    kw = {**TINY, "batch_size": 4, "workers": 2}
    by_threads = extract.extract(data, tmp_path / "t.h5", decode_in="threads", **kw)
    monkeypatch.setattr(config, "PROCESS_DECODE_MIN_IMAGES", 5)  # auto: processes from 5 images
    monkeypatch.setattr(engines, "gpu_expected", lambda opts: True)  # ... with the model on a GPU
    by_procs = extract.extract(data, tmp_path / "p.h5", **kw)
    assert by_threads["decoded_in"] == "threads" and by_procs["decoded_in"] == "processes"
    a, b = read(tmp_path / "t.h5"), read(tmp_path / "p.h5")
    assert a["paths"] == b["paths"] and len(a["paths"]) == 6 * len(COLOURS)
    assert sorted(a["rejected"]) == sorted(b["rejected"]) and len(a["rejected"]) == 2
    np.testing.assert_array_equal(a["features"], b["features"])
    # An incremental run in processes: the unchanged files are kept, one new file is decoded.
    write_images(data, {NAMES[0]: 1}, start=6, noise=50)
    again = extract.extract(data, tmp_path / "p.h5", decode_in="processes", **kw)
    assert again["extracted"] == 1
    c = read(tmp_path / "p.h5")
    assert len(c["paths"]) == len(b["paths"]) + 1
    old_rows = [c["paths"].index(p) for p in b["paths"]]
    np.testing.assert_array_equal(c["features"][old_rows], b["features"])


def test_decode_in_is_checked():
    with pytest.raises(FeatxError, match="decode_in"):
        ExtractOptions(decode_in="fibers")
    with pytest.raises(FeatxError, match="local executor"):
        ExtractOptions(decode_in="processes", executor="ray")


def test_cli_decode_in_processes_with_ray_is_one_line(tmp_path):
    from click.testing import CliRunner

    from featx.cli import cli

    args = ["extract", str(tmp_path), "--decode-in", "processes", "--executor", "ray"]
    assert_one_line_error(CliRunner().invoke(cli, args), "--decode-in processes")
