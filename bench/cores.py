"""Core-milliseconds per image of each stage-1 part, and the end-to-end bound they imply.

The arithmetic behind bench/extract.py's targets: with `cores` cores, decoding (d core-ms per image)
and the model (m core-ms per image) cannot run faster together than cores / (d + m) images per ms.
Run: python bench/cores.py [--data DIR] [--images 480]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from featx.backbone import mobilenet, onnx_engine
from featx.images import decoder

DEFAULT_DATA = os.environ.get("FEATX_DATA") or str(
    Path(__file__).resolve().parents[2] / "shared" / "data" / "cats_and_dogs_filtered"
)


def measure(name: str, run, pixels: np.ndarray, batch: int = 32) -> float:
    """Prints images/s, wall and CPU ms per image; returns core-ms per image."""
    run(pixels[:batch])  # warm-up: model building and the first call are not steady state
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(pixels), batch):
        run(pixels[i : i + batch])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = len(pixels)
    print(
        f"{name:28} {n / wall:7.1f} images/s, {1000 * wall / n:6.2f} ms wall, "
        f"{1000 * cpu / n:6.2f} core-ms per image ({cpu / wall:.2f} cores busy)"
    )
    return 1000 * cpu / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--images", type=int, default=480)
    p.add_argument("--onnx-dir", default="cache", help="where the exported .onnx file lives")
    args = p.parse_args()
    files = sorted(Path(args.data).rglob("*.jpg"))
    files = files[:: max(1, len(files) // args.images)][: args.images]
    t0, c0 = time.perf_counter(), time.process_time()
    pixels = np.stack([decoder.decode_image(decoder.read_file(f)[0], 224) for f in files])
    decode = 1000 * (time.process_time() - c0) / len(files)
    wall = 1000 * (time.perf_counter() - t0) / len(files)
    print(f"{'decoding, 1 thread':28} {1000 / wall:7.1f} images/s, {decode:6.2f} core-ms per image")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    engines = {
        "keras model alone": mobilenet.KerasEngine(mobilenet.BackboneSpec("imagenet", 224, 1.0)),
        "onnx runtime alone": onnx_engine.OnnxEngine(
            mobilenet.BackboneSpec("imagenet", 224, 1.0), onnx_dir=args.onnx_dir
        ),
    }
    for name, engine in engines.items():
        model = measure(name, engine.features, pixels)
        bound = 1000 * cores / (model + decode)
        print(f"  -> decode + model on {cores} cores: at most {bound:.1f} images/s end to end")


if __name__ == "__main__":
    main()
