"""`featx info CACHE`: what a cache holds, without reading its features."""

from __future__ import annotations

from pathlib import Path

from featx.cache.store import read_cache


def info(path: str | Path, files: bool = False) -> dict:
    """What a cache holds: counts per split and class, fingerprint, rejected files; with `files`,
    "files": [{path, split, label}] of every image, its path relative to the data folder (the
    cache's data_dir), as every CSV of featx writes it."""
    cache = read_cache(path, features=False)
    listed = {}
    if files:
        names = cache.class_names
        listed["files"] = [
            {"path": p, "split": str(s), "label": names[int(y)]}
            for p, s, y in zip(cache.paths, cache.splits, cache.labels)
        ]
    return {
        "path": str(path),
        "images": len(cache.paths),
        "feature_dim": cache.feature_dim,
        "dtype": cache.feature_dtype,
        "flip": cache.flip,
        "class_names": cache.class_names,
        "counts": cache.counts(),
        "rejected": [
            {"path": p, "reason": r} for p, r in zip(cache.rejected.paths, cache.rejected_reasons)
        ],
        "fingerprint": cache.fingerprint,
        **{
            k: cache.attrs.get(k)
            for k in ("data_dir", "layout", "val_split", "seed", "created", "updated")
        },
        **listed,
    }
