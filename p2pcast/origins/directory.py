"""An origin in a directory (local disk or a shared filesystem such as Lustre).

Layout under the root::

    chunks/<first 2 hex>/<32 hex xxh3-128>   stored chunk bytes
    manifests/by-id/<32 hex image id>        manifest file
    tags/<name path>/<tag>                   the same bytes as by-id

Every file is written to a dot-named temp file in its final directory, fsynced
and renamed into place, so a reader (or a push after a crash) never sees part
of a file. Dot names cannot be image names or tags, so strays are ignored.
A cancelled put may still complete: the worker thread finishes the rename.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pathlib
import secrets
import urllib.parse
from typing import Self

import aiofiles.os

from p2pcast import limits, manifest
from p2pcast.errors import (
    BadImageName,
    ConfigError,
    ImageNotFound,
    OriginError,
    OriginUnavailable,
    P2PCastError,
)
from p2pcast.manifest import ChunkRef
from p2pcast.names import ImageRef
from p2pcast.origins.base import Origin, OriginConfig

#: errno values that mean "no such manifest" when looking one up by path
#: (ENOTDIR/EISDIR: the name is a prefix of, or extends, another image's name).
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG})

#: errno values of a write that hit an image-name collision on disk: "a:b"
#: needs tags/a/b to be a file, "a/b:c" needs it to be a directory.
_COLLISION = frozenset({errno.EISDIR, errno.ENOTDIR, errno.EEXIST})


class DirectoryOrigin(Origin):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        root = os.path.abspath(os.fspath(path))
        super().__init__(pathlib.Path(root).as_uri())
        self.root = root

    @classmethod
    def from_url(cls, url: str, config: OriginConfig | None = None) -> Self:
        """Accept "file:///abs/path", "file://localhost/abs/path" or a plain path."""
        if "://" not in url:
            return cls(url)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() != "file":
            raise ConfigError(f"not a file:// URL: {url!r}")
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"file:// URL {url!r} names host {parts.netloc!r}; use file:///path")
        if parts.query or parts.fragment or not parts.path:
            raise ConfigError(f"file:// URL {url!r} must be just a path")
        return cls(os.fsdecode(urllib.parse.unquote_to_bytes(parts.path)))

    # -- reading ---------------------------------------------------------------

    async def get_manifest(self, ref: ImageRef) -> bytes:
        try:
            return await _read(self._tag_path(ref), limits.MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise await self._manifest_error(f"image {ref}", exc) from exc

    async def get_manifest_by_id(self, image_id: bytes) -> bytes:
        what = f"image id {image_id.hex()}"
        if len(image_id) != manifest.IMAGE_ID_SIZE:
            raise ImageNotFound(f"{what} not found at {self.url} (ids are 16 bytes)")
        try:
            return await _read(self._by_id_path(image_id), limits.MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise await self._manifest_error(what, exc) from exc

    async def get_chunk(self, chunk: ChunkRef) -> bytes:
        try:
            data = await _read(self._chunk_path(chunk))
        except OSError as exc:
            if exc.errno in _ABSENT and await self._root_exists():
                # A manifest names this chunk, so the origin has lost data.
                raise OriginError(f"chunk {chunk.key} is missing at {self.url}") from exc
            raise await self._unavailable(f"chunk {chunk.key}", exc) from exc
        self.bytes_read += len(data)
        self.chunks_read += 1
        return data

    async def has_chunk(self, chunk: ChunkRef) -> bool:
        try:
            st: os.stat_result = await aiofiles.os.stat(self._chunk_path(chunk))
        except OSError as exc:
            if exc.errno in _ABSENT:
                return False
            raise await self._unavailable(f"chunk {chunk.key}", exc) from exc
        # Content-addressed, so the size is the cheap check left: a short file
        # (a disk that lied about a rename after a crash) is written again.
        return st.st_size == chunk.stored_size

    async def list_images(self) -> list[tuple[ImageRef, bytes]]:
        try:
            found = await asyncio.to_thread(self._walk_tags)
        except OSError as exc:
            raise await self._unavailable("the image list", exc) from exc
        images = []
        for ref, path in found:
            try:
                data = await _read(path, limits.MAX_MANIFEST_BYTES + 1)
            except OSError as exc:
                raise await self._unavailable(f"image {ref}", exc) from exc
            images.append((ref, manifest.image_id_of(data)))
        return images

    # -- writing ---------------------------------------------------------------

    async def put_chunk(self, chunk: ChunkRef, data: bytes) -> None:
        if len(data) != chunk.stored_size:
            raise ValueError(f"chunk {chunk.key}: {len(data)} bytes, ref says {chunk.stored_size}")
        await self._write(self._chunk_path(chunk), data, f"chunk {chunk.key}")

    async def put_manifest(self, ref: ImageRef, data: bytes) -> None:
        # Refuse to publish bytes that no reader could use (ManifestCorrupt).
        await asyncio.to_thread(manifest.decode, data)
        image_id = manifest.image_id_of(data)
        await self._write(self._by_id_path(image_id), data, f"manifest {image_id.hex()}")
        try:
            await _write_atomic(self._tag_path(ref), data)
        except OSError as exc:
            if exc.errno in _COLLISION and await self._root_exists():
                raise BadImageName(
                    f"image {ref} collides with another image's name at {self.url}"
                    " (a name cannot also be another name plus a tag)"
                ) from exc
            raise OriginError(f"cannot write tag {ref} to {self.url}: {_reason(exc)}") from exc

    async def _write(self, path: str, data: bytes, what: str) -> None:
        try:
            await _write_atomic(path, data)
        except OSError as exc:
            raise OriginError(f"cannot write {what} to {self.url}: {_reason(exc)}") from exc

    # -- paths and errors -------------------------------------------------------

    def _chunk_path(self, chunk: ChunkRef) -> str:
        key = chunk.key
        return os.path.join(self.root, "chunks", key[:2], key)

    def _by_id_path(self, image_id: bytes) -> str:
        return os.path.join(self.root, "manifests", "by-id", image_id.hex())

    def _tag_path(self, ref: ImageRef) -> str:
        # ImageRef guarantees segments without "..", "/" or a leading dot.
        return os.path.join(self.root, "tags", *ref.name.split("/"), ref.tag)

    def _walk_tags(self) -> list[tuple[ImageRef, str]]:
        if not os.path.isdir(self.root):  # runs in a worker thread
            raise FileNotFoundError(errno.ENOENT, "origin directory does not exist", self.root)
        tags_root = os.path.join(self.root, "tags")
        found = []

        def fail(exc: OSError) -> None:
            if exc.filename != tags_root or exc.errno != errno.ENOENT:
                raise exc  # a missing tags/ just means nothing was pushed yet

        for dirpath, _dirs, files in os.walk(tags_root, onerror=fail):
            name = os.path.relpath(dirpath, tags_root).replace(os.sep, "/")
            for tag in files:
                try:
                    found.append((ImageRef(name, tag), os.path.join(dirpath, tag)))
                except BadImageName:
                    continue  # temp files, tags/ itself ("."), strays
        return sorted(found, key=lambda item: (item[0].name, item[0].tag))

    async def _root_exists(self) -> bool:
        exists: bool = await aiofiles.os.path.isdir(self.root)
        return exists

    async def _manifest_error(self, what: str, exc: OSError) -> P2PCastError:
        if exc.errno not in _ABSENT:
            return await self._unavailable(what, exc)
        if not await self._root_exists():
            return ImageNotFound(f"{what} not found: origin directory {self.root} does not exist")
        return ImageNotFound(f"{what} not found at {self.url}")

    async def _unavailable(self, what: str, exc: OSError) -> OriginUnavailable:
        if exc.errno in _ABSENT and not await self._root_exists():
            return OriginUnavailable(f"origin directory {self.root} does not exist")
        return OriginUnavailable(f"cannot read {what} from {self.url}: {_reason(exc)}")


# File contents are read and written by one worker-thread call per file, not
# with aiofiles.open: a task cancelled while aiofiles opens a file orphans the
# open file (measured: ~5% of cancellations leak a descriptor and a
# ResourceWarning), and pullers cancel chunk reads routinely. A cancelled
# caller here leaves the thread to finish, close its file and clean up.


async def _read(path: str, limit: int = -1) -> bytes:
    return await asyncio.to_thread(_read_file, path, limit)


async def _write_atomic(path: str, data: bytes) -> None:
    await asyncio.to_thread(_write_file_atomic, path, data)


def _read_file(path: str, limit: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _write_file_atomic(path: str, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, then rename."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            # Without it a crash can leave an empty file under the final name
            # on some filesystems, and content addressing would trust it.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
