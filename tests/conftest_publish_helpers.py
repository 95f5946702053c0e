"""Helpers shared by the origin and push tests (not a conftest: plain imports)."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

from p2pcast.codec import decode_chunk
from p2pcast.errors import ChunkCorrupt, OriginError
from p2pcast.hashing import chunk_digest
from p2pcast.manifest import ChunkRef, Manifest
from p2pcast.origins.base import Origin
from p2pcast.origins.directory import DirectoryOrigin

MiB = 1024 * 1024


def text_blob(size: int, seed: int) -> bytes:
    """Log-like text: compresses well, but differs by seed."""
    rng = random.Random(seed)
    words = [f"word{rng.randrange(1000)}" for _ in range(64)]
    lines = []
    total = 0
    while total < size:
        line = f"{total:012d} {' '.join(rng.choices(words, k=8))}\n".encode()
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


def make_image_tar(
    path: Path, *, seed: int = 1, members: int = 10, member_size: int = 2 * MiB
) -> Path:
    """A tar of alternating text (zstd pays) and random (stays raw) members.

    The defaults give ~20 MiB. Member i depends only on (seed, i), so two
    tars with the same seed share their leading bytes, hence leading chunks.
    """
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(members):
            if i % 2:
                data = random.Random(seed * 1000 + i).randbytes(member_size)
            else:
                data = text_blob(member_size, seed * 1000 + i)
            info = tarfile.TarInfo(f"data/member-{i:03d}.bin")
            info.size = len(data)
            info.mtime = 1_700_000_000  # fixed, so the same seed gives the same bytes
            tar.addfile(info, io.BytesIO(data))
    return path


async def fetch_chunk(origin: Origin, chunk: ChunkRef) -> bytes:
    """What a puller does: get, verify the xxh3, decode."""
    stored = await origin.get_chunk(chunk)
    if chunk_digest(stored) != chunk.digest:
        raise ChunkCorrupt(f"chunk {chunk.index} digest mismatch")
    return bytes(decode_chunk(chunk.codec, stored, chunk.raw_size))


async def reassemble(origin: Origin, manifest: Manifest) -> bytes:
    return b"".join([await fetch_chunk(origin, chunk) for chunk in manifest.chunks()])


class FailingOrigin(DirectoryOrigin):
    """A directory origin whose put_chunk fails after ``allowed`` chunks."""

    def __init__(self, path: Path, allowed: int) -> None:
        super().__init__(path)
        self.allowed = allowed
        self.put_chunks = 0

    async def put_chunk(self, chunk: ChunkRef, data: bytes) -> None:
        if self.put_chunks >= self.allowed:
            raise OriginError(f"injected failure at chunk {chunk.index}")
        self.put_chunks += 1
        await super().put_chunk(chunk, data)


def stored_files(root: Path) -> set[str]:
    """Names of the chunk files under a directory origin."""
    return {p.name for p in (root / "chunks").glob("*/*") if not p.name.startswith(".")}


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]
