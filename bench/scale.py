"""Stage 1 at scale, without a model: memory, bytes written, and the pipeline's own overhead.

    python bench/scale.py [--sizes 6000 60000] [--root /tmp/featx-scale] [--json-out FILE]

Tiny 64x64 JPEGs (generated once under --root and reused) through `extract` with a null engine
(features = zeros, no model), each run in a fresh process:
  - peak RSS (ru_maxrss) and bytes written (wchar of /proc/self/io: every write() of the process)
    of a new cache of each size, then of adding 50 images to it, as a share of the cache's bytes;
  - images/s of the whole pipeline (null engine) against the decode-only ceiling (read + sha256 +
    decode through featx.images.decoding, nothing else) at 1, 2 and all workers, in threads and in
    processes (each against its own ceiling; median of --repeats interleaved runs);
    also the pipeline's main loop alone (extract's steady_images_per_second: after the first
    batch, without listing the folder or writing the last part and the main file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(weights="none", alpha=0.35, image_size=32)

CHILD = """
import json, resource, sys, time
import numpy as np
from featx.backbone import engines, mobilenet
from featx.commands.extract import extract

class Null:
    name = "keras"
    def features(self, batch):
        return np.zeros((len(batch), 1280), np.float32)

def for_extract(opts, old, cache_path, listing, root, log):
    return Null(), mobilenet.fingerprint("none", 32, 0.35, engine="keras")

engines.for_extract = for_extract
data, cache, workers, decode_in = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
io0 = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
t0 = time.perf_counter()
s = extract(data, cache, weights="none", alpha=0.35, image_size=32, workers=workers or None,
            decode_in=decode_in)
seconds = time.perf_counter() - t0
io1 = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print(json.dumps({
    "extracted": s["extracted"], "kept": s["kept"], "seconds": seconds,
    "images_per_second": s["extracted"] / seconds,
    "steady_images_per_second": s["steady_images_per_second"],
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "wchar": int(io1["wchar"]) - int(io0["wchar"]),
    "write_bytes": int(io1["write_bytes"]) - int(io0["write_bytes"]),
    "decoded_in": s["decoded_in"],
}))
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def generate(root: Path, n: int) -> Path:
    """root/n/{a,b}/*.jpg: n distinct 64x64 JPEGs; the first n of a larger set are hard links."""
    from PIL import Image

    folder = root / str(n)
    if (folder / ".done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        cls = "ab"[i % 2]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (8, 8, 3), np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(pixels).save(folder / cls / f"{i:07d}.jpg", quality=85)
    (folder / ".done").touch()
    return folder


def child(data: Path, cache: Path, workers: int = 0, decode_in: str = "auto") -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), str(cache), str(workers), decode_in],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def cache_bytes(cache: Path) -> int:
    folder = cache.with_name(cache.name + ".parts")
    return cache.stat().st_size + sum(p.stat().st_size for p in folder.glob("features-*.h5"))


def scale_run(root: Path, n: int) -> dict:
    data = generate(root, n)
    work = root / f"run-{n}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    shutil.copytree(data, work / "data", copy_function=os.link)  # hard links: instant
    cache = work / "c.h5"
    first = child(work / "data", cache)
    size = cache_bytes(cache)
    extra = generate(root, 50)
    for c in "ab":
        for p in (extra / c).iterdir():
            os.link(p, work / "data" / c / f"extra-{p.name}")
    add = child(work / "data", cache)
    result = {
        "images": n,
        "new_cache": first,
        "cache_bytes": size,
        "add_50": add,
        "add_50_written_share": add["wchar"] / cache_bytes(cache),
    }
    shutil.rmtree(work)
    return result


CEILING = """
import sys, time
from featx.images import decoding
root, workers, processes = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "processes"
files = sorted(f"{c}/{name}" for c in "ab" for name in __import__("os").listdir(f"{root}/{c}"))
chunks = [[(f, None) for f in files[i : i + 32]] for i in range(0, len(files), 32)]
t0 = time.perf_counter()
for _ in decoding.decode(chunks, root, 32, workers=workers, processes=processes):
    pass
print(len(files) / (time.perf_counter() - t0))
"""


def decode_ceiling(data: Path, workers: int, decode_in: str) -> float:
    """images/s of read + sha256 + decode alone: images.decoding on the same workers (processes
    started as extract starts them, counted in), nothing else; in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CEILING, str(data), str(workers), decode_in],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def overhead(root: Path, n: int, workers: list[int], repeats: int) -> list[dict]:
    """The null-engine pipeline against the decode-only ceiling, threads and processes, each
    measured `repeats` times interleaved (the median kept): the machine is shared and noisy."""
    data = generate(root, n)
    rows = []
    for w in workers:
        for decode_in in ("threads", "processes"):
            runs, ceilings = [], []
            for _ in range(repeats):
                cache = root / f"overhead-{w}.h5"
                runs.append(child(data, cache, w, decode_in))
                shutil.rmtree(cache.with_name(cache.name + ".parts"), ignore_errors=True)
                cache.unlink()
                ceilings.append(decode_ceiling(data, w, decode_in))
            pipeline = float(np.median([r["images_per_second"] for r in runs]))
            steady = float(np.median([r["steady_images_per_second"] for r in runs]))
            ceiling = float(np.median(ceilings))
            rows.append({
                "workers": w, "decode_in": decode_in, "pipeline": pipeline, "ceiling": ceiling,
                "ratio": pipeline / ceiling, "pipeline_steady": steady,
                "steady_ratio": steady / ceiling,
            })  # fmt: skip
            log(f"  {w} workers, {decode_in}: pipeline {pipeline:.0f}/s ({steady:.0f}/s in "
                f"its main loop), decoding alone {ceiling:.0f}/s: "
                f"{pipeline / ceiling:.2f}")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[6000, 60000])
    parser.add_argument("--root", type=Path, default=Path("/tmp/featx-scale"))
    parser.add_argument("--overhead-images", type=int, default=6000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=ROOT / "bench/results/scale.json")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    result = {"cores": cores, "sizes": []}
    for n in args.sizes:
        log(f"{n} images ...")
        r = scale_run(args.root, n)
        result["sizes"].append(r)
        log(f"  new cache: peak RSS {r['new_cache']['peak_rss_mib']:.0f} MiB, "
            f"{r['new_cache']['images_per_second']:.0f} images/s, {r['cache_bytes'] / 1e6:.1f} MB; "
            f"+50 images wrote {r['add_50']['wchar'] / 1e6:.2f} MB "
            f"({100 * r['add_50_written_share']:.2f} % of the cache)")  # fmt: skip
    if len(result["sizes"]) >= 2:
        a, b = result["sizes"][0], result["sizes"][-1]
        grow = b["new_cache"]["peak_rss_mib"] - a["new_cache"]["peak_rss_mib"]
        result["peak_rss_growth_mib"] = grow
        log(f"peak RSS {b['images']} - {a['images']} images: {grow:+.0f} MiB")
    log(f"null engine against the decode-only ceiling ({args.overhead_images} images):")
    result["overhead"] = overhead(
        args.root, args.overhead_images, sorted({1, 2, cores}), args.repeats
    )
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
