"""Push: a real ~20 MiB tar into a directory origin, and back out again."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from p2pcast import limits, publish
from p2pcast.codec import Codec
from p2pcast.errors import BadImageFile, ConfigError, ImageNotFound, OriginError
from p2pcast.manifest import ChunkRef, decode
from p2pcast.names import ImageRef, parse_image_ref
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.publish import PushResult, push
from tests.conftest_publish_helpers import (
    FailingOrigin,
    MiB,
    make_image_tar,
    reassemble,
    stored_files,
    temp_files,
)

CHUNK = MiB
REF = parse_image_ref("hpc/demo:v1")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_tar(tmp_path_factory.mktemp("images") / "demo.tar")


def run_push(image: Path, origin: DirectoryOrigin, ref: ImageRef = REF) -> PushResult:
    return asyncio.run(push(image, origin, ref, chunk_size=CHUNK))


def test_push_then_reassemble_byte_identical(image: Path, tmp_path: Path) -> None:
    origin = DirectoryOrigin(tmp_path / "origin")  # push creates it
    data = image.read_bytes()
    assert 19 * MiB < len(data) < 22 * MiB

    result = run_push(image, origin)
    m = result.manifest
    assert m.size == len(data)
    assert m.sha256 == hashlib.sha256(data).digest()
    assert m.image_type == "tar"
    assert m.name == "hpc/demo"
    assert m.chunk_size == CHUNK
    assert m.chunk_count == -(-len(data) // CHUNK)
    assert set(m.codecs) == {Codec.RAW, Codec.ZSTD}  # text compresses, random does not
    assert m.stored_total < m.size
    assert result.chunks_written == m.chunk_count
    assert result.chunks_skipped == 0
    assert result.bytes_stored == m.stored_total
    assert result.seconds >= 0

    async def pull() -> bytes:
        raw = await origin.get_manifest(REF)
        assert raw == m.encode()
        assert decode(raw) == m
        assert await origin.get_manifest_by_id(result.image_id) == raw
        return await reassemble(origin, decode(raw))

    assert asyncio.run(pull()) == data
    # Every stored byte read exactly once: well under the 1.05 x size budget.
    assert origin.chunks_read == m.chunk_count
    assert origin.bytes_read == m.stored_total
    assert stored_files(tmp_path / "origin") == {c.key for c in m.chunks()}
    assert temp_files(tmp_path / "origin") == []


def test_push_again_writes_nothing(image: Path, tmp_path: Path) -> None:
    origin = DirectoryOrigin(tmp_path)
    first = run_push(image, origin)
    second = run_push(image, origin)
    assert second.chunks_written == 0
    assert second.chunks_skipped == first.manifest.chunk_count
    assert second.bytes_stored == 0
    assert second.image_id == first.image_id
    assert second.manifest == first.manifest


def test_same_bytes_under_two_tags_is_one_image(image: Path, tmp_path: Path) -> None:
    origin = DirectoryOrigin(tmp_path)
    first = run_push(image, origin, parse_image_ref("hpc/demo:v1"))
    second = run_push(image, origin, parse_image_ref("hpc/demo:latest"))
    assert second.image_id == first.image_id
    assert [ref.tag for ref, _ in asyncio.run(origin.list_images())] == ["latest", "v1"]


def test_images_sharing_content_share_chunk_files(image: Path, tmp_path: Path) -> None:
    # Same leading members plus one more: all chunks before the old tail match.
    bigger = make_image_tar(tmp_path / "bigger.tar", members=11)
    origin = DirectoryOrigin(tmp_path / "origin")
    a = run_push(image, origin, parse_image_ref("a"))
    b = run_push(bigger, origin, parse_image_ref("b"))
    keys_a = {c.key for c in a.manifest.chunks()}
    keys_b = {c.key for c in b.manifest.chunks()}
    shared = keys_a & keys_b
    assert len(shared) >= a.manifest.chunk_count - 1
    assert b.chunks_skipped == len(shared)
    assert b.chunks_written == b.manifest.chunk_count - len(shared)
    assert stored_files(tmp_path / "origin") == keys_a | keys_b


@pytest.mark.parametrize("concurrency", [1, 4])
def test_interrupted_push_publishes_nothing(image: Path, tmp_path: Path, concurrency: int) -> None:
    origin = FailingOrigin(tmp_path, allowed=3)
    with pytest.raises(OriginError, match="injected failure"):
        asyncio.run(push(image, origin, REF, chunk_size=CHUNK, concurrency=concurrency))
    assert origin.put_chunks == 3
    with pytest.raises(ImageNotFound, match="hpc/demo:v1"):
        asyncio.run(origin.get_manifest(REF))
    assert asyncio.run(origin.list_images()) == []
    assert not (tmp_path / "manifests").exists()
    assert temp_files(tmp_path) == []

    # One at a time, the three uploads before the failure all landed. In
    # parallel, the failure cancels uploads in flight, and a cancelled upload
    # may or may not land (its worker thread finishes the rename if it began).
    landed = stored_files(tmp_path)
    if concurrency == 1:
        assert len(landed) == 3
    assert len(landed) <= 3
    # The next, successful push reuses whatever landed.
    result = run_push(image, DirectoryOrigin(tmp_path))
    assert result.chunks_skipped == len(landed)
    assert landed <= {c.key for c in result.manifest.chunks()}


def test_tag_moves_on_changed_image_and_old_id_stays(image: Path, tmp_path: Path) -> None:
    origin = DirectoryOrigin(tmp_path / "origin")
    old = run_push(image, origin)
    changed = make_image_tar(tmp_path / "changed.tar", seed=2, members=3)
    new = run_push(changed, origin)
    assert new.image_id != old.image_id

    async def check(original: bytes) -> None:
        assert decode(await origin.get_manifest(REF)) == new.manifest
        assert decode(await origin.get_manifest_by_id(old.image_id)) == old.manifest
        assert decode(await origin.get_manifest_by_id(new.image_id)) == new.manifest
        assert await reassemble(origin, old.manifest) == original
        assert await origin.list_images() == [(REF, new.image_id)]

    asyncio.run(check(image.read_bytes()))


def test_missing_image_and_missing_origin(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound, match="hpc/demo:v1"):
        asyncio.run(DirectoryOrigin(tmp_path / "absent").get_manifest(REF))
    with pytest.raises(ImageNotFound, match="hpc/other:latest"):
        asyncio.run(DirectoryOrigin(tmp_path).get_manifest(parse_image_ref("hpc/other")))


def test_progress_reports_every_byte_once(image: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    result = asyncio.run(
        push(
            image,
            DirectoryOrigin(tmp_path),
            REF,
            chunk_size=CHUNK,
            progress=lambda done, total: calls.append((done, total)),
        )
    )
    size = result.manifest.size
    assert len(calls) == result.manifest.chunk_count
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert calls[-1] == (size, size)
    assert {total for _, total in calls} == {size}


class WatchingOrigin(DirectoryOrigin):
    """Holds each upload until ``concurrency`` are in flight, and records peaks.

    Holding uploads makes the peak deterministic: a push that respects its
    bound reaches it exactly, and one that does not overshoots it.
    """

    def __init__(self, path: Path, reads: list[int], concurrency: int, total: int) -> None:
        super().__init__(path)
        self.reads = reads  # chunk reads so far, counted by the patched reader
        self.concurrency = concurrency
        self.total = total
        self.in_flight = 0
        self.finished = 0
        self.max_in_flight = 0
        self.max_read_ahead = 0
        self.changed = asyncio.Condition()

    def _full(self) -> bool:
        return self.in_flight >= min(self.concurrency, self.total - self.finished)

    async def put_chunk(self, chunk: ChunkRef, data: bytes) -> None:
        async with self.changed:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.max_read_ahead = max(self.max_read_ahead, self.reads[0] - self.finished)
            self.changed.notify_all()
            await self.changed.wait_for(self._full)
        await super().put_chunk(chunk, data)
        async with self.changed:
            self.in_flight -= 1
            self.finished += 1
            self.changed.notify_all()


@pytest.mark.parametrize("concurrency", [1, 3])
def test_memory_stays_bounded(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, concurrency: int
) -> None:
    reads = [0]
    real_read = publish._read_chunk

    def counting_read(*args: object) -> bytes:
        reads[0] += 1
        return real_read(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(publish, "_read_chunk", counting_read)
    total = -(-image.stat().st_size // CHUNK)
    origin = WatchingOrigin(tmp_path, reads, concurrency, total)
    result = asyncio.run(push(image, origin, REF, chunk_size=CHUNK, concurrency=concurrency))
    assert origin.finished == result.manifest.chunk_count == total
    assert origin.max_in_flight == concurrency
    # Chunks read but not yet stored: never more than the upload slots.
    assert origin.max_read_ahead <= concurrency


@pytest.mark.parametrize(
    "chunk_size", [limits.MIN_CHUNK_SIZE - 1, limits.MAX_CHUNK_SIZE + 1, 0, 1.5]
)
def test_chunk_size_out_of_limits(image: Path, tmp_path: Path, chunk_size: int) -> None:
    with pytest.raises(ConfigError, match="chunk size"):
        asyncio.run(push(image, DirectoryOrigin(tmp_path), REF, chunk_size=chunk_size))
    assert not tmp_path.joinpath("chunks").exists()


@pytest.mark.parametrize("concurrency", [0, -1, publish.MAX_PUSH_CONCURRENCY + 1])
def test_bad_concurrency(image: Path, tmp_path: Path, concurrency: int) -> None:
    with pytest.raises(ConfigError, match="concurrency"):
        asyncio.run(push(image, DirectoryOrigin(tmp_path), REF, concurrency=concurrency))


@pytest.mark.parametrize(
    ("content", "why"), [(b"", "empty"), (b"\x00\x01 not an image" * 100, "not a squashfs")]
)
def test_not_an_image_is_refused(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "thing.sqfs"
    path.write_bytes(content)
    with pytest.raises(BadImageFile, match=why):
        asyncio.run(push(path, DirectoryOrigin(tmp_path / "origin"), REF))
    assert not (tmp_path / "origin").exists()


def test_file_that_grows_during_push_is_refused(image: Path, tmp_path: Path) -> None:
    growing = tmp_path / "growing.tar"
    growing.write_bytes(image.read_bytes())

    class AppendingOrigin(DirectoryOrigin):
        async def put_chunk(self, chunk: ChunkRef, data: bytes) -> None:
            if chunk.index == 0:
                with growing.open("ab") as f:
                    f.write(b"\0" * 512)
            await super().put_chunk(chunk, data)

    origin = AppendingOrigin(tmp_path / "origin")
    with pytest.raises(BadImageFile, match="grew while being pushed"):
        asyncio.run(push(growing, origin, REF, chunk_size=CHUNK))
    with pytest.raises(ImageNotFound):
        asyncio.run(origin.get_manifest(REF))


def test_file_that_shrinks_during_push_is_refused(image: Path, tmp_path: Path) -> None:
    shrinking = tmp_path / "shrinking.tar"
    shrinking.write_bytes(image.read_bytes())

    class TruncatingOrigin(DirectoryOrigin):
        async def put_chunk(self, chunk: ChunkRef, data: bytes) -> None:
            if chunk.index == 0:
                with shrinking.open("r+b") as f:
                    f.truncate(5 * CHUNK)
            await super().put_chunk(chunk, data)

    with pytest.raises(BadImageFile, match="shrank while being pushed"):
        asyncio.run(push(shrinking, TruncatingOrigin(tmp_path / "origin"), REF, chunk_size=CHUNK))


def test_small_image_single_short_chunk(tmp_path: Path) -> None:
    path = make_image_tar(tmp_path / "small.tar", members=1, member_size=1000)
    origin = DirectoryOrigin(tmp_path / "origin")
    result = asyncio.run(push(path, origin, REF))
    assert result.manifest.chunk_count == 1
    assert result.manifest.chunk_size == publish.AUTO_MIN_CHUNK_SIZE
    assert asyncio.run(reassemble(origin, result.manifest)) == path.read_bytes()


@pytest.mark.parametrize(
    ("size", "chunk"),
    [
        (0, MiB),
        (1000, MiB),
        (256 * MiB, MiB),  # fewer than 1024 chunks even at 1 MiB: the smallest
        (1024 * MiB, MiB),  # exactly 1024 chunks of 1 MiB; 2 MiB would give 512
        (2048 * MiB - 1, MiB),
        (2048 * MiB, 2 * MiB),
        (4096 * MiB, 4 * MiB),
        (20 * 1024 * MiB, limits.DEFAULT_CHUNK_SIZE),  # never beyond the default
    ],
)
def test_auto_chunk_size(size: int, chunk: int) -> None:
    assert publish.auto_chunk_size(size) == chunk
    assert size // chunk >= publish.AUTO_TARGET_CHUNKS or chunk == publish.AUTO_MIN_CHUNK_SIZE
