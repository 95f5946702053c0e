"""A read-only origin over plain HTTP: a directory origin served by any web server.

``http://host:port/prefix`` names a web server that serves a directory origin's
layout (``chunks/ab/<digest>``, ``manifests/by-id/<id>``, ``tags/<name>/<tag>``),
e.g. ``python -m http.server`` in the origin directory. It is what the cluster
benchmark's status quo (every node pulling over HTTP) uses, so p2pcast reads
from the same server over the same shaped link. Ceph's RGW gets its own S3
origin; this one speaks only GET/HEAD of whole files.

The client is deliberately small: one request per connection (HTTP/1.0
semantics, ``Connection: close``), a bounded body, a timeout per request,
and every failure mapped into the p2pcast error tree.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Self

from p2pcast import limits
from p2pcast.errors import ConfigError, ImageNotFound, OriginError, OriginUnavailable
from p2pcast.manifest import ChunkRef
from p2pcast.names import ImageRef
from p2pcast.origins.base import Origin, OriginConfig

#: Seconds for one request (connect, headers and body): a 4 MiB chunk at
#: 100 Mbit/s takes ~0.35 s; a much slower origin is broken, not slow.
REQUEST_TIMEOUT = 60.0

#: Largest response header block accepted.
MAX_HEADER_BYTES = 64 * 1024


class HttpOrigin(Origin):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"not an http:// origin URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")

    @classmethod
    def from_url(cls, url: str, config: OriginConfig | None = None) -> Self:
        return cls(url)

    async def get_manifest(self, ref: ImageRef) -> bytes:
        path = "/".join(("tags", *ref.name.split("/"), ref.tag))
        body = await self._get(path, limits.MAX_MANIFEST_BYTES)
        if body is None:
            raise ImageNotFound(f"image {ref} not found at origin {self.url}")
        return body

    async def get_manifest_by_id(self, image_id: bytes) -> bytes:
        body = await self._get(f"manifests/by-id/{image_id.hex()}", limits.MAX_MANIFEST_BYTES)
        if body is None:
            raise ImageNotFound(f"image id {image_id.hex()} not found at origin {self.url}")
        return body

    async def get_chunk(self, chunk: ChunkRef) -> bytes:
        body = await self._get(self._chunk_path(chunk), chunk.stored_size)
        if body is None:
            raise OriginError(f"chunk {chunk.key} missing at origin {self.url}")
        self.bytes_read += len(body)
        self.chunks_read += 1
        return body

    async def has_chunk(self, chunk: ChunkRef) -> bool:
        status, _, _ = await self._request("HEAD", self._chunk_path(chunk), 0)
        return status == 200

    async def put_chunk(self, chunk: ChunkRef, data: bytes) -> None:
        raise ConfigError(f"{self.url} is a read-only origin: push to its directory instead")

    async def put_manifest(self, ref: ImageRef, data: bytes) -> None:
        raise ConfigError(f"{self.url} is a read-only origin: push to its directory instead")

    async def list_images(self) -> list[tuple[ImageRef, bytes]]:
        raise ConfigError(f"{self.url} cannot list images (plain HTTP has no listing)")

    # ---- HTTP ---------------------------------------------------------------

    @staticmethod
    def _chunk_path(chunk: ChunkRef) -> str:
        return f"chunks/{chunk.key[:2]}/{chunk.key}"

    async def _get(self, path: str, limit: int) -> bytes | None:
        """The body of a 200 answer; None for 404; OriginError otherwise."""
        status, reason, body = await self._request("GET", path, limit)
        if status == 404:
            return None
        if status != 200:
            raise OriginError(f"origin {self.url} answered {status} {reason} for {path}")
        return body

    async def _request(self, method: str, path: str, limit: int) -> tuple[int, str, bytes]:
        target = f"{self.prefix}/{urllib.parse.quote(path)}"
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    writer.write(
                        f"{method} {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                        "Connection: close\r\n\r\n".encode()
                    )
                    await writer.drain()
                    return await _read_response(reader, method, limit, self.url)
                finally:
                    writer.close()
        except TimeoutError as exc:
            raise OriginUnavailable(
                f"origin {self.url} did not answer within {REQUEST_TIMEOUT:g} s for {path}"
            ) from exc
        except OSError as exc:
            raise OriginUnavailable(f"origin {self.url}: {exc.strerror or exc}") from exc


async def _read_response(
    reader: asyncio.StreamReader, method: str, limit: int, url: str
) -> tuple[int, str, bytes]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise OriginError(f"origin {url} sent an oversized header") from exc
    except asyncio.IncompleteReadError as exc:
        raise OriginUnavailable(f"origin {url} closed the connection early") from exc
    if len(head) > MAX_HEADER_BYTES:
        raise OriginError(f"origin {url} sent an oversized header")
    lines = head.decode("latin-1").split("\r\n")
    fields = lines[0].split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        raise OriginError(f"origin {url} sent a malformed status line {lines[0][:80]!r}")
    status, reason = int(fields[1]), fields[2] if len(fields) > 2 else ""
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            length = int(value.strip())
    if method == "HEAD" or status != 200:
        return status, reason, b""
    if length is None:
        raise OriginError(f"origin {url} sent no Content-Length")
    if length > limit:
        raise OriginError(f"origin {url} sent {length} bytes where at most {limit} belong")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise OriginUnavailable(f"origin {url} closed the connection mid-body") from exc
    return status, reason, body
