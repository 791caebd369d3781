"""`featx merge OUT.h5 SHARD.h5...`: the caches of `featx extract --shard K/N` runs joined into the
cache a single run over the whole folder writes: the same paths, labels, splits and features.

By default nothing is copied: OUT's /features is a virtual dataset over the shards' own part files,
named relative to OUT's folder, so the folder holding OUT and the shards can be moved as a whole.
A missing part is a one-line error, never zeros (cache.parts.check_sources). `copy=True` writes
OUT's own parts instead, so the shard caches can be deleted afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from featx.backbone import mobilenet
from featx.cache import store
from featx.errors import FeatxError, Messages
from featx.images import finder
from featx.images.shards import parse as parse_shard
from featx.quality import duplicates

_SAME = ("data_dir", "layout", "val_split", "seed")  # attributes every shard must share


def merge(
    output: str | Path,
    caches: list[str | Path],
    *,
    copy: bool = False,
    overwrite: bool = False,
    log=None,
) -> dict:
    """Join the shard caches `caches` (every shard K of one N, each once) into `output`.

    Args:
        output: the cache to write.
        caches: caches written by `featx extract --shard K/N`, one per K in 0..N-1.
        copy: copy the features into output's own part files (default: refer to the shards').
        overwrite: replace an existing featx cache at `output`.
        log: called with one-line messages; default: logging.getLogger("featx").
    Returns:
        A summary: the output path, shards, images per split, rejected files, whether copied.
    """
    log = Messages(log)
    out = Path(output)
    paths = [Path(p) for p in caches]
    if not paths:
        raise FeatxError("Name the shard caches to merge: featx merge OUT.h5 SHARD.h5...")
    if any(p.resolve() == out.resolve() for p in paths):
        raise FeatxError(f"'{out}' is one of the shards; write the merged cache to another file.")
    if out.exists() and not (overwrite and store.is_featx_cache(out)):
        raise FeatxError(
            f"'{out}' exists. Pass --overwrite to replace it (featx caches only), or another name."
        )
    shards = [store.read_cache(p, features=False) for p in paths]  # checks every part exists
    n = _check_shards(paths, shards)
    with store.writer_lock(out):
        meta, src = _join(out, paths, shards)
        if copy:
            meta.sources = src
            store.load_features(out, meta)
            store.write_cache(out, meta)
        else:
            store.write_main(out, meta, src)
    log(f"merged {n} shards: {len(meta.paths)} images into '{out}'")
    return {
        "cache": str(out),
        "shards": n,
        "images": len(meta.paths),
        "counts": meta.counts(),
        "rejected": len(meta.rejected),
        "copied": copy,
    }


def _check_shards(paths: list[Path], shards: list) -> int:
    """N, after checking the caches are the shards 0..N-1 of one extraction, each once."""
    first, fp = paths[0], shards[0].fingerprint
    seen: dict[int, Path] = {}
    total = None
    for path, cache in zip(paths, shards):
        what = f"The shard cache '{path}'"
        text = cache.attrs.get("shard")
        if not text:
            raise FeatxError(
                f"{what} was not made with --shard K/N; merge joins the caches of "
                "`featx extract DATA_DIR --shard K/N` runs."
            )
        k, n = parse_shard(text)
        if total is not None and n != total:
            raise FeatxError(f"{what} is shard {text}, the others are of {total}; use one N.")
        total = n
        if k in seen:
            raise FeatxError(f"'{seen[k]}' and '{path}' are both shard {k}/{n}; name each once.")
        seen[k] = path
        fix = f"Extract it again with the options of '{first}'."
        mobilenet.check_compatible(fp, cache.fingerprint, what, fix)
        for key in _SAME:
            if cache.attrs.get(key) != shards[0].attrs.get(key):
                raise FeatxError(
                    f"{what} has {key} {cache.attrs.get(key)!r}, '{first}' has "
                    f"{shards[0].attrs.get(key)!r}. {fix}"
                )
        if (cache.flip, cache.feature_dtype) != (shards[0].flip, shards[0].feature_dtype):
            raise FeatxError(f"{what} differs from '{first}' in --flip or --dtype. {fix}")
    missing = sorted(set(range(total)) - set(seen))
    if missing:
        names = ", ".join(f"{k}/{total}" for k in missing)
        raise FeatxError(
            f"Shards {names} are missing. Run `featx extract DATA_DIR --shard K/{total} --cache "
            "SHARD.h5` for each, then merge all of them."
        )
    return total


def _join(out: Path, paths: list[Path], shards: list):
    """(cache without features, sources) of the merged cache, rows sorted by path."""
    first = shards[0]
    owner: dict[str, tuple[int, int]] = {}  # path -> (shard, row)
    for s, cache in enumerate(shards):
        for i, p in enumerate(cache.paths):
            if p in owner:
                raise FeatxError(
                    f"'{p}' is in both '{paths[owner[p][0]]}' and '{paths[s]}': the shards "
                    "overlap. Merge shards of one extraction only."
                )
            owner[p] = (s, i)
    order = sorted(owner)
    where = [owner[p] for p in order]  # (shard, row) of each merged row
    class_names = sorted({c for cache in shards for c in cache.class_names})
    index = {c: i for i, c in enumerate(class_names)}
    classes = [shards[s].class_names[int(shards[s].labels[i])] for s, i in where]
    rows = _rows([cache.rows for cache in shards], where)
    rejected, reasons = _rejected(shards)
    attrs = {k: first.attrs.get(k) for k in _SAME}
    meta = store.Cache(
        fingerprint=first.fingerprint,
        class_names=class_names,
        features=None,
        labels=np.array([index[c] for c in classes], np.int32),
        splits=np.array([str(shards[s].splits[i]) for s, i in where], dtype=object),
        rows=rows,
        rejected=rejected,
        rejected_reasons=reasons,
        attrs=attrs,
        sources=_sources(out, shards, where),
    )
    if first.attrs.get("layout") == "flat":
        meta.splits = np.array(_flat_splits(meta, classes), dtype=object)
    src, meta.sources = meta.sources, None
    return meta, src


def _flat_splits(meta: store.Cache, classes: list[str]) -> list[str]:
    """A flat folder is split again over every image, exactly as a single fresh run splits it,
    near copies (found over every shard's features, read in tiles) kept on one side; a folder
    with split folders keeps the splits its layout gives."""
    files = [finder.ImageFile(p, c, None) for p, c in zip(meta.paths, classes)]
    groups = duplicates.split_groups(meta)
    val_split, seed = float(meta.attrs["val_split"]), int(meta.attrs["seed"])
    assigned = finder.assign_splits(files, {}, val_split, seed, groups)
    return [assigned[p] for p in meta.paths]


def _rows(rows: list, where: list[tuple[int, int]]) -> store.Rows:
    def column(name):
        return [getattr(rows[s], name)[i] for s, i in where]

    merged = store.Rows(
        column("paths"),
        np.array(column("file_size"), np.int64),
        np.array(column("file_mtime_ns"), np.int64),
        column("file_sha256"),
    )
    if all(r.identified for r in rows):  # ctime and inode: what a single run records
        merged.file_ctime_ns = np.array(column("file_ctime_ns"), np.int64)
        merged.file_inode = np.array(column("file_inode"), np.uint64)
    return merged


def _rejected(shards: list) -> tuple[store.Rows, list[str]]:
    found = {}
    for cache in shards:
        r = cache.rejected
        for i, p in enumerate(r.paths):
            found[p] = (int(r.file_size[i]), int(r.file_mtime_ns[i]), cache.rejected_reasons[i])
    paths = sorted(found)
    rows = store.Rows(
        paths,
        np.array([found[p][0] for p in paths], np.int64),
        np.array([found[p][1] for p in paths], np.int64),
        ["" for _ in paths],
    )
    return rows, [found[p][2] for p in paths]


def _sources(out: Path, shards: list, where: list[tuple[int, int]]) -> store.Sources:
    """The shards' part files, named relative to out's folder, and where each row is."""
    base = out.resolve().parent
    names, ids, sizes, offset = [], [], [], []
    for cache in shards:
        src = cache.sources
        offset.append(len(names))
        for name, id_, size in zip(src.names, src.ids, src.sizes.tolist()):
            names.append(os.path.relpath((src.base / name).resolve(), base))
            ids.append(id_)
            sizes.append(size)
    row_source = np.array(
        [offset[s] + int(shards[s].sources.row_source[i]) for s, i in where], np.int32
    )
    row_index = np.array([int(shards[s].sources.row_index[i]) for s, i in where], np.int64)
    first = shards[0].sources
    return store.Sources(
        base, names, ids, np.array(sizes, np.int64), row_source, row_index, first.dim,
        first.dtype, first.flip,
    )  # fmt: skip
