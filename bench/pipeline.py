"""featx against the classic transfer-learning recipe, side by side, on the same photos (issue 7).

Runs one after the other, each step in its own process (so process start-up counts and each step's
peak memory is its own):

1. classic: the recipe of the Keras/TensorFlow tutorials, written plainly with Keras, NOT featx:
   image_dataset_from_directory at 224 px, RandomFlip + RandomRotation, preprocess_input, the
   frozen MobileNetV2 called with training=False, GlobalAveragePooling, Dropout(0.2), Dense(2),
   AdamW(1e-4), `--epochs` epochs, validation on the validation folder after every epoch.
2. featx cold: a fresh cache in a temp folder: `featx extract` then `featx fit-head --head logreg`
   and `--head dense`; once with the default engine and once with every other engine that
   `featx extract --engine` offers (keras, onnx). The ONNX engine's one-time export of the backbone
   (once per machine and cache folder, not per data set) runs first and is a row of its own.
3. featx warm: `featx fit-head --head logreg` again on the existing cache, end to end.
4. `--with-finetune`: `featx finetune` on the cold cache and its logreg head.

featx is driven only through its command line, and what it offers (`--engine`, `fit-head`,
`finetune`) is read from its `--help` at run time: a missing command is reported, not a crash.

Writes bench/results/pipeline.json (per row: wall seconds, images pushed through the base, peak
memory, final validation accuracy; the speed-up ratios; date, machine and command line) and prints
a table plus a Markdown version for the README. Exit status: 0 when every row ran, 1 when a step
failed, 2 when featx lacks a step (e.g. no `fit-head` yet); the JSON is written in every case.

    python bench/pipeline.py                  # the full benchmark (~8-10 min on 2 cores)
    python bench/pipeline.py --quick          # a few hundred images, 2 epochs: checks that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("FEATX_DATA") or str(
    REPO.parent / "shared" / "data" / "cats_and_dogs_filtered"
)
DEFAULT_JSON = REPO / "bench" / "results" / "pipeline.json"
EPOCHS = 10  # the classic recipe's epochs (the tutorials' number)
QUICK_EPOCHS = 2  # --quick: enough to see the loop run
QUICK_TRAIN, QUICK_VAL = 100, 50  # --quick: images per class in the subset
IMAGE_SIZE = 224
BATCH_SIZE = 32
LEARNING_RATE = 1e-4
SEED = 0
TAIL_LINES = 6  # lines of a failed step's stderr kept in the report


# --- 1. the classic recipe (runs in its own process: `pipeline.py --run-classic OUT.json`) --------


def classic_recipe(data: Path, epochs: int) -> dict:
    """The tutorials' recipe: every epoch pushes every image through the frozen base again."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(SEED)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    train = keras.utils.image_dataset_from_directory(
        data / "train", image_size=size, batch_size=BATCH_SIZE, shuffle=True, seed=SEED
    )
    validation = keras.utils.image_dataset_from_directory(
        data / "validation", image_size=size, batch_size=BATCH_SIZE, shuffle=False
    )
    n_train, n_val = len(train.file_paths), len(validation.file_paths)
    classes = train.class_names
    train = train.prefetch(tf.data.AUTOTUNE)
    validation = validation.prefetch(tf.data.AUTOTUNE)

    augmentation = keras.Sequential(
        [keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)]
    )
    base = keras.applications.MobileNetV2(
        input_shape=size + (3,), include_top=False, weights="imagenet"
    )
    base.trainable = False
    inputs = keras.Input(shape=size + (3,))
    x = augmentation(inputs)
    x = keras.applications.mobilenet_v2.preprocess_input(x)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(len(classes))(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    t0 = time.perf_counter()
    history = model.fit(train, validation_data=validation, epochs=epochs, verbose=2)
    return {
        "train_images": n_train,
        "validation_images": n_val,
        "class_names": classes,
        "epochs": epochs,
        "fit_seconds": round(time.perf_counter() - t0, 3),
        "val_accuracy": [float(a) for a in history.history["val_accuracy"]],
        "keras_backend": keras.backend.backend(),
    }


# --- running one step and measuring it ------------------------------------------------------------


# Runs argv[2:] as its own child and writes that child's peak RSS (KiB) to argv[1]. A process
# forked from a big one (pytest with TensorFlow loaded) inherits the parent's high-water mark
# through exec, so wait4 on a direct child over-reports; forked from this ~10 MB launcher, the
# grandchild's peak is its own (to within the launcher's size).
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run_step(name: str, argv: list[str], workdir: Path) -> dict:
    """Run `argv` as a child process; wall seconds from start to exit, and the child's peak RSS."""
    out_path, err_path = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    peak_path = workdir / f"{name}.peak"
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(argv)}", file=sys.stderr, flush=True)
    launch = [sys.executable, "-S", "-c", LAUNCHER, str(peak_path), *argv]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        returncode = subprocess.call(launch, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    peak_kib = int(peak_path.read_text()) if peak_path.is_file() else 0
    step = {
        "name": name,
        "command": shlex.join(argv),
        "seconds": round(seconds, 3),
        "peak_mb": round(peak_kib / 1024, 1),  # Linux reports kilobytes
        "returncode": returncode,
        "stdout": stdout,
        "stderr": stderr,
    }
    if returncode != 0:
        tail = error_lines(stderr)
        step["error"] = "\n".join(tail) or f"exit status {returncode}"
        print(f"  FAILED (exit {returncode}):\n    " + "\n    ".join(tail), file=sys.stderr)
    else:
        print(f"  {seconds:.1f} s, peak {step['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    return step


# TensorFlow's start-up chatter on stderr, never the reason a step failed.
NOISE = re.compile(r"^([IWE]\d{4} |WARNING: All log messages|To enable the following instructions)")


def error_lines(stderr: str) -> list[str]:
    """Why a step failed: featx's one-line `Error: ...`, else the end of stderr (a traceback)."""
    lines = [line for line in stderr.splitlines() if line.strip() and not NOISE.match(line)]
    errors = [line for line in lines if line.startswith("Error:")]
    return errors[-1:] if errors else lines[-TAIL_LINES:]


def last_json(text: str):
    """The JSON object a `--json` command printed (the last line that starts one, to the end)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except ValueError:
                continue
    return None


def validation_accuracy(metrics) -> float | None:
    """metrics["validation"]["accuracy"], also when wrapped in {"metrics": ...}."""
    for obj in (metrics, (metrics or {}).get("metrics") if isinstance(metrics, dict) else None):
        try:
            return float(obj["validation"]["accuracy"])
        except (KeyError, TypeError, ValueError):
            continue
    return None


# --- what this featx offers -----------------------------------------------------------------------


def featx_command() -> list[str]:
    """The console script next to this Python (what users run), else `python -m featx`."""
    script = Path(sys.executable).with_name("featx")
    return [str(script)] if script.exists() else [sys.executable, "-m", "featx"]


def help_text(featx: list[str], *args: str) -> str | None:
    done = subprocess.run([*featx, *args, "--help"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def featx_capabilities(featx: list[str]) -> dict:
    """Commands and options read from `featx --help` and each command's `--help`."""
    top = help_text(featx) or ""
    commands = re.findall(r"^  ([a-z][\w-]*)\s", top.split("Commands:")[-1], re.M)
    extract_help = help_text(featx, "extract") or ""
    engine = re.search(r"--engine\s+\[([\w|]+)\]", extract_help)
    default = re.search(r"--engine.*?\[default:\s*(\w+)\]", extract_help, re.S)
    fit_help = help_text(featx, "fit-head") if "fit-head" in commands else None
    tune_help = help_text(featx, "finetune") if "finetune" in commands else None
    return {
        "commands": commands,
        "engines": engine.group(1).split("|") if engine else [],
        "default_engine": default.group(1) if default else None,
        "fit_head": fit_help is not None,
        "fit_head_output": bool(fit_help and "--output" in fit_help),
        "finetune": tune_help is not None,
        "finetune_output": bool(tune_help and "--output" in tune_help),
        "finetune_json": bool(tune_help and "--json" in tune_help),
        "finetune_epochs": bool(tune_help and "--epochs" in tune_help),
    }


# --- data ----------------------------------------------------------------------------------------


def count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def quick_subset(data: Path, dest: Path, per_train: int, per_val: int) -> Path:
    """dest/{train,validation}/CLASS/: the first images of each class, as symlinks (no copies)."""
    for split, n in (("train", per_train), ("validation", per_val)):
        for class_dir in sorted(p for p in (data / split).iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.iterdir() if p.is_file())[:n]
            target = dest / split / class_dir.name
            target.mkdir(parents=True)
            for f in files:
                (target / f.name).symlink_to(f.resolve())
    return dest


# --- the benchmark -------------------------------------------------------------------------------


def row(rid, label, seconds=None, images=None, peak_mb=None, accuracy=None, status="ok", note=""):
    return {
        "id": rid,
        "label": label,
        "seconds": None if seconds is None else round(seconds, 3),
        "images_through_base": images,
        "peak_mb": peak_mb,
        "val_accuracy": None if accuracy is None else round(accuracy, 4),
        "status": status,
        "note": note,
    }


def fit_head(featx, caps, cache: Path, head: str, work: Path, name: str) -> tuple[dict, Path]:
    """`featx fit-head CACHE --head HEAD --json [--output DIR]` as one measured step."""
    out = work / name
    argv = [*featx, "fit-head", str(cache), "--head", head, "--json"]
    if caps["fit_head_output"]:
        argv += ["--output", str(out)]
    return run_step(name, argv, work), out


def featx_rows(featx, caps, data, work, engine, n_train, n_val, warm, finetune):
    """Steps 2-4 for one engine; engine None: the default (no --engine option, as users type it).

    Returns (rows, steps, the engine that ran, from the summary of `featx extract --json`).
    """
    rows, steps, tag = [], [], engine or "default"
    cache = work / f"cache-{tag}.h5"
    argv = [*featx, "extract", str(data), "--cache", str(cache), "--json"]
    argv += ["--engine", engine] if engine else []
    ext = run_step(f"extract-{tag}", argv, work)
    steps.append(ext)
    summary = last_json(ext["stdout"]) if ext["returncode"] == 0 else None
    used = (summary or {}).get("engine") or engine or "default"
    label_engine = used + (", default" if engine is None else "")
    if summary is None:
        note = ext.get("error") or "featx extract printed no JSON summary"
        rows.append(row(f"extract_{tag}", f"featx extract [{tag}]", status="failed", note=note))
        return rows, steps, used
    images = int(summary.get("extracted", summary.get("images", 0)))
    export = re.search(r"exported the backbone to .*?\(([\d.]+) s", ext["stderr"])
    ext_note = (
        f"{summary.get('images_per_second', 0):.1f} images/s as featx extract counts them "
        "(start-up excluded)"
        + (f"; includes the one-time ONNX export ({export.group(1)} s)" if export else "")
    )
    rows.append(
        row(
            f"extract_{used}",
            f"featx extract [{label_engine}] (stage 1 alone)",
            seconds=ext["seconds"],
            images=images,
            peak_mb=ext["peak_mb"],
            note=ext_note,
        )
    )
    rows[-1]["onnx_export_seconds"] = float(export.group(1)) if export else None
    missing_fit = "`featx fit-head` is not in this featx yet (see featx --help)"
    heads = {}
    for head in ("logreg", "dense"):
        rid, label = f"cold_{head}_{used}", f"featx cold: extract [{label_engine}] + {head}"
        if not caps["fit_head"]:
            rows.append(row(rid, label, status="missing", note=missing_fit))
            continue
        fit, out = fit_head(featx, caps, cache, head, work, f"{head}-{used}")
        steps.append(fit)
        acc = head_accuracy(fit, out)
        ok = acc is not None
        heads[head] = out if ok else None
        note = f"extract {ext['seconds']:.1f} s + fit-head {fit['seconds']:.1f} s"
        rows.append(
            row(
                rid,
                label,
                seconds=ext["seconds"] + fit["seconds"],
                images=images,
                peak_mb=max(ext["peak_mb"], fit["peak_mb"]),
                accuracy=acc,
                status="ok" if ok else "failed",
                note=note if ok else f"{note}; {fit.get('error') or 'no validation accuracy'}",
            )
        )
    if warm:
        rid, label = "warm_logreg", "featx warm: fit-head logreg on the existing cache"
        if not caps["fit_head"]:
            rows.append(row(rid, label, status="missing", note=missing_fit))
        else:
            fit, out = fit_head(featx, caps, cache, "logreg", work, f"warm-logreg-{used}")
            steps.append(fit)
            acc = head_accuracy(fit, out)
            note = "end to end, process start included"
            rows.append(
                row(
                    rid,
                    label,
                    seconds=fit["seconds"],
                    images=0,
                    peak_mb=fit["peak_mb"],
                    accuracy=acc,
                    status="ok" if acc is not None else "failed",
                    note=note if acc is not None else f"{note}; {fit.get('error')}",
                )
            )
    if finetune:
        step, ft_row = finetune_row(
            featx, caps, cache, heads.get("logreg"), work, used, n_train, n_val, finetune
        )
        steps += [step] if step else []
        cold = next((r for r in rows if r["id"] == f"cold_logreg_{used}"), None)
        if ft_row["status"] == "ok" and cold and cold["status"] == "ok":
            total = cold["seconds"] + ft_row["seconds"]
            ft_row["note"] += f"; cold logreg + finetune: {total:.1f} s"
            ft_row["seconds_including_cold"] = round(total, 3)
        rows.append(ft_row)
    return rows, steps, used


def onnx_export_row(featx, data: Path, work: Path) -> tuple[dict, dict]:
    """The one-time ONNX export, done before the cold runs and reported as a row of its own.

    `featx extract --engine onnx` exports the backbone once into the per-user folder
    ($FEATX_HOME, set to a fresh folder per benchmark run) and reuses it for every later cache; a
    user pays it once, not per data set. So it runs here on one image per class and split, and
    the cold onnx rows measure extraction with the exported model in place.
    """
    tiny = quick_subset(data, work / "onnx-export-data", per_train=1, per_val=1)
    argv = [*featx, "extract", str(tiny), "--cache", str(work / "onnx-export.h5"), "--json"]
    step = run_step("onnx-export", [*argv, "--engine", "onnx"], work)
    export = re.search(r"exported the backbone to .*?\(([\d.]+) s", step["stderr"])
    label = "featx one-time: export the backbone to ONNX"
    if step["returncode"] != 0:
        return row("onnx_export", label, status="failed", note=step.get("error", "")), step
    note = (
        f"once per user; model.export {export.group(1)} s"
        if export
        else ("no export logged: an exported model was already there")
    )
    images = count_images(tiny)
    return row(
        "onnx_export",
        label,
        seconds=step["seconds"],
        images=images,
        peak_mb=step["peak_mb"],
        note=note,
    ), step


def head_accuracy(step: dict, out: Path) -> float | None:
    """Validation accuracy from OUT/metrics.json, else from the JSON the command printed."""
    if step["returncode"] != 0:
        return None
    try:
        acc = validation_accuracy(json.loads((out / "metrics.json").read_text()))
    except (OSError, ValueError):
        acc = None
    return acc if acc is not None else validation_accuracy(last_json(step["stdout"]))


def finetune_row(featx, caps, cache, head_dir, work, engine, n_train, n_val, epochs):
    """`featx finetune CACHE --head DIR` (with `--epochs` when `epochs` is an int, e.g. --quick)."""
    rid, label = "finetune", "featx finetune (after cold, from the logreg head)"
    if not caps["finetune"]:
        return None, row(rid, label, status="missing", note="`featx finetune` is not in featx yet")
    if head_dir is None:
        return None, row(rid, label, status="failed", note="no logreg head to start from")
    out = work / f"finetune-{engine}"
    argv = [*featx, "finetune", str(cache), "--head", str(head_dir)]
    argv += ["--output", str(out)] if caps["finetune_output"] else []
    argv += ["--json"] if caps["finetune_json"] else []
    if epochs is not True and caps["finetune_epochs"]:
        argv += ["--epochs", str(epochs)]
    step = run_step(f"finetune-{engine}", argv, work)
    acc = head_accuracy(step, out)
    metrics = last_json(step["stdout"]) or {}
    with contextlib.suppress(OSError, ValueError):
        metrics = json.loads((out / "metrics.json").read_text())
    epochs_run = metrics.get("epochs_run") if isinstance(metrics, dict) else None
    images = None if epochs_run is None else int(epochs_run) * (n_train + n_val)
    note = (
        f"{epochs_run} epoch{'s' * (epochs_run != 1)}; images counted for the training epochs "
        "only, plus evaluation passes"
        if epochs_run is not None
        else "epochs run unknown"
    )
    if acc is None:
        note += f"; {step.get('error') or 'no validation accuracy found'}"
    result = row(
        rid,
        label,
        seconds=step["seconds"],
        images=images,
        peak_mb=step["peak_mb"],
        accuracy=acc,
        status="ok" if acc is not None else "failed",
        note=note,
    )
    if isinstance(metrics, dict) and acc is not None:
        # The evidence of issue 4: the warm start reproduces the head, and never ends worse.
        before = (metrics.get("before") or {}).get("validation") or {}
        result["finetune"] = {
            "head_val_accuracy": metrics.get("head_validation_accuracy"),
            "warm_start_val_accuracy": before.get("accuracy"),
            "epochs_run": epochs_run,
            "best_epoch": metrics.get("best_epoch"),
            "epoch_seconds": metrics.get("epoch_seconds"),
            "val_accuracy_per_epoch": (metrics.get("history") or {}).get("val_accuracy"),
        }
        note += (
            f"; validation accuracy {before.get('accuracy')} (warm start; head "
            f"{metrics.get('head_validation_accuracy')}) -> {acc}, best epoch "
            f"{metrics.get('best_epoch')}"
        )
        result["note"] = note
    return step, result


def ratios(rows: list[dict]) -> list[dict]:
    """classic seconds / featx seconds, with both accuracies, for every featx cold/warm row."""
    by_id = {r["id"]: r for r in rows}
    classic = by_id.get("classic")
    export = by_id.get("onnx_export")
    out = []
    for r in rows:
        if not (r["id"].startswith("cold_logreg_") or r["id"] == "warm_logreg"):
            continue
        ok = classic and classic["status"] == "ok" and r["status"] == "ok" and r["seconds"]
        out.append(
            {
                "id": "classic_over_" + r["id"].replace("_logreg", ""),
                "label": f"classic / {r['label']}",
                "value": round(classic["seconds"] / r["seconds"], 2) if ok else None,
                "classic_seconds": classic["seconds"] if classic else None,
                "featx_seconds": r["seconds"],
                "classic_val_accuracy": classic["val_accuracy"] if classic else None,
                "featx_val_accuracy": r["val_accuracy"],
            }
        )
        if ok and r["id"] == "cold_logreg_onnx" and export and export["status"] == "ok":
            with_export = r["seconds"] + export["seconds"]
            out[-1]["value_including_onnx_export"] = round(classic["seconds"] / with_export, 2)
    return out


def write_results(path, result: dict) -> Path:
    """Write a benchmark's results as indented JSON to `path` (its folder made) and return it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def machine() -> dict:
    cpu = "unknown"
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = names[0].strip() if names else platform.processor() or "unknown"
    except OSError:
        pass
    ram_gb = None
    try:
        kb = re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)
        ram_gb = round(int(kb.group(1)) / 1024**2, 1)
    except (OSError, AttributeError):
        pass
    versions = {}
    for pkg in ("featx", "keras", "tensorflow", "onnxruntime", "jax"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[pkg] = metadata.version(pkg)
    return {
        "nproc": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_model": cpu,
        "ram_gb": ram_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
        "versions": versions,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# --- output ----------------------------------------------------------------------------------


def fmt(value, spec=",.0f", none="-"):
    return none if value is None else format(value, spec)


def speedup(r, classic):
    """classic seconds / this row's seconds, for the rows that do what the classic recipe does."""
    if not r["id"].startswith(("classic", "cold_", "warm_")):
        return None
    if not classic or classic["status"] != "ok" or r["status"] != "ok" or not r["seconds"]:
        return None
    return classic["seconds"] / r["seconds"]


def text_table(rows: list[dict]) -> str:
    classic = next((r for r in rows if r["id"] == "classic"), None)
    head = (
        f"{'run':<58} {'seconds':>8} {'base imgs':>10} {'peak MB':>8} {'val acc':>8} "
        f"{'speed-up':>8}"
    )
    lines = [head, "-" * len(head)]
    lines += table_rows(
        rows,
        classic,
        "{label:<58} {seconds:>8} {base:>10} {peak:>8} {acc:>8} {speed:>8}",
        "{label:<58} {STATUS}: {reason}",
        "x",
    )
    return "\n".join(lines)


def table_rows(rows: list[dict], classic, ok: str, failed: str, times: str) -> list[str]:
    """One line per row, from the `ok` template (label, seconds, base, peak, acc, speed) or the
    `failed` one (label, status, STATUS, reason); `times` marks a speed-up ("x" or "×")."""
    lines = []
    for r in rows:
        if r["status"] != "ok":
            reason = r["note"].splitlines()[-1] if r["note"] else ""
            lines.append(failed.format(label=r["label"], status=r["status"],
                                       STATUS=r["status"].upper(), reason=reason))  # fmt: skip
            continue
        x = speedup(r, classic)
        lines.append(
            ok.format(
                label=r["label"],
                seconds=fmt(r["seconds"], ".1f"),
                base=fmt(r["images_through_base"]),
                peak=fmt(r["peak_mb"]),
                acc=fmt(r["val_accuracy"], ".4f"),
                speed=fmt(x, ".1f") + times if x else "-",
            )
        )
    return lines


def markdown(result: dict) -> str:
    m, rows = result["machine"], result["rows"]
    classic = next((r for r in rows if r["id"] == "classic"), None)
    counts = result["counts"]
    lines = [
        f"Measured {result['date'][:10]} on {m['nproc']} CPU cores ({m['cpu_model']}), "
        f"{m['ram_gb']} GB RAM, Keras {m['versions'].get('keras', '?')} "
        f"({m['keras_backend']} backend); {counts['train']:,} train / {counts['validation']:,} "
        f"validation images; `{result['command']}`.",
        "",
        "| run | seconds | images through the base | peak memory (MB) | validation accuracy "
        "| speed-up vs classic |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += table_rows(
        rows,
        classic,
        "| {label} | {seconds} | {base} | {peak} | {acc} | {speed} |",
        "| {label} | {status} | | | | |",
        "×",
    )
    notes = [f"- {r['label']}: {r['note']}." for r in rows if r["status"] == "ok" and r["note"]]
    lines += ["", *notes] if notes else []
    return "\n".join(lines)


def benchmark(args) -> dict:
    data = Path(args.data).expanduser()
    for split in ("train", "validation"):
        if not (data / split).is_dir():
            sys.exit(
                f"error: no '{split}' folder in '{data}'. Expected DATA/train/CLASS/*.jpg and "
                "DATA/validation/CLASS/*.jpg (cats_and_dogs_filtered); pass --data or set "
                "FEATX_DATA."
            )
    featx = featx_command()
    caps = featx_capabilities(featx)
    if "extract" not in caps["commands"]:
        sys.exit(
            f"error: `{shlex.join(featx)} --help` lists no extract command; is featx installed?"
        )
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else EPOCHS)
    started = dt.datetime.now().astimezone()
    rows, steps, missing = [], [], []
    with tempfile.TemporaryDirectory(prefix="featx-bench-") as tmp:
        work = Path(tmp)
        # featx keeps the exported ONNX backbone per user; a fresh folder per run makes the
        # one-time export row below measure that export every time.
        os.environ["FEATX_HOME"] = str(work / "featx-home")
        if args.quick:
            data = quick_subset(data, work / "data", args.quick_train, args.quick_val)
        n_train, n_val = count_images(data / "train"), count_images(data / "validation")

        if args.skip_classic:
            rows.append(row("classic", "classic recipe", status="skipped", note="--skip-classic"))
        else:
            out = work / "classic.json"
            argv = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--run-classic",
                str(out),
                "--data",
                str(data),
                "--epochs",
                str(epochs),
            ]
            step = run_step("classic", argv, work)
            steps.append(step)
            info = json.loads(out.read_text()) if step["returncode"] == 0 else None
            rows.append(
                row(
                    "classic",
                    f"classic recipe: Keras tutorial, {epochs} epoch{'s' * (epochs != 1)}",
                    seconds=step["seconds"],
                    images=epochs * (n_train + n_val)
                    if info is None
                    else epochs * (info["train_images"] + info["validation_images"]),
                    peak_mb=step["peak_mb"],
                    accuracy=info["val_accuracy"][-1] if info else None,
                    status="ok" if info else "failed",
                    note=f"model.fit {info['fit_seconds']:.1f} s"
                    if info
                    else step.get("error", ""),
                )
            )
            if info:
                rows[-1]["val_accuracy_per_epoch"] = [round(a, 4) for a in info["val_accuracy"]]

        if "onnx" in caps["engines"]:
            row_, step = onnx_export_row(featx, data, work)
            rows.append(row_)
            steps.append(step)
        # The default engine first (the command a user types), then every other engine offered.
        if not caps["engines"]:
            missing.append("featx extract --engine (only the built-in engine is measured)")
        if not caps["fit_head"]:
            missing.append("featx fit-head")
        if args.with_finetune and not caps["finetune"]:
            missing.append("featx finetune")
        more_rows, more_steps, default_engine = featx_rows(
            featx,
            caps,
            data,
            work,
            None,
            n_train,
            n_val,
            warm=True,
            finetune=args.with_finetune and (epochs if args.quick else True),
        )
        rows += more_rows
        steps += more_steps
        for engine in caps["engines"]:
            if engine in ("auto", default_engine):
                continue
            more_rows, more_steps, _ = featx_rows(
                featx, caps, data, work, engine, n_train, n_val, warm=False, finetune=False
            )
            rows += more_rows
            steps += more_steps

    order = {"classic": 0, "onnx": 1, "extract": 1, "cold": 2, "warm": 3, "finetune": 4}
    rows.sort(key=lambda r: order.get(r["id"].split("_")[0], 9))  # stable: engines keep order
    argv = [Path(sys.argv[0]).as_posix()] + sys.argv[1:]
    result = {
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join(["python", *argv]),
        "data": str(Path(args.data).expanduser()),
        "quick": bool(args.quick),
        "epochs": epochs,
        "counts": {"train": n_train, "validation": n_val},
        "machine": machine(),
        "featx": {**caps, "command": shlex.join(featx), "default_engine_used": default_engine},
        "missing": missing,
        "rows": rows,
        "ratios": ratios(rows),
        "steps": [{k: v for k, v in s.items() if k not in ("stdout", "stderr")} for s in steps],
        "seconds_total": round((dt.datetime.now().astimezone() - started).total_seconds(), 1),
    }
    result["markdown"] = markdown(result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help="folder with train/CLASS and validation/CLASS  [default: $FEATX_DATA "
        "or ../shared/data/cats_and_dogs_filtered]",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"classic recipe epochs  [default: {EPOCHS}; {QUICK_EPOCHS} with --quick]",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a subset of the photos (symlinks in a temp folder) and 2 epochs",
    )
    parser.add_argument(
        "--quick-train",
        type=int,
        default=QUICK_TRAIN,
        help=f"--quick: train images per class  [default: {QUICK_TRAIN}]",
    )
    parser.add_argument(
        "--quick-val",
        type=int,
        default=QUICK_VAL,
        help=f"--quick: validation images per class  [default: {QUICK_VAL}]",
    )
    parser.add_argument(
        "--with-finetune", action="store_true", help="also run `featx finetune` after the cold run"
    )
    parser.add_argument("--skip-classic", action="store_true", help="leave out the classic recipe")
    parser.add_argument(
        "--json-out",
        default=str(DEFAULT_JSON),
        help="where to write the results  [default: bench/results/pipeline.json]",
    )
    parser.add_argument("--run-classic", metavar="OUT_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.run_classic:  # the child process of step 1
        result = classic_recipe(Path(args.data), args.epochs or EPOCHS)
        Path(args.run_classic).write_text(json.dumps(result, indent=2))
        return 0

    result = benchmark(args)
    out = write_results(args.json_out, result)
    print()
    print(text_table(result["rows"]))
    print()
    for r in result["rows"]:
        if r["status"] == "ok" and r["note"]:
            print(f"{r['label']}: {r['note']}")
    print()
    for r in result["ratios"]:
        if r["value"] is not None:
            with_export = r.get("value_including_onnx_export")
            print(
                f"{r['label']}: {r['value']:.1f}x"
                + (f" ({with_export:.1f}x with the one-time ONNX export)" if with_export else "")
                + f"; accuracy {r['classic_val_accuracy']:.4f} classic vs "
                f"{r['featx_val_accuracy']:.4f} featx"
            )
    if result["missing"]:
        print("\nnot in this featx yet: " + "; ".join(result["missing"]))
    print("\nMarkdown for the README (Performance):\n")
    print(result["markdown"])
    print(f"\nwrote {out}")
    failed = [r["id"] for r in result["rows"] if r["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 2 if any(r["status"] == "missing" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
