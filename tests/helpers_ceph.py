"""Helpers for tests against the real Ceph of the session fixture (tests/conftest.py).

Broadcasts run N in-process daemons on 127.0.0.1 (port 0 each) in one event
loop; each daemon opens its own origin client from the image's URL and the
configuration it was given, as separate daemons would. Ceph is reached on the
instance's own address.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from p2pcast.daemon import Daemon, DaemonConfig
from p2pcast.manifest import Manifest
from p2pcast.names import ImageRef
from p2pcast.node import Broadcast, BroadcastOptions
from p2pcast.origins.base import Origin, OriginConfig, open_origin
from p2pcast.publish import push
from tests.helpers_node import cluster_auth
from tools.ceph import RGW_DATA_POOL, Ceph

MiB = 1 << 20

#: Bound on one broadcast in these tests (they take a second or two); it only
#: turns a hang into a failure with a traceback.
STEP_TIMEOUT = 90.0


def s3_config(ceph: Ceph, endpoints: tuple[str, ...] | None = None) -> OriginConfig:
    """p2pcast's own S3 settings for the instance (no AWS_* variables needed)."""
    return OriginConfig(
        s3_endpoints=(ceph.endpoint,) if endpoints is None else endpoints,
        s3_access_key=ceph.access_key,
        s3_secret_key=ceph.secret_key,
    )


def rados_config(ceph: Ceph) -> OriginConfig:
    return OriginConfig(rados_conf=str(ceph.conf), rados_id="admin")


def sha256_of(path: str | Path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


async def publish(image: Path, url: str, config: OriginConfig, ref: ImageRef) -> Manifest:
    async with open_origin(url, config) as origin:
        return (await push(image, origin, ref, chunk_size=MiB)).manifest


def publish_sync(image: Path, url: str, config: OriginConfig, ref: ImageRef) -> Manifest:
    return asyncio.run(publish(image, url, config, ref))


@dataclasses.dataclass
class Outcome:
    """One node's end of a broadcast."""

    node: str
    broadcast: Broadcast
    daemon: Daemon

    @property
    def error(self) -> BaseException | None:
        return self.broadcast.error

    @property
    def path(self) -> Path:
        return self.daemon.cache.image_path(self.broadcast.image_id)

    @property
    def origin(self) -> Origin:
        assert self.broadcast.origin is not None
        return self.broadcast.origin


@contextlib.asynccontextmanager
async def daemons(
    tmp: Path, count: int, config: OriginConfig, options: BroadcastOptions | None = None
) -> AsyncIterator[list[Daemon]]:
    """COUNT daemons n1..nCOUNT on 127.0.0.1; stopped (origins closed) on the way out."""
    started: list[Daemon] = []
    try:
        for i in range(1, count + 1):
            daemon = Daemon(
                DaemonConfig(
                    node=f"n{i}",
                    listen="127.0.0.1",
                    port=0,
                    state_dir=tmp / f"n{i}",
                    control_socket=str(tmp / f"n{i}" / "control.sock"),
                    origin_config=config,
                    options=options or BroadcastOptions(linger=10.0),
                    authenticator=cluster_auth(),
                )
            )
            started.append(daemon)
            await daemon.start()
        yield started
    finally:
        async with asyncio.timeout(STEP_TIMEOUT):
            for daemon in started:
                await daemon.stop()


async def broadcast(group: list[Daemon], image: str) -> list[Outcome]:
    """Ask every daemon to fetch IMAGE (e.g. "s3://bucket/name:tag") from the others;
    wait until each has finished (or failed) and has served its neighbours."""
    addresses = {d.config.node: f"127.0.0.1:{d.service.port}" for d in group}
    hostlist = f"n[1-{len(group)}]"
    async with asyncio.timeout(STEP_TIMEOUT):
        started = await asyncio.gather(
            *(
                d.fetch({"image": image, "peers": hostlist, "node": d.config.node,
                         "addresses": addresses})
                for d in group
            )
        )  # fmt: skip
        # The daemon's own task records failures; wait for it, as a watcher would.
        await asyncio.gather(*(b.done.wait() for b in started))
        await asyncio.gather(
            *(
                d.runs.get(b.image_id) or asyncio.sleep(0)
                for d, b in zip(group, started, strict=True)
            )
        )
        await asyncio.gather(*(b.linger() for b in started if b.error is None))
    return [Outcome(d.config.node, b, d) for d, b in zip(group, started, strict=True)]


def cached(daemon: Daemon) -> list[tuple[str, bool]]:
    """(image name, complete) of everything in a daemon's cache."""
    return [(e.name, e.complete) for e in daemon.cache.entries()]


def osd_delta(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]
) -> dict[int, tuple[int, int]]:
    return {osd: (after[osd][0] - before[osd][0], after[osd][1] - before[osd][1]) for osd in after}


def rgw_head_object(ceph: Ceph, bucket: str, key: str) -> str:
    """The RADOS object in RGW's data pool that holds the start of S3 object KEY:
    its name is the bucket's marker, "_", then the key (RGW's layout)."""
    cluster = ceph.rados()
    try:
        with cluster.open_ioctx(RGW_DATA_POOL) as ioctx:
            names = [str(o.key) for o in ioctx.list_objects()]
    finally:
        cluster.shutdown()
    found = [n for n in names if n.endswith(f"_{key}")]
    assert len(found) == 1, f"{key}: {found} in {len(names)} objects of {RGW_DATA_POOL}"
    return found[0]


def overwrite(ceph: Ceph, pool: str, obj: str, data: bytes) -> None:
    """Overwrite the start of a RADOS object in place (its xattrs, RGW's manifest
    among them, stay): rot inside Ceph, below any gateway."""
    cluster = ceph.rados()
    try:
        with cluster.open_ioctx(pool) as ioctx:
            ioctx.write(obj, data, 0)
    finally:
        cluster.shutdown()
