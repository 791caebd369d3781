"""What Ray costs on one machine: `ray_executor.run` vs the in-process engine on the same photos.

Both decode with featx's decoder and run the ImageNet MobileNetV2 (224 px, Keras engine, batch 32)
on the first --limit photos of cats_and_dogs_filtered (or --data), half of each class. Each run is
a fresh subprocess timed from spawn to exit, so imports, model building and (for Ray) starting a
local Ray of --workers + 1 CPUs, its actors and shutting it down all count, as they do for a user.
Each path runs twice, on one batch and on all the photos; the difference gives
  marginal images/s  (the photos' own cost: (n - 32) / (t_n - t_32))
  fixed s            (what a run costs besides its photos: t_32 - 32 / marginal)
and the total images/s (n / t_n). Printed: Ray / in-process for both rates (issue #15's target:
total >= 0.7 on 2 CPUs), and the run size from which the total ratio reaches it.

    python bench/ray_overhead.py                 # 300 photos, 1 worker (a local Ray of 2 CPUs)
    python bench/ray_overhead.py --limit 3000    # all of cats_and_dogs_filtered

N GPUs, on paper. A run of n images on N actors takes about s + n / (N * r): s the fixed cost
(Ray start, actor start, TensorFlow import and model build, paid once, by all actors in parallel),
r one actor's marginal rate. Every actor reads and decodes its own images (RAY_DECODE_THREADS
threads), so decoding scales with the actors, but within an actor it does not overlap the model (a
batch is decoded, then run). Assumed, not measured (no GPU was lent for this bench): MobileNetV2 at
224 px runs at ~2,000 images/s on one recent GPU at batch 256, and one core decodes ~300 of these
500x375 JPEGs a second (DCT scaling); 4 decoding threads then give r ~ 1,200 / (1 + 1,200 / 2,000)
~ 750 images/s per GPU actor: decode-bound. Two actors per GPU (`gpus_per_worker=0.5`) overlap
one's decoding with the other's model: ~1,500 images/s per GPU (2 x 750, under the GPU's 2,000)
while the node has 8 cores per GPU. On a node of 8 GPUs and 64 cores, 16 actors: with s = 30 s,
1,000,000 images take about 30 + 1e6 / (8 * 1,500) ~ 115 s. The parts hold 5 KB per image (1280 float32 features): 5 GB for
a million images, merged by featx afterwards (reading them: about a minute from one disk).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("FEATX_DATA") or str(
    REPO.parent / "shared" / "data" / "cats_and_dogs_filtered"
)
TARGET = 0.7  # issue #15: Ray's total rate / the in-process one, 2 CPUs

# Run in a subprocess: argv = [data, files.json, out dir, batch_size, workers].
IN_PROCESS = """
import json, sys
import numpy as np
from featx import backbone, images
root, files, batch_size = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[4])
engine = backbone.KerasEngine(backbone.BackboneSpec())
size = engine.spec.image_size
chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
def load(p):
    return images.decode_image(images.read_file(f"{root}/{p}")[0], size)
for chunk, pixels in images.prefetch(chunks, load):
    batch = np.zeros((batch_size, size, size, 3), np.uint8)
    batch[: len(pixels)] = pixels
    engine.features(batch)
"""

RAY = """
import json, sys
from featx import backbone, ray_executor
root, files, out = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
batch_size, workers = int(sys.argv[4]), int(sys.argv[5])
spec = backbone.BackboneSpec()
ray_executor.run(files, root, spec, out, batch_size=batch_size, workers=workers)
assert ray_executor.read_parts(out).paths == sorted(files), "not every photo came back once"
"""


def timed(code: str, data: str, files: list[str], batch_size: int, workers: int) -> float:
    """Seconds from spawn to exit of `code` on `files`."""
    with tempfile.TemporaryDirectory() as tmp:
        listed = Path(tmp, "files.json")
        listed.write_text(json.dumps(files))
        args = [data, str(listed), f"{tmp}/parts", str(batch_size), str(workers)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True)
        seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"failed:\n{done.stderr.decode()[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--workers", type=int, default=1, help="Ray actors (a local Ray of workers+1)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from featx import images

    listing = images.find_images(args.data)
    per_class = args.limit // len(listing.class_names)  # the same number of each class
    files = [
        f.path
        for c in listing.class_names
        for f in [f for f in listing.files if f.class_name == c][:per_class]
    ]
    small = files[: args.batch_size]  # one batch: what a run costs besides its images
    rows = {}
    for name, code in (("in-process", IN_PROCESS), (f"ray, {args.workers} worker(s)", RAY)):
        t_small = timed(code, args.data, small, args.batch_size, args.workers)
        t_all = timed(code, args.data, files, args.batch_size, args.workers)
        rate = (len(files) - len(small)) / (t_all - t_small)  # the images' own cost
        fixed = t_small - len(small) / rate  # start-up, imports, model build (and Ray)
        rows[name] = (len(files) / t_all, rate, fixed, t_all)
    print(f"{len(files)} photos of {args.data}, batch {args.batch_size}, {os.cpu_count()} cores")
    print(f"{'path':<20} {'total img/s':>12} {'marginal img/s':>15} {'fixed s':>8} {'wall s':>7}")
    for name, (total, rate, fixed, t) in rows.items():
        print(f"{name:<20} {total:12.1f} {rate:15.1f} {fixed:8.1f} {t:7.1f}")
    (a_total, a_rate, a_fixed, _), (b_total, b_rate, b_fixed, _) = rows.values()
    ratio = b_total / a_total
    verdict = "meets" if ratio >= TARGET else "misses"
    print(
        f"ray / in-process: total {ratio:.2f} ({verdict} the {TARGET} target at {len(files)} "
        f"photos), marginal {b_rate / a_rate:.2f}"
    )
    # The total ratio at n photos is (fa + n / ra) / (fb + n / rb): where does it reach TARGET?
    gap = 1 / a_rate - TARGET / b_rate
    if gap > 0:
        n = (TARGET * b_fixed - a_fixed) / gap
        print(f"the total ratio reaches {TARGET} from about {max(0, round(n))} photos on")
    else:
        print(f"the marginal ratio alone is under {TARGET}: no run size reaches the target")


if __name__ == "__main__":
    main()
