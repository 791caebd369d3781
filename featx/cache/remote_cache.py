"""A cache whose home is object storage (`--cache s3://bucket/c.h5`), and part files that Ray's
actors write there (`--parts s3://bucket/run/`) when the nodes of a cluster share no disk.

The driver works on a local copy, the stage: `<featx's per-user folder>/remote/<digest of the
URL>/` ($FEATX_HOME, else ~/.cache/featx), holding the main file and the parts it names,
downloaded once (a part is immutable: present is current). extract runs on the stage as on any
local cache (lock, journal, resume), then `push` uploads the parts the new main file names, then
the main file in one PUT, then deletes the parts it no longer names: a reader of the URL sees the
old main file or the new one, and every part either names is there. An object PUT is atomic, so
Ray's actors write their parts straight to the URL (no rename needed): a part is there whole or
not at all; the driver pulls the ones there into its journal before planning (resume) and after
Ray (results). fit-head, audit and info read a URL through the same stage (`local_copy`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py

from featx import config
from featx.backbone import onnx_engine
from featx.cache import parts
from featx.errors import not_found
from featx.files import replaced_atomically
from featx.images import remote

PART_GLOB = "features-*.h5"


def parts_url(cache_url: str) -> str:
    """Where the parts of a cache at `cache_url` live: `<cache URL>.parts`, as on disk."""
    return cache_url.rstrip("/") + ".parts"


def beside(cache_path: str | Path) -> Path:
    """Where the outputs of a cache are placed beside it (fit-head's and audit's folders): the
    cache itself, or for a URL its name in config.CACHE_DIR (outputs are local files)."""
    if remote.is_url(cache_path):
        return Path(config.CACHE_DIR) / str(cache_path).rstrip("/").rsplit("/", 1)[-1]
    return Path(cache_path)


def stage(url: str) -> Path:
    """The local path of the cache at `url` (its folder made on first use)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    folder = onnx_engine.user_dir() / "remote" / digest
    folder.mkdir(parents=True, exist_ok=True)
    return folder / url.rstrip("/").rsplit("/", 1)[-1]


def _download(url: str, path: Path) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(remote.read(url))


def local_copy(url: str, missing_ok: bool = False) -> Path:
    """The cache at `url` on this machine: its main file fetched again when the store holds
    another version, the parts it names fetched when absent. missing_ok: a URL with no cache yet
    gives the stage path (extract makes a new cache there); else a not-found FeatxError."""
    path = stage(url)
    found = remote.entry(url)
    if found is None or found.get("type") == "directory":
        if missing_ok:
            return path
        raise not_found("cache", url)
    mark = path.with_name(path.name + ".stamp")
    now = f"{found.get('size')} {remote.stamp(found)}"
    if not path.is_file() or not mark.is_file() or mark.read_text() != now:
        try:
            _download(url, path)
        except OSError as e:
            raise remote.one_line(url, e) from None
        mark.write_text(now)
    for name in _named_parts(path):
        local = path.parent / name
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            (local.parent / parts.Journal.MARKER).touch()  # featx's folder, as extract makes it
            try:
                _download(remote.join(url.rsplit("/", 1)[0], name), local)
            except OSError as e:
                raise remote.one_line(remote.join(url.rsplit("/", 1)[0], name), e) from None
    return path


def _named_parts(path: Path) -> list[str]:
    """The part files a main file names (relative to its folder); [] for one featx cannot read
    (store.read_cache then says what is wrong with it)."""
    try:
        with h5py.File(path, "r") as f:
            names = f["sources/names"].asstr()[()] if "sources" in f else []
    except (OSError, KeyError):
        return []
    return [n for n in names if n and ".." not in Path(n).parts and not Path(n).is_absolute()]


def push(url: str, path: Path) -> None:
    """Publish the staged cache `path` at `url`: the parts its main file names that the store
    lacks, then the main file (one PUT: the commit), then the parts no longer named deleted."""
    named = _named_parts(path)
    where = parts_url(url)
    there = remote.names(where, ".h5")
    folder = path.with_name(path.name + ".parts").name
    for name in named:
        if Path(name).parent.name == folder and Path(name).name not in there:
            remote.write(remote.join(where, Path(name).name), (path.parent / name).read_bytes())
    remote.write(url, path.read_bytes())
    found = remote.entry(url)
    path.with_name(path.name + ".stamp").write_text(
        f"{found.get('size')} {remote.stamp(found)}" if found else ""
    )
    keep = {Path(n).name for n in named}
    for name in there:
        if name.startswith("features-") and name not in keep:
            remote.remove(remote.join(where, name))


def pull_parts(url: str, journal: parts.Journal) -> list[str]:
    """Copy the part files Ray's actors wrote at `url` into the journal's folder, where extract
    reads them as an interrupted run's; the names copied."""
    pulled, found = [], remote.names(url, ".h5")
    if found:  # the journal's folder and marker, as Journal.start makes them (its batches stay)
        journal.check_owned()
        journal.folder.mkdir(parents=True, exist_ok=True)
        (journal.folder / journal.MARKER).touch()
    for name, size in sorted(found.items()):
        local = journal.folder / name
        if name.startswith("features-") and not (local.is_file() and local.stat().st_size == size):
            _download(remote.join(url, name), local)
            pulled.append(name)
    return pulled


def drop_parts(url: str, names) -> None:
    """Delete the parts at `url` that the driver has copied (they live in the cache now)."""
    for name in names:
        remote.remove(remote.join(url, name))
