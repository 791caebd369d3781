"""Cold start (#25): each command's whole-process time next to a floor measured in the same run.

Every case is a fresh process timed from spawn to exit (Python start-up and imports count, as
they do for a user), best of --repeat runs; the floors are what the work itself needs:
  --help           `featx --help`                     floor: `python -c pass`
  argument error   `featx fit-head missing.h5`        floor: `python -c pass`
  info             `featx info CACHE`                 floor: numpy + h5py open the cache and read
                                                              its labels
  report           `featx report HEAD`                floor: read metrics.json, write an HTML page
  predict          `featx predict HEAD one.jpg`       floor: a plain script that imports numpy,
                   (a logistic-regression head,              Pillow and onnxruntime, opens the
                   the default engine: ONNX Runtime)         same backbone file, decodes and runs
                                                             one image and does the head's matmul
  first extract    `featx extract` of --data with a   floor: the same extract with the backbone
                   fresh per-user folder (FEATX_HOME)        already prepared in FEATX_HOME
Targets (#25): predict <= 1.5x its floor, first extract <= 1.3x.

--compare DIR times another checkout's featx (e.g. main's) in the same run, each case of the two
interleaved, so that the machine's load falls on both alike; the setup (a small cache and a
logistic-regression head on the real weights) is made once, with this checkout.

    python bench/cold_start.py --compare /work/main       # before and after, ~15 min on 2 cores
    python bench/cold_start.py --no-extract --repeat 1     # the quick commands only, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("FEATX_DATA") or str(
    REPO.parent / "shared" / "data" / "cats_and_dogs_filtered"
)
TARGETS = {"predict": 1.5, "first extract": 1.3}

INFO_FLOOR = """
import sys, h5py, numpy as np
with h5py.File(sys.argv[1], "r") as f:
    labels = {k: np.asarray(f[k]) for k in f if isinstance(f[k], h5py.Dataset) and f[k].ndim == 1}
    print(len(labels), dict(f.attrs).keys())
"""

REPORT_FLOOR = """
import json, sys, html
metrics = json.load(open(sys.argv[1] + "/metrics.json"))
page = "<html><body><pre>" + html.escape(json.dumps(metrics, indent=2)) + "</pre></body></html>"
open(sys.argv[2], "w").write(page)
"""

PREDICT_FLOOR = """
import sys
import numpy as np
import onnxruntime as ort
from PIL import Image
backbone, head, image, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
session = ort.InferenceSession(backbone, providers=["CPUExecutionProvider"])
pixels = np.asarray(Image.open(image).convert("RGB").resize((size, size)), np.float32)[None]
features = session.run(None, {session.get_inputs()[0].name: pixels})[0]
with np.load(head) as h:
    if str(h["scaling"]) == "l2":
        features = features / np.linalg.norm(features, axis=1, keepdims=True)
    z = (features - h["mean"]) / h["scale"] @ h["coef"].T + h["intercept"]
z = np.hstack([np.zeros_like(z), z]) if z.shape[1] == 1 else z
p = np.exp(z - z.max(1, keepdims=True))
print(p / p.sum(1, keepdims=True))
"""


# The options of #25 item 2 for preparing the ONNX backbone, each in a fresh process; prints the
# seconds of its phases as JSON. argv: option, weights file, image size, output file.
PREPARE = """
import json, sys, time
t0 = time.perf_counter()
option, weights, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
phases = {}
if option == "built from the weights":
    from featx.backbone import onnx_builder
    onnx_builder.build(weights, size, 1.0, out)
else:
    import keras
    from featx.backbone import mobilenet
    phases["import keras"] = time.perf_counter() - t0
    model = mobilenet.build_backbone(weights, size, 1.0)
    import numpy as np
    model(np.zeros((1, size, size, 3), np.float32), training=False)  # export needs a call
    phases["build the Keras model"] = time.perf_counter() - t0 - sum(phases.values())
    if option == "keras model.export (main)":
        model.export(out, format="onnx", verbose=False)
    else:  # what model.export does, without tf2onnx's optimizer passes
        import tf2onnx
        from keras.src.export.onnx import get_concrete_fn
        from keras.src.export.tf2onnx_lib import patch_tf2onnx
        import tensorflow as tf
        signature = [tf.TensorSpec((None, size, size, 3), tf.float32, name="image")]
        patch_tf2onnx()
        tf2onnx.optimizer._get_optimizers = lambda: {}  # from_function takes no optimizers=
        tf2onnx.convert.from_function(get_concrete_fn(model, signature), signature,
                                      output_path=out)
    phases["convert"] = time.perf_counter() - t0 - sum(phases.values())
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
np.save(out + ".npy", session.run(None, {session.get_inputs()[0].name: x})[0])
print(json.dumps(phases))
"""
PREPARE_OPTIONS = ("keras model.export (main)", "tf2onnx without optimizer passes",
                   "built from the weights")  # fmt: skip


def bench_prepare(work: Path, repeat: int) -> str:
    """Whole-process seconds (best of `repeat`) of each way to prepare the ONNX backbone of the
    ImageNet weights, its phases, its file's size and largest difference from main's file."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from featx.backbone import mobilenet

    weights = mobilenet.resolve_weights("imagenet", 224, 1.0)
    env = env_for(REPO, work / "unused-home")
    rows = ["| option | seconds | phases | MB | max diff from main's file |"]
    rows.append("|---|---|---|---|---|")
    reference = None
    for option in PREPARE_OPTIONS:
        best, phases = None, {}
        for i in range(repeat):
            out = work / f"prepare-{PREPARE_OPTIONS.index(option)}-{i}.onnx"
            args = ["-c", PREPARE, option, weights, 224, out]
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, *map(str, args)], env=env,
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"{option} failed: {done.stderr[-1500:]}")
            seconds = time.perf_counter() - t0
            if best is None or seconds < best:
                best, phases = seconds, json.loads(done.stdout.strip().splitlines()[-1])
        features = np.load(str(out) + ".npy")
        reference = features if reference is None else reference
        diff = float(np.abs(features - reference).max())
        text = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
        mb = out.stat().st_size / 1e6
        rows.append(f"| {option} | {best:.1f} | {text} | {mb:.1f} | {diff:.1e} |")
        log(rows[-1])
    return "\n".join(rows)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def env_for(code: Path, home: Path) -> dict:
    """featx from `code`, its per-user folder `home`; Python's bytecode cached in the bench's own
    folder (PYTHONPYCACHEPREFIX), as an installed package has it, never written into `code`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    pycache = Path(tempfile.gettempdir()) / "featx-cold-pycache"
    return {
        **env,
        "PYTHONPATH": str(code),
        "PYTHONPYCACHEPREFIX": str(pycache),
        "FEATX_HOME": str(home),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def timed(args: list, env: dict, must_fail: bool = False) -> float:
    """Seconds from spawn to exit of `python ARGS`; an unexpected exit status is an error."""
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, *map(str, args)], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    if (done.returncode != 0) != must_fail:
        raise RuntimeError(f"{args} failed ({done.returncode}): {done.stderr[-1500:]}")
    return seconds


def link_subset(data: Path, per_folder: int, folder: Path) -> Path:
    """A data folder of symlinks to the first `per_folder` images of each split/class folder."""
    for split in sorted(p for p in data.iterdir() if p.is_dir()):
        for cls in sorted(p for p in split.iterdir() if p.is_dir()):
            target = folder / split.name / cls.name
            target.mkdir(parents=True)
            for image in sorted(cls.iterdir())[:per_folder]:
                (target / image.name).symlink_to(image.resolve())
    return folder


def setup(data: Path, work: Path) -> dict:
    """A small cache and a logistic-regression head on the real weights, the backbone prepared
    in a per-user folder: what the quick commands run on (made with this checkout)."""
    home = work / "home"
    env = env_for(REPO, home)
    subset = link_subset(data, 20, work / "subset")
    cache = work / "subset.h5"
    featx = ["-m", "featx"]
    subprocess.run([sys.executable, *featx, "extract", subset, "--cache", cache], env=env,
                   check=True, capture_output=True)  # fmt: skip
    head = work / "head"
    subprocess.run([sys.executable, *featx, "fit-head", cache, "--head", "logreg", "--C", "1",
                    "--output", head], env=env, check=True, capture_output=True)  # fmt: skip
    backbone = next(home.glob("backbone-*.onnx"))
    image = next((subset / "validation" / "cats").iterdir())
    return {"home": home, "cache": cache, "head": head, "backbone": backbone, "image": image}


def quick_cases(s: dict, work: Path) -> dict:
    """name -> (featx's args, the floor's args): each a `python ...` command line."""
    size = json.loads((s["head"] / "head.json").read_text())["fingerprint"]["image_size"]
    return {
        "--help": (["-m", "featx", "--help"], ["-c", "pass"]),
        "argument error": (["-m", "featx", "fit-head", work / "missing.h5"], ["-c", "pass"]),
        "info": (["-m", "featx", "info", s["cache"]], ["-c", INFO_FLOOR, s["cache"]]),
        "report": (
            ["-m", "featx", "report", s["head"]],
            ["-c", REPORT_FLOOR, s["head"], work / "floor.html"],
        ),
        "predict": (
            ["-m", "featx", "predict", s["head"], s["image"]],
            ["-c", PREDICT_FLOOR, s["backbone"], s["head"] / "head.npz", s["image"], size],
        ),
    }


def bench_quick(codes: dict, s: dict, work: Path, repeat: int) -> dict:
    """{label: {case: {"featx": best s, "floor": best s}}}, the versions interleaved."""
    cases = quick_cases(s, work)
    times = {label: {c: {"featx": [], "floor": []} for c in cases} for label in codes}
    for _ in range(repeat):
        for case, (featx_args, floor_args) in cases.items():
            for label, code in codes.items():
                head = work / f"head-{label}"  # report rewrites its folder: a copy per version
                if not head.exists():
                    shutil.copytree(s["head"], head)
                args = [head if a == s["head"] else a for a in featx_args]
                env = env_for(code, s["home"])
                must_fail = case == "argument error"
                times[label][case]["featx"].append(timed(args, env, must_fail))
                times[label][case]["floor"].append(timed(floor_args, env))
            log(
                f"{case}: "
                + ", ".join(f"{k} {min(v[case]['featx']):.2f} s" for k, v in times.items())
            )
    return {k: {c: {n: min(t) for n, t in v.items()} for c, v in cases_.items()}
            for k, cases_ in times.items()}  # fmt: skip


def bench_extract(codes: dict, data: Path, work: Path, repeat: int) -> dict:
    """{label: {"first extract": {"featx": best s with a fresh FEATX_HOME, "floor": best s with
    the backbone prepared}}}; each version's prepared home is the one its first run made."""
    times = {label: {"featx": [], "floor": []} for label in codes}
    for i in range(repeat):
        for label, code in codes.items():
            fresh, prepared = work / f"fresh-{label}-{i}", work / f"prepared-{label}"
            args = ["-m", "featx", "extract", data, "--engine", "auto", "--cache"]
            seconds = timed([*args, work / f"first-{label}-{i}.h5"], env_for(code, fresh))
            times[label]["featx"].append(seconds)
            if not prepared.exists():
                fresh.rename(prepared)
            again = timed([*args, work / f"again-{label}-{i}.h5"], env_for(code, prepared))
            times[label]["floor"].append(again)
            log(f"first extract, {label}: {seconds:.1f} s; prepared: {again:.1f} s")
    return {
        label: {"first extract": {n: min(t) for n, t in v.items()}} for label, v in times.items()
    }


def table(results: dict) -> str:
    lines = [
        "| case | " + " | ".join(f"{k}: featx s | floor s | ratio" for k in results) + " | target |"
    ]
    lines.append("|---|" + "---|---|---|" * len(results) + "---|")
    cases = next(iter(results.values()))
    for case in cases:
        cells = []
        for label in results:
            r = results[label][case]
            cells.append(f"{r['featx']:.2f} | {r['floor']:.2f} | {r['featx'] / r['floor']:.2f}x")
        target = f"<= {TARGETS[case]}x" if case in TARGETS else ""
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {target} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case; best counts")
    parser.add_argument("--compare", help="another checkout's folder, timed in the same run")
    parser.add_argument("--no-extract", action="store_true", help="skip the first extract")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--prepare-options",
        action="store_true",
        help="only time the ways to prepare the ONNX backbone (#25 item 2)",
    )
    args = parser.parse_args()
    codes = {"this": REPO}
    if args.compare:
        codes = {"compared": Path(args.compare).resolve(), "this": REPO}
    with tempfile.TemporaryDirectory(prefix="featx-cold-") as tmp:
        work = Path(tmp)
        # `python -m featx` puts the working folder first on sys.path: it must hold no featx, so
        # that PYTHONPATH alone says which checkout runs.
        os.chdir(work)
        if args.prepare_options:
            print(bench_prepare(work, args.repeat))
            return
        s = setup(Path(args.data), work)
        results = bench_quick(codes, s, work, args.repeat)
        if not args.no_extract:
            first = bench_extract(codes, Path(args.data), work, args.repeat)
            for label in results:
                results[label].update(first[label])
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"codes": {k: str(v) for k, v in codes.items()},
                                               "repeat": args.repeat, "results": results},
                                              indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
