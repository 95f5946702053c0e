"""Push: cut an image file into chunks, store them at the origin, publish a manifest.

The file is read once, sequentially, computing the whole-image sha256 on the
way. Compression and hashing run in worker threads (zstd, xxhash and hashlib
release the GIL) so the event loop stays free for the uploads. At most
``concurrency`` chunks are in flight, plus the one being read, which bounds
memory to a few chunks whatever the image size.

The manifest is written last: until then no tag or id names the new chunks,
so an interrupted push leaves only unreferenced chunks, which the next push
reuses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from typing import BinaryIO

from p2pcast import limits
from p2pcast.codec import Codec, encode_chunk
from p2pcast.errors import BadImageFile, ConfigError
from p2pcast.hashing import chunk_digest, image_hasher
from p2pcast.imagetype import detect_image_type
from p2pcast.manifest import ChunkRef, Manifest, chunk_count_for, image_id_of
from p2pcast.names import ImageRef
from p2pcast.origins.base import Origin

#: Upper bound on upload concurrency. Each slot holds up to two chunks (raw
#: and stored), so this caps push memory at 64 x 2 x MAX_CHUNK_SIZE = 8 GiB in
#: the worst case; 64 default-size chunks in flight (256 MiB) already cover the
#: bandwidth-delay product of any origin link we expect.
MAX_PUSH_CONCURRENCY = 64

#: Chunk size chosen when none is given: the largest power of two from
#: AUTO_MIN_CHUNK_SIZE up to limits.DEFAULT_CHUNK_SIZE that still cuts the image
#: into at least AUTO_TARGET_CHUNKS chunks. A relay forwards a chunk only once
#: it is all in and verified, so each hop of the broadcast costs about one
#: chunk time, and what matters is the chunk's share of the image: at 256 MiB,
#: 16 nodes, 100 Mbit/s, 4 MiB chunks (64 of them) took the last node to
#: 1.26 x S/B on the emulated cluster and 1.21 x in the simulator; 1 MiB chunks
#: 1.14 x and 1.085 x. The more nodes, the more hops the start-up fan-out and
#: the tail take: at 1 GiB, 1024 simulated nodes, 100 Mbit/s, 4 MiB chunks
#: (256) ended at 1.218 x S/B, 2 MiB 1.177 x, 1 MiB (1024 chunks) 1.115 x.
#: Smaller chunks cost a few milliseconds of Python per chunk per node
#: (requests, announcements, hashing calls): below 1 MiB that starts to show in
#: the CPU figures; 4 MiB chunks are kept for images of 4 GiB and more, which
#: still have 1024 chunks or more.
AUTO_MIN_CHUNK_SIZE = limits.MiB
AUTO_TARGET_CHUNKS = 1024


def auto_chunk_size(size: int) -> int:
    """The chunk size push uses for an image of ``size`` bytes by default."""
    chunk = AUTO_MIN_CHUNK_SIZE
    while chunk < limits.DEFAULT_CHUNK_SIZE and size // (2 * chunk) >= AUTO_TARGET_CHUNKS:
        chunk *= 2
    return chunk


@dataclasses.dataclass(frozen=True, slots=True)
class PushResult:
    manifest: Manifest
    image_id: bytes
    chunks_written: int  # new at the origin
    chunks_skipped: int  # already there (same stored bytes)
    bytes_stored: int  # stored bytes this push wrote; manifest.stored_total has the whole
    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class _Encoded:
    codec: Codec
    digest: bytes
    stored_size: int
    written: bool


async def push(
    image_path: str | os.PathLike[str],
    origin: Origin,
    ref: ImageRef,
    *,
    chunk_size: int | None = None,
    concurrency: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> PushResult:
    """Store an image at the origin under ``ref``; return what was done.

    ``chunk_size`` None: :func:`auto_chunk_size` of the image's size.
    """
    started = time.monotonic()
    path = os.fspath(image_path)
    image_type = await asyncio.to_thread(detect_image_type, path)
    size = await asyncio.to_thread(_file_size, path)
    chunk_size = auto_chunk_size(size) if chunk_size is None else chunk_size
    _check_options(chunk_size, concurrency)
    count = chunk_count_for(size, chunk_size)
    if size > limits.MAX_IMAGE_SIZE:
        raise BadImageFile(f"{path}: {size} bytes exceeds the {limits.MAX_IMAGE_SIZE}-byte limit")
    if count > limits.MAX_CHUNKS:
        raise ConfigError(f"{path}: {count} chunks exceeds {limits.MAX_CHUNKS}; use larger chunks")

    chunks, sha256 = await _store_chunks(
        path,
        origin,
        size=size,
        chunk_size=chunk_size,
        concurrency=concurrency,
        progress=progress or _no_progress,
    )

    result = Manifest(
        name=ref.name,  # not the tag: the same bytes under two tags are one image
        image_type=image_type,
        size=size,
        chunk_size=chunk_size,
        sha256=sha256,
        digests=b"".join(e.digest for e in chunks),
        stored_sizes=tuple(e.stored_size for e in chunks),
        codecs=bytes(e.codec for e in chunks),
    )
    data = result.encode()
    await origin.put_manifest(ref, data)
    written = [e for e in chunks if e.written]
    return PushResult(
        manifest=result,
        image_id=image_id_of(data),
        chunks_written=len(written),
        chunks_skipped=count - len(written),
        bytes_stored=sum(e.stored_size for e in written),
        seconds=time.monotonic() - started,
    )


async def _store_chunks(
    path: str,
    origin: Origin,
    *,
    size: int,
    chunk_size: int,
    concurrency: int,
    progress: Callable[[int, int], None],
) -> tuple[list[_Encoded], bytes]:
    """Read, encode and upload every chunk; return them in order and the sha256."""
    count = chunk_count_for(size, chunk_size)
    hasher = image_hasher()
    encoded: list[_Encoded | None] = [None] * count
    slots = asyncio.Semaphore(concurrency)
    done = 0

    async def store(index: int, raw: bytes) -> None:
        nonlocal done
        try:
            codec, stored, digest = await asyncio.to_thread(_encode, raw)
            chunk = ChunkRef(index, index * chunk_size, len(raw), len(stored), codec, digest)
            del raw  # only the stored bytes need to stay alive during the upload
            written = not await origin.has_chunk(chunk)
            if written:
                await origin.put_chunk(chunk, stored)
            encoded[index] = _Encoded(codec, digest, len(stored), written)
            done += chunk.raw_size
            progress(done, size)
        finally:
            slots.release()

    f = await asyncio.to_thread(_open, path)
    error: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as tasks:
            for index in range(count):
                await slots.acquire()  # released when the chunk is stored
                want = min(chunk_size, size - index * chunk_size)
                raw = await asyncio.to_thread(_read_chunk, f, hasher, want)
                if len(raw) != want:
                    raise BadImageFile(f"{path}: file shrank while being pushed")
                tasks.create_task(store(index, raw))
                del raw
            if await asyncio.to_thread(f.read, 1):
                raise BadImageFile(f"{path}: file grew while being pushed")
    except ExceptionGroup as group:
        error = _first_error(group)
    finally:
        f.close()
    if error is not None:
        # Raised outside the except block so the group does not become its
        # __context__: callers catch the p2pcast error tree, not groups.
        raise error
    chunks = [e for e in encoded if e is not None]
    assert len(chunks) == count  # every task finished, or the group raised
    return chunks, hasher.digest()


def _no_progress(done: int, total: int) -> None:
    pass


def _check_options(chunk_size: int, concurrency: int) -> None:
    if not (
        type(chunk_size) is int and limits.MIN_CHUNK_SIZE <= chunk_size <= limits.MAX_CHUNK_SIZE
    ):
        raise ConfigError(
            f"chunk size {chunk_size!r} is outside"
            f" {limits.MIN_CHUNK_SIZE}..{limits.MAX_CHUNK_SIZE} bytes"
        )
    if not (type(concurrency) is int and 1 <= concurrency <= MAX_PUSH_CONCURRENCY):
        raise ConfigError(f"push concurrency {concurrency!r} is outside 1..{MAX_PUSH_CONCURRENCY}")


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise BadImageFile(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _open(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise BadImageFile(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _read_chunk(f: BinaryIO, hasher: hashlib._Hash, size: int) -> bytes:
    """Read the next chunk and add it to the image hash (in a worker thread)."""
    try:
        raw = f.read(size)
    except OSError as exc:
        raise BadImageFile(f"{f.name}: read failed: {exc.strerror or exc}") from exc
    hasher.update(raw)
    return raw


def _encode(raw: bytes) -> tuple[Codec, bytes, bytes]:
    codec, stored = encode_chunk(raw)
    return codec, stored, chunk_digest(stored)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error in a (nested) task group failure.

    When several uploads fail at once (a full disk) the first says it all.
    """
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]
