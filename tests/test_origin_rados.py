"""The RADOS origin: URL and configuration, librados missing, then against the
real OSDs of the session fixture: layout, push, tags, bad input and rot."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pcast import manifest as manifest_mod
from p2pcast.codec import decode_chunk
from p2pcast.errors import (
    ChunkCorrupt,
    ConfigError,
    ImageNotFound,
    ManifestCorrupt,
    OriginError,
    OriginUnavailable,
)
from p2pcast.hashing import chunk_digest
from p2pcast.manifest import Manifest
from p2pcast.names import ImageRef
from p2pcast.origins import rados as rados_module
from p2pcast.origins.base import OriginConfig, open_origin
from p2pcast.origins.rados import RadosOrigin
from p2pcast.publish import push
from tests.helpers_ceph import MiB, overwrite, rados_config
from tests.helpers_node import make_tar
from tools.ceph import Ceph, gen_key

# Every test here needs python3-rados, like the Ceph fixture (see tests/conftest.py).
pytestmark = pytest.mark.usefixtures("librados")


def objects(ceph: Ceph, pool: str) -> dict[str, bytes]:
    """Every object of a pool, read with librados directly."""
    cluster = ceph.rados()
    try:
        with cluster.open_ioctx(pool) as ioctx:
            return {str(o.key): ioctx.read(str(o.key), 64 * MiB) for o in ioctx.list_objects()}
    finally:
        cluster.shutdown()


# -- URLs and configuration ---------------------------------------------------------


def test_url_query_overrides_config(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\n")
    other = tmp_path / "other.conf"
    other.write_text("[global]\n")
    config = OriginConfig(rados_conf=str(other), rados_id="p2pcast")
    origin = open_origin(f"rados://images?conf={conf}", config)
    assert isinstance(origin, RadosOrigin)
    assert (origin.pool, origin.conf, origin.rados_id) == ("images", str(conf), "p2pcast")
    assert origin.url == f"rados://images?conf={conf}&id=p2pcast"
    plain = RadosOrigin.from_url("rados://images", config)
    assert plain.conf == str(other)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("rados://bad pool", "bad RADOS pool name"),
        ("rados://images?conf=/nonexistent/ceph.conf", "does not exist"),
        ("rados://images?user=x", "unknown RADOS origin option"),
        ("rados://images/hpc/x:1", "goes in the image reference"),
    ],
)
def test_bad_rados_urls_are_config_errors(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        open_origin(url)


def test_without_python3_rados_the_message_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "rados", None)  # makes `import rados` fail
    with pytest.raises(ConfigError, match=r"apt-get install python3-rados") as caught:
        open_origin("rados://images")
    assert "Python 3.11" in str(caught.value)


# -- against the OSDs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tar(tmp_path_factory.mktemp("rados-image") / "image.tar", members=5, seed=21)


@pytest.fixture(scope="module")
def pushed(ceph: Ceph, image: Path) -> Iterator[Manifest]:
    async def run() -> Manifest:
        async with RadosOrigin.from_url(f"rados://{ceph.pool}", rados_config(ceph)) as origin:
            result = await push(image, origin, ImageRef("hpc/rapp", "1.0"), chunk_size=MiB)
            return result.manifest

    yield asyncio.run(run())


def test_layout_chunks_by_content_manifest_by_id_tag_holds_the_id(
    ceph: Ceph, pushed: Manifest
) -> None:
    stored = objects(ceph, ceph.pool)
    image_id = pushed.image_id
    for chunk in pushed.chunks():
        assert chunk_digest(stored[f"chunks/{chunk.key[:2]}/{chunk.key}"]) == chunk.digest
    assert stored[f"manifests/by-id/{image_id.hex()}"] == pushed.encode()
    assert stored["tags/hpc/rapp/1.0"] == image_id.hex().encode() + b"\n"


def test_push_again_skips_every_chunk_and_reads_back(
    ceph: Ceph, pushed: Manifest, image: Path
) -> None:
    async def run() -> None:
        url = f"rados://{ceph.pool}?conf={ceph.conf}"  # everything in the URL
        async with open_origin(url) as origin:
            result = await push(image, origin, ImageRef("hpc/rapp", "copy"), chunk_size=MiB)
            assert (result.chunks_written, result.chunks_skipped) == (0, pushed.chunk_count)
            assert await origin.get_manifest(ImageRef("hpc/rapp", "copy")) == pushed.encode()
            assert await origin.get_manifest_by_id(pushed.image_id) == pushed.encode()
            data = await asyncio.gather(*(origin.get_chunk(c) for c in pushed.chunks()))
            raw = [
                decode_chunk(c.codec, d, c.raw_size)
                for c, d in zip(pushed.chunks(), data, strict=True)
            ]
            assert b"".join(raw) == image.read_bytes()
            assert origin.bytes_read == pushed.stored_total

    asyncio.run(run())


def test_a_tag_moves_a_manifest_never_changes(ceph: Ceph, pushed: Manifest, tmp_path: Path) -> None:
    newer = make_tar(tmp_path / "newer.tar", members=2, seed=22)

    async def run() -> None:
        async with RadosOrigin.from_url(f"rados://{ceph.pool}", rados_config(ceph)) as origin:
            tag = ImageRef("hpc/rapp", "stable")
            await origin.put_manifest(tag, pushed.encode())
            second = (await push(newer, origin, tag, chunk_size=MiB)).manifest
            assert manifest_mod.decode(await origin.get_manifest(tag)) == second
            assert await origin.get_manifest_by_id(pushed.image_id) == pushed.encode()
            listed = dict(await origin.list_images())
            assert listed[tag] == second.image_id
            assert listed[ImageRef("hpc/rapp", "1.0")] == pushed.image_id

    asyncio.run(run())


def test_no_such_pool_or_image(ceph: Ceph, pushed: Manifest, image: Path) -> None:
    async def run() -> None:
        async with RadosOrigin.from_url("rados://nosuchpool", rados_config(ceph)) as origin:
            with pytest.raises(ImageNotFound, match="pool nosuchpool does not exist"):
                await origin.get_manifest(ImageRef("hpc/rapp", "1.0"))
        async with RadosOrigin.from_url("rados://nosuchpool", rados_config(ceph)) as origin:
            with pytest.raises(ConfigError, match="ceph osd pool create nosuchpool"):
                await push(image, origin, ImageRef("hpc/rapp"), chunk_size=MiB)
        async with RadosOrigin.from_url(f"rados://{ceph.pool}", rados_config(ceph)) as origin:
            with pytest.raises(ImageNotFound, match="image hpc/nope:latest not found in pool"):
                await origin.get_manifest(ImageRef("hpc/nope"))
            with pytest.raises(ImageNotFound, match="image id 00"):
                await origin.get_manifest_by_id(bytes(16))

    asyncio.run(run())


def test_wrong_key_or_user_is_a_config_error(ceph: Ceph, tmp_path: Path) -> None:
    keyring = tmp_path / "keyring"
    keyring.write_text(f"[client.admin]\n\tkey = {gen_key()}\n")

    async def run(config: OriginConfig) -> None:
        async with RadosOrigin.from_url(f"rados://{ceph.pool}", config) as origin:
            await origin.get_manifest(ImageRef("hpc/rapp", "1.0"))

    wrong_key = OriginConfig(rados_conf=str(ceph.conf), rados_keyring=str(keyring))
    with pytest.raises(ConfigError, match=r"refused client\.admin") as caught:
        asyncio.run(run(wrong_key))
    assert "keyring" in str(caught.value)
    # A user with no key anywhere: refused just the same, not hanging.
    with pytest.raises(ConfigError, match=r"refused client\.nobody"):
        asyncio.run(run(OriginConfig(rados_conf=str(ceph.conf), rados_id="nobody")))


def test_unreachable_monitors_are_origin_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rados_module, "CONNECT_TIMEOUT", 1)
    conf = tmp_path / "ceph.conf"
    # A monitor address where nothing listens (loopback, so no traffic leaves).
    conf.write_text("[global]\nmon_host = 127.0.0.1:1\nauth_client_required = none\n")

    async def run() -> None:
        async with RadosOrigin.from_url(f"rados://x?conf={conf}") as origin:
            await origin.get_manifest(ImageRef("x"))

    with pytest.raises(OriginUnavailable, match="cannot reach the Ceph monitors"):
        asyncio.run(run())


def test_rot_and_wrong_sizes_are_caught(ceph: Ceph, pushed: Manifest, tmp_path: Path) -> None:
    source = make_tar(tmp_path / "rot.tar", members=2, seed=23)

    async def run() -> None:
        async with RadosOrigin.from_url(f"rados://{ceph.pool}", rados_config(ceph)) as origin:
            m = (await push(source, origin, ImageRef("hpc/rrot"), chunk_size=MiB)).manifest
            short, longer = m.chunk(0), m.chunk(1)
            cluster = ceph.rados()
            try:
                with cluster.open_ioctx(ceph.pool) as ioctx:
                    ioctx.write_full(f"chunks/{short.key[:2]}/{short.key}", b"x" * 10)
                    ioctx.write(f"chunks/{longer.key[:2]}/{longer.key}", b"y", longer.stored_size)
                    ioctx.write_full("manifests/by-id/" + "ab" * 16, pushed.encode())
                    ioctx.write_full("tags/hpc/forged/1", b"ab" * 16 + b"\n")
                    ioctx.write_full("tags/hpc/garbage/1", b"not an id")
            finally:
                cluster.shutdown()
            with pytest.raises(ChunkCorrupt, match="is 10 bytes"):
                await origin.get_chunk(short)
            with pytest.raises(ChunkCorrupt, match="bytes or more"):
                await origin.get_chunk(longer)
            # Same length, other bytes: the origin hands them over; the xxh3 check
            # at the node (tests/test_ceph_broadcast.py) catches them.
            third = m.chunk(2)
            overwrite(ceph, ceph.pool, f"chunks/{third.key[:2]}/{third.key}", b"\0" * 64)
            rotten = await origin.get_chunk(third)
            assert len(rotten) == third.stored_size and chunk_digest(rotten) != third.digest
            assert not await origin.has_chunk(short)  # a push writes it again
            with pytest.raises(ManifestCorrupt, match="altered"):
                await origin.get_manifest(ImageRef("hpc/forged", "1"))
            with pytest.raises(OriginError, match="not an image id"):
                await origin.get_manifest(ImageRef("hpc/garbage", "1"))
            repaired = await push(source, origin, ImageRef("hpc/rrot"), chunk_size=MiB)
            assert repaired.chunks_written == 2  # the short and the long one
            assert await origin.get_chunk(short) != b"x" * 10

    asyncio.run(run())


def test_ceph_conf_from_the_environment_as_librados_finds_it(
    ceph: Ceph, pushed: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CEPH_CONF", str(ceph.conf))

    async def run() -> bytes:
        async with open_origin(f"rados://{ceph.pool}") as origin:  # no conf, no user
            return await origin.get_manifest(ImageRef("hpc/rapp", "1.0"))

    assert asyncio.run(run()) == pushed.encode()
    monkeypatch.delenv("CEPH_CONF")
    with pytest.raises(ConfigError, match=r"from CEPH_CONF or /etc/ceph/ceph\.conf") as caught:
        asyncio.run(run())
    assert "--rados-conf" in str(caught.value)
