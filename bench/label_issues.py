"""How far to trust `featx audit`'s label issues (#26 item 9): planted label noise, then the list.

For each shared data set's default cache (/work/caches/SET.h5 unless --cache-dir), 5 % of the train
photos (seeded: --seed 0) get another class, drawn uniformly among the others, in memory (the
cache is only read). `featx audit`'s own search (`commands.audit.find_label_issues`, its
defaults: out-of-fold logistic regression, then cleanlab's confident learning) then lists its
label issues, and the list is compared with the planted ones:

  precision  the share of the listed photos that were planted (the real data's own doubtful
             labels count against it: they were not planted);
  recall     the share of the planted photos that the list holds.

    python bench/label_issues.py                 # the four shared sets, ~1-2 min each

Writes bench/results/label_issues.json (every number, date, command) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

SETS = ("cats_and_dogs_filtered", "oxford_flowers17", "neu_surface_defects", "clothing_small")
RESULTS = Path(__file__).resolve().parent / "results" / "label_issues.json"
FRACTION = 0.05


def plant_noise(labels, splits, n_classes: int, fraction: float = FRACTION, seed: int = 0):
    """(new labels, rows given a wrong class): round(fraction x train images) train rows, drawn
    with `seed`, each moved to another class chosen uniformly among the others."""
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(np.asarray(splits) == "train")
    rows = np.sort(rng.choice(train, size=round(fraction * len(train)), replace=False))
    noisy = np.array(labels, np.int32, copy=True)
    shift = rng.integers(1, n_classes, size=len(rows))  # never 0: another class
    noisy[rows] = (noisy[rows] + shift) % n_classes
    return noisy, rows


def precision_recall(flagged, planted) -> tuple[float, float]:
    """(share of `flagged` that was planted, share of `planted` that was flagged)."""
    flagged, planted = set(map(int, flagged)), set(map(int, planted))
    hit = len(flagged & planted)
    return (hit / len(flagged) if flagged else 0.0, hit / len(planted) if planted else 0.0)


def measure(cache_path: Path, seed: int) -> dict:
    from featx.cache import store
    from featx.commands.audit import find_label_issues

    cache = store.read_cache(cache_path)
    labels, planted = plant_noise(cache.labels, cache.splits, len(cache.class_names), seed=seed)
    t = time.perf_counter()
    issues, note = find_label_issues(dataclasses.replace(cache, labels=labels))
    flagged = [d["row"] for d in issues]
    precision, recall = precision_recall(flagged, planted)
    return {
        "train_images": int((cache.splits == "train").sum()),
        "planted": len(planted),
        "listed": len(flagged),
        "listed_and_planted": len(set(flagged) & set(planted.tolist())),
        "precision": round(precision, 3),
        "recall": round(recall, 3),
        "seconds": round(time.perf_counter() - t, 1),
        "note": note,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/work/caches"))
    parser.add_argument("--seed", type=int, default=0, help="seeds which photos are moved")
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    args = parser.parse_args(argv)
    rows = {}
    for name in args.sets:
        rows[name] = measure(args.cache_dir / f"{name}.h5", args.seed)
        print(json.dumps({name: rows[name]}), flush=True)
    result = {
        "fraction": FRACTION,
        "seed": args.seed,
        "sets": rows,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/label_issues.py " + " ".join(argv or sys.argv[1:]),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("| data set | train photos | moved | listed | precision | recall |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['train_images']} | {r['planted']} | {r['listed']} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} |"
        )
    return result


if __name__ == "__main__":
    main()
