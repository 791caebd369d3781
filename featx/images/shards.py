"""Shards of a data folder: `featx extract --shard K/N` runs stage 1 on the images of shard K of N,
so N processes (a Slurm array, a Kubernetes indexed Job, one per GPU) split the work without
talking to each other; `featx merge` puts their caches back together (featx.commands.merge).

The shard of an image is a stable hash of its path relative to the data folder (SHA-1 of the UTF-8
path, as featx records it, with forward slashes): the same on every run and every machine, and
independent of which other files exist, so adding images never moves one to another shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from featx.errors import FeatxError

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N), with 0 <= K < N."""
    m = _SHARD.match(str(text))
    if m is None:
        raise FeatxError(
            f"--shard takes K/N (this run's shard K of N, counted from 0), got {text!r}; "
            "e.g. --shard 0/4 ... --shard 3/4."
        )
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= k < n:
        raise FeatxError(
            f"--shard {text}: K must be in 0..N-1 and N at least 1, e.g. 0/{max(n, 2)}."
        )
    return k, n


def shard_of(path: str, n: int) -> int:
    """The shard (0..n-1) of the image at `path` (relative to the data folder, '/'-separated)."""
    digest = hashlib.sha1(path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n


def restrict(listing, shard: tuple[int, int] | None):
    """The listing of one shard's images. Files of the other shards go to `others`: the split of a
    flat folder is still decided over every image, as a single run decides it."""
    if shard is None:
        return listing
    k, n = shard
    mine, others = [], []
    for f in listing.files:
        (mine if shard_of(f.path, n) == k else others).append(f)
    skipped = [(p, why) for p, why in listing.skipped if shard_of(p, n) == k]
    return dataclasses.replace(listing, files=mine, skipped=skipped, others=others)
