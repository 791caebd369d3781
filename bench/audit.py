"""Validation of `featx audit` on real photos (issue 16): duplicates, label noise, the threshold.

1. oxford_flowers17 (17 classes x 80 photos) has 70 known near-identical pairs, listed in
   oxford_flowers17.near_duplicates.txt (dHash distance <= 4): the recall of the near-duplicate
   search on them at the default threshold, and the other pairs it flags (with their contact sheet
   in WORK/flowers-audit/duplicates.png to look at).
2. Label noise: cats_and_dogs_filtered copied to WORK, 40 training photos (20 per class, seeded)
   moved into the other class folder, extracted and audited: recall and precision of the flagged
   label issues against the 40.
3. The threshold: edited copies of 30 training photos (resized, recompressed, cropped, stamped,
   blurred, brighter) extracted beside their originals: the share of each edit found at several
   thresholds, beside flowers' recall and extra pairs and the pairs flagged among cats and dogs.
4. Outliers: those flagged in each cache, and 10 photos of the other data set planted among them.
5. Time: `featx audit` end to end (a subprocess: start-up and imports count) on both caches, and
   the one-line leakage check that extract and fit-head run at their end.
   `--scale N`: also the blocked all-pairs search on N random 1280-d features (100,000: ~1-2 min).

featx runs through its command line (extract, audit), the checks use the library.
Writes bench/results/audit.json and prints a summary.

    python bench/audit.py                    # ~3 minutes on 2 cores (most of it extraction)
    python bench/audit.py --work /tmp/a      # keep copies and caches; a second run reuses them
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featx import config  # noqa: E402
from featx.cache import store  # noqa: E402
from featx.commands import audit  # noqa: E402
from featx.quality import duplicates  # noqa: E402

SHARED = Path(os.environ.get("FEATX_SHARED_DATA") or REPO.parent / "shared" / "data")
DEFAULT_JSON = REPO / "bench" / "results" / "audit.json"
FLIPS_PER_CLASS = 20
EDITED_PHOTOS = 15  # per class
THRESHOLDS = (0.85, 0.88, 0.90, 0.92, 0.94, 0.96)
TARGET = {"label_recall": 0.8, "label_precision": 0.5}


def featx(*args: str) -> tuple[dict, float]:
    """Run `featx ARGS --json` in a subprocess; (its JSON, wall seconds)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "featx", *args, "--json"], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        sys.exit(f"featx {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout), seconds


def extract(data: Path, cache: Path) -> dict:
    summary, seconds = featx("extract", str(data), "--cache", str(cache))
    print(f"  extract {data.name}: {summary['images']} images in {seconds:.1f} s", flush=True)
    return {"images": summary["images"], "extracted": summary["extracted"], "seconds": seconds}


def run_audit(cache: Path, out: Path) -> tuple[dict, float]:
    result, seconds = featx("audit", str(cache), "--output", str(out))
    print(f"  audit {cache.name}: {seconds:.1f} s end to end", flush=True)
    return result, seconds


# --- 1. flowers ---------------------------------------------------------------------------------


def flowers(work: Path) -> dict:
    data = SHARED / "oxford_flowers17"
    cache = work / "flowers.h5"
    ext = extract(data, cache)
    result, seconds = run_audit(cache, work / "flowers-audit")
    c = store.read_cache(cache)
    by_name = {Path(p).name: p for p in c.paths}
    known = {
        frozenset((by_name[a], by_name[b]))
        for _, a, b in (
            line.split() for line in (SHARED / "oxford_flowers17.near_duplicates.txt").open()
        )
    }
    group_of = {p: n for n, g in enumerate(result["duplicates"]) for p in g["paths"]}
    found = {k for k in known if len({group_of.get(p, -1 - i) for i, p in enumerate(k)}) == 1}
    pairs, sims, _ = duplicates.scan(duplicates.unit_rows(c.features), config.AUDIT_NEAR_DUPLICATE)
    flagged = {frozenset((c.paths[i], c.paths[j])): float(s) for (i, j), s in zip(pairs, sims)}
    label = dict(zip(c.paths, c.labels.tolist()))
    other = sorted(((s, *sorted(k)) for k, s in flagged.items() if k not in known), reverse=True)
    return {
        "images": len(c.paths),
        "known_pairs": len(known),
        "found": len(found),
        "recall": round(len(found) / len(known), 4),
        "missed": sorted(sorted(k) for k in known - found),
        "flagged_pairs": len(flagged),
        "other_pairs": len(other),
        "other_pairs_cross_class": sum(label[a] != label[b] for _, a, b in other),
        "other_pairs_list": [[round(s, 4), a, b] for s, a, b in other],
        "groups": len(result["duplicates"]),
        "cross_split_groups": result["summary"]["cross_split_groups"],
        "label_issues": len(result["label_issues"]),
        "outliers": len(result["outliers"]),
        "audit_seconds_end_to_end": round(seconds, 2),
        "audit_seconds": result["summary"]["seconds"],
        "extract": ext,
        "contact_sheet": str(work / "flowers-audit" / "duplicates.png"),
    }


# --- 2. label noise -----------------------------------------------------------------------------


def noisy_copy(work: Path, seed: int = 0) -> tuple[Path, set[str]]:
    """cats_and_dogs_filtered copied to WORK/cats_noisy with FLIPS_PER_CLASS training photos of
    each class moved into the other class folder (chosen before any move); the moved paths."""
    src = SHARED / "cats_and_dogs_filtered"
    data = work / "cats_noisy"
    record = work / "cats_noisy.moved.json"
    if data.is_dir() and record.is_file():
        return data, set(json.loads(record.read_text()))
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(src, data, copy_function=shutil.copy2)
    for folder in [data, *data.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o755)
    rng = np.random.default_rng(seed)
    plan = []
    for c, other in (("cats", "dogs"), ("dogs", "cats")):
        files = sorted((data / "train" / c).iterdir())
        for i in sorted(rng.choice(len(files), FLIPS_PER_CLASS, replace=False)):
            plan.append((files[i], data / "train" / other / files[i].name))
    for a, b in plan:
        os.rename(a, b)
    moved = sorted(b.relative_to(data).as_posix() for _, b in plan)
    record.write_text(json.dumps(moved))
    return data, set(moved)


def label_noise(work: Path) -> dict:
    data, moved = noisy_copy(work)
    cache = work / "cats_noisy.h5"
    ext = extract(data, cache)
    result, seconds = run_audit(cache, work / "cats_noisy-audit")
    flagged = [d["path"] for d in result["label_issues"]]
    hits = moved & set(flagged)
    return {
        "moved": len(moved),
        "flagged": len(flagged),
        "true_positives": len(hits),
        "recall": round(len(hits) / len(moved), 4),
        "precision": round(len(hits) / max(1, len(flagged)), 4),
        "suggested_correctly": sum(
            d["suggested"] != d["label"] for d in result["label_issues"] if d["path"] in moved
        ),
        "missed": sorted(moved - set(flagged)),
        "flagged_not_moved": [d for d in result["label_issues"] if d["path"] not in moved],
        "duplicates": result["duplicates"],
        "outliers": result["outliers"],
        "audit_seconds_end_to_end": round(seconds, 2),
        "audit_seconds": result["summary"]["seconds"],
        "extract": ext,
        "contact_sheet": str(work / "cats_noisy-audit" / "label_issues.png"),
    }


# --- 3. the threshold ---------------------------------------------------------------------------


def edits():
    from PIL import Image, ImageDraw, ImageFilter

    def resize(f):
        return lambda im: im.resize(
            (max(1, int(im.width * f)), max(1, int(im.height * f))), Image.Resampling.BILINEAR
        )

    def crop(f):
        return lambda im: im.crop(
            (
                int(im.width * f),
                int(im.height * f),
                int(im.width * (1 - f)),
                int(im.height * (1 - f)),
            )
        )

    def stamp(im):
        ImageDraw.Draw(im).text((10, im.height - 30), "(c) 2024 photo", fill=(255, 255, 0))
        return im

    return {
        "brighter 20 %": (lambda im: Image.eval(im, lambda v: min(255, int(v * 1.2))), 75),
        "stamped text": (stamp, 75),
        "75 % size": (resize(0.75), 75),
        "JPEG quality 30": (lambda im: im, 30),
        "5 % crop": (crop(0.05), 75),
        "half size": (resize(0.5), 75),
        "blur 1.5 px": (lambda im: im.filter(ImageFilter.GaussianBlur(1.5)), 75),
        "10 % crop": (crop(0.10), 75),
        "quarter size": (resize(0.25), 75),
    }


def threshold_table(work: Path, flowers_cache: Path, cats_cache: Path) -> dict:
    from PIL import Image

    data = work / "edited"
    rng = np.random.default_rng(1)
    if not data.is_dir():
        for c in ("cats", "dogs"):
            files = sorted((SHARED / "cats_and_dogs_filtered" / "train" / c).iterdir())
            (data / c).mkdir(parents=True)
            for i in rng.choice(len(files), EDITED_PHOTOS, replace=False):
                f = files[i]
                shutil.copyfile(f, data / c / f.name)
                for n, (edit, quality) in enumerate(edits().values()):
                    with Image.open(f) as img:
                        edit(img.convert("RGB")).save(
                            data / c / f"{f.stem}__{n}.jpg", quality=quality
                        )
    cache = work / "edited.h5"
    featx("extract", str(data), "--cache", str(cache), "--val-split", "0")
    c = store.read_cache(cache)
    x = duplicates.unit_rows(c.features)
    index = {p: i for i, p in enumerate(c.paths)}
    sims: dict[str, list[float]] = {name: [] for name in edits()}
    names = list(edits())
    for p, i in index.items():
        if "__" in p:
            stem, n = p.rsplit("__", 1)
            sims[names[int(n.split(".")[0])]].append(float(x[i] @ x[index[stem + ".jpg"]]))
    fl = store.read_cache(flowers_cache)
    by_name = {Path(p).name: i for i, p in enumerate(fl.paths)}
    known = {
        frozenset((by_name[a], by_name[b]))
        for _, a, b in (
            line.split() for line in (SHARED / "oxford_flowers17.near_duplicates.txt").open()
        )
    }
    xf = duplicates.unit_rows(fl.features)
    xc = duplicates.unit_rows(store.read_cache(cats_cache).features)
    _, _, nearest = duplicates.scan(xc, 2.0, neighbors=1)
    rows = []
    for t in THRESHOLDS:
        pairs = {frozenset(p) for p in duplicates.scan(xf, t)[0].tolist()}
        rows.append(
            {
                "threshold": t,
                "flowers_found": len(pairs & known),
                "flowers_other_pairs": len(pairs - known),
                "cats_dogs_pairs": len(duplicates.scan(xc, t)[0]),
                "edits_found": {
                    k: round(float(np.mean(np.array(v) >= t)), 2) for k, v in sims.items()
                },
            }
        )
    return {
        "photos": 2 * EDITED_PHOTOS,
        "similarity_median": {k: round(float(np.median(v)), 3) for k, v in sims.items()},
        "cats_dogs_nearest_neighbour_percentiles": {
            q: round(float(np.percentile(nearest[:, 0], q)), 3) for q in (50, 99, 99.9)
        },
        "rows": rows,
    }


# --- outliers -----------------------------------------------------------------------------------


def outliers(flowers_cache: Path, cats_cache: Path, planted: int = 10) -> dict:
    """Outliers flagged in each cache, and how many of `planted` photos of the other data set are
    flagged when their features are added to it (features only: nothing is extracted)."""
    caches = {"flowers": store.read_cache(flowers_cache), "cats_dogs": store.read_cache(cats_cache)}
    rng = np.random.default_rng(0)
    out = {}
    for name, other in (("flowers", "cats_dogs"), ("cats_dogs", "flowers")):
        base, extra = caches[name].features, caches[other].features
        pick = extra[rng.choice(len(extra), planted, replace=False)]
        clean = audit.find_outliers(duplicates.scan(duplicates.unit_rows(base), 2.0, 10)[2])
        mixed = np.vstack([base, pick])
        found = audit.find_outliers(duplicates.scan(duplicates.unit_rows(mixed), 2.0, 10)[2])
        out[name] = {
            "images": len(base),
            "flagged": len(clean),
            f"planted_{other}_found": sum(d["row"] >= len(base) for d in found),
            "planted": planted,
        }
    return out


# --- 4. time ------------------------------------------------------------------------------------


def leakage_check_seconds(cache: Path) -> float:
    """The check extract and fit-head run at their end, in a process that has their imports."""
    code = (
        "import time, featx.commands.fit_head, featx.commands.extract, featx.commands.audit\n"
        "import scipy.sparse.csgraph, featx.quality.duplicates\n"
        f"t = time.perf_counter(); featx.quality.duplicates.leakage_line({str(cache)!r})\n"
        "print(time.perf_counter() - t)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
            ).stdout
        )
        for _ in range(3)
    ]
    return round(min(runs), 3)


def scale(n: int, dim: int = 1280) -> dict:
    """Time the search (pairs and neighbours) on n random features; its peak memory beyond the
    features themselves (numpy reports its arrays to tracemalloc)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    x = duplicates.unit_rows(rng.random((n, dim), dtype=np.float32) ** 3)
    tracemalloc.start()
    t = time.perf_counter()
    duplicates.scan(x, config.AUDIT_NEAR_DUPLICATE, neighbors=config.AUDIT_NEIGHBORS)
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"  scan of {n} x {dim}: {seconds:.1f} s, peak {peak / 2**20:.0f} MB", flush=True)
    return {
        "images": n,
        "seconds": round(seconds, 1),
        "features_mb": round(x.nbytes / 2**20),
        "peak_memory_beyond_features_mb": round(peak / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, help="folder for copies and caches (default: temp)")
    parser.add_argument("--scale", type=int, default=0, help="also time the search on N features")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    for need in ("oxford_flowers17", "cats_and_dogs_filtered"):
        if not (SHARED / need).is_dir():
            sys.exit(f"{SHARED / need} not found; set FEATX_SHARED_DATA to the folder holding it.")
    t0 = time.perf_counter()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="featx-bench-audit-")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    print("1. flowers: near duplicates", flush=True)
    fl = flowers(args.work)
    print("2. cats and dogs with 40 moved photos: label issues", flush=True)
    noise = label_noise(args.work)
    print("3. the threshold: edited copies", flush=True)
    table = threshold_table(args.work, args.work / "flowers.h5", args.work / "cats_noisy.h5")
    out = outliers(args.work / "flowers.h5", args.work / "cats_noisy.h5")
    print("4. time", flush=True)
    timing = {
        "leakage_check_seconds": {
            "flowers (1,360 images)": leakage_check_seconds(args.work / "flowers.h5"),
            "cats_and_dogs (3,000 images)": leakage_check_seconds(args.work / "cats_noisy.h5"),
        }
    }
    if args.scale:
        timing["scan"] = scale(args.scale)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(sys.argv),
        "threshold": config.AUDIT_NEAR_DUPLICATE,
        "flowers": fl,
        "label_noise": noise,
        "threshold_table": table,
        "outliers": out,
        "time": timing,
        "seconds": round(time.perf_counter() - t0, 1),
        "targets_met": noise["recall"] >= TARGET["label_recall"]
        and noise["precision"] >= TARGET["label_precision"],
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nflowers: {fl['found']}/{fl['known_pairs']} known near-identical pairs found "
        f"(recall {fl['recall']:.3f}) at cosine >= {config.AUDIT_NEAR_DUPLICATE}; "
        f"{fl['other_pairs']} other pairs flagged ({fl['other_pairs_cross_class']} across classes)"
    )
    print(
        f"label noise: {noise['true_positives']} of {noise['moved']} moved photos flagged, "
        f"{noise['flagged']} flagged: recall {noise['recall']:.3f}, precision "
        f"{noise['precision']:.3f} (target >= {TARGET['label_recall']} / "
        f">= {TARGET['label_precision']})"
    )
    print("threshold  flowers found/other  cats-dogs pairs  " + "  ".join(edits()))
    for r in table["rows"]:
        found = "  ".join(f"{v:.2f}" for v in r["edits_found"].values())
        print(
            f"{r['threshold']:.2f}       {r['flowers_found']}/70 {r['flowers_other_pairs']:>4}"
            f"  {r['cats_dogs_pairs']:>6}           {found}"
        )
    print(
        "outliers: "
        + "; ".join(
            f"{name}: {o['flagged']} of {o['images']} flagged, planted "
            + ", ".join(f"{v} of {o['planted']}" for k, v in o.items() if k.startswith("planted_"))
            + " found"
            for name, o in out.items()
        )
    )
    print(
        f"audit end to end: flowers {fl['audit_seconds_end_to_end']:.1f} s, cats and dogs "
        f"{noise['audit_seconds_end_to_end']:.1f} s; leakage check (s): "
        f"{timing['leakage_check_seconds']}"
    )
    if "scan" in timing:
        print(f"search on {timing['scan']['images']} features: {timing['scan']['seconds']} s")
    print(f"wrote {args.json_out} in {result['seconds']:.0f} s")
    if tmp is not None:
        tmp.cleanup()
    sys.exit(0 if result["targets_met"] else 1)


if __name__ == "__main__":
    main()
