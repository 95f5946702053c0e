"""Helpers for tests that run several nodes in one process over loopback.

Each node is a PeerService with its own NodeCache and its own DirectoryOrigin
client (over one shared origin directory), as separate daemons would have.
Only 127.0.0.1 and port 0 are used.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import random
import socket
import tarfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from p2pcast import manifest as manifest_mod
from p2pcast.auth import Authenticator, SecretAuth
from p2pcast.codec import Codec
from p2pcast.manifest import Manifest
from p2pcast.names import ImageRef
from p2pcast.node import Broadcast, BroadcastOptions, Peer, PeerService
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.publish import push
from p2pcast.store import NodeCache

MiB = 1024 * 1024
HOST = "127.0.0.1"

#: Bound on any one network step of a test (connect, broadcast, linger). The
#: transfers take well under a second here; this only turns a hang into a
#: failure with a traceback.
STEP_TIMEOUT = 60.0

T = TypeVar("T")

DEFAULT_OPTIONS = BroadcastOptions()

#: The shared secret of the test clusters' nodes (the daemons read theirs from a
#: root-only file; in-process nodes are handed the authenticator).
TEST_SECRET = b"test cluster secret, 32 bytes or more"


def cluster_auth() -> Authenticator:
    return SecretAuth(TEST_SECRET)


#: The event loops a node can run on, by name (as the daemon chooses them).
LOOP_RUNNERS: dict[str, Callable[[Coroutine[Any, Any, Any]], Any]] = {
    "asyncio": asyncio.run,
    "uvloop": uvloop.run,
}


def run_on(loop_name: str, coro: Coroutine[Any, Any, T]) -> T:
    result: T = LOOP_RUNNERS[loop_name](coro)
    return result


def _text(size: int, rng: random.Random) -> bytes:
    """Log-like lines: zstd shrinks them a lot."""
    words = [f"w{rng.randrange(10_000)}".encode() for _ in range(256)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(words, k=12)) + b"\n"
    return bytes(out[:size])


def make_tar(path: Path, *, members: int = 13, member_size: int = 2 * MiB, seed: int = 1) -> Path:
    """A real tar (image type detection needs one) of text and random members.

    Text members become zstd chunks, random ones stay raw: both paths of
    the store and the transport get used.
    """
    rng = random.Random(seed)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(members):
            data = rng.randbytes(member_size) if i % 2 else _text(member_size, rng)
            info = tarfile.TarInfo(f"layer/member-{i:03d}.bin")
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def sha256_of(path: Path) -> bytes:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


@dataclasses.dataclass(frozen=True)
class Published:
    """An image pushed to a directory origin."""

    source: Path
    origin_dir: Path
    manifest_bytes: bytes
    sha256: bytes

    @property
    def manifest(self) -> Manifest:
        return manifest_mod.decode(self.manifest_bytes)


def publish(tmp: Path, *, chunk_size: int = MiB, **tar_options: int) -> Published:
    source = make_tar(tmp / "image.tar", **tar_options)
    origin_dir = tmp / "origin"

    async def go() -> bytes:
        async with DirectoryOrigin(origin_dir) as origin:
            await push(source, origin, ImageRef("test/node"), chunk_size=chunk_size)
            return await origin.get_manifest(ImageRef("test/node"))

    manifest_bytes = asyncio.run(go())
    published = Published(source, origin_dir, manifest_bytes, sha256_of(source))
    codecs = {c.codec for c in published.manifest.chunks()}
    assert codecs == {Codec.RAW, Codec.ZSTD}, "the test image must have raw and zstd chunks"
    return published


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


@dataclasses.dataclass
class Node:
    service: PeerService
    origin: DirectoryOrigin
    broadcasts: list[Broadcast] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.service.node


class Cluster:
    """N nodes in this process; use ``async with running(...)``."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes

    @property
    def peers(self) -> list[Peer]:
        return [Peer(n.name, HOST, n.service.port) for n in self.nodes]

    def start_broadcasts(
        self, published: Published, options: BroadcastOptions = DEFAULT_OPTIONS
    ) -> list[Broadcast]:
        peers = self.peers
        started = []
        for rank, node in enumerate(self.nodes):
            broadcast = Broadcast(
                node.service,
                published.manifest_bytes,
                peers,
                rank,
                node.origin,
                options=options,
                rng=random.Random(rank),
            )
            node.broadcasts.append(broadcast)
            started.append(broadcast)
        return started

    async def broadcast(
        self, published: Published, options: BroadcastOptions = DEFAULT_OPTIONS
    ) -> list[Broadcast]:
        """Run one broadcast on every node to the end, lingering included."""
        started = self.start_broadcasts(published, options)
        async with asyncio.timeout(STEP_TIMEOUT):
            await asyncio.gather(*(b.run() for b in started))
            await asyncio.gather(*(b.linger() for b in started))
        return started

    async def stop_broadcasts(self) -> None:
        for node in self.nodes:
            for broadcast in node.broadcasts:
                await broadcast.stop()
            node.broadcasts.clear()

    def origin_bytes(self) -> int:
        return sum(n.origin.bytes_read for n in self.nodes)


@contextlib.asynccontextmanager
async def running(
    tmp: Path,
    published: Published,
    count: int,
    *,
    zero_copy: bool = True,
    service_class: type[PeerService] = PeerService,
    auth: Callable[[int], Authenticator] | None = None,
) -> AsyncIterator[Cluster]:
    """Start ``count`` nodes; stop broadcasts, links and origins on the way out.

    ``auth(i)`` gives node i's authenticator (default: the cluster's secret).
    """
    nodes: list[Node] = []
    try:
        for i in range(count):
            cache = NodeCache(tmp / f"node{i}")
            service = service_class(
                f"node{i}",
                HOST,
                0,
                cache,
                auth=auth(i) if auth is not None else cluster_auth(),
                zero_copy=zero_copy,
            )
            node = Node(service, DirectoryOrigin(published.origin_dir))
            nodes.append(node)
            service.start()
        yield Cluster(nodes)
    finally:
        cluster = Cluster(nodes)
        async with asyncio.timeout(STEP_TIMEOUT):
            await cluster.stop_broadcasts()
            for node in nodes:
                await node.service.close()
                await node.origin.close()
