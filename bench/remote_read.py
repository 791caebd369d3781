"""What reading photos from object storage costs: read + decode from a local S3 server (moto, on
127.0.0.1) against the same photos in a local folder, and what N nodes would reach.

The first --limit photos of cats_and_dogs_filtered (or --data), half of each class, are copied into
a folder and uploaded to a bucket of a moto server started here (its own process, loopback only).
Each source is read and decoded at 224 px the way extract does it (featx.images.decoding: --workers
threads, a few batches ahead), --repeats times, best kept. The model's rate on this CPU is measured
too (ImageNet MobileNetV2, --engine, batch 32). Printed: images/s and MB/s of each source, the
overhead of the S3 reads, and the N-node arithmetic:

    rate(N) = min(N x per-node rate, bandwidth / mean object size)
    per-node rate = min(decode rate of the node's reads, model rate of the node)

with the object store's aggregate bandwidth a parameter (--bandwidth-mbs, MB/s) and the per-node
rates measured here (a GPU node's model rate, e.g. ~3,000 images/s, can be given with
--model-rate). moto is a Python server on the same 2 cores as the readers, so its numbers bound
what the client side costs from above; a real store serves from other machines.

    python bench/remote_read.py                       # 200 photos, 2 threads
    python bench/remote_read.py --limit 400 --bandwidth-mbs 1000 \
        --json-out bench/results/remote_read.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = os.environ.get("FEATX_DATA") or str(
    REPO.parent / "shared" / "data" / "cats_and_dogs_filtered"
)
NODES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)


def photos(data: Path, limit: int) -> list[str]:
    """The first limit/2 photos of each class of the train split, relative to `data`."""
    out = []
    for cls in ("cats", "dogs"):
        names = sorted((data / "train" / cls).iterdir())[: limit // 2]
        out += [f"train/{cls}/{p.name}" for p in names]
    return out


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto's server did not start")


def read_decode(root: str, files: list[str], workers: int, repeats: int) -> float:
    """Best images/s of reading and decoding `files` below `root` (a folder or a URL) at 224 px,
    in batches of 32 with extract's prefetching threads."""
    from featx.images import decoding

    chunks = [[(f, None) for f in files[i : i + 32]] for i in range(0, len(files), 32)]
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = 0
        for _, results in decoding.decode(iter(chunks), root, 224, workers=workers,
                                          processes=False):  # fmt: skip
            assert all(r[0] == "ok" for r in results), results[0][:2]
            n += len(results)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def model_rate(engine: str, batches: int = 6) -> float:
    """Images/s of the ImageNet MobileNetV2 at 224 px, batch 32, after its first call."""
    import numpy as np

    from featx.backbone import engines, mobilenet

    runner = engines.make_engine(engine, mobilenet.BackboneSpec())
    batch = np.random.default_rng(0).integers(0, 255, (32, 224, 224, 3), dtype=np.uint8)
    runner.features(batch)  # builds or loads the model
    t0 = time.perf_counter()
    for _ in range(batches):
        runner.features(batch)
    return 32 * batches / (time.perf_counter() - t0)


def arithmetic(per_node: float, mean_bytes: float, bandwidth_mbs: float) -> list[dict]:
    cap = bandwidth_mbs * 1e6 / mean_bytes
    return [
        {"nodes": n, "images_per_second": round(min(n * per_node, cap)),
         "bound": "nodes" if n * per_node < cap else "bandwidth"}
        for n in NODES
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2, help="decoding threads")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--bandwidth-mbs", type=float, default=1000.0,
                    help="the object store's aggregate bandwidth to the nodes, MB/s")  # fmt: skip
    ap.add_argument("--model-rate", type=float, default=None,
                    help="a node's model rate, images/s (default: measured here)")  # fmt: skip
    ap.add_argument("--gpu-model-rate", type=float, default=3000.0,
                    help="a GPU node's model rate, images/s (assumed, not measured)")  # fmt: skip
    ap.add_argument("--json-out")
    args = ap.parse_args()

    data, files = Path(args.data), photos(Path(args.data), args.limit)
    mean_bytes = sum((data / f).stat().st_size for f in files) / len(files)
    proc, endpoint = start_moto()
    tmp = Path(tempfile.mkdtemp(prefix="featx-remote-read-"))
    try:
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        for f in files:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data / f, tmp / f)
            fs.pipe_file(f"bench/photos/{f}", (data / f).read_bytes())
        local = read_decode(str(tmp), files, args.workers, args.repeats)
        remote = read_decode("s3://bench/photos", files, args.workers, args.repeats)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    model = args.model_rate or model_rate(args.engine)
    result = {
        "photos": len(files), "mean_kb": round(mean_bytes / 1e3, 1), "workers": args.workers,
        "local_images_per_second": round(local, 1), "s3_images_per_second": round(remote, 1),
        "s3_mb_per_second": round(remote * mean_bytes / 1e6, 2),
        "s3_over_local": round(remote / local, 3),
        "model_images_per_second": round(model, 1), "model_measured": args.model_rate is None,
        "bandwidth_mb_per_second": args.bandwidth_mbs,
    }  # fmt: skip
    result["bandwidth_cap_images_per_second"] = round(args.bandwidth_mbs * 1e6 / mean_bytes)
    columns = {"cpu_local": min(local, model), "cpu_s3": min(remote, model),
               "gpu_s3": min(remote, args.gpu_model_rate)}  # fmt: skip
    for name, per_node in columns.items():
        result[f"nodes_{name}"] = arithmetic(per_node, mean_bytes, args.bandwidth_mbs)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("nodes_")}, indent=1))
    print("\nimages/s of N nodes = min(N x per node, bandwidth / object size); (n): nodes bound,")
    print("(b): bandwidth bound. Per node = min(read + decode, model) as measured here; the GPU")
    print(f"column takes the model at {args.gpu_model_rate:.0f} images/s (assumed).")
    print(f"{'nodes':>6} {'CPU, local read':>16} {'CPU, S3 read':>14} {'GPU, S3 read':>14}")
    for rows in zip(*(result[f"nodes_{name}"] for name in columns)):
        cells = [f"{r['images_per_second']:>10} ({r['bound'][0]})" for r in rows]
        print(f"{rows[0]['nodes']:>6} {cells[0]:>16} {cells[1]:>14} {cells[2]:>14}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
