"""Read and decode the files to extract, a few batches ahead, in threads or in processes.

Threads are enough when a file takes long to decode: Pillow releases the GIL inside the codec,
and real photos decoded at 224 px scale with threads (bench/scale.py; #14). Small files decoded
small do not: Pillow's Python code around the codec holds the GIL most of each image, so 2
threads decode tiny JPEGs barely faster than 1, where 2 processes decode them 2.4x faster.
Processes write the pixels straight into shared memory (one slot per batch in flight), so only
the (status, sha256) of each file is pickled, never the pixels.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from featx import config
from featx.errors import FeatxError
from featx.files import is_url
from featx.images import decoder, remote


def choose(decode_in: str, workers: int, num_images: int, model_on_gpu: bool) -> str:
    """Where to decode: `decode_in` ("threads" or "processes") as asked, or for "auto",
    processes where decoding sets the pace: the model runs on a GPU, on 2 workers or more, for
    config.PROCESS_DECODE_MIN_IMAGES images or more (processes take ~0.3 s to start). With the
    model on this CPU it costs 17-20 core-ms an image against decoding's 2 (bench/cores.py):
    threads keep up, and processes measured no faster (148-168 against 167-173 images/s, ONNX
    Runtime, cats/dogs, 2 cores)."""
    if decode_in != "auto":
        return decode_in
    pays = model_on_gpu and workers >= 2 and num_images >= config.PROCESS_DECODE_MIN_IMAGES
    return "processes" if pays else "threads"


def load_one(root: str, image_size: int, item: tuple) -> tuple:
    """images.load_for_cache of one (relative path, old sha256) item of the data folder `root`."""
    path = remote.join(root, item[0]) if is_url(root) else os.path.join(root, item[0])
    return decoder.load_for_cache(path, image_size, item[1])


def decode(chunks, root: str, image_size: int, *, workers: int, processes: bool,
           ahead: int = config.PREFETCH_BATCHES):  # fmt: skip
    """Yield (chunk, results) for each chunk of (relative path, old sha256 or None) items, in
    order: results are decoder.load_for_cache's, one per item. In processes, the pixels are views
    of shared memory that stay valid until the next chunk is asked for (copy them to keep them).
    Closing the generator (or Ctrl-C in the consumer) stops the workers without waiting."""
    if not processes:
        load = functools.partial(load_one, root, image_size)
        yield from prefetch(chunks, load, ahead, workers)
        return
    yield from _decode_in_processes(chunks, root, image_size, workers, max(1, ahead))


def _decode_in_processes(chunks, root: str, image_size: int, workers: int, ahead: int):
    chunks = list(chunks)
    batch = max((len(c) for c in chunks), default=1)
    slots = ahead + 1  # the chunk the consumer holds and `ahead` decoding
    shape = (slots, batch, image_size, image_size, 3)
    ctx = _context()
    pixels = ctx.RawArray(ctypes.c_uint8, int(np.prod(shape)))
    budget = (config.DECODE_PIXEL_BUDGET, ctx.Condition(), ctx.RawValue(ctypes.c_int64, 0))
    pool = ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_start_worker,
        initargs=(pixels, shape, root, image_size, budget),
    )  # fmt: skip
    view = np.frombuffer(pixels, np.uint8).reshape(shape)
    pending: deque = deque()

    def submit(index: int) -> None:
        if index < len(chunks):
            chunk, slot = chunks[index], index % slots
            # Tasks of a whole chunk when `ahead` chunks are enough to keep every worker busy:
            # each task costs the main process a pickle, a pipe write and a result to collect.
            step = max(1, -(-len(chunk) // max(1, -(-workers // ahead))))
            futures = [
                pool.submit(_decode_rows, slot, start, chunk[start : start + step])
                for start in range(0, len(chunk), step)
            ]
            pending.append((chunk, slot, futures))

    try:
        for index in range(ahead):
            submit(index)
        for index in range(len(chunks)):
            chunk, slot, futures = pending.popleft()
            done = [r for f in futures for r in f.result()]
            submit(index + ahead)  # into the slot the consumer has given back
            yield (
                chunk,
                [
                    (status, value, view[slot, row] if status == "ok" else None)
                    for row, (status, value) in enumerate(done)
                ],
            )
    except BrokenProcessPool:
        raise FeatxError(_BROKEN) from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        _kill(pool)


_BROKEN = (
    "a decoding process died (out of memory, or killed) and the run stopped; the finished batches "
    "are kept. Run again to resume, or pass --decode-in threads (API: decode_in='threads'). A "
    "script that calls featx must do it under `if __name__ == '__main__':` for processes to start."
)


def warm_up() -> None:
    """Start the process that forks the decoding processes now: it imports numpy and Pillow
    (~0.2 s) on another core while this one lists the folder; decode() needs it ready."""
    if _context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        with contextlib.suppress(Exception):  # only an early start: decode() starts it anyway
            forkserver.ensure_running()


def _context():
    """forkserver where there is one (a clean process forks each worker: no copy of a parent
    that runs TensorFlow's threads), else spawn; the workers import only featx.images.decoding."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["featx.images.decoding"])
        return ctx
    return multiprocessing.get_context("spawn")


def _kill(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now: one stuck on a file (a hung network mount) must not hold up the
    exit. Python 3.14 has pool.kill_workers(); before it, the processes are only reachable so."""
    kill = getattr(pool, "kill_workers", None)
    if kill is not None:
        kill()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.kill()


# --- in a worker process -------------------------------------------------------------------------

_worker: dict = {}


def _start_worker(pixels, shape, root: str, image_size: int, budget) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    rows = np.frombuffer(pixels, np.uint8).reshape(shape)
    _worker.update(pixels=rows, root=root, size=image_size)
    # The pixel budget is shared by all the workers, as it is by threads in one process.
    decoder._PIXEL_BUDGET = decoder._PixelBudget(*budget)
    parent = multiprocessing.parent_process()
    if parent is not None:  # a parent killed with -9 must not leave its workers behind
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()


def _exit_with(sentinel) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _decode_rows(slot: int, start: int, items: list) -> list:
    """Decode `items` into rows start... of `slot`; the (status, value) of each, pixels stay."""
    out, rows = [], _worker["pixels"][slot]
    for row, item in enumerate(items, start):
        status, value, decoded = load_one(_worker["root"], _worker["size"], item)
        if decoded is not None:
            rows[row] = decoded
        out.append((status, value))
    return out


def prefetch(chunks, load, ahead: int = config.PREFETCH_BATCHES, workers: int | None = None):
    """Yield (chunk, [load(item) for item in chunk]) for each chunk, in order, with the next
    `ahead` chunks loading in `workers` threads meanwhile (Pillow releases the GIL while
    decoding). Each chunk is cut into one slice per worker, loaded as one task: a future per
    image cost more Python time than decoding a small image.

    Closing the generator (or Ctrl-C in the consumer) cancels what has not started and returns
    without waiting for the threads, so an interrupted run stops at once."""
    workers = workers or config.decode_workers()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="featx-decode")
    pending: deque = deque()
    chunks = iter(chunks)

    def load_all(items) -> list:
        return [load(item) for item in items]

    def submit() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            step = max(1, -(-len(chunk) // workers))
            slices = [chunk[i : i + step] for i in range(0, len(chunk), step)]
            pending.append((chunk, [pool.submit(load_all, part) for part in slices]))

    try:
        for _ in range(max(1, ahead)):
            submit()
        while pending:
            chunk, futures = pending.popleft()
            submit()
            yield chunk, [r for f in futures for r in f.result()]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
