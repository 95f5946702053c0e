"""The node cache: images being received and images complete, by image id.

Layout under the cache root::

    images/<image id hex>/manifest     the manifest file, as the origin gave it
    images/<image id hex>/image        the image, raw bytes at their offsets
    images/<image id hex>/stored       zstd chunks in their stored (wire) form
    images/<image id hex>/complete     marker: written after the sha256 check

Raw chunks go out by sendfile straight from ``image``; compressed chunks from
``stored``, so a node relays exactly the bytes it verified, without
recompressing. An image without its ``complete`` marker is never handed out
for staging; at start-up such partial images are removed (resuming them is a
later feature).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from p2pcast import manifest as manifest_mod
from p2pcast.codec import Codec, decode_chunk
from p2pcast.errors import ChunkCorrupt, ImageDigestMismatch, ManifestCorrupt, StoreError
from p2pcast.hashing import BytesLike, chunk_digest, image_hasher
from p2pcast.manifest import ChunkRef, Manifest
from p2pcast.protocol import FileSlice

#: Read size when hashing a whole image: large enough for sha256 to run at
#: full speed, small enough not to matter for memory.
HASH_READ_SIZE = 8 * 1024 * 1024


def _store_error(action: str, path: Path, exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"no space left on device while {action} {path}")
    return StoreError(f"{action} {path}: {exc.strerror or exc}")


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    image_id: str
    name: str
    size: int
    complete: bool
    path: Path

    def to_dict(self) -> dict[str, object]:
        return {
            "image_id": self.image_id,
            "name": self.name,
            "size": self.size,
            "complete": self.complete,
            "path": str(self.path),
        }


class ImageFile:
    """One image being received (or complete) in the cache, open for I/O."""

    def __init__(self, directory: Path, manifest: Manifest, *, complete: bool) -> None:
        self.directory = directory
        self.manifest = manifest
        self.complete = complete
        self.image_path = directory / "image"
        self.stored_path = directory / "stored"
        # Offsets of compressed chunks in the ``stored`` file.
        self.stored_offsets: dict[int, int] = {}
        offset = 0
        for chunk in manifest.chunks():
            if chunk.codec is not Codec.RAW:
                self.stored_offsets[chunk.index] = offset
                offset += chunk.stored_size
        self.stored_total = offset
        self.hasher = image_hasher()
        self.hashed = 0  # bytes of the image already fed to the hasher
        self.hash_buffer: bytearray | None = None
        flags = os.O_RDONLY if complete else os.O_RDWR | os.O_CREAT
        try:
            self.image_fd = os.open(self.image_path, flags | os.O_CLOEXEC, 0o644)
            self.stored_fd = os.open(self.stored_path, flags | os.O_CLOEXEC, 0o644)
            if not complete:
                # Reserve the space now: a full disk fails here, at once, not
                # half-way through the broadcast.
                if manifest.size:
                    os.posix_fallocate(self.image_fd, 0, manifest.size)
                if self.stored_total:
                    os.posix_fallocate(self.stored_fd, 0, self.stored_total)
        except OSError as exc:
            self.close()
            raise _store_error("preparing", directory, exc) from exc

    @property
    def closed(self) -> bool:
        return self.image_fd < 0

    def close(self) -> None:
        for name in ("image_fd", "stored_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # ---- chunks -----------------------------------------------------------

    def write_chunk(self, index: int, stored: BytesLike) -> None:
        """Verify a chunk's stored bytes and write it; ChunkCorrupt if bad."""
        chunk = self.manifest.chunk(index)
        if len(stored) != chunk.stored_size:
            raise ChunkCorrupt(
                f"chunk {index} has {len(stored)} bytes, manifest says {chunk.stored_size}"
            )
        if chunk_digest(stored) != chunk.digest:
            raise ChunkCorrupt(f"chunk {index} fails its xxh3 check")
        raw = decode_chunk(chunk.codec, stored, chunk.raw_size)
        try:
            if chunk.codec is not Codec.RAW:
                _pwrite_all(self.stored_fd, stored, self.stored_offsets[index])
            _pwrite_all(self.image_fd, raw, chunk.offset)
        except OSError as exc:
            raise _store_error("writing chunk to", self.directory, exc) from exc

    def chunk_slice(self, index: int) -> FileSlice:
        """Where chunk ``index``'s stored bytes lie, for sendfile."""
        chunk = self.manifest.chunk(index)
        if chunk.codec is Codec.RAW:
            return FileSlice(self.image_fd, chunk.offset, chunk.stored_size)
        return FileSlice(self.stored_fd, self.stored_offsets[index], chunk.stored_size)

    def read_stored(self, chunk: ChunkRef) -> bytes:
        piece = self.chunk_slice(chunk.index)
        return os.pread(piece.fd, piece.length, piece.offset)

    # ---- completion -------------------------------------------------------

    def hash_upto(self, end: int) -> None:
        """Extend the running sha256 over the image's bytes up to ``end``.

        Blocking (run it in a thread). The broadcast calls it as the verified
        prefix of the image grows, so the whole-image check costs almost
        nothing after the last chunk arrives, instead of a full re-read
        (0.7 s per GB of one core).
        """
        if self.hash_buffer is None:
            self.hash_buffer = bytearray(HASH_READ_SIZE)
        view = memoryview(self.hash_buffer)
        while self.hashed < end:
            # preadv into one reused buffer: a fresh 8 MiB ``bytes`` per read
            # costs page faults on every block (here, on a VM that hands freed
            # memory back to its host, as much CPU as the hashing itself).
            got = os.preadv(
                self.image_fd, [view[: min(HASH_READ_SIZE, end - self.hashed)]], self.hashed
            )
            if not got:
                raise ImageDigestMismatch(f"image {self.manifest.name} is shorter than its size")
            self.hasher.update(view[:got])
            self.hashed += got

    def verify_image(self) -> None:
        """Check the whole image's sha256 (blocking: run it in a thread)."""
        self.hash_upto(self.manifest.size)
        if self.hasher.digest() != self.manifest.sha256:
            raise ImageDigestMismatch(
                f"image {self.manifest.name} does not match its sha256 after assembly"
            )

    def mark_complete(self) -> None:
        try:
            os.fsync(self.image_fd)
            if self.stored_total:
                os.fsync(self.stored_fd)
            marker = self.directory / "complete"
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"completed": time.time()}))
            os.replace(tmp, marker)
        except OSError as exc:
            raise _store_error("completing", self.directory, exc) from exc
        self.complete = True


def _pwrite_all(fd: int, data: BytesLike, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class NodeCache:
    """Images on this node, keyed by image id."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.images = self.root / "images"
        try:
            self.images.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _store_error("creating cache", self.images, exc) from exc

    def _dir(self, image_id: bytes) -> Path:
        return self.images / image_id.hex()

    def is_complete(self, image_id: bytes) -> bool:
        return (self._dir(image_id) / "complete").exists()

    def image_path(self, image_id: bytes) -> Path:
        return self._dir(image_id) / "image"

    def open(self, manifest_bytes: bytes) -> ImageFile:
        """Open an image for receiving, or for serving if already complete."""
        manifest = manifest_mod.decode(manifest_bytes)
        image_id = manifest_mod.image_id_of(manifest_bytes)
        directory = self._dir(image_id)
        if self.is_complete(image_id):
            return ImageFile(directory, manifest, complete=True)
        # A partial copy from a previous run is not trusted: start over.
        shutil.rmtree(directory, ignore_errors=True)
        try:
            directory.mkdir(parents=True)
            (directory / "manifest").write_bytes(manifest_bytes)
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise _store_error("creating", directory, exc) from exc
        try:
            return ImageFile(directory, manifest, complete=False)
        except StoreError:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def discard(self, image_id: bytes) -> None:
        """Remove an image (partial or complete) from the cache."""
        shutil.rmtree(self._dir(image_id), ignore_errors=True)

    def entries(self) -> Iterator[CacheEntry]:
        for directory in sorted(self.images.iterdir()):
            try:
                manifest = manifest_mod.decode((directory / "manifest").read_bytes())
            except (OSError, ManifestCorrupt):
                continue
            yield CacheEntry(
                image_id=directory.name,
                name=manifest.name,
                size=manifest.size,
                complete=(directory / "complete").exists(),
                path=directory / "image",
            )

    def remove_partial(self) -> int:
        """Drop every incomplete image (left by a crash); returns how many."""
        removed = 0
        for entry in list(self.entries()):
            if not entry.complete:
                shutil.rmtree(entry.path.parent, ignore_errors=True)
                removed += 1
        return removed

    def gc(self, keep: set[str]) -> list[CacheEntry]:
        """Remove complete images not in ``keep`` (image ids in hex)."""
        removed = []
        for entry in list(self.entries()):
            if entry.complete and entry.image_id not in keep:
                shutil.rmtree(entry.path.parent, ignore_errors=True)
                removed.append(entry)
        return removed
