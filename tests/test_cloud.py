"""Data folders in object storage (#28): `featx extract s3://...` and `featx predict s3://...`
against a real S3 API, moto's server on 127.0.0.1 (a free port, loopback only), started once per
module in its own process. The bucket gives the cache the same folder gives on disk; objects
added, deleted and a driver killed with kill -9 are handled as files are; missing credentials, a
missing bucket and throttling are one line each. Skipped where moto or s3fs is not installed
(`pip install 'featx[cloud]'`, moto[server] is in the dev extra)."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner
from helpers import SLOW_EXTRACT, TINY, assert_one_line_error, assert_same_cache, write_images

import featx
from featx import config
from featx.cache import remote_cache, store
from featx.cli import cli
from featx.commands.extract import extract
from featx.images import finder, remote

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("moto", "s3fs", "flask")),
    reason="needs moto[server] and s3fs: pip install -e '.[dev,cloud]'",
)
RUN = dict(engine="keras", batch_size=4, **TINY)
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """What a process needs to reach the test's S3 server and nothing else: its endpoint, test
    credentials, no instance-metadata lookup (that would leave this machine), no user config."""
    return {
        **CREDENTIALS,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
    }


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server, in its own process on 127.0.0.1; its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "moto's server did not start"
                assert time.time() < deadline, "moto's server not listening after 60 s"
                time.sleep(0.1)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _fresh_clients():
    """fsspec keeps one S3 filesystem per process, with the credentials it found first."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """A new bucket on the server, this process's environment pointed at it; the s3fs
    filesystem to put objects with."""
    import s3fs

    for key, value in s3_env(s3_server).items():
        monkeypatch.setenv(key, value)
    _fresh_clients()
    fs = s3fs.S3FileSystem()
    bucket = "b-" + request.node.name.replace("_", "-")[:40].lower().rstrip("-")
    fs.mkdir(bucket)
    yield fs, bucket
    _fresh_clients()


def upload(fs, local: Path, url_path: str) -> None:
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.pipe_file(f"{url_path}/{f.relative_to(local).as_posix()}", f.read_bytes())
    fs.invalidate_cache()


def make_data(root: Path) -> Path:
    """24 generated images, one corrupt file, one hidden file."""
    data = write_images(root, {"cats": 12, "dogs": 12}, noise=40)
    (data / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (data / "dogs" / ".DS_Store").write_bytes(b"hidden")
    return data


def test_a_bucket_extracts_to_the_cache_its_folder_gives_on_disk(s3, tmp_path):
    fs, bucket = s3
    data = make_data(tmp_path / "data")
    upload(fs, data, f"{bucket}/photos")
    url = f"s3://{bucket}/photos"
    summary = extract(url, tmp_path / "s3.h5", **RUN)
    assert summary["extracted"] == 24 and summary["images"] == 24
    assert summary["rejected"] == [
        {"path": "cats/broken.jpg", "reason": "not an image (format not recognised)"}
    ]
    extract(data, tmp_path / "local.h5", **RUN)
    assert_same_cache(tmp_path / "s3.h5", tmp_path / "local.h5", exact=True)
    cache = store.read_cache(tmp_path / "s3.h5", features=False)
    assert cache.attrs["data_dir"] == url
    # The key of each row is the object's size and stamp (of its ETag), not a local mtime.
    listed = remote.list_objects(url)
    assert list(cache.rows.file_size) == [listed[p][0] for p in cache.paths]
    assert list(cache.rows.file_mtime_ns) == [listed[p][1] for p in cache.paths]
    # Decoding processes read the objects themselves: the same cache again.
    extract(url, tmp_path / "proc.h5", decode_in="processes", workers=2, **RUN)
    assert_same_cache(tmp_path / "proc.h5", tmp_path / "local.h5", exact=True)


def test_added_objects_are_extracted_alone_and_a_deleted_one_is_dropped(s3, tmp_path):
    fs, bucket = s3
    data = make_data(tmp_path / "data")
    upload(fs, data, f"{bucket}/photos")
    url, cache, local = f"s3://{bucket}/photos", tmp_path / "s3.h5", tmp_path / "local.h5"
    extract(url, cache, **RUN)
    extract(data, local, **RUN)  # the folder goes through the same steps (splits are sticky)

    new = write_images(tmp_path / "new", {"cats": 3, "dogs": 2}, name="new{i}.jpg", seed=5)
    upload(fs, new, f"{bucket}/photos")
    summary = extract(url, cache, **RUN)
    assert summary["extracted"] == 5 and summary["kept"] == 25 and summary["images"] == 29
    write_images(data, {"cats": 3, "dogs": 2}, name="new{i}.jpg", seed=5)
    extract(data, local, **RUN)
    assert_same_cache(cache, local, exact=True)

    fs.rm_file(f"{bucket}/photos/dogs/dogs003.jpg")
    summary = extract(url, cache, **RUN)
    assert summary["extracted"] == 0 and summary["dropped"] == 1 and summary["images"] == 28
    assert "dogs/dogs003.jpg" not in store.read_cache(cache, features=False).paths
    (data / "dogs" / "dogs003.jpg").unlink()
    extract(data, local, **RUN)
    assert_same_cache(cache, local, exact=True)


def test_an_object_rewritten_with_the_same_bytes_is_not_extracted_again(s3, tmp_path):
    fs, bucket = s3
    data = make_data(tmp_path / "data")
    upload(fs, data, f"{bucket}/photos")
    url, cache = f"s3://{bucket}/photos", tmp_path / "s3.h5"
    extract(url, cache, **RUN)
    # Another object with new bytes, and one put again unchanged (a new upload, the same bytes).
    fs.pipe_file(f"{bucket}/photos/cats/cats000.jpg", (data / "cats" / "cats001.jpg").read_bytes())
    fs.pipe_file(f"{bucket}/photos/cats/cats002.jpg", (data / "cats" / "cats002.jpg").read_bytes())
    summary = extract(url, cache, **RUN)
    assert summary["extracted"] == 1  # cats000 changed; cats002's content hash is the same


@pytest.mark.slow
def test_a_driver_killed_mid_run_resumes_to_the_identical_cache(s3, s3_server, tmp_path):
    fs, bucket = s3
    data = make_data(tmp_path / "data")
    upload(fs, data, f"{bucket}/photos")
    url, cache = f"s3://{bucket}/photos", tmp_path / "killed.h5"
    env = {**os.environ, **s3_env(s3_server)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACT, url, str(cache)], env=env)
    journal = cache.with_name(cache.name + ".parts")
    deadline = time.time() + 120
    try:
        while len(list(journal.glob("part-*.npz"))) < 2:
            assert proc.poll() is None, "extraction ended before it could be killed"
            assert time.time() < deadline, "no journalled batch after 120 s"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert featx.info(cache)["images"] == 0  # the cache opens: empty, but valid
    finished = len(list(journal.glob("part-*.npz"))) * 4
    summary = extract(url, cache, **RUN)
    assert summary["resumed"] == finished >= 8 and summary["extracted"] + finished <= 25
    extract(data, tmp_path / "local.h5", **RUN)
    assert_same_cache(cache, tmp_path / "local.h5", exact=True)


def test_predict_reads_objects_and_prefixes(s3, tiny_model, tmp_path):
    fs, bucket = s3
    data = write_images(tmp_path / "data", {"cats": 2, "dogs": 2}, noise=40)
    upload(fs, data, f"{bucket}/new")
    url = f"s3://{bucket}/new"
    got = featx.predict(tiny_model.logreg, [f"{url}/cats/cats000.jpg", f"{url}/dogs"])
    local = featx.predict(tiny_model.logreg, [data / "cats" / "cats000.jpg", data / "dogs"])
    assert [r["path"] for r in got["rows"]] == [
        f"{url}/cats/cats000.jpg", f"{url}/dogs/dogs000.jpg", f"{url}/dogs/dogs001.jpg"
    ]  # fmt: skip
    assert [r["label"] for r in got["rows"]] == ["cats", "dogs", "dogs"]  # from the prefixes
    for a, b in zip(got["rows"], local["rows"]):
        assert a["top_k"] == b["top_k"] and a["error"] is None
    missing = featx.predict(tiny_model.logreg, [f"{url}/cats/nope.jpg", f"{url}/cats"])
    assert [r["error"] for r in missing["rows"]] == ["file not found", None, None]


# --- a cache at a URL, and Ray's parts there (#28 item 2) ---------------------------------------


def objects(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p[len(prefix) + 1 :] for p in fs.find(prefix))


def test_a_cache_at_a_url_is_published_part_by_part_and_read_by_every_stage(s3, tmp_path):
    fs, bucket = s3
    data = make_data(tmp_path / "data")
    upload(fs, data, f"{bucket}/photos")
    url = f"s3://{bucket}/caches/c.h5"
    extract(f"s3://{bucket}/photos", url, **RUN)
    extract(data, tmp_path / "local.h5", **RUN)
    stored = objects(fs, f"{bucket}/caches")
    assert stored[0] == "c.h5" and len(stored) == 2 and stored[1].startswith("c.h5.parts/features-")
    # Another machine: nothing staged yet; every stage reads the cache from the URL.
    shutil.rmtree(remote_cache.stage(url).parent)
    assert_same_cache(url, tmp_path / "local.h5", exact=True)
    assert featx.info(url)["images"] == 24
    head = featx.fit_head(url, "logreg", output=tmp_path / "head")
    local_head = featx.fit_head(tmp_path / "local.h5", "logreg", output=tmp_path / "local-head")
    assert head["validation"]["accuracy"] == local_head["validation"]["accuracy"]
    # the URL as given, not a path that pathlib folded ("s3:/b/c.h5")
    assert json.loads((tmp_path / "head" / "head.json").read_text())["cache"] == url
    manifest = json.loads((tmp_path / "head" / "featx-files.json").read_text())
    assert manifest["made_by"]["source"] == url
    audited = featx.audit(url, output=tmp_path / "audit")["summary"]
    # Its contact sheets read the photos from the bucket the cache names as its data folder.
    assert audited["images"] == 24 and audited["unreadable_images"] == 0

    # Incremental: the new objects' part is uploaded, the main file replaced, nothing left over.
    new = write_images(tmp_path / "new", {"cats": 3, "dogs": 2}, name="new{i}.jpg", seed=5)
    upload(fs, new, f"{bucket}/photos")
    assert extract(f"s3://{bucket}/photos", url, **RUN)["extracted"] == 5
    stored = objects(fs, f"{bucket}/caches")
    with h5py.File(remote_cache.stage(url), "r") as f:
        named = sorted(f["sources/names"].asstr()[()])
    assert stored == ["c.h5", *named]
    shutil.rmtree(remote_cache.stage(url).parent)
    assert featx.info(url)["images"] == 29


needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is optional: pip install 'featx[ray]'"
)


@needs_ray
@pytest.mark.slow
def test_ray_actors_write_their_parts_to_a_url_and_the_driver_commits(s3, tmp_path):
    fs, bucket = s3
    data = make_data(tmp_path / "data")
    upload(fs, data, f"{bucket}/photos")
    photos, url = f"s3://{bucket}/photos", f"s3://{bucket}/caches/c.h5"
    extract(data, tmp_path / "local.h5", **RUN)
    ray = dict(executor="ray", workers=1, **RUN)
    # A cache at a URL: the actors PUT their parts beside it, the driver publishes the main file.
    assert extract(photos, url, **ray)["extracted"] == 24
    with h5py.File(remote_cache.stage(url), "r") as f:
        named = sorted(f["sources/names"].asstr()[()])
    assert objects(fs, f"{bucket}/caches") == ["c.h5", *named]
    assert_same_cache(url, tmp_path / "local.h5")
    # A local cache, parts through a URL (`--parts`): copied into the cache, then deleted there.
    cache = tmp_path / "ray.h5"
    assert extract(photos, cache, parts=f"s3://{bucket}/run", **ray)["extracted"] == 24
    assert objects(fs, f"{bucket}/run") == []
    assert_same_cache(cache, tmp_path / "local.h5")


# --- one line for each way a store can refuse ---------------------------------------------------


def cli_extract(url: str, tmp_path: Path):
    return CliRunner().invoke(cli, ["extract", url, "--cache", str(tmp_path / "c.h5"),
                                    "--weights", "none"])  # fmt: skip


def test_missing_credentials_are_one_line(s3, tmp_path, monkeypatch):
    fs, bucket = s3
    upload(fs, make_data(tmp_path / "data"), f"{bucket}/photos")
    for key in CREDENTIALS:
        monkeypatch.delenv(key)
    _fresh_clients()
    result = cli_extract(f"s3://{bucket}/photos", tmp_path)
    assert_one_line_error(result, "No credentials", f"s3://{bucket}/photos", "AWS_ACCESS_KEY_ID")
    assert not (tmp_path / "c.h5").exists()


def test_a_missing_bucket_is_one_line(s3, tmp_path):
    result = cli_extract("s3://no-such-bucket/photos", tmp_path)
    assert_one_line_error(result, "The bucket of 's3://no-such-bucket/photos' does not exist")
    result = cli_extract(f"s3://{s3[1]}/no-such-prefix", tmp_path)
    assert_one_line_error(result, "Data folder not found", f"s3://{s3[1]}/no-such-prefix")


class _Throttling(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request 503 SlowDown, as S3 does under load."""

    protocol_version = "HTTP/1.1"
    calls = 0
    BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")  # fmt: skip

    def _answer(self):
        type(self).calls += 1
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(self.BODY)

    do_GET = do_HEAD = do_PUT = _answer

    def log_message(self, *args):
        pass


def test_throttling_is_retried_a_bounded_number_of_times_then_one_line(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Throttling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for key, value in s3_env(f"http://127.0.0.1:{server.server_address[1]}").items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: none
        monkeypatch.setattr(config, "REMOTE_BACKOFF_SECONDS", 0.01)
        _fresh_clients()
        t0 = time.perf_counter()
        result = cli_extract("s3://busy/photos", tmp_path)
        assert_one_line_error(result, "throttled", "s3://busy/photos", "run again")
        assert time.perf_counter() - t0 < 60
        # featx tried REMOTE_ATTEMPTS times (s3fs adds its own few), then stopped.
        assert config.REMOTE_ATTEMPTS <= _Throttling.calls <= 10 * config.REMOTE_ATTEMPTS
        # A read that stays throttled rejects the file as unreadable (tried again next run).
        status, reason, _ = featx.images.decoder.load_for_cache("s3://busy/a.jpg", 32)
        assert status == "rejected" and reason.startswith("unreadable")
    finally:
        server.shutdown()
        _fresh_clients()


def test_urls_are_told_from_paths():
    assert remote.is_url("s3://b/p") and remote.is_url("gs://b") and remote.is_url("az://c/p")
    assert not remote.is_url("photos/s3:/x") and not remote.is_url("C:\\photos")
    assert finder.inside("s3://b/p", "cats/a.jpg") == "s3://b/p/cats/a.jpg"
    assert finder.inside("s3://b/p", "../a.jpg") is None
    assert remote.stamp({"ETag": '"abc"'}) != remote.stamp({"ETag": '"abd"'})
    assert remote.stamp({"VersionId": "1", "ETag": "x"}) == remote.stamp({"VersionId": "1"})


def test_a_store_whose_package_is_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as where the cloud extra is not installed
    result = cli_extract("gs://bucket/photos", tmp_path)
    assert_one_line_error(result, "gs://bucket/photos", "gcsfs", "pip install 'featx[cloud]'")
    result = cli_extract("nosuch://bucket/photos", tmp_path)
    assert_one_line_error(result, "'nosuch://bucket/photos' is no URL featx can read")


def test_featx_outputs_inside_a_bucket_folder_are_skipped_with_the_reason(s3, tmp_path):
    """The local rule (featx never reads its own outputs as data) holds for a bucket: a cache,
    its parts and lock, and folders carrying featx's marker files are not images or classes."""
    fs, bucket = s3
    data = write_images(tmp_path / "data", {"cats": 2, "dogs": 2})
    (data / "cats" / "old.h5.parts").mkdir()
    (data / "cats" / "old.h5.parts" / ".featx-journal").touch()
    (data / "cats" / "old.h5.parts" / "features-1.npz").write_bytes(b"PK")
    (data / "cats" / "old.h5").write_bytes(b"\x89HDF")
    (data / "cats" / "old.h5.lock").write_bytes(b"")
    write_images(data / "dogs" / "out-head", {"x": 1})  # an output folder with an image
    (data / "dogs" / "out-head" / "head.json").write_text("{}")
    write_images(data / "cache", {"x": 1})  # a cache folder where classes are
    (data / "cache" / "c.h5").write_bytes(b"\x89HDF")
    (data / "cache" / "c.h5.lock").write_bytes(b"")
    upload(fs, data, f"{bucket}/photos")
    listing = finder.find_images(f"s3://{bucket}/photos")
    assert listing.class_names == ["cats", "dogs"]
    assert [f.path for f in listing.files] == [
        "cats/cats000.jpg", "cats/cats001.jpg", "dogs/dogs000.jpg", "dogs/dogs001.jpg"
    ]  # fmt: skip
    own = "featx's own output; not read as data"
    assert dict(listing.skipped) == {
        "cache": own, "cats/old.h5": own, "cats/old.h5.lock": own, "cats/old.h5.parts": own,
        "dogs/out-head": own,
    }  # fmt: skip
