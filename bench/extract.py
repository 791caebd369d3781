"""Stage-1 benchmark: how close `featx extract` gets to the model alone, and to the obvious recipe.

On cats_and_dogs_filtered (or --data), in one run, images/s of:
  (a) the Keras backbone alone on pre-decoded batches (batch 32): the Keras ceiling;
  (b) the obvious Keras recipe: image_dataset_from_directory + preprocess_input + model.predict;
  (c) `featx extract --engine keras`, end to end;
  (d) `featx extract --engine onnx`, end to end (the .onnx file exported beforehand, as on any
      run after the first one; the one-time export is timed separately);
  (e) ONNX Runtime alone on pre-decoded batches: the ONNX ceiling;
plus decoding alone (the featx decoder in DECODE_THREADS threads), the ratios c/a, c/b, d/a, d/e,
the peak memory of `featx extract` for a small and the full image count, and the validation
accuracy of a logistic regression on the (c) and (d) caches.

(b), (c) and (d) each run as a fresh subprocess, timed from spawn to exit: Python start-up, imports
and model building count, as they do for a user. (a) and (e) run in this process after a warm-up.
Peak memory is each subprocess's own RSS high-water mark (VmHWM, written at exit: wait4's
ru_maxrss would include this process's RSS at fork time).

    python bench/extract.py                # all 3,000 photos (~4 minutes on 2 cores)
    python bench/extract.py --limit 200    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featx import config  # noqa: E402
from featx.backbone import mobilenet  # noqa: E402
from featx.images import decoder, finder  # noqa: E402

DEFAULT_DATA = os.environ.get("FEATX_DATA") or str(
    REPO.parent / "shared" / "data" / "cats_and_dogs_filtered"
)
TARGETS = {  # issue 2 and issue 6, on the 2-core machine
    "c/a": 0.9,
    "c/b": 1.0,
    "d/a": 1.6,
    "d/e": 0.8,
}

# Prepended to every subprocess: writes the process's peak RSS in KiB to the file in argv[1].
PEAK = """
import atexit, resource, sys
def _write_peak(path=sys.argv.pop(1)):
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except OSError:  # no /proc (macOS): ru_maxrss, in bytes there
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    with open(path, "w") as f:
        f.write(str(kib))
atexit.register(_write_peak)
"""

# (b): what a Keras user writes first; the backbone has the same weights as featx's.
RECIPE = """
import json, sys, time
t0 = time.perf_counter()
import keras
import tensorflow as tf
from featx.backbone import mobilenet
data, weights = sys.argv[1], sys.argv[2]
size, alpha, batch = int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
model = keras.applications.MobileNetV2(
    input_shape=(size, size, 3), alpha=alpha, include_top=False, pooling="avg", weights=None
)
path = mobilenet.resolve_weights(weights, size, alpha)
if path:
    model.load_weights(path)
ds = keras.utils.image_dataset_from_directory(data, image_size=(size, size), batch_size=batch)
ds = ds.map(lambda x, y: (keras.applications.mobilenet_v2.preprocess_input(x), y))
ds = ds.prefetch(tf.data.AUTOTUNE)
t1 = time.perf_counter()
features = model.predict(ds, verbose=0)
t2 = time.perf_counter()
print(json.dumps({"images": len(features), "seconds": t2 - t0, "predict_seconds": t2 - t1}))
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pick_files(data: Path, limit: int | None) -> list[finder.ImageFile]:
    """`limit` files spread evenly over the sorted listing (every split and class)."""
    files = finder.find_images(data).files
    if limit is None or limit >= len(files):
        return files
    step = len(files) / limit
    return [files[int(i * step)] for i in range(limit)]


def link_subset(data: Path, files, folder: Path) -> Path:
    """A data folder of symlinks to `files`, with the same layout as `data`."""
    for f in files:
        target = folder / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to((data / f.path).resolve())
    return folder


def run_child(code: str, args: list[str], workdir: Path, name: str) -> dict:
    """Run `python -c code args` in a fresh process: wall seconds, peak RSS (MiB), stdout JSON."""
    out, err, peak = (workdir / f"{name}.{x}" for x in ("out", "err", "peak"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", PEAK + code, str(peak), *args]
    with open(out, "w") as fo, open(err, "w") as fe:
        t0 = time.perf_counter()
        code = subprocess.call(cmd, stdout=fo, stderr=fe, cwd=REPO, env=env)
        seconds = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"{name} failed ({code}):\n{err.read_text()[-3000:]}")
    text = "\n" + out.read_text()
    return {
        "seconds": seconds,
        "peak_rss_mib": round(int(peak.read_text()) / 1024, 1),
        "stdout": json.loads(text[text.rfind("\n{") + 1 :]),  # the last top-level JSON
    }


def featx_extract(
    data: Path, cache: Path, engine: str, args, workdir: Path, name: str, int8: bool = False
) -> dict:
    cmd = ["extract", str(data), "--cache", str(cache)]
    cmd += ["--engine", engine, "--weights", args.weights, "--image-size", str(args.image_size)]
    cmd += ["--alpha", str(args.alpha), "--batch-size", str(args.batch_size), "--json"]
    cmd += ["--precision", "int8"] if int8 else []
    code = "from featx.cli import cli; cli(prog_name='featx')"
    r = run_child(code, cmd, workdir, name)
    summary = r.pop("stdout")
    assert summary["engine"] == engine, summary["engine"]
    n = summary["extracted"]
    return {
        **r,
        "images": n,
        "images_per_second": n / r["seconds"],
        # featx's own summary: from the extract() call (imports excluded, model loading included)
        "no_startup_images_per_second": summary["images_per_second"],
        # after the first batch (which imports TensorFlow and builds the model): decoding hidden?
        "steady_images_per_second": summary.get("steady_images_per_second"),
        "model_load_seconds": summary.get("model_load_seconds"),
    }


def time_batches(features, pixels: np.ndarray, batch: int) -> float:
    """images/s of `features` over fixed-size batches, after one warm-up batch."""
    features(pixels[:batch])
    t0 = time.perf_counter()
    for i in range(0, len(pixels), batch):
        features(pixels[i : i + batch])
    return len(pixels) / (time.perf_counter() - t0)


def decode_all(root: Path, files, size: int, threads: int) -> tuple[np.ndarray, float]:
    """Decode through featx's own reader and decoder in `threads` threads; pixels and images/s."""

    def one(f):
        data, _ = decoder.read_file(root / f.path)
        return decoder.decode_image(data, size)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        pixels = np.stack(list(pool.map(one, files)))
    return pixels, len(files) / (time.perf_counter() - t0)


def logreg_accuracy(cache_path: Path) -> float | None:
    """Validation accuracy (%) of StandardScaler + LogisticRegression(C=0.1) trained on train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featx.cache import store

    cache = store.read_cache(cache_path)
    (x_train, y_train), (x_val, y_val) = cache.split("train"), cache.split("validation")
    if len(x_val) == 0 or len(set(y_train)) < 2:
        return None
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return round(100 * model.fit(x_train, y_train).score(x_val, y_val), 2)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="image folder [$FEATX_DATA or %(default)s]")
    p.add_argument("--limit", type=int, help="use this many images (spread over the folder)")
    p.add_argument(
        "--model-images",
        type=int,
        default=960,
        help="pre-decoded images for (a) and (e) [%(default)s]",
    )
    p.add_argument("--engines", default="keras,onnx", help="keras, onnx or both [%(default)s]")
    p.add_argument("--small", type=int, default=300, help="image count of the small memory run")
    p.add_argument("--weights", default=config.WEIGHTS)
    p.add_argument("--image-size", type=int, default=config.IMAGE_SIZE)
    p.add_argument("--alpha", type=float, default=config.ALPHA)
    p.add_argument("--batch-size", type=int, default=config.BATCH_SIZE)
    p.add_argument(
        "--int8",
        action="store_true",
        help="also measure ONNX Runtime INT8 static quantization (speed and accuracy)",
    )
    p.add_argument("--json-out", default=str(REPO / "bench" / "results" / "extract.json"))
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not set(engines) <= {"keras", "onnx"}:
        p.error(f"--engines takes keras and/or onnx, got {args.engines!r}")
    if "onnx" in engines:
        from featx.backbone import onnx_engine

        if not onnx_engine.onnxruntime_available():
            log("onnxruntime is not installed: skipping (d) and (e) (pip install 'featx[onnx]')")
            engines.remove("onnx")
    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"no data folder at {data}: pass --data or set FEATX_DATA")

    result: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_start": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "data": str(data),
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "alpha": args.alpha,
            "weights": args.weights,
            "decode_threads": config.decode_workers(),
            "prefetch_batches": config.PREFETCH_BATCHES,
            "subprocess_rows": "b, c, d: fresh subprocess, start-up included",
        },
        "rows": {},
    }
    rows = result["rows"]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="featx-bench-") as tmp:
        work = Path(tmp)
        files = pick_files(data, args.limit)
        n = len(files)
        run_dir = data if args.limit is None else link_subset(data, files, work / "subset")
        small_n = min(args.small, max(n // 2, 1))
        small_dir = link_subset(run_dir, pick_files(run_dir, small_n), work / "small")
        result["images"] = n
        log(f"{n} images from {data}; {config.decode_workers()} decoding threads; {args.engines}")

        model_files = files[:: max(1, n // args.model_images)][: args.model_images]
        pixels, rate = decode_all(data, model_files, args.image_size, 1)
        rows["decode_1_thread"] = {"images_per_second": rate, "images": len(model_files)}
        _, rate = decode_all(data, model_files, args.image_size, config.decode_workers())
        rows["decode_threads"] = {"images_per_second": rate, "images": len(model_files)}
        log(f"decoding: {rows['decode_threads']['images_per_second']:.0f} images/s")

        if "keras" in engines:
            engine = mobilenet.KerasEngine(
                mobilenet.BackboneSpec(args.weights, args.image_size, args.alpha)
            )
            rate = time_batches(engine.features, pixels, args.batch_size)
            rows["a"] = {"images_per_second": rate, "images": len(pixels)}
            log(f"(a) Keras model alone: {rate:.1f} images/s")
            cmd = [str(run_dir), args.weights]
            cmd += [str(args.image_size), str(args.alpha), str(args.batch_size)]
            r = run_child(RECIPE, cmd, work, "recipe")
            out = r.pop("stdout")
            rows["b"] = {
                **r,
                "images": out["images"],
                "images_per_second": out["images"] / r["seconds"],
                # the model.predict call only (imports and model building excluded)
                "no_startup_images_per_second": out["images"] / out["predict_seconds"],
            }
            log(f"(b) Keras recipe: {rows['b']['images_per_second']:.1f} images/s")
            rows["c"] = featx_extract(run_dir, work / "c.h5", "keras", args, work, "c")
            log(f"(c) featx extract --engine keras: {rows['c']['images_per_second']:.1f} images/s")

        if "onnx" in engines:
            from featx.backbone import onnx_engine

            spec = mobilenet.BackboneSpec(args.weights, args.image_size, args.alpha)
            engine = onnx_engine.OnnxEngine(spec, onnx_dir=work)
            t0 = time.perf_counter()
            engine.load()  # exports into the folder that (d)'s cache uses
            result["onnx_export_seconds"] = round(time.perf_counter() - t0, 2)
            rate = time_batches(engine.features, pixels, args.batch_size)
            rows["e"] = {"images_per_second": rate, "images": len(pixels)}
            log(f"(e) ONNX Runtime alone: {rate:.1f} images/s")
            rows["d"] = featx_extract(run_dir, work / "d.h5", "onnx", args, work, "d")
            log(f"(d) featx extract --engine onnx: {rows['d']['images_per_second']:.1f} images/s")
            if args.int8:
                result["int8"] = measure_int8(engine.path, data, pixels, run_dir, args, work, rows)

        memory = {}
        for engine, row in (("keras", "c"), ("onnx", "d")):
            if row in rows:
                small = featx_extract(small_dir, work / f"s{row}.h5", engine, args, work, "s")
                memory[engine] = {
                    f"{small['images']}_images_mib": small["peak_rss_mib"],
                    f"{n}_images_mib": rows[row]["peak_rss_mib"],
                    "growth_mib": round(rows[row]["peak_rss_mib"] - small["peak_rss_mib"], 1),
                }
        result["peak_memory"] = memory

        if "c" in rows and "d" in rows:
            from featx.cache import store

            kc, oc = store.read_cache(work / "c.h5"), store.read_cache(work / "d.h5")
            assert kc.paths == oc.paths
            result["keras_vs_onnx"] = {
                "max_feature_difference": float(np.abs(kc.features - oc.features).max()),
                "logreg_val_accuracy_keras": logreg_accuracy(work / "c.h5"),
                "logreg_val_accuracy_onnx": logreg_accuracy(work / "d.h5"),
            }

    def rate(key, field):
        """The row's rate for `field`, else the next-closest measured one (a and e are steady)."""
        row = rows.get(key, {})
        chain = ("steady_images_per_second", "no_startup_images_per_second", "images_per_second")
        for name in chain[chain.index(field) :] if field in chain else (field,):
            if row.get(name):
                return row[name]
        return row.get("images_per_second")

    fields = {
        "ratios": "images_per_second",
        "ratios_no_startup": "no_startup_images_per_second",
        "ratios_steady": "steady_images_per_second",
    }
    for name, field in fields.items():
        result[name] = {
            k: round(rate(k[0], field) / rate(k[2], field), 3)
            for k in TARGETS
            if k[0] in rows and k[2] in rows
        }
    result["targets"] = {
        k: {"target": t, "value": result["ratios"][k], "met": result["ratios"][k] >= t}
        for k, t in TARGETS.items()
        if k in result["ratios"]
    }
    for row in rows.values():
        for k, v in row.items():
            if isinstance(v, float):
                row[k] = round(v, 2)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    print_table(result)
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


def measure_int8(fp32_path: Path, data: Path, pixels, run_dir, args, work: Path, rows) -> dict:
    """`featx extract --precision int8` (backbone.int8: static QDQ quantization, per-channel
    weights, uint8 activations, MinMax calibration on the run's training images): quantization time,
    ONNX Runtime INT8 alone (e8), featx end to end (d8) and logistic-regression accuracy."""
    import onnxruntime

    from featx.backbone import int8, onnx_engine
    from featx.cache import store

    # Quantize here, as `featx extract --precision int8` would on its first run, so that (d8)
    # times the extraction, not the one-time quantization (reported apart).
    files = int8.calibration_files(finder.find_images(run_dir))  # featx's own choice
    t0 = time.perf_counter()
    path, _ = int8.quantize(fp32_path, run_dir, files, args.image_size, args.batch_size, log)
    out = {
        "calibration_images": len(files),
        "quantize_seconds": round(time.perf_counter() - t0, 1),
        "onnx_mib": round(path.stat().st_size / 2**20, 2),
    }
    session = onnxruntime.InferenceSession(str(path), onnx_engine.session_options())
    rate = time_batches(lambda b: session.run(None, {"image": b.astype(np.float32)}), pixels, 32)
    rows["e8"] = {"images_per_second": rate, "images": len(pixels)}
    log(f"(e8) ONNX Runtime INT8 alone: {rate:.1f} images/s")
    rows["d8"] = featx_extract(run_dir, work / "d8.h5", "onnx", args, work, "d8", int8=True)
    log(f"(d8) featx extract --precision int8: {rows['d8']['images_per_second']:.1f} images/s")
    fp32, q = store.read_cache(work / "d.h5").features, store.read_cache(work / "d8.h5").features
    cos = (fp32 * q).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(q, axis=1)
    out["min_cosine_to_fp32"] = round(float(cos.min()), 4)
    out["mean_cosine_to_fp32"] = round(float(cos.mean()), 4)
    out["logreg_val_accuracy_fp32"] = logreg_accuracy(work / "d.h5")
    out["logreg_val_accuracy_int8"] = logreg_accuracy(work / "d8.h5")
    out["speedup_end_to_end"] = round(
        rows["d8"]["images_per_second"] / rows["d"]["images_per_second"], 2
    )
    return out


LABELS = {
    "decode_1_thread": "decoding alone, 1 thread",
    "decode_threads": f"decoding alone, {config.decode_workers()} threads",
    "a": "(a) Keras model alone, pre-decoded",
    "b": "(b) Keras recipe (image_dataset_from_directory + predict)",
    "c": "(c) featx extract --engine keras (end to end)",
    "d": "(d) featx extract --engine onnx (end to end)",
    "e": "(e) ONNX Runtime alone, pre-decoded",
    "d8": "(d8) featx extract --precision int8 (end to end)",
    "e8": "(e8) ONNX Runtime INT8 alone, pre-decoded",
}


def print_table(r: dict) -> None:
    print(
        f"\nstage 1 on {r['images']} images, {r['machine']['cpus']} CPUs, load average "
        f"{r['machine']['load_average_start'][0]} -> {r['machine']['load_average_end'][0]}"
    )
    print(f"{'images/s':>69} {'no start-up':>12} {'steady':>7} {'peak MiB':>9}")
    for key, label in LABELS.items():
        if key in r["rows"]:
            row = r["rows"][key]
            rss = row.get("peak_rss_mib", "")
            rate = row["images_per_second"]
            warm = row.get("no_startup_images_per_second", rate)
            steady = row.get("steady_images_per_second") or warm
            print(f"{label:60} {rate:8.1f} {warm:12.1f} {steady:7.1f} {rss:>9}")
    if "onnx_export_seconds" in r:
        print(f"one-time ONNX export: {r['onnx_export_seconds']} s")
    for k, t in r["targets"].items():
        verdict = "met" if t["met"] else "MISSED"
        warm, steady = r["ratios_no_startup"][k], r["ratios_steady"][k]
        print(
            f"{k} = {t['value']:.2f}  (target >= {t['target']}: {verdict}); "
            f"without start-up {warm:.2f}; steady state {steady:.2f}"
        )
    for engine, m in r["peak_memory"].items():
        print(f"peak memory, {engine}: " + ", ".join(f"{k} {v}" for k, v in m.items()))
    if "keras_vs_onnx" in r:
        parts = [f"{k} {v}" for k, v in r["keras_vs_onnx"].items()]
        print("keras vs onnx caches: " + ", ".join(parts))
    if "int8" in r:
        print("int8: " + ", ".join(f"{k} {v}" for k, v in r["int8"].items()))


if __name__ == "__main__":
    main()
