"""The directory origin: layout, atomic writes, lookups and error translation."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
from pathlib import Path

import pytest

from p2pcast import manifest
from p2pcast.codec import Codec, encode_chunk
from p2pcast.errors import (
    BadImageName,
    ConfigError,
    ImageNotFound,
    ManifestCorrupt,
    OriginError,
    OriginUnavailable,
)
from p2pcast.hashing import chunk_digest
from p2pcast.manifest import ChunkRef, Manifest
from p2pcast.names import ImageRef, parse_image_ref
from p2pcast.origins import directory
from p2pcast.origins.base import ORIGIN_CLASSES, Origin, open_origin
from p2pcast.origins.directory import DirectoryOrigin
from tests.conftest_publish_helpers import temp_files

CHUNK_SIZE = 64 * 1024


def chunk_for(data: bytes, index: int = 0) -> tuple[ChunkRef, bytes]:
    codec, stored = encode_chunk(data)
    ref = ChunkRef(index, index * CHUNK_SIZE, len(data), len(stored), codec, chunk_digest(stored))
    return ref, stored


def manifest_bytes(name: str = "demo", seed: int = 0) -> bytes:
    """A valid one-chunk manifest; the seed changes its id."""
    data = bytes([seed]) * 1000
    chunk, _ = chunk_for(data)
    return Manifest(
        name=name,
        image_type="tar",
        size=len(data),
        chunk_size=CHUNK_SIZE,
        sha256=bytes(32),
        digests=chunk.digest,
        stored_sizes=(chunk.stored_size,),
        codecs=bytes([chunk.codec]),
    ).encode()


# -- open_origin --------------------------------------------------------------


def test_open_plain_path(tmp_path: Path) -> None:
    origin = open_origin(str(tmp_path / "origin"))
    assert isinstance(origin, DirectoryOrigin)
    assert origin.url == f"file://{tmp_path}/origin"
    assert origin.root == str(tmp_path / "origin")


def test_open_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    origin = open_origin("my:origin")  # a colon without "//" is a path
    assert isinstance(origin, DirectoryOrigin)
    assert origin.root == str(tmp_path / "my:origin")


@pytest.mark.parametrize("prefix", ["file://", "file://localhost", "FILE://"])
def test_open_file_url(tmp_path: Path, prefix: str) -> None:
    origin = open_origin(f"{prefix}{tmp_path}/with%20space")
    assert isinstance(origin, DirectoryOrigin)
    assert origin.root == f"{tmp_path}/with space"
    assert origin.url == f"file://{tmp_path}/with%20space"
    # The canonical url opens the same origin again.
    assert isinstance(again := open_origin(origin.url), DirectoryOrigin)
    assert again.root == origin.root


def test_reserved_schemes_are_not_available_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    # s3:// and rados:// have classes now (tests/test_origin_s3.py); a reserved
    # scheme without one still says so.
    monkeypatch.setitem(ORIGIN_CLASSES, "gs", None)
    with pytest.raises(ConfigError, match="not available yet"):
        open_origin("gs://bucket/images")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("", "empty"),
        ("ftp://example.com/images", "unknown origin scheme"),
        ("file://otherhost/srv", "names host"),
        ("file://", "just a path"),
        ("file:///srv?x=1", "just a path"),
    ],
)
def test_bad_origin_urls(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        open_origin(url)


def test_scheme_that_cannot_be_imported_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(ORIGIN_CLASSES, "s3", "p2pcast.origins.no_such_module:S3Origin")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        open_origin("s3://bucket")


# -- chunks -------------------------------------------------------------------


def test_chunk_round_trip_layout_and_counters(tmp_path: Path) -> None:
    async def main() -> None:
        origin = DirectoryOrigin(tmp_path / "origin")  # created on first write
        chunk, stored = chunk_for(b"abc" * 10000)
        assert chunk.codec is Codec.ZSTD
        assert not await origin.has_chunk(chunk)
        await origin.put_chunk(chunk, stored)
        assert await origin.has_chunk(chunk)
        path = tmp_path / "origin" / "chunks" / chunk.key[:2] / chunk.key
        assert path.read_bytes() == stored
        assert (origin.bytes_read, origin.chunks_read) == (0, 0)
        assert await origin.get_chunk(chunk) == stored
        assert await origin.get_chunk(chunk) == stored
        assert (origin.bytes_read, origin.chunks_read) == (2 * len(stored), 2)
        assert temp_files(tmp_path) == []

    asyncio.run(main())


def test_short_chunk_file_does_not_count_as_present(tmp_path: Path) -> None:
    async def main() -> None:
        origin = DirectoryOrigin(tmp_path)
        chunk, stored = chunk_for(os.urandom(5000))
        await origin.put_chunk(chunk, stored)
        path = tmp_path / "chunks" / chunk.key[:2] / chunk.key
        path.write_bytes(b"")  # what a crash without fsync can leave behind
        assert not await origin.has_chunk(chunk)
        await origin.put_chunk(chunk, stored)
        assert await origin.has_chunk(chunk)

    asyncio.run(main())


def test_put_chunk_refuses_data_of_the_wrong_size(tmp_path: Path) -> None:
    chunk, stored = chunk_for(os.urandom(100))
    with pytest.raises(ValueError, match="bytes"):
        asyncio.run(DirectoryOrigin(tmp_path).put_chunk(chunk, stored + b"x"))


def test_missing_chunk_names_the_key(tmp_path: Path) -> None:
    origin = DirectoryOrigin(tmp_path)
    chunk, _ = chunk_for(b"never stored")
    with pytest.raises(OriginError, match=chunk.key) as info:
        asyncio.run(origin.get_chunk(chunk))
    assert not isinstance(info.value, OriginUnavailable)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert origin.chunks_read == 0


def test_cancelled_reads_leak_no_open_files(tmp_path: Path) -> None:
    # Pullers cancel chunk reads (timeouts, shutdown); a file opened by a
    # worker thread for a cancelled read must still be closed. A leak shows up
    # as a ResourceWarning, which the pytest config turns into an error.
    async def main() -> int:
        origin = DirectoryOrigin(tmp_path)
        chunk, stored = chunk_for(os.urandom(1000))
        await origin.put_chunk(chunk, stored)
        cancelled = 0
        for _ in range(300):
            task = asyncio.create_task(origin.get_chunk(chunk))
            await asyncio.sleep(0)  # let it reach the worker thread
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                cancelled += 1
        return cancelled

    assert asyncio.run(main()) == 300
    gc.collect()


def test_chunk_from_missing_origin_dir(tmp_path: Path) -> None:
    origin = DirectoryOrigin(tmp_path / "nowhere")
    chunk, _ = chunk_for(b"x")
    with pytest.raises(OriginUnavailable, match="does not exist"):
        asyncio.run(origin.get_chunk(chunk))
    assert not asyncio.run(origin.has_chunk(chunk))


def test_chunk_read_error_is_origin_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin = DirectoryOrigin(tmp_path)
    chunk, stored = chunk_for(b"y" * 100)
    asyncio.run(origin.put_chunk(chunk, stored))

    async def broken_read(path: str, limit: int = -1) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO), path)

    monkeypatch.setattr(directory, "_read", broken_read)
    with pytest.raises(OriginUnavailable, match="Input/output error"):
        asyncio.run(origin.get_chunk(chunk))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_write_errors_are_origin_errors_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def failing_replace(src: str, dst: str) -> None:
        raise OSError(code, os.strerror(code), dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    origin = DirectoryOrigin(tmp_path)
    chunk, stored = chunk_for(b"z" * 100)
    with pytest.raises(OriginError, match=os.strerror(code)) as info:
        asyncio.run(origin.put_chunk(chunk, stored))
    assert chunk.key in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert temp_files(tmp_path) == []  # the failed write cleaned up after itself
    with pytest.raises(OriginError, match=os.strerror(code)):
        asyncio.run(origin.put_manifest(ImageRef("demo"), manifest_bytes()))


# -- manifests and tags --------------------------------------------------------


def test_manifest_by_tag_and_by_id(tmp_path: Path) -> None:
    async def main() -> None:
        origin = DirectoryOrigin(tmp_path)
        ref = parse_image_ref("hpc/demo:v1")
        data = manifest_bytes()
        image_id = manifest.image_id_of(data)
        await origin.put_manifest(ref, data)
        assert await origin.get_manifest(ref) == data
        assert await origin.get_manifest_by_id(image_id) == data
        assert (tmp_path / "tags" / "hpc" / "demo" / "v1").read_bytes() == data
        assert (tmp_path / "manifests" / "by-id" / image_id.hex()).read_bytes() == data
        assert temp_files(tmp_path) == []

    asyncio.run(main())


def test_tag_moves_but_by_id_stays(tmp_path: Path) -> None:
    async def main() -> None:
        origin = DirectoryOrigin(tmp_path)
        ref = ImageRef("demo")
        old, new = manifest_bytes(seed=1), manifest_bytes(seed=2)
        await origin.put_manifest(ref, old)
        await origin.put_manifest(ref, new)
        assert await origin.get_manifest(ref) == new
        assert await origin.get_manifest_by_id(manifest.image_id_of(old)) == old
        assert await origin.list_images() == [(ref, manifest.image_id_of(new))]

    asyncio.run(main())


def test_put_manifest_refuses_garbage(tmp_path: Path) -> None:
    origin = DirectoryOrigin(tmp_path)
    with pytest.raises(ManifestCorrupt):
        asyncio.run(origin.put_manifest(ImageRef("demo"), b"not a manifest"))
    assert not (tmp_path / "tags").exists()


def test_missing_image_names_image_and_origin(tmp_path: Path) -> None:
    origin = DirectoryOrigin(tmp_path)
    asyncio.run(origin.put_manifest(ImageRef("other"), manifest_bytes()))
    with pytest.raises(ImageNotFound) as info:
        asyncio.run(origin.get_manifest(parse_image_ref("hpc/demo:v9")))
    assert "hpc/demo:v9" in str(info.value)
    assert origin.url in str(info.value)


def test_missing_origin_dir_is_image_not_found(tmp_path: Path) -> None:
    origin = open_origin(str(tmp_path / "no-origin"))
    with pytest.raises(ImageNotFound) as info:
        asyncio.run(origin.get_manifest(ImageRef("demo", "v1")))
    assert "demo:v1" in str(info.value)
    assert "does not exist" in str(info.value)
    with pytest.raises(ImageNotFound, match="does not exist"):
        asyncio.run(origin.get_manifest_by_id(bytes(16)))
    with pytest.raises(OriginUnavailable, match="does not exist"):
        asyncio.run(origin.list_images())


def test_missing_image_id(tmp_path: Path) -> None:
    origin = DirectoryOrigin(tmp_path)
    with pytest.raises(ImageNotFound, match="00" * 16):
        asyncio.run(origin.get_manifest_by_id(bytes(16)))
    with pytest.raises(ImageNotFound, match="16 bytes"):
        asyncio.run(origin.get_manifest_by_id(b"../../x"))


def test_manifest_read_error_is_origin_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_read(path: str, limit: int = -1) -> bytes:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(directory, "_read", broken_read)
    with pytest.raises(OriginUnavailable, match="Permission denied"):
        asyncio.run(DirectoryOrigin(tmp_path).get_manifest(ImageRef("demo")))


def test_name_that_is_another_name_plus_tag(tmp_path: Path) -> None:
    # "a:b" is the file tags/a/b; "a/b:c" needs tags/a/b to be a directory.
    async def main() -> None:
        origin = DirectoryOrigin(tmp_path)
        await origin.put_manifest(parse_image_ref("a:b"), manifest_bytes())
        with pytest.raises(BadImageName, match="collides"):
            await origin.put_manifest(parse_image_ref("a/b:c"), manifest_bytes())
        with pytest.raises(ImageNotFound):
            await origin.get_manifest(parse_image_ref("a/b:c"))
        await origin.put_manifest(parse_image_ref("x/y:z"), manifest_bytes())
        with pytest.raises(BadImageName, match="collides"):
            await origin.put_manifest(parse_image_ref("x:y"), manifest_bytes())
        with pytest.raises(ImageNotFound):
            await origin.get_manifest(parse_image_ref("x:y"))

    asyncio.run(main())


def test_list_images(tmp_path: Path) -> None:
    async def main() -> list[tuple[ImageRef, bytes]]:
        origin = DirectoryOrigin(tmp_path)
        assert await origin.list_images() == []
        for text, seed in [("b/c:2", 1), ("a:latest", 2), ("b/c:1", 3)]:
            await origin.put_manifest(parse_image_ref(text), manifest_bytes(seed=seed))
        (tmp_path / "tags" / "b" / ".tmp-leftover").write_bytes(b"junk")
        (tmp_path / "tags" / "stray-at-top").write_bytes(b"junk")
        return await origin.list_images()

    images = asyncio.run(main())
    assert [str(ref) for ref, _ in images] == ["a:latest", "b/c:1", "b/c:2"]
    assert [image_id for _, image_id in images] == [
        manifest.image_id_of(manifest_bytes(seed=seed)) for seed in (2, 3, 1)
    ]


def test_origin_is_an_async_context_manager(tmp_path: Path) -> None:
    async def main() -> Origin:
        async with open_origin(str(tmp_path)) as origin:
            await origin.put_manifest(ImageRef("demo"), manifest_bytes())
        return origin

    assert isinstance(asyncio.run(main()), DirectoryOrigin)
