"""An origin in a RADOS pool, read straight from the OSDs over librados.

URL: ``rados://POOL[?conf=/etc/ceph/ceph.conf&id=USER&keyring=PATH]``; an image
is ``rados://POOL/NAME[:TAG]``. The objects have the same names as in an S3
origin, one RADOS object each::

    chunks/<first 2 hex>/<32 hex xxh3-128>   stored chunk bytes (content-addressed)
    manifests/by-id/<32 hex image id>        manifest file: never changes
    tags/<name path>/<tag>                   the image id it points to (hex): moves

(names and tag objects: p2pcast.origins.keys, shared by both stores)

No gateway in the path: a node asks the OSD that holds a chunk, and CRUSH
spreads chunks over OSDs. Reads and writes are librados' asynchronous
operations, completed on the event loop from librados' callback thread, so
many are in flight without a thread each; connecting (blocking) runs in a
worker thread once. A full write (write_full) is atomic in RADOS.

librados for Python is Debian's python3-rados; it imports only into Debian's
CPython 3.11 (or a venv of it). Without it, opening a rados:// origin says so.
The pool is never created here: its PG count and placement are the site's.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import urllib.parse
from typing import Any, Self

from p2pcast import limits, manifest
from p2pcast.errors import (
    ChunkCorrupt,
    ConfigError,
    ImageNotFound,
    ManifestCorrupt,
    OriginError,
    OriginUnavailable,
)
from p2pcast.manifest import ChunkRef
from p2pcast.names import ImageRef
from p2pcast.origins import keys
from p2pcast.origins.base import Origin, OriginConfig

#: Seconds librados may take to reach the monitors when connecting.
CONNECT_TIMEOUT = 10
#: Seconds an OSD or monitor operation may take before librados gives up
#: (librados' default is to wait for ever, e.g. for an OSD that never returns).
OP_TIMEOUT = 30
#: Operations in flight per origin: each read holds up to one chunk in memory;
#: 16 concurrent 4 MiB reads already reached ~1.3 GiB/s here.
MAX_OPS = 16

_POOL = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_QUERY_KEYS = frozenset({"conf", "id", "keyring"})
#: errno values that mean the credentials or caps are wrong, not the cluster down.
_DENIED = frozenset({errno.EACCES, errno.EPERM})


class _Missing(Exception):  # internal, never leaves this module
    """ENOENT from an operation on one object."""


def load_librados() -> Any:
    """The rados module, or a ConfigError saying how to get it."""
    try:
        import rados
    except ImportError as exc:
        raise ConfigError(
            "rados:// origins need librados for Python, which does not import here"
            f" ({exc}): install Debian's python3-rados (apt-get install python3-rados) and"
            " run p2pcast on Debian's Python 3.11 or a venv made from it with"
            " --system-site-packages (tools/setup.sh does)"
        ) from exc
    return rados


class RadosOrigin(Origin):
    def __init__(
        self,
        pool: str,
        *,
        conf: str | None = None,
        rados_id: str | None = None,
        keyring: str | None = None,
    ) -> None:
        if not _POOL.fullmatch(pool):
            raise ConfigError(f"bad RADOS pool name {pool!r}")
        self._lib = load_librados()
        if conf is not None and not os.path.isfile(conf):
            raise ConfigError(f"Ceph configuration {conf} does not exist")
        query = [(k, v) for k, v in (("conf", conf), ("id", rados_id), ("keyring", keyring)) if v]
        super().__init__(
            urllib.parse.urlunsplit(
                ("rados", pool, "", urllib.parse.urlencode(query, safe=":/"), "")
            )
        )
        self.pool = pool
        self.conf = conf
        self.rados_id = rados_id
        self.keyring = keyring
        self._cluster: Any = None
        self._ioctx: Any = None
        self._opening: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None
        self._pending: set[Any] = set()  # completions whose callback has not reached us

    @classmethod
    def from_url(cls, url: str, config: OriginConfig | None = None) -> Self:
        config = config or OriginConfig()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() != "rados" or not parts.netloc:
            raise ConfigError(f"not a rados://POOL URL: {url!r}")
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(
                f"RADOS origin URL {url!r} must be rados://POOL[?conf=...]: the image name"
                " goes in the image reference (rados://POOL/NAME[:TAG])"
            )
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        if unknown := sorted(set(query) - _QUERY_KEYS):
            raise ConfigError(f"unknown RADOS origin option(s) {unknown} in {url!r}")
        return cls(
            parts.netloc,
            conf=query.get("conf", [config.rados_conf])[-1],
            rados_id=query.get("id", [config.rados_id])[-1],
            keyring=query.get("keyring", [config.rados_keyring])[-1],
        )

    # -- reading ---------------------------------------------------------------

    async def get_manifest(self, ref: ImageRef) -> bytes:
        try:
            ioctx = await self._open(for_write=False)
            body = await self._read(ioctx, keys.tag_key(ref), keys.MAX_TAG_BYTES + 1)
        except _Missing:
            raise ImageNotFound(f"image {ref} not found in pool {self.pool}") from None
        image_id = keys.tag_image_id(ref, self.url, body)
        try:
            return await self._manifest(ioctx, image_id)
        except _Missing:
            raise OriginError(
                f"tag {ref} at {self.url} points to manifest {image_id.hex()}, which is missing"
            ) from None

    async def get_manifest_by_id(self, image_id: bytes) -> bytes:
        what = f"image id {image_id.hex()}"
        if len(image_id) != manifest.IMAGE_ID_SIZE:
            raise ImageNotFound(f"{what} not found at {self.url} (ids are 16 bytes)")
        try:
            return await self._manifest(await self._open(for_write=False), image_id)
        except _Missing:
            raise ImageNotFound(f"{what} not found in pool {self.pool}") from None

    async def _manifest(self, ioctx: Any, image_id: bytes) -> bytes:
        key = keys.manifest_key(image_id)
        # Its size first: a read buffer of MAX_MANIFEST_BYTES for every manifest
        # would cost 12 MiB each time.
        size = await self._stat(ioctx, key)
        if size > limits.MAX_MANIFEST_BYTES:
            raise OriginError(f"manifest {image_id.hex()} at {self.url} is {size} bytes: too big")
        data = await self._read(ioctx, key, size)
        found = manifest.image_id_of(data)
        if found != image_id:
            raise ManifestCorrupt(
                f"manifest {image_id.hex()} at {self.url} has the id {found.hex()}: altered"
            )
        return data

    async def get_chunk(self, chunk: ChunkRef) -> bytes:
        ioctx = await self._open(for_write=False)
        try:
            # One byte more than the manifest says, to notice a longer object.
            data = await self._read(ioctx, keys.chunk_key(chunk), chunk.stored_size + 1)
        except _Missing:
            # A manifest names this chunk, so the origin has lost data.
            raise OriginError(f"chunk {chunk.key} is missing in pool {self.pool}") from None
        if len(data) != chunk.stored_size:
            raise ChunkCorrupt(
                f"chunk {chunk.key} at {self.url} is {len(data)} bytes or more,"
                f" the manifest says {chunk.stored_size}"
            )
        self.bytes_read += len(data)
        self.chunks_read += 1
        return data

    async def has_chunk(self, chunk: ChunkRef) -> bool:
        ioctx = await self._open(for_write=True)
        try:
            size = await self._stat(ioctx, keys.chunk_key(chunk))
        except _Missing:
            return False
        return size == chunk.stored_size

    async def list_images(self) -> list[tuple[ImageRef, bytes]]:
        ioctx = await self._open(for_write=False)
        try:
            names = await asyncio.to_thread(_list_keys, ioctx, keys.TAG_PREFIX)
        except self._lib.Error as exc:
            raise self._error("the image list", exc) from exc
        return await keys.resolve_tags(keys.tag_refs(names), self.get_manifest)

    # -- writing ---------------------------------------------------------------

    async def put_chunk(self, chunk: ChunkRef, data: bytes) -> None:
        if len(data) != chunk.stored_size:
            raise ValueError(f"chunk {chunk.key}: {len(data)} bytes, ref says {chunk.stored_size}")
        await self._write(await self._open(for_write=True), keys.chunk_key(chunk), data)

    async def put_manifest(self, ref: ImageRef, data: bytes) -> None:
        await asyncio.to_thread(manifest.decode, data)  # refuse what no reader could use
        image_id = manifest.image_id_of(data)
        ioctx = await self._open(for_write=True)
        await self._write(ioctx, keys.manifest_key(image_id), data)
        await self._write(ioctx, keys.tag_key(ref), keys.tag_body(image_id))

    # -- librados -----------------------------------------------------------------

    async def _open(self, *, for_write: bool) -> Any:
        """The pool's I/O context, connecting on first use (in a worker thread)."""
        if self._ioctx is not None:
            return self._ioctx
        if self._opening is None:
            self._opening = asyncio.Lock()
            self._slots = asyncio.Semaphore(MAX_OPS)
        async with self._opening:
            if self._ioctx is None:
                self._cluster, self._ioctx = await asyncio.to_thread(self._connect, for_write)
        return self._ioctx

    def _connect(self, for_write: bool) -> tuple[Any, Any]:
        lib = self._lib
        conf = {
            # connect(timeout=) alone does not bound the monitor hunt: it waited
            # for ever on an address where nothing listened.
            "client_mount_timeout": str(CONNECT_TIMEOUT),
            "rados_osd_op_timeout": str(OP_TIMEOUT),
            "rados_mon_op_timeout": str(OP_TIMEOUT),
        }
        if self.keyring:
            conf["keyring"] = self.keyring
        who = f"client.{self.rados_id or 'admin'}"
        try:
            cluster = lib.Rados(conffile=self.conf or "", rados_id=self.rados_id, conf=conf)
        except lib.Error as exc:
            where = self.conf or "CEPH_CONF or /etc/ceph/ceph.conf"
            raise ConfigError(
                f"cannot read the Ceph configuration for {self.url} from {where} ({exc}):"
                " name one with --rados-conf, P2PCAST_RADOS_CONF, ?conf= or CEPH_CONF"
            ) from exc
        try:
            cluster.connect(timeout=CONNECT_TIMEOUT)
        except lib.Error as exc:
            cluster.shutdown()
            if _errno(exc) in _DENIED or isinstance(exc, lib.PermissionDeniedError):
                raise ConfigError(
                    f"the Ceph monitors refused {who} for {self.url}: check the keyring"
                    " (--rados-keyring, P2PCAST_RADOS_KEYRING) and the user (--rados-id)"
                ) from exc
            raise OriginUnavailable(
                f"cannot reach the Ceph monitors for {self.url} as {who}: {exc}"
            ) from exc
        try:
            ioctx = cluster.open_ioctx(self.pool)
        except lib.Error as exc:
            cluster.shutdown()
            if _errno(exc) == errno.ENOENT or isinstance(exc, lib.ObjectNotFound):
                message = f"RADOS pool {self.pool} does not exist"
                if for_write:
                    raise ConfigError(
                        f"{message}: create it first, e.g. ceph osd pool create {self.pool} 32"
                    ) from exc
                raise ImageNotFound(f"{message}, so it holds no image") from exc
            raise OriginUnavailable(f"cannot open pool {self.pool}: {exc}") from exc
        return cluster, ioctx

    async def _read(self, ioctx: Any, key: str, length: int) -> bytes:
        """Up to LENGTH bytes from the start of object KEY."""
        rc, data = await self._aio(lambda done: ioctx.aio_read(key, length, 0, done), key)
        if not rc:
            return b""  # the binding hands back an unshrunk buffer for an empty object
        # rc is the byte count; the binding shrinks the buffer to it (checked anyway).
        out: bytes = data if len(data) == rc else data[:rc]
        return out

    async def _stat(self, ioctx: Any, key: str) -> int:
        _, size = await self._aio(lambda done: ioctx.aio_stat(key, done), key)
        return int(size)

    async def _write(self, ioctx: Any, key: str, data: bytes) -> None:
        await self._aio(lambda done: ioctx.aio_write_full(key, data, done), key)

    async def _aio(self, submit: Any, key: str) -> tuple[int, Any]:
        """Submit one asynchronous operation, await its callback on this loop, and
        return (return value, the callback's first value)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, Any]] = loop.create_future()

        def settle(completion: Any, result: tuple[int, Any]) -> None:
            self._pending.discard(completion)
            if not future.done():  # the awaiting task may have been cancelled
                future.set_result(result)

        def done(completion: Any, *values: Any) -> None:
            # On librados' callback thread: hand the result to the loop, nothing else.
            result = (completion.get_return_value(), values[0] if values else None)
            loop.call_soon_threadsafe(settle, completion, result)

        assert self._slots is not None
        async with self._slots:
            try:
                # Kept referenced until its callback has run, even if we are cancelled.
                self._pending.add(submit(done))
            except self._lib.Error as exc:
                raise self._error(key, exc) from exc
            rc, value = await future
        if rc == -errno.ENOENT:
            raise _Missing(key)
        if rc < 0:
            raise self._error(key, OSError(-rc, os.strerror(-rc)))
        return rc, value

    def _error(self, what: str, exc: BaseException) -> OriginError | ConfigError:
        code = _errno(exc)
        if code in _DENIED:
            return ConfigError(
                f"Ceph refused {what} in pool {self.pool} to client.{self.rados_id or 'admin'}"
                f" ({os.strerror(code or 0)}): check the user's OSD caps"
            )
        if code in (errno.ETIMEDOUT, errno.ENOTCONN, errno.ESHUTDOWN):
            return OriginUnavailable(f"Ceph did not complete {what} in pool {self.pool}: {exc}")
        return OriginError(f"Ceph failed {what} in pool {self.pool}: {exc}")

    async def close(self) -> None:
        ioctx, cluster = self._ioctx, self._cluster
        self._ioctx = self._cluster = None
        if cluster is not None:
            await asyncio.to_thread(_shutdown, ioctx, cluster)


def _shutdown(ioctx: Any, cluster: Any) -> None:
    # aio_flush waits for every operation submitted on the context: no callback
    # may run after its Python objects are gone.
    ioctx.aio_flush()
    ioctx.close()
    cluster.shutdown()


def _list_keys(ioctx: Any, prefix: str) -> list[str]:
    return [str(obj.key) for obj in ioctx.list_objects() if str(obj.key).startswith(prefix)]


def _errno(exc: BaseException) -> int | None:
    code = getattr(exc, "errno", None)
    return abs(code) if isinstance(code, int) else None
