"""The node cache: images being received and images complete, by image id.

Layout under the cache root::

    images/<image id hex>/manifest     the manifest file, as the origin gave it
    images/<image id hex>/image        the image, raw bytes at their offsets
    images/<image id hex>/stored       zstd chunks in their stored (wire) form
    images/<image id hex>/complete     marker: written after the sha256 check

Raw chunks go out by sendfile straight from ``image``; compressed chunks from
``stored``, so a node relays exactly the bytes it verified, without
recompressing. An image without its ``complete`` marker is never handed out
for staging.

Partial images (no ``complete`` marker: the daemon died or stopped mid-way)
are kept, so a restarted daemon resumes instead of starting over. Nothing in
them is trusted: when the same image is opened again, :meth:`ImageFile.scan_held`
re-checks every chunk against the manifest's xxh3 (one pass over the files, in
a worker thread) and only the chunks that match count as held; the rest are
fetched again, and the whole-image sha256 still decides completion. Stale
partials do not pile up: ``gc`` removes partials as well as complete images
(except those a broadcast is using), and the daemon drops partials untouched
for :data:`PARTIAL_MAX_AGE` at start-up.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
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

log = logging.getLogger(__name__)

#: Read size when hashing a whole image: large enough for sha256 to run at
#: full speed, small enough not to matter for memory.
HASH_READ_SIZE = 8 * 1024 * 1024

#: A partial image not written for this long is dropped at start-up (s). A
#: restart after a crash or an update comes within minutes, and a requeued
#: job within hours; a partial older than a day belongs to an image nobody
#: asked for since, and would only hold disk space (``cache gc`` removes it
#: sooner).
PARTIAL_MAX_AGE = 24 * 3600.0


#: Room asked beyond an image's own two files when the daemon makes room for it
#: (bytes): its manifest and markers, and the filesystem's own blocks.
ROOM_SLACK = 1024 * 1024


def space_needed(manifest: Manifest) -> int:
    """Bytes the cache reserves for an image: its file and its compressed chunks."""
    stored = sum(c.stored_size for c in manifest.chunks() if c.codec is not Codec.RAW)
    return manifest.size + stored + ROOM_SLACK


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

    def __init__(
        self, directory: Path, manifest: Manifest, *, complete: bool, resumed: bool = False
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.complete = complete
        #: a partial image left by an earlier run: its chunks are unknown until
        #: :meth:`scan_held` checked them
        self.resumed = resumed
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

    def scan_held(self) -> list[int]:
        """The chunks of a partial image whose bytes match the manifest.

        Blocking (run it in a thread). Reads each file once, one chunk at a
        time into one reused buffer (memory: a chunk or two, whatever the
        image size). A raw chunk is held if its bytes in ``image`` match the
        chunk's xxh3; a compressed one if its bytes in ``stored`` do, and then
        ``image`` gets the decoded bytes rewritten where they differ (the
        daemon may have died between its two writes). Anything else, short
        reads included, is simply not held: it is fetched again.
        """
        held: list[int] = []
        buffer = bytearray(self.manifest.chunk_size)
        view = memoryview(buffer)
        try:
            for chunk in self.manifest.chunks():
                if chunk.stored_size > len(buffer):  # a manifest's chunks fit its chunk size
                    continue
                piece = self.chunk_slice(chunk.index)
                stored = view[: os.preadv(piece.fd, [view[: piece.length]], piece.offset)]
                if len(stored) != chunk.stored_size or chunk_digest(stored) != chunk.digest:
                    continue
                if chunk.codec is not Codec.RAW:
                    try:
                        raw = decode_chunk(chunk.codec, stored, chunk.raw_size)
                    except ChunkCorrupt:
                        continue  # an xxh3 collision, or a bad manifest: fetch it
                    if os.pread(self.image_fd, chunk.raw_size, chunk.offset) != raw:
                        _pwrite_all(self.image_fd, raw, chunk.offset)
                held.append(chunk.index)
        except OSError as exc:
            raise _store_error("re-checking partial image", self.directory, exc) from exc
        return held

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
            self.touch(image_id)
            return ImageFile(directory, manifest, complete=True)
        if self._resumable(directory, manifest_bytes):
            # A partial copy from an earlier run: kept, but none of its bytes
            # count until ImageFile.scan_held checked them.
            try:
                return ImageFile(directory, manifest, complete=False, resumed=True)
            except StoreError as exc:
                log.warning("cannot resume %s, starting over: %s", directory, exc)
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

    @staticmethod
    def _resumable(directory: Path, manifest_bytes: bytes) -> bool:
        """A partial image of exactly this manifest, with its files in place.

        The manifest is compared byte for byte: one half-written by a crash
        (it is written before the image files) means nothing else was.
        """
        try:
            return (directory / "manifest").read_bytes() == manifest_bytes and (
                (directory / "image").is_file() and (directory / "stored").is_file()
            )
        except OSError:
            return False

    def space(self) -> tuple[int, int]:
        """(free, total) bytes of the filesystem holding the cache."""
        try:
            st = os.statvfs(self.images)
        except OSError as exc:
            raise _store_error("measuring", self.images, exc) from exc
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def held_bytes(self, image_id: bytes) -> int:
        """Bytes a partial copy of the image already holds (a resume keeps them)."""
        held = 0
        for name in ("image", "stored"):
            try:
                held += (self._dir(image_id) / name).stat().st_blocks * 512
            except OSError:
                pass
        return held

    def touch(self, image_id: bytes) -> None:
        """Mark a complete image used now: room is made by removing the images
        used least recently (the mtime of their ``complete`` marker)."""
        try:
            os.utime(self._dir(image_id) / "complete")
        except OSError:
            pass  # a read-only or vanished entry: its age only orders eviction

    def least_recently_used(self, keep: set[str]) -> list[CacheEntry]:
        """Complete images not in ``keep`` (ids in hex), least recently used first."""

        def last_used(entry: CacheEntry) -> float:
            try:
                return (entry.path.parent / "complete").stat().st_mtime
            except OSError:
                return -math.inf

        entries = [e for e in self.entries() if e.complete and e.image_id not in keep]
        return sorted(entries, key=last_used)

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

    def remove_stale_partial(
        self, max_age: float = PARTIAL_MAX_AGE, now: float | None = None
    ) -> int:
        """Drop incomplete images not written for ``max_age`` seconds (and
        directories without a readable manifest); returns how many.

        Younger partials stay: the same image asked again resumes from them.
        """
        now = time.time() if now is None else now
        removed = 0
        for directory in sorted(self.images.iterdir()):
            if (directory / "complete").exists():
                continue
            try:
                manifest_mod.decode((directory / "manifest").read_bytes())
                written = max(
                    (directory / name).stat().st_mtime for name in ("manifest", "image", "stored")
                )
            except (OSError, ManifestCorrupt):
                written = -math.inf  # half-made: nothing there to resume
            if now - written > max_age:
                shutil.rmtree(directory, ignore_errors=True)
                removed += 1
        return removed

    def gc(self, keep: set[str]) -> list[CacheEntry]:
        """Remove images, complete or partial, not in ``keep`` (image ids in hex).

        Partials go too: one whose image is asked again is worth keeping only
        until an administrator asks for the space, and the daemon keeps the
        ones its broadcasts are writing (they are in ``keep``).
        """
        removed = []
        for entry in list(self.entries()):
            if entry.image_id not in keep:
                shutil.rmtree(entry.path.parent, ignore_errors=True)
                removed.append(entry)
        return removed
