"""Find the images of a data folder in its layout (DATA/CLASS/* or DATA/SPLIT/CLASS/*), and assign
the train/validation split of a folder without split folders (seeded, stratified, stable).

Listing never opens a file: links, FIFOs and other special files are recorded with a reason.
Decoding is featx.images.decoder's.
"""

from __future__ import annotations

import errno
import hashlib
import operator
import os
import stat
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from featx import config
from featx.errors import FeatxError, check_fraction, not_found
from featx.files import is_url
from featx.images import remote


@dataclass(frozen=True)
class ImageFile:
    """One candidate image found in the data folder."""

    path: str  # relative to the data folder, with forward slashes
    class_name: str
    split: str | None  # from the folder layout; None when featx must assign it


@dataclass
class Listing:
    layout: str  # "splits" (DATA/train/CLASS/...) or "flat" (DATA/CLASS/...)
    files: list[ImageFile]
    class_names: list[str]
    empty_classes: list[str]
    # (path, reason) left out while listing: links back into the folder, broken links, FIFOs, ...
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # `extract --shard`: the other shards' images, counted when a flat folder is split
    others: list[ImageFile] = field(default_factory=list)
    # {path: (size, stamp)} when the listing itself knows them (objects in a bucket); else None
    stats: dict[str, tuple[int, int]] | None = None


_HIDDEN = (".", "__")  # names that start so are not listed


_NAME = operator.attrgetter("name")


def _visible(entry: os.DirEntry | Path) -> bool:
    return not entry.name.startswith(_HIDDEN)


FEATX_OWN = "featx's own output; not read as data"


def own_folder(folder: Path | str, names, local: bool = True) -> bool:
    """Whether `folder` (holding the entries `names`, hidden ones included) is featx's output:
    a cache's parts folder, a folder carrying one of featx's marker files, or the default cache
    folder (config.CACHE_DIR of this working folder, or one of that name holding a cache).
    `local`: False for a folder in object storage (a key prefix, never this working folder)."""
    name = str(folder).rstrip("/").rsplit("/", 1)[-1]
    if name.endswith(".h5.parts") or not config.OUTPUT_MARKERS.isdisjoint(names):
        return True
    if name != Path(config.CACHE_DIR).name:
        return False
    here = local and os.path.realpath(folder) == os.path.realpath(config.CACHE_DIR)
    return bool(own_files(names)) or here


def own_files(names) -> set[str]:
    """The entries of a folder's `names` that featx wrote: a cache `X.h5` beside its `X.h5.parts`
    or `X.h5.lock`, and those two."""
    names = set(names)
    caches = {n for n in names if n.endswith(".h5") and {n + ".parts", n + ".lock"} & names}
    return caches | {n for n in names if n.endswith((".h5.parts", ".h5.lock"))}


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def special_kind(mode: int) -> str | None:
    """'FIFO', 'socket' or 'device' for files that must never be opened (a FIFO blocks forever)."""
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return None


def _plain_file(entry: os.DirEntry) -> bool:
    """A regular file that is no link, as the folder listing says (no system call on Linux)."""
    try:
        return entry.is_file(follow_symlinks=False)  # False for a link, whatever it points to
    except OSError:
        return False


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link loop: entry() reports it
        return False


class _Walk:
    """A recursive listing below one data folder that never follows a link back into the folder
    (its files are listed where they really are, so a link cannot relabel them) or above it (a
    loop), and never offers a FIFO, socket or device. What it leaves out is kept in `skipped`
    as (path, reason) instead of vanishing silently."""

    def __init__(self, boundary: Path):
        self.boundary = os.path.realpath(boundary)
        self.found: list[str] = []  # str, not Path: a Path per file cost more than listing it
        self.skipped: list[tuple[Path, str]] = []
        self._seen: set[str] = set()

    def _listed_inside(self, real: str) -> bool:
        # A target inside the data folder that the walk lists anyway (no hidden part on the way).
        if not _within(real, self.boundary):
            return False
        rel = os.path.relpath(real, self.boundary)
        return rel == "." or all(_visible(Path(part)) for part in Path(rel).parts)

    def _link_problem(self, path: Path, is_dir: bool) -> str | None:
        real = os.path.realpath(path)
        if is_dir and _within(self.boundary, real):
            return "symbolic link to the data folder or above it (a loop); not followed"
        if self._listed_inside(real):
            where = os.path.relpath(real, self.boundary).replace(os.sep, "/")
            kind = "folder" if is_dir else "file"
            return f"symbolic link to the {kind} '{where}' of the data folder; not followed"
        return None

    def entry(self, path: Path) -> None:
        """Add `path` (a file or a folder) to the listing, or to `skipped` with the reason."""
        try:
            st = os.stat(path)
        except OSError as e:
            if os.path.islink(path):
                reason = "symbolic link loop" if e.errno == errno.ELOOP else "broken symbolic link"
            else:
                reason = f"unreadable: {e.strerror or e}"
            self.skipped.append((path, reason))
            return
        is_dir = stat.S_ISDIR(st.st_mode)
        if os.path.islink(path):
            problem = self._link_problem(path, is_dir)
            if problem:
                self.skipped.append((path, problem))
                return
        if is_dir:
            self.folder(path)
        elif special_kind(st.st_mode):
            self.skipped.append((path, f"not a regular file ({special_kind(st.st_mode)})"))
        else:
            self.found.append(str(path))

    def folder(self, folder: Path) -> None:
        real = os.path.realpath(folder)
        if real in self._seen:  # two links to one folder outside the data folder
            self.skipped.append((folder, "folder already listed through another link"))
            return
        self._seen.add(real)
        try:
            with os.scandir(folder) as it:
                listed = list(it)
        except OSError as e:
            self.skipped.append((folder, f"unreadable folder: {e.strerror or e}"))
            return
        names = [e.name for e in listed]
        if own_folder(folder, names):
            self.skipped.append((folder, FEATX_OWN))
            return
        own = own_files(names)
        self.skipped += [(folder / n, FEATX_OWN) for n in sorted(own)]
        entries = [e for e in listed if not e.name.startswith(_HIDDEN) and e.name not in own]
        # A folder's own files first, then its subfolders, each sorted by name (os.walk's order).
        entries.sort(key=_NAME)
        subfolders = []
        for e in entries:
            if _plain_file(e):  # the common case, known from the listing itself: no stat
                self.found.append(e.path)
            elif _is_dir(e):
                subfolders.append(e)
            else:
                self.entry(Path(e.path))
        for e in subfolders:
            self.entry(Path(e.path))


def walk_files(folder: Path, boundary: Path | None = None) -> tuple[list[Path], list[tuple]]:
    """Every non-hidden regular file below `folder`, recursively, sorted, and [(path, reason)]
    for what was left out: links back into `boundary` (default `folder`) or above it, broken
    links, link loops, FIFOs, sockets, devices and unreadable folders. Links to files and folders
    elsewhere are followed."""
    walk = _Walk(boundary or folder)
    walk.folder(Path(folder))
    return [Path(p) for p in walk.found], walk.skipped


def inside(root: Path | str, rel: str) -> Path | str | None:
    """`root / rel` when `rel` (a path stored in a cache) stays inside `root`: relative, with no
    '..' part. Else None: a tampered cache must not make featx read files elsewhere. A URL root
    gives a URL."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts or Path(rel).drive:
        return None
    return remote.join(root, rel) if is_url(root) else Path(root) / rel


class _LocalTree:
    """A local data folder as find_images sees it: folders named relative to the root ("" is
    the root, "train/cat" below it), files listed by _Walk."""

    def __init__(self, root: Path):
        self.root, self.walk = root, _Walk(root)
        self.prefix = os.path.join(str(root), "")
        self.stats = None  # find_images' caller stats the files itself

    def exists(self) -> bool:
        return self.root.is_dir()

    def show(self, rel: str) -> str:
        return str(self.root / rel) if rel else str(self.root)

    def subfolders(self, rel: str, named=None) -> list[str]:
        """Names of the visible subfolders of `rel`, sorted; only those whose lower-case name is
        in `named` when given (checked before the is-a-folder test: a class holds many files)."""
        with os.scandir(self.root / rel) as it:
            entries = [e for e in it if _visible(e) and (named is None or e.name.lower() in named)]
        return sorted(e.name for e in entries if _is_dir(e))

    def files(self, rel: str) -> list[str]:
        before = len(self.walk.found)
        self.walk.entry(self.root / rel)
        root, prefix = self.root, self.prefix
        return [
            f[len(prefix) :] if f.startswith(prefix) else Path(f).relative_to(root).as_posix()
            for f in self.walk.found[before:]
        ]

    def top_folders(self) -> list[str]:
        """The root's subfolders that may be classes or splits: featx's own outputs (`featx
        extract .` in a project folder: cache/, X.h5.parts/) are skipped with the reason."""
        top = []
        for name in self.subfolders(""):
            folder = self.root / name
            try:
                own = own_folder(folder, os.listdir(folder))
            except OSError:
                own = False  # unreadable: the walk reports it
            if own:
                self.walk.skipped.append((folder, FEATX_OWN))
            else:
                top.append(name)
        return top

    def skipped(self) -> list[tuple[str, str]]:
        return sorted(
            (printable(p.relative_to(self.root).as_posix()), why) for p, why in self.walk.skipped
        )


class _ObjectTree:
    """A data folder in object storage (featx.images.remote), listed once: the same layout rules
    as a local folder; keys with a hidden part are left out as hidden files are, and featx's own
    outputs (own_folder: a cache's parts, folders with featx's marker files) are skipped."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        listed = remote.list_objects(self.url)
        entries: dict[str, set[str]] = {}  # folder -> the names in it, hidden ones included
        for rel in listed:
            parts = rel.split("/")
            for depth in range(len(parts)):
                entries.setdefault("/".join(parts[:depth]), set()).add(parts[depth])
        own = sorted(f for f, names in entries.items() if f and own_folder(f, names, local=False))
        own = [f for f in own if not any(f.startswith(o + "/") for o in own)]  # outermost
        inside_own = tuple(o + "/" for o in own)
        own_keys = {  # a cache X.h5 beside its parts or lock, and its lock
            f"{f}/{n}" if f else n for f, names in entries.items() for n in own_files(names)
        }
        own += sorted(k for k in own_keys & listed.keys() if not k.startswith(inside_own))
        self.own = sorted(own)
        self.stats = {
            rel: key
            for rel, key in listed.items()
            if all(map(visible_name, rel.split("/")))
            and not rel.startswith(inside_own)
            and rel not in own_keys
        }
        self.folders: dict[str, set[str]] = {}  # folder -> its subfolders' names
        for rel in self.stats:
            parts = rel.split("/")
            for depth in range(len(parts) - 1):
                self.folders.setdefault("/".join(parts[:depth]), set()).add(parts[depth])

    def exists(self) -> bool:
        return bool(self.stats)

    def show(self, rel: str) -> str:
        return remote.join(self.url, rel) if rel else self.url

    def subfolders(self, rel: str, named=None) -> list[str]:
        names = self.folders.get(rel, set())
        return sorted(n for n in names if named is None or n.lower() in named)

    def files(self, rel: str) -> list[str]:
        return [p for p in self.stats if p.startswith(rel + "/")]

    def top_folders(self) -> list[str]:
        return self.subfolders("")  # (featx's own outputs are not listed)

    def skipped(self) -> list[tuple[str, str]]:
        return [(o, FEATX_OWN) for o in self.own]


def visible_name(name: str) -> bool:
    """Whether a file or folder called `name` is listed (hidden: '.*' and '__*')."""
    return bool(name) and not name.startswith(_HIDDEN)


def _check_not_too_high(tree, class_dirs: list[str]) -> None:
    """A class folder that holds split folders means DATA_DIR is one level too high."""
    for c in class_dirs:
        inner = tree.subfolders(c, config.SPLIT_FOLDER_NAMES)
        if inner:
            raise FeatxError(
                f"'{tree.show(c)}' looks like a data folder, not a class: it holds split folders "
                f"({', '.join(inner)}). Pass '{tree.show(c)}' as DATA_DIR (one level down), or "
                "rename them."
            )


def printable(name: str) -> str:
    """`name` as text that can be written anywhere (HDF5, CSV, a terminal): a file name that is
    not valid UTF-8 arrives from the system with its bad bytes as lone surrogates, which no
    encoder accepts; they are shown as backslash escapes (b'\\xe9' -> '\\xe9')."""
    if name.isascii():
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


NOT_UTF8 = "file name is not valid UTF-8; rename it (e.g. with `convmv -f latin1 -t utf8`)"


def _check_class_name(shown: str, name: str) -> None:
    """A class name becomes a line of labels.txt, a CSV cell and a heading: one with a line break
    or another control character would be misread (3 lines of labels.txt for 2 outputs), and one
    that is not valid UTF-8 cannot be stored at all."""
    if printable(name) != name:
        raise FeatxError(
            f"The class folder '{printable(shown)}' has a name that is not valid UTF-8, "
            "which the cache, labels.txt and the CSV files cannot hold. Rename the folder "
            "(e.g. with `convmv -f latin1 -t utf8`)."
        )
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise FeatxError(
            f"The class folder {shown!r} has a line break or another control character "
            "in its name, which labels.txt and the CSV files cannot hold. Rename the folder."
        )


def look_alike_classes(class_names: list[str]) -> list[list[str]]:
    """Groups of class names that a reader takes for one: they differ only in letter case
    ('Dogs', 'dogs') or in Unicode form ('café' typed on macOS, NFD, and on Linux, NFC)."""
    groups: dict[str, list[str]] = {}
    for name in class_names:
        groups.setdefault(unicodedata.normalize("NFC", name).casefold(), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def look_alike_warning(names: list[str]) -> str:
    shown = ", ".join(f"'{n}'" if n.isascii() else ascii(n) for n in names)
    return (
        f"warning: the class folders {shown} look alike (they differ only in letter case or "
        f"Unicode form) and are {len(names)} classes; merge them into one folder, or rename them."
    )


def _class_dirs(tree) -> tuple[str, list[tuple[str | None, str]]]:
    """(layout, [(split from the layout or None, class folder relative to the root)])."""
    root, top = tree.show(""), tree.top_folders()
    split_dirs = [p for p in top if p.lower() in config.SPLIT_FOLDER_NAMES]
    if not split_dirs:
        _check_not_too_high(tree, top)
        return "flat", [(None, c) for c in top]
    others = [p for p in top if p not in split_dirs]
    if others:
        raise FeatxError(
            f"'{root}' mixes split folders ({', '.join(split_dirs)}) with "
            f"other folders ({', '.join(others)}). Put every class folder inside train/ "
            "(and validation/, test/), or use a flat layout DATA/CLASS/*."
        )
    splits = Counter(config.SPLIT_FOLDER_NAMES[p.lower()] for p in split_dirs)
    if any(n > 1 for n in splits.values()):
        raise FeatxError(f"'{root}' has both val/ and validation/ folders; keep one of them.")
    if "train" not in splits:
        raise FeatxError(f"'{root}' has split folders but no train/ folder; add train/CLASS/*.")
    return "splits", [
        (config.SPLIT_FOLDER_NAMES[s.lower()], f"{s}/{c}") for s in split_dirs
        for c in tree.subfolders(s)
    ]  # fmt: skip


def find_images(data_dir: str | Path) -> Listing:
    """List the images in `data_dir` (a folder, or a URL: featx.images.remote) and their classes.

    Two layouts are understood:
      DATA/{train,validation|val,test}/CLASS/*  -> those splits are kept;
      DATA/CLASS/*                              -> split later by `assign_splits`.
    Any non-hidden regular file is a candidate: formats are detected from content when decoding,
    and a file that is no image is rejected then, with its reason. Links back into the data
    folder, broken links, special files and unreadable folders are listed in `skipped`. For a
    URL, `Listing.stats` holds each object's (size, stamp), read with the listing.
    """
    tree = _ObjectTree(str(data_dir)) if is_url(data_dir) else _LocalTree(Path(data_dir))
    if not tree.exists():
        raise not_found("data", data_dir)
    layout, class_dirs = _class_dirs(tree)
    files: list[ImageFile] = []
    per_class: Counter = Counter()
    all_classes = set()
    for split, class_dir in class_dirs:
        name = class_dir.rsplit("/", 1)[-1]
        _check_class_name(tree.show(class_dir), name)
        all_classes.add(name)
        found = tree.files(class_dir)
        files += [ImageFile(rel, name, split) for rel in found]
        per_class[name] += len(found)
    class_names = sorted(c for c in all_classes if per_class[c] > 0)
    empty = sorted(c for c in all_classes if per_class[c] == 0)
    if len(class_names) < 2:
        hint = ""
        if len(class_dirs) == 1 and tree.subfolders(class_dirs[0][1]):
            one = tree.show(class_dirs[0][1])
            hint = f" If '{one}' holds the class folders, pass it as DATA_DIR."
        raise FeatxError(
            f"Found {len(class_names)} class folder(s) with files in '{tree.show('')}' "
            f"({', '.join(class_names) or 'none'}); a classifier needs at least 2. "
            f"Expected DATA/CLASS/image.jpg or DATA/train/CLASS/image.jpg.{hint}"
        )
    if os.sep != "/":
        files = [ImageFile(f.path.replace(os.sep, "/"), f.class_name, f.split) for f in files]
    bad_names = [f.path for f in files if printable(f.path) != f.path]
    if bad_names:
        files = [f for f in files if printable(f.path) == f.path]
    files.sort(key=lambda f: f.path)
    skipped = sorted(tree.skipped() + [(printable(p), NOT_UTF8) for p in bad_names])
    return Listing(layout, files, class_names, empty, skipped, stats=tree.stats)


def _rank_key(seed: int):
    """A per-file pseudo-random sort key, sha1 of "seed:path": the split of a file never depends
    on which other files exist. One call per path; the digest sorts as its hex digest does."""
    prefix, sha1 = f"{seed}:".encode(), hashlib.sha1
    return lambda path: sha1(prefix + path.encode()).digest()


def _assignable(files: list[ImageFile]) -> list[ImageFile]:
    """The files featx splits: a flat folder's, or train/'s when there is no validation/."""
    has_validation = any(f.split == "validation" for f in files)
    return [f for f in files if f.split is None or (f.split == "train" and not has_validation)]


def unassigned(files: list[ImageFile], existing: dict[str, str]) -> list[ImageFile]:
    """The files whose split is decided now: featx splits them and the cache has none recorded."""
    return [f for f in _assignable(files) if existing.get(f.path) not in ("train", "validation")]


def assign_splits(
    files: list[ImageFile],
    existing: dict[str, str],
    val_split: float = config.VAL_SPLIT,
    seed: int = config.SEED,
    groups: list[list[str]] = (),
) -> dict[str, str]:
    """Return {path: split} for every file.

    Files whose split comes from the layout keep it; files in `existing` (recorded in the cache)
    keep theirs, so splits are stable when images are added. The rest (flat layout, or train/
    without validation/) are split per class: enough of them go to validation to bring each
    class's validation share to `val_split`, chosen by a seeded hash of the path.

    `groups`: lists of paths that must stay on one side (near copies: featx.quality.duplicates).
    A group is placed as one unit, ranked by its first path's hash, owned by its most common
    class; a new file joining a group whose members already have a split goes to their side. A
    group larger than its class's validation share is split file by file (see _keeps_whole).
    Without groups, each file is its own unit: the split is the one featx made before groups.
    """
    check_fraction("val_split", val_split)
    assignable = _assignable(files)
    pending = unassigned(files, existing)
    pending_paths = {f.path for f in pending}
    result = {f.path: f.split for f in files if f.path not in pending_paths}
    result.update({f.path: existing[f.path] for f in assignable if f.path not in pending_paths})
    decided = {f.path for f in assignable if f.path not in pending_paths}  # have a side already
    if not pending:
        return result
    total, val = Counter(f.class_name for f in assignable), Counter()
    val.update(f.class_name for f in assignable if result.get(f.path) == "validation")
    class_of_all = {f.path: f.class_name for f in assignable}
    need = _targets(total, val_split)
    groups = [g for g in groups if _keeps_whole(g, class_of_all, need)]
    units = _units(pending, groups, result, decided)
    for paths, side in units:  # new copies of files that already have a side join it
        if side is not None:
            result.update(dict.fromkeys(paths, side))
    class_of = {f.path: f.class_name for f in pending}
    val.update(class_of[p] for paths, side in units if side == "validation" for p in paths)
    rank = _rank_key(seed)
    free = sorted((paths for paths, side in units if side is None), key=lambda u: rank(u[0]))
    for paths in free:
        per_class = Counter(class_of[p] for p in paths)
        owner = min(per_class, key=lambda c: (-per_class[c], c))
        # a unit goes to validation when that brings its class nearer its share (a single file:
        # while the share is not reached)
        to_val = val[owner] + per_class[owner] / 2 < need[owner]
        result.update(dict.fromkeys(paths, "validation" if to_val else "train"))
        if to_val:
            val.update(per_class)
    return result


def _targets(total: Counter, val_split: float) -> dict[str, int]:
    """{class: validation images it should have}."""
    need = {}
    for class_name, n in total.items():
        target = round(n * val_split)
        if val_split > 0 and n >= 2:
            target = max(1, min(target, n - 1))  # keep at least one image on each side
        need[class_name] = target
    return need


def _keeps_whole(group: list[str], class_of: dict, need: dict) -> bool:
    """Whether a group stays whole: no larger than its class's validation share (a larger one
    could go to validation only by overshooting it; 4 look-alikes in a class of 4 are the class,
    not copies). Its class: the most common among its members being split."""
    per_class = Counter(class_of[p] for p in group if p in class_of)
    if not per_class:
        return False
    owner = min(per_class, key=lambda c: (-per_class[c], c))
    return sum(per_class.values()) <= need[owner]


def _units(pending: list[ImageFile], groups, result: dict, decided: set) -> list:
    """[(paths, side or None)]: the pending files in units that stay together, with the side of
    their group's files that already have one (the majority; a tie, a leak recorded before:
    train), or None where featx chooses."""
    pending_paths = {f.path for f in pending}
    units, placed = [], set()
    for group in groups:
        members = sorted(p for p in group if p in pending_paths and p not in placed)
        if not members:
            continue
        placed.update(members)
        sides = Counter(result[p] for p in group if p in decided)
        side = None
        if sides:
            side = "validation" if sides["validation"] > sides["train"] else "train"
        units.append((members, side))
    units += [([f.path], None) for f in pending if f.path not in placed]
    return units
