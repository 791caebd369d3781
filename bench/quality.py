"""Model quality: featx's heads against the simplest thing that could work, on four data sets (#17).

For each data set of the quality suite (../shared/data: cats_and_dogs_filtered, oxford_flowers17,
neu_surface_defects, clothing_small), on one identical split:

1. `featx extract --flip` into --cache-dir (incremental: a second run does no model work). A flat
   folder (flowers, NEU) is split by featx's own seeded, stratified 80/20 split; the folders with
   train/validation(/test) keep theirs. The split is read back from the cache, so every row below
   sees exactly the same images.
2. The baseline, written plainly with h5py and scikit-learn, NOT featx: the cached features as
   they are and `LogisticRegression()` with every default, fitted on the train split.
3. featx: `fit_head` (the library function behind `featx fit-head`) with its defaults, the
   defaults from before issue 17 (standardised features, no mirror images), and each option.
4. --multi-scale (slow: extracts every image again at 320 px): logistic regression on the 320 px
   features and on the 224 + 320 px features side by side; measured here only, not in featx.

Reported per data set on the validation split (clothing_small's test split too, in the JSON):
accuracy, balanced accuracy and macro-F1, the mean over data sets, and, against the baseline, the
images only one of the two got right (featx / baseline): their difference over the validation
size is the accuracy difference, and it is noise when it is within about twice the square root of
their sum. For oxford_flowers17, the accuracy on the validation images without a near-duplicate
in the train split (from oxford_flowers17.near_duplicates.txt) shows what the leak is worth.

--timing also measures, on cats_and_dogs_filtered in a temporary folder: `featx extract` with and
without --flip (cold, the ONNX file already exported) and a warm `featx fit-head` end to end.

Writes bench/results/quality.json (every number, date, machine, command) and prints a table plus
a Markdown version for the README.

    python bench/quality.py                          # ~5 min once the caches exist
    python bench/quality.py --timing --multi-scale   # + ~6 min of extraction
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this tree's featx, before an installed one
sys.path.insert(1, str(Path(__file__).resolve().parent))

from pipeline import machine, write_results  # noqa: E402  (bench/pipeline.py: cores, RAM, ...)

from featx import config  # noqa: E402

DEFAULT_DATA_ROOT = os.environ.get("FEATX_QUALITY_DATA") or str(REPO.parent / "shared" / "data")
DEFAULT_CACHE_DIR = REPO / "cache" / "quality"
DEFAULT_JSON = REPO / "bench" / "results" / "quality.json"
SETS = ("cats_and_dogs_filtered", "oxford_flowers17", "neu_surface_defects", "clothing_small")
NEAR_DUPLICATES = {"oxford_flowers17": "oxford_flowers17.near_duplicates.txt"}
LARGE_SIZE = 320  # --multi-scale: the second input size (the 224 px weights, convolved larger)
SMALL_PER_CLASS = (10, 25)  # small training sets: images per class drawn from the train split
SMALL_DRAWS = 10  # random draws per size; the accuracy is their mean
IMBALANCE_RATIO = 8  # uneven training sets: the largest class this many times the smallest
IMBALANCE_DRAWS = 5

# (id, label, head, fit_head options). The caches hold mirror images (extract --flip), which
# fit-head uses by default when they are there; the rows without --flip leave them out, like a
# cache made by a default `featx extract` (config.FLIP decides which rows those are). Each row
# changes one thing from featx's defaults.
DEFAULT = {"flip": config.FLIP}
ROWS = (
    ("logreg", "featx logreg, defaults", "logreg", DEFAULT),
    ("dense", "featx dense, defaults", "dense", DEFAULT),
    ("logreg_before", "logreg before #17 (= --scaling standard)", "logreg",
     {"scaling": "standard", "flip": False}),
    ("logreg_none", "logreg --scaling none", "logreg", {**DEFAULT, "scaling": "none"}),
    ("logreg_l2", "logreg --scaling l2", "logreg", {**DEFAULT, "scaling": "l2"}),
    ("logreg_balanced", "logreg --class-weight balanced", "logreg",
     {**DEFAULT, "class_weight": "balanced"}),
    ("logreg_flip", "logreg --flip", "logreg", {"flip": True}),
    ("logreg_flip_standard", "logreg --flip --scaling standard", "logreg",
     {"flip": True, "scaling": "standard"}),
    ("dense_flip", "dense --flip", "dense", {"flip": True}),
    ("dense_auto", "dense --scaling auto", "dense", {**DEFAULT, "scaling": "auto"}),
    ("dense_hidden", "dense --hidden 256", "dense", {**DEFAULT, "hidden": 256}),
    ("dense_hidden_flip", "dense --hidden 256 --flip", "dense", {"hidden": 256, "flip": True}),
)  # fmt: skip
QUICK_ROWS = ("logreg", "dense", "logreg_before", "logreg_flip")


# --- the data ----------------------------------------------------------------------------------


def run(argv: list[str]) -> tuple[dict, float]:
    """Run a featx command with --json; (its JSON output, wall seconds)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        sys.exit(f"error: `{shlex.join(argv)}` failed ({done.returncode}):\n{tail}")
    return json.loads(done.stdout[done.stdout.index("{") :]), seconds


def featx(*args) -> list[str]:
    return [sys.executable, "-m", "featx", *map(str, args)]


def extract(data: Path, cache: Path, *options) -> dict:
    summary, seconds = run(featx("extract", data, "--cache", cache, "--json", *options))
    return {
        "cache": str(cache),
        "extracted": summary["extracted"],
        "seconds": round(seconds, 2),
        "engine": summary["engine"],
        "counts": summary["counts"],
    }


def read_plain(cache: Path) -> dict:
    """The cache as plain arrays (h5py only): what a user of the baseline would read."""
    with h5py.File(cache, "r") as f:
        return {
            "X": f["features"][()],
            "y": f["labels"][()],
            "splits": np.array(f["splits"].asstr()[()]),
            "paths": np.array(f["paths"].asstr()[()]),
            "classes": list(f["class_names"].asstr()[()]),
            "data_dir": f.attrs["data_dir"],
        }


def leaked(data_root: Path, name: str, plain: dict) -> np.ndarray | None:
    """Validation rows whose near-duplicate (listed by file name) is in the train split."""
    listing = NEAR_DUPLICATES.get(name)
    if listing is None or not (data_root / listing).is_file():
        return None
    pairs = [line.split()[1:3] for line in (data_root / listing).read_text().splitlines() if line]
    split_of = {Path(p).name: s for p, s in zip(plain["paths"], plain["splits"])}
    in_train = {a for a, b in pairs if split_of.get(b) == "train"}
    in_train |= {b for a, b in pairs if split_of.get(a) == "train"}
    names = np.array([Path(p).name for p in plain["paths"]])
    return (plain["splits"] == "validation") & np.isin(names, list(in_train))


# --- scoring -----------------------------------------------------------------------------------


def scores(y_true, y_pred) -> dict:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    return {
        "n": int(len(y_true)),
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "balanced_accuracy": round(float(balanced_accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(float(f1_score(y_true, y_pred, average="macro")), 4),
    }


def baseline(plain: dict) -> dict:
    """scikit-learn's LogisticRegression() with its defaults on the raw cached features."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    train = plain["splits"] == "train"
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # it stops at max_iter=100: as a user
        model = LogisticRegression().fit(plain["X"][train], plain["y"][train])
    out = {"fit_seconds": round(time.perf_counter() - t0, 3), "wrong": {}}
    for split in ("validation", "test"):
        rows = plain["splits"] == split
        if rows.any():
            pred = model.predict(plain["X"][rows])
            out[split] = scores(plain["y"][rows], pred)
            out["wrong"][split] = sorted(plain["paths"][rows][pred != plain["y"][rows]])
    return out


def featx_row(cache: Path, head: str, options: dict, data_dir: str) -> dict:
    """fit_head (the library function of `featx fit-head`) in a temporary folder."""
    from featx.commands.fit_head import fit_head

    with tempfile.TemporaryDirectory(prefix="featx-quality-") as tmp:
        m = fit_head(cache, head, Path(tmp) / "out", **options)
        with open(Path(tmp) / "out" / "misclassified.csv", newline="") as fh:
            wrong_rows = list(csv.DictReader(fh))
    out = {"fit_seconds": m["fit_seconds"], "fitted": m["fitted"], "wrong": {}}
    for split in ("validation", "test"):
        if split in m:
            out[split] = {
                k: m[split][k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1")
            }
            out["wrong"][split] = sorted(  # relative to the data folder (absolute before #26)
                os.path.relpath(r["path"], data_dir) if os.path.isabs(r["path"]) else r["path"]
                for r in wrong_rows
                if r["split"] == split
            )
    return out


def multi_scale_rows(plain: dict, large: dict) -> dict:
    """Logistic regression (featx's, default options) on the 320 px features, and on the 224 px
    and 320 px features side by side. Measured here only: featx has no option for it."""
    from featx.heads import estimators

    if list(large["paths"]) != list(plain["paths"]):
        sys.exit("error: the 224 px and 320 px caches hold different images; re-run extract.")
    train, val = plain["splits"] == "train", plain["splits"] == "validation"
    out = {}
    for key, X in (
        ("logreg_320", large["X"]),
        ("logreg_224_320", np.hstack([plain["X"], large["X"]])),
    ):
        t0 = time.perf_counter()
        head = estimators.LogRegHead().fit(X[train], plain["y"][train])
        pred = head.predict(X[val])
        out[key] = {
            "fit_seconds": round(time.perf_counter() - t0, 3),
            "fitted": head.summary(),
            "validation": scores(plain["y"][val], pred),
            "wrong": {"validation": sorted(plain["paths"][val][pred != plain["y"][val]])},
        }
    return out


def small_training_sets(plain: dict, per_class: int, draws: int) -> dict:
    """Accuracy on the whole validation split when only `per_class` training images per class
    are there (random draws of the train split): the baseline, featx logreg before #17
    (standardised) and featx logreg with its defaults. Mean over the draws."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from featx.heads import estimators

    X, y, splits = plain["X"], plain["y"], plain["splits"]
    val = splits == "validation"
    acc = {"baseline": [], "logreg_before": [], "logreg": []}
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        rows = np.concatenate(
            [
                rng.choice(np.flatnonzero((splits == "train") & (y == c)), per_class, replace=False)
                for c in np.unique(y)
            ]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            acc["baseline"].append(LogisticRegression().fit(X[rows], y[rows]).score(X[val], y[val]))
        before = estimators.LogRegHead(scaling="standard").fit(X[rows], y[rows])
        acc["logreg_before"].append(before.score(X[val], y[val]))
        acc["logreg"].append(estimators.LogRegHead().fit(X[rows], y[rows]).score(X[val], y[val]))
    return {
        "per_class": per_class,
        "draws": draws,
        "accuracy": {k: round(float(np.mean(v)), 4) for k, v in acc.items()},
        "worst_draw_vs_baseline": {
            k: round(float(np.min(np.subtract(v, acc["baseline"]))), 4)
            for k, v in acc.items()
            if k != "baseline"
        },
    }


def imbalanced_training_sets(plain: dict, ratio: float, draws: int) -> dict:
    """featx logreg with and without --class-weight balanced on uneven training sets: class
    sizes from the smallest train class down to 1/ratio of it (geometric, in a random order per
    draw). Evaluated on the validation split as it is, and on a validation subset with the same
    class proportions as the training set. Mean accuracy and balanced accuracy over the draws."""
    from featx.heads import estimators

    X, y, splits = plain["X"], plain["y"], plain["splits"]
    k = int(y.max()) + 1
    n_train = np.bincount(y[splits == "train"], minlength=k).min()
    n_val = np.bincount(y[splits == "validation"], minlength=k).min()
    out: dict = {}
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        share = ratio ** (-rng.permutation(k) / (k - 1))

        def pick(split, n, share=share, rng=rng):
            return np.concatenate(
                [
                    rng.choice(
                        np.flatnonzero((splits == split) & (y == c)),
                        max(2, round(n * share[c])),
                        replace=False,
                    )
                    for c in range(k)
                ]
            )

        train, same = pick("train", n_train), pick("validation", n_val)
        as_is = np.flatnonzero(splits == "validation")
        for weight in ("none", "balanced"):
            head = estimators.LogRegHead(class_weight=weight).fit(X[train], y[train])
            for name, rows in (("validation_as_is", as_is), ("validation_same_shares", same)):
                s = scores(y[rows], head.predict(X[rows]))
                for metric in ("accuracy", "balanced_accuracy"):
                    out.setdefault(name, {}).setdefault(weight, {}).setdefault(metric, [])
                    out[name][weight][metric].append(s[metric])
    return {
        "ratio": ratio,
        "draws": draws,
        **{
            name: {
                w: {m: round(float(np.mean(v)), 4) for m, v in ms.items()} for w, ms in ws.items()
            }
            for name, ws in out.items()
        },
    }


def paired(row: dict, base: dict, split: str = "validation") -> dict:
    """Images only this row got right / only the baseline got right."""
    mine, theirs = set(row["wrong"].get(split, [])), set(base["wrong"].get(split, []))
    return {"only_featx_right": len(theirs - mine), "only_baseline_right": len(mine - theirs)}


# --- the benchmark -----------------------------------------------------------------------------


def benchmark(args) -> dict:
    data_root = Path(args.data_root).expanduser()
    cache_dir = Path(args.cache_dir).expanduser()
    names = args.sets.split(",") if args.sets else list(SETS)
    missing = [n for n in names if not (data_root / n).is_dir()]
    if missing and args.sets:
        sys.exit(f"error: no {', '.join(missing)} in '{data_root}'; pass --data-root or --sets.")
    if missing:  # `make bench` on a machine without the suite: measure what is there
        print(f"note: {', '.join(missing)} not in '{data_root}'; left out.", file=sys.stderr)
        names = [n for n in names if n not in missing]
    row_specs = [r for r in ROWS if not args.quick or r[0] in QUICK_ROWS]
    started = dt.datetime.now().astimezone()
    sets = {}
    for name in names:
        print(f"{name}: extracting (incremental)", flush=True)
        cache = cache_dir / f"{name}.h5"
        result = {"extract": extract(data_root / name, cache, "--flip")}
        plain = read_plain(cache)
        result["classes"] = len(plain["classes"])
        result["rows"] = {"baseline": baseline(plain)}
        for key, label, head, options in row_specs:
            print(f"{name}: {label}", flush=True)
            result["rows"][key] = featx_row(cache, head, options, plain["data_dir"])
        if args.multi_scale:
            large = cache_dir / f"{name}-{LARGE_SIZE}.h5"
            result["extract_large"] = extract(
                data_root / name, large, "--image-size", LARGE_SIZE, "--no-flip"
            )
            result["rows"].update(multi_scale_rows(plain, read_plain(large)))
        if not args.quick:
            print(f"{name}: small and uneven training sets", flush=True)
            result["small"] = [
                small_training_sets(plain, n, SMALL_DRAWS)
                for n in SMALL_PER_CLASS
                if n <= np.bincount(plain["y"][plain["splits"] == "train"]).min()
            ]
            result["imbalanced"] = imbalanced_training_sets(plain, IMBALANCE_RATIO, IMBALANCE_DRAWS)
        base = result["rows"]["baseline"]
        for key, row in result["rows"].items():
            if key != "baseline":
                row["paired"] = paired(row, base)
        mask = leaked(data_root, name, plain)
        if mask is not None:
            val_paths = set(plain["paths"][plain["splits"] == "validation"])
            leaks = set(plain["paths"][mask])
            clean = len(val_paths) - len(leaks)
            result["near_duplicates"] = {
                "validation_images_with_a_duplicate_in_train": len(leaks),
                "accuracy_without_them": {
                    key: round(1 - len(set(row["wrong"]["validation"]) - leaks) / clean, 4)
                    for key, row in result["rows"].items()
                },
                "accuracy_on_them": {
                    key: round(1 - len(set(row["wrong"]["validation"]) & leaks) / len(leaks), 4)
                    for key, row in result["rows"].items()
                }
                if leaks
                else {},
            }
        sets[name] = result
    labels = {"baseline": "plain LogisticRegression() on raw features"}
    labels.update({key: label for key, label, _, _ in row_specs})
    if args.multi_scale:
        labels["logreg_320"] = f"logreg on {LARGE_SIZE} px features (bench only)"
        labels["logreg_224_320"] = f"logreg on 224 + {LARGE_SIZE} px features (bench only)"
    result = {
        "date": started.isoformat(timespec="seconds"),
        "command": "python " + shlex.join(["bench/quality.py", *sys.argv[1:]]),
        "machine": machine(),
        "data_root": str(data_root),
        "labels": labels,
        "sets": sets,
        "means": means(sets, labels),
    }
    if args.timing:
        result["timing"] = timing(data_root / "cats_and_dogs_filtered", cache_dir)
    result["seconds_total"] = round((dt.datetime.now().astimezone() - started).total_seconds(), 1)
    result["markdown"] = markdown(result)
    result["markdown_training_sets"] = extra_tables(result)
    result["markdown_timing"] = timing_table(result)
    return result


def means(sets: dict, labels: dict) -> dict:
    """Per row: the mean validation accuracy, balanced accuracy and macro-F1 over the data sets."""
    out = {}
    for key in labels:
        rows = [s["rows"][key]["validation"] for s in sets.values() if key in s["rows"]]
        if len(rows) == len(sets):
            out[key] = {
                m: round(float(np.mean([r[m] for r in rows])), 4)
                for m in ("accuracy", "balanced_accuracy", "macro_f1")
            }
    return out


TIMING_REPEATS = 3  # warm fit-head runs per row; the fastest counts (the machine is shared)
FIT_HEAD_ROWS = (  # (id, cache, fit-head options)
    ("fit_head_before", "extract", ["--scaling", "standard"]),
    ("fit_head", "extract", []),
    ("fit_head_flip", "extract_flip", []),
    ("fit_head_dense_flip", "extract_flip", ["--head", "dense"]),
)


def timing(data: Path, cache_dir: Path) -> dict:
    """Cold `featx extract` with and without --flip (the backbone's ONNX file already exported
    into cache_dir, where the temporary caches go), then warm `featx fit-head` runs end to end
    (process start included; the fastest of TIMING_REPEATS) on each cache."""
    out: dict = {}
    caches = {}
    try:
        for key, options in (("extract", ["--no-flip"]), ("extract_flip", ["--flip"])):
            caches[key] = cache_dir / f".timing-{key}.h5"
            caches[key].unlink(missing_ok=True)
            print(f"timing: featx extract {' '.join(options)}", flush=True)
            out[key] = extract(data, caches[key], *options)
        for key, cache, options in FIT_HEAD_ROWS:
            print(f"timing: featx fit-head {' '.join(options)} ({cache})", flush=True)
            runs = []
            with tempfile.TemporaryDirectory(prefix="featx-quality-") as tmp:
                for _ in range(TIMING_REPEATS):
                    argv = featx("fit-head", caches[cache], "--output", Path(tmp), "--json")
                    m, seconds = run([*argv, *options])
                    runs.append((round(seconds, 2), m["fit_seconds"]))
            out[key] = {
                "cache": cache,
                "options": options,
                "seconds": min(r[0] for r in runs),
                "fit_seconds": min(r[1] for r in runs),
                "runs": runs,
                "fitted": {k: v for k, v in m["fitted"].items() if k not in ("cv",)},
                "validation_accuracy": m["validation"]["accuracy"],
            }
    finally:
        for cache in caches.values():
            cache.unlink(missing_ok=True)
    return out


# --- output ------------------------------------------------------------------------------------


def fmt(value, spec=".4f") -> str:
    return "-" if value is None else format(value, spec)


def text_table(result: dict) -> str:
    names = list(result["sets"])
    short = [n.split("_")[0][:9] for n in names]
    head = f"{'validation accuracy':<56}" + "".join(f"{s:>10}" for s in short) + f"{'mean':>8}"
    lines = [head, "-" * len(head)]
    for key, label in result["labels"].items():
        cells = []
        for n in names:
            row = result["sets"][n]["rows"].get(key)
            cells.append(f"{row['validation']['accuracy']:>10.4f}" if row else f"{'-':>10}")
        mean = result["means"].get(key, {}).get("accuracy")
        lines.append(f"{label[:56]:<56}" + "".join(cells) + f"{fmt(mean):>8}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    m = result["machine"]
    names = list(result["sets"])
    lines = [
        f"Measured {result['date'][:10]} on {m['nproc']} CPU cores ({m['cpu_model']}), "
        f"Python {m['python']}, scikit-learn; `{result['command']}`. Validation accuracy (in "
        "brackets: images only featx / only the baseline got right).",
        "",
        "| | " + " | ".join(names) + " | mean |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for key, label in result["labels"].items():
        cells = []
        for n in names:
            row = result["sets"][n]["rows"].get(key)
            if row is None:
                cells.append("-")
                continue
            cell = f"{row['validation']['accuracy']:.3f}"
            if "paired" in row:
                p = row["paired"]
                cell += f" ({p['only_featx_right']}/{p['only_baseline_right']})"
            cells.append(cell)
        mean = result["means"].get(key, {}).get("accuracy")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(mean)} |")
    return "\n".join(lines)


def extra_tables(result: dict) -> str:
    """Markdown: the small training sets and the uneven training sets, when measured."""
    names = [n for n, s in result["sets"].items() if "small" in s]
    if not names:
        return ""
    head = " | ".join(names) + " | mean |"
    rule = "|---|---|" + "---:|" * (len(names) + 1)
    lines = [
        f"Small training sets: validation accuracy, mean of {SMALL_DRAWS} random draws of the "
        "train split (in brackets: the worst draw's difference to the baseline).",
        "",
        "| train images per class | | " + head,
        rule,
    ]
    labels = {
        "baseline": "plain LogisticRegression()",
        "logreg_before": "logreg before #17",
        "logreg": "featx logreg, defaults",
    }
    for n in SMALL_PER_CLASS:
        for key, label in labels.items():
            cells, values = [], []
            for name in names:
                small = next(
                    (x for x in result["sets"][name]["small"] if x["per_class"] == n), None
                )
                if small is None:
                    cells.append("-")
                    continue
                value = small["accuracy"][key]
                values.append(value)
                worst = small["worst_draw_vs_baseline"].get(key)
                cells.append(f"{value:.3f}" + (f" ({worst:+.3f})" if worst is not None else ""))
            mean = f"{np.mean(values):.4f}" if len(values) == len(names) else "-"
            lines.append(f"| {n} | {label} | " + " | ".join(cells) + f" | {mean} |")
    lines += [
        "",
        f"Uneven training sets (largest class {IMBALANCE_RATIO}x the smallest, "
        f"{IMBALANCE_DRAWS} draws): featx logreg with `--class-weight none` / `balanced`.",
        "",
        "| evaluated on | metric | " + head,
        rule,
    ]
    for split in ("validation_as_is", "validation_same_shares"):
        for metric in ("accuracy", "balanced_accuracy"):
            cells, values = [], {"none": [], "balanced": []}
            for name in names:
                imb = result["sets"][name]["imbalanced"][split]
                for w in values:
                    values[w].append(imb[w][metric])
                cells.append(f"{imb['none'][metric]:.3f} / {imb['balanced'][metric]:.3f}")
            mean = f"{np.mean(values['none']):.4f} / {np.mean(values['balanced']):.4f}"
            where = split.replace("_", " ").replace("validation", "validation split")
            lines.append(
                f"| {where} | {metric.replace('_', ' ')} | " + " | ".join(cells) + f" | {mean} |"
            )
    return "\n".join(lines)


def timing_table(result: dict) -> str:
    """Markdown: what --flip costs, and warm fit-head end to end."""
    t = result.get("timing")
    if not t:
        return ""
    base = t["extract"]["seconds"]
    lines = [
        "| cats_and_dogs_filtered (3,000 images) | seconds | validation accuracy |",
        "|---|---:|---:|",
        f"| `featx extract` (cold, ONNX file present) | {base:.1f} | |",
        f"| `featx extract --flip` | {t['extract_flip']['seconds']:.1f} "
        f"({t['extract_flip']['seconds'] / base:.2f}×) | |",
    ]
    labels = {
        "fit_head_before": "warm `featx fit-head --scaling standard` (before #17)",
        "fit_head": "warm `featx fit-head` (defaults)",
        "fit_head_flip": "warm `featx fit-head` on the `--flip` cache",
        "fit_head_dense_flip": "warm `featx fit-head --head dense` on the `--flip` cache",
    }
    for key, label in labels.items():
        if key in t:
            lines.append(
                f"| {label} | {t[key]['seconds']:.1f} (fit {t[key]['fit_seconds']:.1f}) "
                f"| {t[key]['validation_accuracy']:.4f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-root",
        default=str(DEFAULT_DATA_ROOT),
        help="folder holding the data sets  [default: $FEATX_QUALITY_DATA or ../shared/data]",
    )
    parser.add_argument(
        "--cache-dir",
        default=str(DEFAULT_CACHE_DIR),
        help="where the feature caches go (reused across runs)  [default: cache/quality]",
    )
    parser.add_argument("--sets", help=f"comma-separated subset of {','.join(SETS)}")
    parser.add_argument("--quick", action="store_true", help=f"only the rows {QUICK_ROWS}")
    parser.add_argument(
        "--multi-scale", action="store_true", help=f"also extract at {LARGE_SIZE} px and compare"
    )
    parser.add_argument(
        "--timing", action="store_true", help="time extract with/without --flip, warm fit-head"
    )
    parser.add_argument(
        "--json-out",
        default=str(DEFAULT_JSON),
        help="where to write the results  [default: bench/results/quality.json]",
    )
    args = parser.parse_args(argv)
    if not any((Path(args.data_root) / n).is_dir() for n in SETS) and not args.sets:
        print(f"no data set of the quality suite in '{args.data_root}'; nothing to measure.")
        return 0
    result = benchmark(args)
    out = write_results(args.json_out, result)
    print()
    print(text_table(result))
    for name, s in result["sets"].items():
        dup = s.get("near_duplicates")
        if dup:
            print(
                f"\n{name}: {dup['validation_images_with_a_duplicate_in_train']} validation "
                "images have a near-duplicate in train; accuracy without them: "
                + ", ".join(f"{k} {v:.4f}" for k, v in dup["accuracy_without_them"].items())
            )

    print("\nMarkdown for the README (Model quality):\n")
    print(result["markdown"])
    for key in ("markdown_training_sets", "markdown_timing"):
        if result[key]:
            print()
            print(result[key])
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
