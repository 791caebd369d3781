"""A real two-node Ray cluster on this machine (#28 item 4): `ray start --head` and a second
`ray start --address`, each with its own temp dir and 1 CPU, on 127.0.0.1 only, whose nodes share
nothing but the S3 server (moto, as in test_cloud.py): `featx extract --executor ray --ray-address`
reads the photos from the bucket, the actors PUT their parts beside the cache's URL, and the cache
equals the one a single machine writes; then the same with the second node killed with kill -9
mid-run (the run finishes, or a rerun resumes). Each node runs in its own process group, killed at
teardown whatever happens (never `ray stop`, which would stop every Ray on the machine)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from helpers import TINY, assert_same_cache, write_images
from test_cloud import free_port, s3_env, upload
from test_cloud import s3_server as s3_server  # a fixture, shared

from featx.commands.extract import extract

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("ray", "moto", "s3fs", "flask")),
        reason="needs Ray, moto[server] and s3fs: pip install -e '.[dev,ray,cloud]'",
    ),
]
# `ray start`, except that an address on 127.0.0.1 stays there: Ray turns a loopback address into
# the machine's routable one (services.resolve_ip_for_localhost), and these nodes are loopback only.
RAY_START = [sys.executable, "-c", textwrap.dedent(
    """
    import sys
    import ray._private.services as services
    services.resolve_ip_for_localhost = lambda host: host
    from ray.scripts.scripts import main
    sys.argv = ["ray", *sys.argv[1:]]
    main()
    """
), "start"]  # fmt: skip
# The driver's and the test's own connections: 127.0.0.1 for this node's address (what Ray does
# where it supports no cluster), so they find the head's raylet on loopback.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class Node:
    """One `ray start --block` in its own process group."""

    def __init__(self, args: list[str], temp: Path, env: dict, log: Path):
        ports = [
            "--node-manager-port",
            "--object-manager-port",
            "--metrics-export-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
        ]  # fmt: skip: two nodes on one machine, no clash
        own = [x for p in ports for x in (p, str(free_port()))]
        self.log = log
        self.out = open(log, "wb")  # noqa: SIM115  (the node's output, while it runs)
        self.proc = subprocess.Popen(
            [*RAY_START, "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
             "--temp-dir", str(temp), "--disable-usage-stats", *own, *args],
            env=env, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def kill(self) -> None:
        """kill -9 of the node: its raylet, object store and every worker it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.out.close()


WAIT_FOR_NODES = textwrap.dedent(
    """
    import sys, time, ray
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    deadline = time.time() + 180
    while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[2]):
        assert time.time() < deadline, ray.nodes()
        time.sleep(0.5)
    print([n["NodeManagerAddress"] for n in ray.nodes()])
    """
)


@pytest.fixture
def cluster(s3_server, tmp_path):
    """(address, env, second node) of a two-node cluster whose processes reach the S3 server."""
    env = {
        **os.environ,
        **s3_env(s3_server),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }  # fmt: skip: a test cluster on loopback
    port = free_port()
    address = f"127.0.0.1:{port}"
    head_args = ["--head", "--port", str(port), "--include-dashboard", "false",
                 "--ray-client-server-port", str(free_port())]  # fmt: skip
    # Short temp dirs: Ray's socket paths in them must fit AF_UNIX's 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="featx-ray-"))
    nodes = [Node(head_args, temp / "head", env, tmp_path / "head.log")]
    try:
        _wait_for(nodes, address, env)
        nodes.append(Node(["--address", address], temp / "two", env, tmp_path / "two.log"))
        _wait_for(nodes, address, env)
        yield address, {**env, **LOOPBACK}, nodes[1]
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for(nodes: list[Node], address: str, env: dict) -> None:
    """Until the cluster counts every node alive; a node that exits fails at once, with its log."""
    wait = [sys.executable, "-c", WAIT_FOR_NODES, address, str(len(nodes))]
    waiter = subprocess.Popen(wait, env={**env, **LOOPBACK})
    try:
        while waiter.poll() is None:
            for node in nodes:
                assert node.proc.poll() is None, node.log.read_text()[-3000:]
            time.sleep(0.5)
        assert waiter.returncode == 0, "the cluster did not come up"
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()


DRIVER = textwrap.dedent(
    """
    import sys
    from featx.cache import ray_executor
    from featx.commands.extract import extract
    ray_executor.FAULTS = ray_executor.Faults(delay=float(sys.argv[4]))
    summary = extract(sys.argv[1], sys.argv[2], executor="ray", ray_address=sys.argv[3],
                      engine="keras", batch_size=4, weights="none", alpha=0.35, image_size=32)
    print("EXTRACTED", summary["extracted"], "RESUMED", summary["resumed"])
    """
)


def driver(env, data: str, cache: str, address: str, delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, data, cache, address, str(delay)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.fixture
def bucket(s3_server, tmp_path, monkeypatch):
    """A bucket of 24 photos and a corrupt file, and the same photos in a local folder."""
    import s3fs

    for key, value in s3_env(s3_server).items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    name = f"cluster-{tmp_path.name.replace('_', '-').lower()[:40]}"
    fs.mkdir(name)
    data = write_images(tmp_path / "data", {"cats": 12, "dogs": 12}, noise=40)
    (data / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    upload(fs, data, f"{name}/photos")
    extract(data, tmp_path / "single.h5", engine="keras", batch_size=4, **TINY)
    yield fs, name, data
    s3fs.S3FileSystem.clear_instance_cache()


def part_count(fs, prefix: str) -> int:
    fs.invalidate_cache()
    try:
        return sum("features-" in p for p in fs.ls(prefix, refresh=True))
    except FileNotFoundError:
        return 0


def test_two_nodes_that_share_no_disk_write_the_single_machine_cache(cluster, bucket, tmp_path):
    address, env, _ = cluster
    fs, name, _ = bucket
    url = f"s3://{name}/caches/two.h5"
    args = ["extract", f"s3://{name}/photos", "--cache", url, "--executor", "ray",
            "--ray-address", address, "--engine", "keras", "--batch-size", "4", "--weights",
            "none", "--alpha", "0.35", "--image-size", "32", "--json"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "featx", *args], env=env, capture_output=True,
                         text=True, timeout=400)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["extracted"] == 24 and summary["cache"] == url
    assert_same_cache(url, tmp_path / "single.h5")


def test_a_node_killed_mid_run_costs_its_blocks_only(cluster, bucket, tmp_path):
    address, env, second = cluster
    fs, name, _ = bucket
    url, parts = f"s3://{name}/caches/killed.h5", f"{name}/caches/killed.h5.parts"
    run = driver(env, f"s3://{name}/photos", url, address, 1.0)  # a second or more a block
    try:
        deadline = time.time() + 300
        while not part_count(fs, parts):
            assert run.poll() is None, run.communicate()[0]
            assert time.time() < deadline, "no part written after 300 s"
            time.sleep(0.2)
        second.kill()  # mid-run: at least one block done, others to come
        out, _ = run.communicate(timeout=400)
        print("after the kill:", out.strip().splitlines()[-1:], "exit", run.returncode)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    if run.returncode != 0:  # the run did not survive the node: a rerun resumes what it wrote
        again = driver(env, f"s3://{name}/photos", url, address, 0.0)
        out, _ = again.communicate(timeout=400)
        assert again.returncode == 0, out
        print("rerun:", out.strip().splitlines()[-1:])
        assert "RESUMED 0" not in out, out  # the blocks done before the kill were kept
    assert_same_cache(url, tmp_path / "single.h5")
