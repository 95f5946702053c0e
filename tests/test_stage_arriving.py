"""A tar image is unpacked while its chunks arrive: real daemons on loopback.

Two daemons (in this process, on 127.0.0.2-3, each with its own state, run
directory and control socket) stage a tar through the control socket's
``stage`` operation, as the Prolog asks. Their origin holds back the image's
last chunk until the test lets it go, so "unpacking overlaps the transfer" is
observed without timing: the first member is in the staging scratch directory
while the broadcast provably lacks a chunk, and nothing is at the staged path
until the whole image arrived and verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from p2pcast import control, jobrecord
from p2pcast.daemon import Daemon, DaemonConfig
from p2pcast.demo import free_port
from p2pcast.errors import ChunkCorrupt, StageError
from p2pcast.jobstage import JobStaging
from p2pcast.manifest import ChunkRef
from p2pcast.names import ImageRef
from p2pcast.node import BroadcastOptions
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.publish import push
from p2pcast.swarm import SwarmConfig
from tests.helpers_node import cluster_auth
from tests.test_stage_support import add_file, is_root, leftovers, need, write_tar

pytestmark = pytest.mark.slow

IMAGE = "hpc/arriving:1"
FIRST = b'PRETTY_NAME="unpacked while arriving"\n'
#: Random bytes: ten 64 KiB chunks, so there is a prefix to unpack from.
PAYLOAD = random.Random(11).randbytes(640 * 1024)
CHUNK = 64 * 1024
USER = 4321
#: Bound on each wait: the steps take well under a second; a hang fails here.
STEP = 30.0
#: The test's fixed polling period while waiting for a file to appear.
POLL = 0.02


class GatedOrigin(DirectoryOrigin):
    """A directory origin that withholds the image's last chunk until released,
    then gives it as is or corrupted."""

    def __init__(self, root: Path, gate: asyncio.Event, corrupt: bool) -> None:
        super().__init__(root)
        self.gate = gate
        self.corrupt = corrupt
        self.last_index = -1

    async def get_chunk(self, chunk: ChunkRef) -> bytes:
        if chunk.index == self.last_index:
            await self.gate.wait()
            if self.corrupt:
                return b"\0" * chunk.stored_size
        return await super().get_chunk(chunk)


@pytest.fixture(scope="module")
def origin_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The origin directory, and the index of the image's last chunk."""
    work = tmp_path_factory.mktemp("arriving")

    def build(tf: tarfile.TarFile) -> None:
        add_file(tf, "etc/os-release", FIRST)
        add_file(tf, "payload", PAYLOAD)

    image = write_tar(work / "image.tar", build)
    origin = work / "origin"

    async def publish() -> int:
        async with DirectoryOrigin(origin) as o:
            pushed = await push(image, o, ImageRef("hpc/arriving", "1"), chunk_size=CHUNK)
            return pushed.manifest.chunk_count - 1

    return origin, asyncio.run(publish())


@contextlib.asynccontextmanager
async def daemons(
    work: Path, published: tuple[Path, int], names: list[str], corrupt: bool = False
) -> AsyncIterator[tuple[dict[str, Daemon], asyncio.Event]]:
    origin, last = published
    need(is_root(), "root (chown of the unpacked tree to the job's user)")
    port = free_port("127.0.0.2")
    gate = asyncio.Event()
    started: dict[str, Daemon] = {}
    # One failed origin read fails the broadcast: the corrupt case ends at once.
    options = BroadcastOptions(swarm=SwarmConfig(max_origin_failures=1))
    try:
        for i, name in enumerate(names, start=2):
            node = work / name
            daemon = Daemon(
                DaemonConfig(
                    node=name,
                    listen=f"127.0.0.{i}",
                    port=port,
                    state_dir=node / "state",
                    control_socket=str(node / "control.sock"),
                    origin=str(origin),
                    run_dir=node / "run",
                    options=options,
                    authenticator=cluster_auth(),
                )
            )
            gated = GatedOrigin(origin, gate, corrupt)
            gated.last_index = last
            daemon.origins[str(origin)] = gated
            await daemon.start()
            started[name] = daemon
        yield started, gate
    finally:
        gate.set()  # never leave a read waiting
        for daemon in started.values():
            await daemon.stop()


def _stage_body(job: int, names: list[str], node: str) -> dict[str, Any]:
    hosts = {n: f"127.0.0.{i}" for i, n in enumerate(names, start=2)}
    return {
        "job": str(job), "image": IMAGE, "mounts": "", "peers": ",".join(names),
        "node": node, "uid": USER, "gid": USER, "addresses": hosts,
    }  # fmt: skip


async def _stage(daemon: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    return await control.request(daemon.config.control_socket, "stage", **body)


def _run_dir(daemon: Daemon) -> Path:
    assert daemon.config.run_dir is not None
    return daemon.config.run_dir


async def _first_member_in_scratch(daemon: Daemon, *tasks: asyncio.Task[Any]) -> None:
    """Wait until the first member is unpacked in the daemon's staging scratch."""
    staged = _run_dir(daemon) / "staged"
    async with asyncio.timeout(STEP):
        while not any(staged.glob(".*.staging-*/rootfs/etc/os-release")):
            for task in tasks:
                if task.done():
                    task.result()  # its error, if it failed
                    pytest.fail("staging ended before the last chunk was released")
            await asyncio.sleep(POLL)


def test_tar_is_unpacked_while_it_arrives_and_shared(
    tmp_path: Path, origin_dir: tuple[Path, int]
) -> None:
    names = ["n1", "n2"]

    async def go() -> None:
        async with daemons(tmp_path, origin_dir, names) as (nodes, gate):
            first = {
                n: asyncio.create_task(_stage(d, _stage_body(1, names, n)))
                for n, d in nodes.items()
            }
            for daemon in nodes.values():
                await _first_member_in_scratch(daemon, *first.values())
                [broadcast] = daemon.service.broadcasts.values()
                # Provably before the transfer ends: the last chunk is withheld.
                assert not broadcast.swarm.have[-1]
                assert broadcast.state == "fetching"
                assert 0 < broadcast.held_prefix < broadcast.manifest.size
                # Nothing visible where the job will run from, no record yet.
                assert [p for p in (_run_dir(daemon) / "staged").iterdir()
                        if not p.name.startswith(".")] == []  # fmt: skip
                assert jobrecord.read(_run_dir(daemon), "1") is None
            # A second job of the same user joins while the first still stages.
            second = asyncio.create_task(_stage(nodes["n1"], _stage_body(2, ["n1"], "n1")))
            await asyncio.sleep(POLL)
            assert not second.done()
            gate.set()
            async with asyncio.timeout(STEP):
                results = {n: await t for n, t in first.items()}
                shared = await second
            for name, result in results.items():
                assert result["method"] == "untar" and result["state"] == "complete"
                assert result["unpacked_while_arriving"] > 0, name
                root = Path(result["root"])
                assert (root / "etc" / "os-release").read_bytes() == FIRST
                assert (root / "payload").read_bytes() == PAYLOAD
                assert os.stat(root / "payload").st_uid == USER
                assert jobrecord.read(_run_dir(nodes[name]), "1") is not None
                # The scratch directory went with the rename.
                assert leftovers(root.parent, root.name) == [root.name]
            assert shared["root"] == results["n1"]["root"] and shared["jobs_sharing"] == 2
            staging = nodes["n1"].staging
            assert staging is not None
            [entry] = staging.describe()
            assert entry["jobs"] == ["1", "2"]
            for job in ("1", "2"):
                await control.request(nodes["n1"].config.control_socket, "release", job=job)
            await control.request(nodes["n2"].config.control_socket, "release", job="1")
            for daemon in nodes.values():
                assert list((_run_dir(daemon) / "staged").iterdir()) == []

    asyncio.run(go())


def test_a_broadcast_failing_mid_way_leaves_nothing_staged(
    tmp_path: Path, origin_dir: tuple[Path, int]
) -> None:
    names = ["n1"]

    async def go() -> None:
        async with daemons(tmp_path, origin_dir, names, corrupt=True) as (nodes, gate):
            daemon = nodes["n1"]
            task = asyncio.create_task(_stage(daemon, _stage_body(3, names, "n1")))
            await _first_member_in_scratch(daemon, task)
            gate.set()  # the last chunk comes, corrupt: the broadcast fails
            async with asyncio.timeout(STEP):
                with pytest.raises(ChunkCorrupt, match="corrupt"):
                    await task
            record = jobrecord.read(_run_dir(daemon), "3")
            assert record is not None and record.root is None
            assert record.error is not None and "corrupt" in record.error
            # Neither the staged copy nor its scratch tree remain.
            assert list((_run_dir(daemon) / "staged").iterdir()) == []
            assert daemon.staging is not None and daemon.staging.describe() == []

    asyncio.run(go())


def test_stopping_the_daemon_wakes_the_unpacking(
    tmp_path: Path, origin_dir: tuple[Path, int]
) -> None:
    async def go() -> None:
        async with daemons(tmp_path, origin_dir, ["n1"]) as (nodes, _):
            daemon = nodes.pop("n1")  # stopped here, not on the way out
            task = asyncio.create_task(_stage(daemon, _stage_body(4, ["n1"], "n1")))
            await _first_member_in_scratch(daemon, task)
            async with asyncio.timeout(STEP):  # a thread left waiting would hang here
                await daemon.stop()
                with pytest.raises(StageError, match="the broadcast was stopped"):
                    await task
            assert list((_run_dir(daemon) / "staged").iterdir()) == []

    asyncio.run(go())


def test_a_restart_removes_a_half_unpacked_scratch_tree(tmp_path: Path) -> None:
    run, state = tmp_path / "run", tmp_path / "state"
    scratch = run / "staged" / ".abc-u4321.staging-x1y2z3" / "rootfs" / "etc"
    scratch.mkdir(parents=True)
    (scratch / "os-release").write_bytes(FIRST)
    JobStaging(run, state).recover()  # what a daemon killed mid-unpack finds
    assert list((run / "staged").iterdir()) == []
