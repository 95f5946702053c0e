"""A full tmpfs, end to end through real daemons: a clean error, no partial
data, a consistent cache, and the next try works once there is room.

The unit layers have their own tests (a full disk while unpacking, at cache
open, while a tar arrives); these run ``python -m p2pcast daemon`` processes
(tests/helpers_hooks.Nodes) with the staging area or the node cache on a
small tmpfs, and go through the Slurm Prolog/Epilog and the CLI as a cluster
would:

* the run directory (staged copies and job records, /run/p2pcast on a
  node) without room left for the unpacked tar (a node fault); then with
  room, from the cache;
* a staging area or node cache smaller in all than the image: the image's
  fault (ImageTooLarge, a user error), no node drains;
* the node cache full of other files (a node fault, nothing left), then
  with room;
* a cache full of images nobody uses: the least recently used go to make
  room; one staged for a running job stays;
* one node of a broadcast whose cache cannot hold the image: the others must
  not wait for it (timed against the same broadcast with room on both);
* the run directory already full: neither the copy nor the record that
  would say why fits.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pcast import jobrecord
from p2pcast import manifest as manifest_mod
from p2pcast.errors import ImageTooLarge, StoreError
from p2pcast.jobspec import NODE_FAULT
from p2pcast.names import ImageRef
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.publish import push
from p2pcast.store import NodeCache
from p2pcast.swarm import SwarmConfig
from tests.helpers_hooks import EPILOG, PROLOG, REPO, Nodes
from tests.test_stage_support import add_file, is_root, mount_guard, need, tmpfs, write_tar

pytestmark = pytest.mark.slow

#: Two tar images of the same size (distinct names: each has its own broadcast).
IMAGE = "hpc/big:1"
OTHER = "hpc/other:1"
#: Random, so neither chunk compression nor tmpfs can make it smaller; 48
#: chunks of 64 KiB, so that two nodes share the origin reads.
PAYLOAD = 3 * 1024 * 1024
#: Far smaller than PAYLOAD (the unpacked tree or the cached image cannot fit).
SMALL = "1m"
#: Room for the image and its unpacked tree several times over.
ROOMY = "16m"
#: Bounds a broadcast that should finish in about a second here.
DONE_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An origin with IMAGE and OTHER; returns the origin and each image's tar file."""
    work = tmp_path_factory.mktemp("fullfs-origin")
    origin = work / "origin"
    files = {}
    for seed, name in enumerate((IMAGE, OTHER)):
        payload = random.Random(seed).randbytes(PAYLOAD)

        def build(tf: object, payload: bytes = payload) -> None:
            add_file(tf, "etc/os-release", b'PRETTY_NAME="fullfs"\n')  # type: ignore[arg-type]
            add_file(tf, "payload", payload)  # type: ignore[arg-type]

        files[name] = write_tar(work / f"image{seed}.tar", build)

    async def publish() -> None:
        async with DirectoryOrigin(origin) as o:
            for name, path in files.items():
                ref = ImageRef(*name.split(":"))
                await push(path, o, ref, chunk_size=64 * 1024)

    asyncio.run(publish())
    return {"origin": origin, **files}


@pytest.fixture
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A short directory (control sockets must fit AF_UNIX's 108 bytes)."""
    need(is_root(), "root (tmpfs mounts, chown of unpacked trees)")
    path = tmp_path_factory.mktemp("ff")
    with mount_guard(path):
        yield path


def _fill(directory: Path, leave: int) -> Path:
    """A file that takes all but LEAVE bytes of DIRECTORY's filesystem (what
    something other than p2pcast put there)."""
    st = os.statvfs(directory)
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - leave)
    finally:
        os.close(fd)
    return filler


def _remount(path: Path, size: str) -> None:
    subprocess.run(
        ["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _broadcast(nodes: Nodes, name: str, image: str) -> dict[str, Any]:
    """This node's broadcast of ``image`` (its progress), as status shows it."""
    wanted = image.split(":", maxsplit=1)[0]
    found: list[dict[str, Any]] = [
        b for b in nodes.request(name, "status")["broadcasts"] if b["name"] == wanted
    ]
    assert len(found) == 1, found
    return found[0]


def _wait_complete(nodes: Nodes, name: str, image: str) -> dict[str, Any]:
    deadline = time.monotonic() + DONE_TIMEOUT
    while (progress := _broadcast(nodes, name, image))["state"] != "complete":
        assert progress["state"] == "fetching" or progress["state"] == "verifying", progress
        assert time.monotonic() < deadline, f"not complete after {DONE_TIMEOUT} s: {progress}"
        time.sleep(0.1)
    return progress


def _check_cache(cache: Path, expected: dict[str, Path]) -> None:
    """The cache holds exactly ``expected`` (image id -> the tar published), each
    complete, verified by the store's own check and by its sha256, with no
    stray file (a temporary marker, a second directory)."""
    images = cache / "images"
    assert sorted(os.listdir(images)) == sorted(expected)
    for image_id, source in expected.items():
        directory = images / image_id
        assert sorted(os.listdir(directory)) == ["complete", "image", "manifest", "stored"]
        manifest_bytes = (directory / "manifest").read_bytes()
        assert manifest_mod.image_id_of(manifest_bytes).hex() == image_id
        image = NodeCache(cache).open(manifest_bytes)
        try:
            assert image.complete
            image.verify_image()  # the whole-image sha256 of the manifest
        finally:
            image.close()
        assert _sha256(directory / "image") == _sha256(source)


def _daemon_log(nodes: Nodes, name: str) -> str:
    return (nodes.dir(name) / "daemon.log").read_text()


def _one_error_line(stderr: str) -> str:
    """The single error line of a hook or CLI run, with no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert len(errors) == 1, stderr
    return errors[0]


def test_full_staging_area_fails_the_stage_and_keeps_the_cached_image(
    work: Path, published: dict[str, Path]
) -> None:
    nodes = Nodes(work, 1, published["origin"])
    # The whole run directory, as /run/p2pcast on a node: the job records
    # share the tmpfs with the staged copies. It could hold the unpacked
    # image, but something else took all but 1 MiB of it.
    with tmpfs(nodes.run_dir("n1"), ROOMY) as run_dir:
        staged = run_dir / "staged"
        try:
            nodes.start("n1")
            filler = _fill(run_dir, 1024 * 1024)
            free = os.statvfs(run_dir).f_bfree

            result = nodes.run_hooks(PROLOG, 61, IMAGE)["n1"]
            # The staging area is the node's: sized by its administrator, or
            # filled by what it failed to clean. hook_exit_status documents
            # "run directory full" as a node fault: the node drains.
            assert result.returncode == NODE_FAULT, result.stderr
            line = _one_error_line(result.stderr)
            assert "(StageError, node fault, draining): no space left on" in line, line
            assert f"{staged} while unpacking" in line, line
            # Nothing partial: no scratch tree, no half-unpacked copy.
            assert os.listdir(staged) == []
            # The job's steps fail with the message; nothing counts the job.
            record = jobrecord.read(run_dir, "61")
            assert record is not None and record.root is None
            assert record.error is not None and "no space left on" in record.error
            assert nodes.request("n1", "status")["staged"] == []
            state = json.loads((nodes.dir("n1") / "state" / "staging.json").read_text())
            assert state["staged"] == {}
            # The broadcast goes on without the staging (other nodes may fetch
            # from this one) and leaves a complete, verified image.
            first = _wait_complete(nodes, "n1", IMAGE)
            assert first["from_origin"] > 0
            _check_cache(nodes.dir("n1") / "state" / "cache", {first["image_id"]: published[IMAGE]})
            [entry] = nodes.request("n1", "cache-list")["images"]
            assert entry["complete"] and entry["image_id"] == first["image_id"]
            assert "Traceback" not in _daemon_log(nodes, "n1")
            epilog = nodes.run_hooks(EPILOG, 61, IMAGE)["n1"]
            assert epilog.returncode == 0, epilog.stderr
            assert jobrecord.read(run_dir, "61") is None
            # The record gone too, the tmpfs is as it was: no space held.
            assert os.statvfs(run_dir).f_bfree == free

            # With room, the next job stages the cached copy: no origin read.
            filler.unlink()
            result = nodes.run_hooks(PROLOG, 62, IMAGE, mounts="/tmp:/data")["n1"]
            assert result.returncode == 0, result.stderr
            second = _broadcast(nodes, "n1", IMAGE)
            assert second["origin_bytes_read"] == first["origin_bytes_read"]
            assert second["from_origin"] == first["from_origin"]
            record = jobrecord.read(run_dir, "62")
            assert record is not None and record.error is None and record.root is not None
            assert record.root.parent == staged
            assert (record.root / "payload").stat().st_size == PAYLOAD
            assert (record.root / "data").is_dir()
            [copy] = nodes.request("n1", "status")["staged"]
            assert copy["jobs"] == ["62"]
            print(
                f"\nrun dir tmpfs: {free} free blocks before and after the failure,"
                f" {os.statvfs(run_dir).f_bfree} of the resized one with the image staged;"
                f" origin bytes read: {first['origin_bytes_read']} for the first job,"
                f" {second['origin_bytes_read'] - first['origin_bytes_read']} more for the second"
            )

            epilog = nodes.run_hooks(EPILOG, 62, IMAGE)["n1"]
            assert epilog.returncode == 0, epilog.stderr
            assert os.listdir(staged) == []
            assert os.listdir(run_dir / "jobs") == []
            assert nodes.request("n1", "status")["staged"] == []
            _check_cache(nodes.dir("n1") / "state" / "cache", {first["image_id"]: published[IMAGE]})
        finally:
            nodes.close()


def _cli(nodes: Nodes, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pcast", *args, "--control", nodes.control(name)],
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=DONE_TIMEOUT * 2,
    )


def test_full_cache_fails_the_fetch_and_leaves_no_partial_image(
    work: Path, published: dict[str, Path]
) -> None:
    nodes = Nodes(work, 1, published["origin"])
    with tmpfs(nodes.dir("n1") / "state" / "cache", SMALL) as cache:
        try:
            nodes.start("n1")
            # A cache smaller in all than the image: the request's fault.
            result = _cli(nodes, "n1", "fetch", IMAGE)
            assert result.returncode == ImageTooLarge.exit_code, result.stderr
            line = _one_error_line(result.stderr)
            assert "error: image hpc/big needs 4.0 MiB of cache space" in line, line
            assert f"more than this node's cache ({cache}) has in all (1.0 MiB)" in line, line
            assert os.listdir(cache / "images") == []

            # Room enough in all, but taken by something that is not a cached image.
            _remount(cache, ROOMY)
            filler = _fill(cache, 1024 * 1024)
            free = os.statvfs(cache).f_bfree
            started = time.monotonic()
            result = _cli(nodes, "n1", "fetch", IMAGE)
            failed_after = time.monotonic() - started
            assert result.returncode == StoreError.exit_code, result.stderr
            line = _one_error_line(result.stderr)
            assert line.startswith("p2pcast: error: no space left on device while preparing"), line
            assert str(cache) in line
            # Nothing of the image stays, not even the space it reserved.
            assert os.listdir(cache / "images") == []
            assert os.statvfs(cache).f_bfree == free
            # The daemon is up and has nothing half-made to show; its log says why.
            assert nodes.procs["n1"].poll() is None
            assert nodes.request("n1", "status")["broadcasts"] == []
            assert nodes.request("n1", "cache-list")["images"] == []
            assert f"fetch of {IMAGE} failed: no space left on device" in _daemon_log(nodes, "n1")
            assert "Traceback" not in _daemon_log(nodes, "n1")

            filler.unlink()
            result = _cli(nodes, "n1", "fetch", IMAGE)
            assert result.returncode == 0, result.stderr
            progress = _broadcast(nodes, "n1", IMAGE)
            assert progress["state"] == "complete"
            _check_cache(cache, {progress["image_id"]: published[IMAGE]})
            print(
                f"\ncache tmpfs: {free} free blocks before and after the failed fetch"
                f" (failed in {failed_after:.2f} s, CLI start-up included),"
                f" {os.statvfs(cache).f_bfree} with the image cached"
            )
        finally:
            nodes.close()


def test_a_peer_with_a_full_cache_does_not_hold_up_the_broadcast(
    work: Path, published: dict[str, Path]
) -> None:
    nodes = Nodes(work, 2, published["origin"])
    with tmpfs(nodes.dir("n2") / "state" / "cache", SMALL) as cache:
        try:
            nodes.start_all()
            started = time.monotonic()
            results = nodes.run_hooks(PROLOG, 71, OTHER)
            degraded = time.monotonic() - started
            assert results["n1"].returncode == 0, results["n1"].stderr
            # n2's cache could never hold the image: the job fails, n2 does not drain.
            assert results["n2"].returncode == 0, results["n2"].stderr
            line = _one_error_line(results["n2"].stderr)
            assert "(ImageTooLarge, the job's steps will fail with it)" in line, line
            record = jobrecord.read(nodes.run_dir("n2"), "71")
            assert record is not None and record.error is not None
            assert "of cache space" in record.error
            assert os.listdir(cache / "images") == []
            assert nodes.request("n2", "status")["broadcasts"] == []  # and it is up
            alone = _broadcast(nodes, "n1", OTHER)
            cache_n1 = nodes.dir("n1") / "state" / "cache"
            _check_cache(cache_n1, {alone["image_id"]: published[OTHER]})

            # The same broadcast with room on both nodes, for comparison.
            _remount(cache, ROOMY)
            started = time.monotonic()
            results = nodes.run_hooks(PROLOG, 72, IMAGE)
            normal = time.monotonic() - started
            assert all(r.returncode == 0 for r in results.values()), results
            both = _broadcast(nodes, "n1", IMAGE)
            print(
                f"\nn1's Prolog with n2's cache full: {degraded:.2f} s (broadcast"
                f" {alone['seconds']:.2f} s, {alone['from_origin']} bytes from the origin,"
                f" {alone['from_peers']} from peers); with room on both: {normal:.2f} s"
                f" (broadcast {both['seconds']:.2f} s, {both['from_origin']} from the origin,"
                f" {both['from_peers']} from peers)"
            )
            # n2 is up but has no broadcast, and never announces a chunk: n1
            # reads n2's share itself once it judges n2 a slow owner, after
            # the swarm's takeover grace (2 s), not after the 30 s peer
            # timeout of a node that does not answer at all.
            assert alone["from_origin"] == alone["bytes_total"]
            assert alone["seconds"] < SwarmConfig().takeover_grace + 5.0, (alone, both)
            for job, image in ((71, OTHER), (72, IMAGE)):
                for name, r in nodes.run_hooks(EPILOG, job, image).items():
                    assert r.returncode == 0, f"{name}: {r.stderr}"
        finally:
            nodes.close()


def test_a_run_dir_filled_by_others_fails_cleanly_without_a_record(
    work: Path, published: dict[str, Path]
) -> None:
    """/run full before the job starts (not by this image): the staging fails,
    and so does writing the job record that would say why."""
    nodes = Nodes(work, 1, published["origin"])
    with tmpfs(nodes.run_dir("n1"), ROOMY) as run_dir:
        try:
            nodes.start("n1")
            filler = _fill(run_dir, 0)
            assert os.statvfs(run_dir).f_bfree == 0
            result = nodes.run_hooks(PROLOG, 81, IMAGE)["n1"]
            assert result.returncode == NODE_FAULT, result.stderr
            line = _one_error_line(result.stderr)
            print(f"\n{line}")
            # The node's fault (it cannot keep records), and both causes said.
            assert "(StoreError, node fault, draining): no space left on" in line, line
            assert "while unpacking" in line and "; and cannot write the job record" in line, line
            assert "No space left on device" in line, line
            # No record at all: the job's steps fail with "no staging record".
            assert jobrecord.read(run_dir, "81") is None
            assert os.listdir(run_dir / "staged") == []
            assert os.listdir(run_dir / "jobs") == []
            assert nodes.request("n1", "status")["staged"] == []
            filler.unlink()
            epilog = nodes.run_hooks(EPILOG, 81, IMAGE)["n1"]
            assert epilog.returncode == 0, epilog.stderr
        finally:
            nodes.close()


def test_a_staging_area_smaller_than_the_image_is_the_jobs_error(
    work: Path, published: dict[str, Path]
) -> None:
    """A tar larger than the whole staging filesystem can never be unpacked on this
    node: the job fails with ImageTooLarge and the node does not drain (a node
    fault on every node of the allocation would drain them all, and a requeued job
    more). The image itself still arrives and stays cached."""
    nodes = Nodes(work, 1, published["origin"])
    with tmpfs(nodes.run_dir("n1"), SMALL) as run_dir:
        try:
            nodes.start("n1")
            result = nodes.run_hooks(PROLOG, 63, IMAGE)["n1"]
            assert result.returncode == 0, result.stderr
            line = _one_error_line(result.stderr)
            assert "(ImageTooLarge, the job's steps will fail with it)" in line, line
            assert "image hpc/big:1 unpacks to at least 3.0 MiB, more than this node's" in line
            record = jobrecord.read(run_dir, "63")
            assert record is not None and record.root is None
            assert record.error is not None and "staging area" in record.error
            assert os.listdir(run_dir / "staged") == []
            assert nodes.request("n1", "status")["staged"] == []
            done = _wait_complete(nodes, "n1", IMAGE)
            _check_cache(nodes.dir("n1") / "state" / "cache", {done["image_id"]: published[IMAGE]})
            epilog = nodes.run_hooks(EPILOG, 63, IMAGE)["n1"]
            assert epilog.returncode == 0, epilog.stderr
            assert jobrecord.read(run_dir, "63") is None
        finally:
            nodes.close()


def test_images_nobody_uses_make_room_and_a_staged_one_stays(
    work: Path, published: dict[str, Path]
) -> None:
    """A cache with room for one image: the next image evicts the one no job
    uses; one staged for a running job is never evicted (the fetch fails as a
    node fault instead, leaving the staged image whole), until its job ends."""
    nodes = Nodes(work, 1, published["origin"])
    with tmpfs(nodes.dir("n1") / "state" / "cache", "6m") as cache:
        try:
            nodes.start("n1")
            assert _cli(nodes, "n1", "fetch", IMAGE).returncode == 0
            big = _broadcast(nodes, "n1", IMAGE)["image_id"]
            result = _cli(nodes, "n1", "fetch", OTHER)
            assert result.returncode == 0, result.stderr
            other = _broadcast(nodes, "n1", OTHER)["image_id"]
            _check_cache(cache, {other: published[OTHER]})
            log = _daemon_log(nodes, "n1")
            assert f"cache full: removed hpc/big ({big[:12]}, 3.0 MiB) to make room for" in log

            # OTHER staged for job 91: it must stay while the job runs.
            staged = nodes.run_hooks(PROLOG, 91, OTHER)["n1"]
            assert staged.returncode == 0, staged.stderr
            result = _cli(nodes, "n1", "fetch", IMAGE)
            assert result.returncode == StoreError.exit_code, result.stderr
            assert "no space left on device while preparing" in _one_error_line(result.stderr)
            _check_cache(cache, {other: published[OTHER]})
            [copy] = nodes.request("n1", "status")["staged"]
            assert copy["jobs"] == ["91"]

            # Job over: OTHER is nobody's now, and goes for IMAGE.
            assert nodes.run_hooks(EPILOG, 91, OTHER)["n1"].returncode == 0
            result = _cli(nodes, "n1", "fetch", IMAGE)
            assert result.returncode == 0, result.stderr
            _check_cache(cache, {big: published[IMAGE]})
            assert "cache full: removed hpc/other" in _daemon_log(nodes, "n1")
            assert "Traceback" not in _daemon_log(nodes, "n1")
        finally:
            nodes.close()
