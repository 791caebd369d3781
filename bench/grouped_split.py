"""The grouped split against the plain one (#23 item 2), on the cache of a flat data folder.

For each seed, two splits of the same images (80/20, stratified by class):
  plain    each image by its own seeded hash: the split featx made before groups (for the cache's
           own seed it must equal the split recorded in the cache, which this script checks);
  grouped  copies kept on one side (featx.quality.duplicates.split_groups: featx audit's groups),
           what `featx extract` now makes.
For each: the duplicate groups (featx audit's own search, at its threshold) with members in both
train and validation, and the validation accuracy of the default logistic-regression head
(`featx fit-head` defaults) trained on that split. No image is extracted: the cached features are
written again with the other split into a temporary cache.

    python bench/grouped_split.py /work/caches/oxford_flowers17.h5 --seeds 5

Writes bench/results/grouped_split.json (every number, the command) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from featx.cache import store
from featx.commands.fit_head import fit_head
from featx.images.finder import ImageFile, assign_splits
from featx.quality import duplicates

RESULTS = Path(__file__).resolve().parent / "results" / "grouped_split.json"


def crossing(splits: dict[str, str], groups: list[list[str]]) -> int:
    """Groups with members in more than one split."""
    return sum(len({splits[p] for p in g}) > 1 for g in groups)


def accuracy(cache: store.Cache, splits: dict[str, str], folder: Path, name: str) -> float:
    """Validation accuracy of the default head trained on `splits` of the cache's features."""
    path = folder / f"{name}.h5"
    split_array = np.array([splits[p] for p in cache.paths], dtype=object)
    store.write_cache(path, dataclasses.replace(cache, splits=split_array, sources=None))
    metrics = fit_head(path, output=folder / name, log=lambda *_: None)
    return float(metrics["validation"]["accuracy"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cache", type=Path, help="a featx cache of a flat data folder")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 of the split")
    args = parser.parse_args(argv)
    cache = store.read_cache(args.cache)
    if cache.attrs.get("layout") != "flat":
        sys.exit(f"{args.cache}: the data folder has its own split; nothing to compare.")
    files = [
        ImageFile(p, cache.class_names[int(y)], None) for p, y in zip(cache.paths, cache.labels)
    ]
    val_split = float(cache.attrs["val_split"])
    audit_groups = [[cache.paths[i] for i in g.rows] for g in duplicates.find_duplicates(cache)[0]]
    kept = duplicates.split_groups(cache)
    recorded = dict(zip(cache.paths, cache.splits.tolist()))
    plain_is_old = assign_splits(files, {}, val_split, int(cache.attrs["seed"])) == recorded
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            row = {"seed": seed}
            for name, groups in (("plain", []), ("grouped", kept)):
                splits = assign_splits(files, {}, val_split, seed, groups)
                row[f"{name}_crossing_groups"] = crossing(splits, audit_groups)
                row[f"{name}_validation_images"] = sum(s == "validation" for s in splits.values())
                row[f"{name}_accuracy"] = round(accuracy(cache, splits, Path(tmp), name), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    mean = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0] if k != "seed"}
    result = {
        "cache": str(args.cache),
        "images": len(cache.paths),
        "audit_groups": len(audit_groups),
        "groups_kept_together": len(kept),
        "plain_split_equals_the_recorded_one": plain_is_old,
        "seeds": rows,
        "mean": mean,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/grouped_split.py " + " ".join(argv or sys.argv[1:]),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("| seed | crossing groups plain → grouped | validation accuracy plain → grouped |")
    print("|---|---|---|")
    for r in [*rows, {"seed": "mean", **mean}]:
        print(
            f"| {r['seed']} | {r['plain_crossing_groups']} → {r['grouped_crossing_groups']} | "
            f"{r['plain_accuracy']:.4f} → {r['grouped_accuracy']:.4f} |"
        )
    print(f"plain split of the cache's seed equals its recorded split: {plain_is_old}")
    return result


if __name__ == "__main__":
    main()
