"""Broadcasts seeded from the real Ceph: 6 daemons from S3 (radosgw) and from RADOS.

Origin reads are counted by Ceph itself, not by p2pcast: radosgw's perf
counters (GET requests and the bytes they sent) and each OSD's (client read
ops op_r and the bytes they returned, op_out_bytes). Faults: radosgw killed
and restarted mid-transfer, and a chunk object rotting inside Ceph.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pcast.errors import ChunkCorrupt, OriginUnavailable
from p2pcast.manifest import ChunkRef, Manifest
from p2pcast.names import ImageRef
from p2pcast.origins import s3 as s3_module
from p2pcast.origins.s3 import S3Origin
from tests.helpers_ceph import (
    broadcast,
    cached,
    daemons,
    osd_delta,
    overwrite,
    publish_sync,
    rados_config,
    rgw_head_object,
    s3_config,
    sha256_of,
)
from tests.helpers_node import make_tar
from tools.ceph import RGW_DATA_POOL, Ceph

NODES = 6
BUCKET = "bcast"
#: Ceph's reads for N nodes may exceed the image by this factor at most: the
#: manifests and tags (each node reads its own) and RGW's bucket metadata.
MAX_READ_FACTOR = 1.05


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 13 members of 2 MiB, text and random: zstd and raw chunks, 26 chunks of 1 MiB.
    return make_tar(tmp_path_factory.mktemp("ceph-image") / "image.tar", seed=4)


@pytest.fixture(scope="module")
def published(ceph: Ceph, image: Path) -> Iterator[Manifest]:
    """The image pushed once to S3 and once to RADOS, under the same name."""
    ref = ImageRef("hpc/bcast", "v1")
    in_s3 = publish_sync(image, f"s3://{BUCKET}", s3_config(ceph), ref)
    in_rados = publish_sync(image, f"rados://{ceph.pool}", rados_config(ceph), ref)
    assert in_s3 == in_rados  # same bytes, same chunking: the same manifest
    yield in_s3


def test_six_nodes_from_s3_read_each_byte_from_ceph_once(
    ceph: Ceph, published: Manifest, image: Path, tmp_path: Path
) -> None:
    gets_before, sent_before = ceph.rgw_reads()
    osds_before = ceph.osd_reads()

    async def run() -> None:
        async with daemons(tmp_path, NODES, s3_config(ceph)) as group:
            outcomes = await broadcast(group, f"s3://{BUCKET}/hpc/bcast:v1")
            want = sha256_of(image)
            for outcome in outcomes:
                assert outcome.error is None, f"{outcome.node}: {outcome.error}"
                assert sha256_of(outcome.path) == want, outcome.node
            # p2pcast's own count agrees with Ceph's (below) that chunks came once.
            assert sum(o.origin.bytes_read for o in outcomes) == published.stored_total

    asyncio.run(run())
    gets, sent = ceph.rgw_reads()
    served = sent - sent_before
    print(
        f"S3: radosgw served {gets - gets_before} GETs, {served} bytes for an image of"
        f" {published.stored_total} stored bytes ({served / published.stored_total:.4f} x)"
    )
    assert published.stored_total <= served <= MAX_READ_FACTOR * published.stored_total
    assert gets - gets_before >= published.chunk_count
    reads = osd_delta(osds_before, ceph.osd_reads())
    print(f"S3: OSD (read ops, bytes) during the broadcast: {reads}")
    total = sum(b for _, b in reads.values())
    assert published.stored_total <= total <= MAX_READ_FACTOR * published.stored_total
    # radosgw's reads spread over every OSD.
    assert all(ops > 0 and read > 0 for ops, read in reads.values()), reads


def test_six_nodes_from_rados_read_each_byte_from_the_osds_once(
    ceph: Ceph, published: Manifest, image: Path, tmp_path: Path
) -> None:
    before = ceph.osd_reads()

    async def run() -> None:
        async with daemons(tmp_path, NODES, rados_config(ceph)) as group:
            outcomes = await broadcast(group, f"rados://{ceph.pool}/hpc/bcast:v1")
            want = sha256_of(image)
            for outcome in outcomes:
                assert outcome.error is None, f"{outcome.node}: {outcome.error}"
                assert sha256_of(outcome.path) == want, outcome.node

    asyncio.run(run())
    reads = osd_delta(before, ceph.osd_reads())
    total = sum(b for _, b in reads.values())
    print(
        f"RADOS: OSD (read ops, bytes): {reads}; {total} bytes for an image of"
        f" {published.stored_total} stored bytes ({total / published.stored_total:.4f} x)"
    )
    assert published.stored_total <= total <= MAX_READ_FACTOR * published.stored_total
    # Chunks are read straight from the OSDs that hold them: every OSD served some.
    assert len(reads) == 3
    assert all(ops > 0 and read > 0 for ops, read in reads.values()), reads
    assert sum(ops for ops, _ in reads.values()) >= published.chunk_count


def test_radosgw_killed_and_restarted_mid_transfer_the_fetch_completes(
    ceph: Ceph, published: Manifest, image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed_at: list[int] = []
    old_pid = ceph.pids()["client.rgw.gw"]
    real_get_chunk = S3Origin.get_chunk

    async def get_chunk(self: S3Origin, chunk: ChunkRef) -> bytes:
        # After a few chunks, radosgw dies (SIGKILL) under this very request and
        # comes back a second later; the request must get through on a retry.
        if self.chunks_read == 4 and not killed_at:
            killed_at.append(chunk.index)
            await asyncio.to_thread(ceph.stop_rgw)

            async def restart() -> None:
                await asyncio.sleep(1.0)
                await asyncio.to_thread(ceph.start_rgw)

            restarts.append(asyncio.create_task(restart()))
        return await real_get_chunk(self, chunk)

    restarts: list[asyncio.Task[None]] = []
    monkeypatch.setattr(S3Origin, "get_chunk", get_chunk)

    async def run() -> None:
        async with daemons(tmp_path, 2, s3_config(ceph)) as group:
            outcomes = await broadcast(group, f"s3://{BUCKET}/hpc/bcast:v1")
            await asyncio.gather(*restarts)
            for outcome in outcomes:
                assert outcome.error is None, f"{outcome.node}: {outcome.error}"
                assert sha256_of(outcome.path) == sha256_of(image), outcome.node
            retries = sum(o.origin.retries for o in outcomes if isinstance(o.origin, S3Origin))
            assert retries > 0  # the outage was seen, and ridden out
            print(f"radosgw killed at chunk {killed_at}; {retries} retried S3 requests")

    try:
        asyncio.run(run())
    finally:
        if "client.rgw.gw" not in ceph.pids():
            ceph.start_rgw()  # the other tests need it
    assert killed_at
    assert ceph.pids()["client.rgw.gw"] != old_pid
    # The dead radosgw was fenced (tools/ceph.py): metadata changes by the new one
    # (a bucket created by a push) do not wait 30 s for its watches to time out.
    started = time.monotonic()
    publish_sync(image, "s3://after-restart", s3_config(ceph), ImageRef("hpc/after"))
    assert time.monotonic() - started < 10.0


def test_all_endpoints_down_ends_in_origin_unavailable_not_a_hang(
    ceph: Ceph, published: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fast retries: the point is that they end, with a clear error.
    monkeypatch.setattr(s3_module, "RETRY_ROUNDS", 2)
    monkeypatch.setattr(s3_module, "BACKOFF_FIRST", 0.01)
    ceph.stop_rgw()
    try:

        async def run() -> None:
            async with S3Origin.from_url(f"s3://{BUCKET}", s3_config(ceph)) as origin:
                with pytest.raises(OriginUnavailable, match="after 2 attempts") as caught:
                    await origin.get_chunk(published.chunk(0))
                assert ceph.endpoint in str(caught.value)
                assert origin.retries == 2

        asyncio.run(run())
    finally:
        ceph.start_rgw()


@pytest.mark.parametrize("kind", ["s3", "rados"])
def test_chunk_rotting_inside_ceph_fails_cleanly_and_stages_nothing(
    ceph: Ceph, kind: str, tmp_path: Path
) -> None:
    # An image of its own: its chunks are corrupted without harming the others'.
    source = make_tar(tmp_path / "rot.tar", members=4, seed=99)
    ref = ImageRef("hpc/rot", kind)
    if kind == "s3":
        config, url = s3_config(ceph), f"s3://{BUCKET}"
    else:
        config, url = rados_config(ceph), f"rados://{ceph.pool}"
    m = publish_sync(source, url, config, ref)
    victim = m.chunk(m.chunk_count // 2)
    key = f"chunks/{victim.key[:2]}/{victim.key}"
    if kind == "s3":
        # Below radosgw: the RADOS object that holds the S3 object's bytes.
        overwrite(ceph, RGW_DATA_POOL, rgw_head_object(ceph, BUCKET, key), b"\xde\xad" * 512)
    else:
        overwrite(ceph, ceph.pool, key, b"\xde\xad" * 512)

    async def run() -> None:
        async with daemons(tmp_path / "nodes", 1, config) as group:
            [outcome] = await broadcast(group, f"{url}/{ref}")
            assert isinstance(outcome.error, ChunkCorrupt), outcome.error
            assert f"chunk {victim.index}" in str(outcome.error)
            assert outcome.broadcast.state == "failed"
            # Nothing of the image stays in the cache: no partial, no "complete".
            assert cached(group[0]) == []
            assert not outcome.path.exists()

    asyncio.run(run())
