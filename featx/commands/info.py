"""`featx info CACHE`: what a cache holds, without reading its features."""

from __future__ import annotations

from pathlib import Path

from featx.cache.store import read_cache


def info(path: str | Path) -> dict:
    """What a cache holds: counts per split and class, fingerprint, rejected files."""
    cache = read_cache(path, features=False)
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
    }
