"""Data folders, images and part files in object storage: `s3://`, `gs://`, `az://` or any fsspec
URL. Listing, reads and writes go through fsspec (s3fs, gcsfs, adlfs: the `cloud` extra),
imported on first use, so a local run never loads it.

Objects are read where they are decoded (extract's decoding workers, Ray's actors), never by the
driver for them. An object's identity for the incremental check is its size and a stamp: a
63-bit digest of its version id, else its ETag, else its modification time, stored where a local
file's mtime_ns goes; the sha256 of the content stays what decides a real change. Every call is
tried config.REMOTE_ATTEMPTS times when the store says it is busy or the network fails; what is
still wrong then is a one-line FeatxError (listing) or an OSError (a read: the file is rejected as
unreadable, and tried again next run).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from typing import TypeVar

from featx import config
from featx.errors import FeatxError
from featx.files import is_url

__all__ = ["is_url", "join", "list_objects", "read", "write", "stamp", "entry"]

T = TypeVar("T")

INSTALL_HINT = "pip install 'featx[cloud]'"

# Words of the messages stores and their clients give for a busy store (S3 SlowDown 503,
# Throttling, RequestLimitExceeded; GCS 429 rateLimitExceeded; Azure ServerBusy) or a broken
# connection: these are tried again, the rest at once reported.
_BUSY = (
    "slowdown", "slow down", "reduce your request rate", "throttl", "ratelimit", "rate limit",
    "too many requests", "serverbusy", "server busy", "requestlimitexceeded",
)  # fmt: skip
_NETWORK = ("timeout", "timed out", "connection", "temporarily", "endpoint", "ssl")


def join(root: str, rel: str) -> str:
    """`rel` (a path with forward slashes) below the URL `root`."""
    return f"{root.rstrip('/')}/{rel}"


def filesystem(url: str):
    """(fsspec filesystem, path without the protocol) of `url`; a one-line FeatxError when the
    protocol's package is not installed."""
    try:
        import fsspec
    except ImportError:
        raise FeatxError(f"'{url}' is a URL; reading one needs fsspec: {INSTALL_HINT}") from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:  # fsspec says which package the protocol needs
        raise FeatxError(f"'{url}' needs a package that is not installed ({e}); "
                         f"{INSTALL_HINT}") from None  # fmt: skip
    except ValueError as e:  # an unknown protocol
        raise FeatxError(f"'{url}' is no URL featx can read ({e}).") from None
    return fs, path.rstrip("/")


def kind(e: BaseException) -> str:
    """'credentials', 'bucket', 'busy', 'network', 'missing' or 'other': what went wrong, from
    the error's class and message (no client library imported: any fsspec store)."""
    name, text = type(e).__name__.lower(), str(e).lower()
    if "credential" in name or "credential" in text or "nocredentials" in name:
        return "credentials"
    if "bucket" in text and ("not exist" in text or "not found" in text or "nosuch" in text):
        return "bucket"
    if any(w in text or w in name for w in _BUSY) or getattr(e, "errno", None) == 16:
        return "busy"  # s3fs turns SlowDown into OSError(EBUSY)
    if isinstance(e, FileNotFoundError):
        return "missing"
    if any(w in name or w in text for w in _NETWORK):
        return "network"
    if isinstance(e, PermissionError) or "accessdenied" in text or "forbidden" in text:
        return "denied"
    return "other"


def one_line(url: str, e: BaseException) -> FeatxError:
    """The one-line error of a failed call on `url`, saying what to do."""
    why = kind(e)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if why == "credentials":
        return FeatxError(
            f"No credentials to read '{url}' ({first}). Set them as the store's client expects: "
            "for s3:// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), for gs:// "
            "GOOGLE_APPLICATION_CREDENTIALS, for az:// AZURE_STORAGE_CONNECTION_STRING."
        )
    if why == "bucket":
        return FeatxError(f"The bucket of '{url}' does not exist ({first}). Check its name, "
                          "and the endpoint (AWS_ENDPOINT_URL) and region.")  # fmt: skip
    if why == "busy":
        return FeatxError(
            f"The object store throttled the requests for '{url}' ({first}) "
            f"{config.REMOTE_ATTEMPTS} times. Wait and run again (finished work is kept), or "
            "pass fewer --workers."
        )
    if why == "denied":
        return FeatxError(f"Access to '{url}' was denied ({first}). Check the credentials' "
                          "permissions on that bucket and prefix.")  # fmt: skip
    if why == "missing":
        return FeatxError(f"Nothing found at '{url}' ({first}). Check the URL.")
    return FeatxError(f"Could not reach '{url}' ({type(e).__name__}: {first}).")


def retried(call: Callable[[], T], attempts: int = config.REMOTE_ATTEMPTS) -> T:
    """call(), tried again after a busy store or a network failure, `attempts` times in all,
    waiting config.REMOTE_BACKOFF_SECONDS, then twice that, ...; the last error passes through."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as e:
            if attempt == attempts - 1 or kind(e) not in ("busy", "network"):
                raise
            time.sleep(config.REMOTE_BACKOFF_SECONDS * 2**attempt)
    raise AssertionError("unreachable")


def stamp(info: dict) -> int:
    """An object's change stamp (0 .. 2**63-1): of its version id, else its ETag, else its
    modification time, whichever the store gives."""
    for key in ("VersionId", "version_id", "generation", "ETag", "etag", "LastModified",
                "last_modified", "mtime", "updated"):  # fmt: skip
        value = info.get(key)
        if value not in (None, "", "null"):
            digest = hashlib.sha256(f"{key}={value}".encode()).digest()
            return int.from_bytes(digest[:8], "big") >> 1
    return 0


def list_objects(url: str) -> dict[str, tuple[int, int]]:
    """{path relative to `url`, with forward slashes: (size, stamp)} of every object below it;
    a one-line FeatxError for no credentials, a missing bucket, throttling or nothing there."""
    fs, base = filesystem(url)
    fs.invalidate_cache()  # fsspec keeps listings per process: a second run must see new objects
    try:
        found = retried(lambda: fs.find(base, detail=True))
    except Exception as e:
        raise one_line(url, e) from None
    out = {}
    for path, info in found.items():
        if info.get("type", "file") != "file" or path.endswith("/"):
            continue  # the empty "folder/" objects consoles create
        rel = path[len(base) :].lstrip("/")
        if rel:
            out[rel] = (int(info.get("size") or 0), stamp(info))
    return out


def entry(url: str) -> dict | None:
    """fsspec's info of the object at `url`, {"type": "directory"} for a prefix, or None."""
    fs, path = filesystem(url)
    try:
        return retried(lambda: fs.info(path))
    except FileNotFoundError:
        return None
    except Exception as e:
        raise one_line(url, e) from None


def read(url: str) -> bytes:
    """The bytes of the object at `url`; OSError (with a short reason) when it cannot be read."""
    fs, path = filesystem(url)
    try:
        return retried(lambda: fs.cat_file(path))
    except OSError:
        raise
    except Exception as e:  # a client error that is no OSError: one for the caller
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"{kind(e)}: {first}") from None


def write(url: str, data: bytes) -> None:
    """Store `data` as the object at `url` in one PUT: readers see all of it or none."""
    fs, path = filesystem(url)
    try:
        retried(lambda: fs.pipe_file(path, data))
    except Exception as e:
        raise one_line(url, e) from None


def names(url: str, suffix: str = "") -> dict[str, int]:
    """{name: size} of the objects directly below the prefix `url` whose name ends in `suffix`."""
    fs, base = filesystem(url)
    try:
        found = retried(lambda: fs.ls(base, detail=True, refresh=True))
    except FileNotFoundError:
        return {}
    except Exception as e:
        raise one_line(url, e) from None
    out = {}
    for info in found:
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if info.get("type") == "file" and name.endswith(suffix):
            out[name] = int(info.get("size") or 0)
    return out


def remove(url: str) -> None:
    """Delete the object at `url` (nothing when it is gone already)."""
    fs, path = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        retried(lambda: fs.rm_file(path))
