"""The origin interface, and choosing an implementation by URL scheme.

An origin is the trusted store that push writes and the first node of a
broadcast reads: manifests by tag and by id, and content-addressed chunks.
Implementations translate their foreign exceptions (OSError, botocore, rados)
into the p2pcast error tree where they occur, so callers catch only that.

Implementations are imported lazily by name: a node that reads from a
directory need not have an S3 client installed.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import re
import urllib.parse
from types import TracebackType
from typing import Self

from p2pcast.errors import BadImageName, ConfigError
from p2pcast.manifest import ChunkRef
from p2pcast.names import ImageRef, parse_image_ref

#: Scheme -> "module:Class". None marks a scheme that is reserved but not
#: implemented yet; adding one is a single line here.
ORIGIN_CLASSES: dict[str, str | None] = {
    "file": "p2pcast.origins.directory:DirectoryOrigin",
    "http": "p2pcast.origins.http:HttpOrigin",
    "s3": "p2pcast.origins.s3:S3Origin",
    "rados": "p2pcast.origins.rados:RadosOrigin",
}

#: Schemes whose URL names a bucket or pool, so that ``SCHEME://BUCKET/NAME[:TAG]``
#: can name one image (split_image_url).
BUCKET_SCHEMES = ("s3", "rados")

#: Only "scheme://" counts as a URL, so "my:dir" stays a relative path.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclasses.dataclass(frozen=True, slots=True)
class OriginConfig:
    """What p2pcast's own configuration (options, P2PCAST_* variables) says about
    origins that need more than a URL. A URL's query overrides it; unset fields
    leave the client library's defaults (AWS_* variables and files, CEPH_CONF).

    Secrets are never command-line options (``ps`` shows those): the S3 keys come
    from the environment or the AWS files.
    """

    #: RGW endpoints, tried in turn when one fails (empty: botocore's own choice,
    #: AWS_ENDPOINT_URL or the profile's endpoint_url)
    s3_endpoints: tuple[str, ...] = ()
    s3_profile: str | None = None
    s3_region: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = dataclasses.field(default=None, repr=False)
    #: ceph.conf for RADOS (None: librados' search, CEPH_CONF then /etc/ceph)
    rados_conf: str | None = None
    #: cephx user without "client." (None: librados' default, admin)
    rados_id: str | None = None
    rados_keyring: str | None = None


class Origin(abc.ABC):
    """Where images live. Chunks are named by ChunkRef.key (their xxh3-128)."""

    url: str  # canonical, e.g. "file:///srv/origin"
    bytes_read: int  # stored bytes returned by get_chunk, for the read-amplification check
    chunks_read: int

    def __init__(self, url: str) -> None:
        self.url = url
        self.bytes_read = 0
        self.chunks_read = 0

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, config: OriginConfig | None = None) -> Self:
        """Open the origin a URL of this class's scheme names (ConfigError if bad)."""

    @abc.abstractmethod
    async def get_manifest(self, ref: ImageRef) -> bytes:
        """Raw manifest file the tag points to; ImageNotFound if absent."""

    @abc.abstractmethod
    async def get_manifest_by_id(self, image_id: bytes) -> bytes:
        """Raw manifest file with this image id; ImageNotFound if absent."""

    @abc.abstractmethod
    async def get_chunk(self, chunk: ChunkRef) -> bytes:
        """Stored bytes of a chunk, unverified (the caller checks the xxh3).

        Counts bytes_read and chunks_read. A missing chunk is an OriginError:
        a manifest names it, so the origin has lost data.
        """

    @abc.abstractmethod
    async def has_chunk(self, chunk: ChunkRef) -> bool:
        """Whether a complete copy of the chunk is stored."""

    @abc.abstractmethod
    async def put_chunk(self, chunk: ChunkRef, data: bytes) -> None:
        """Store a chunk atomically under chunk.key."""

    @abc.abstractmethod
    async def put_manifest(self, ref: ImageRef, data: bytes) -> None:
        """Store a manifest by id, then point the tag at it (both atomic).

        A tag may move to another manifest; a manifest stored by id never
        changes, so a broadcast that started from it can always finish.
        """

    @abc.abstractmethod
    async def list_images(self) -> list[tuple[ImageRef, bytes]]:
        """Every tag with the image id it points to, sorted by name and tag."""

    async def close(self) -> None:  # noqa: B027 - most origins hold nothing to close
        """Release connections; the origin is not used afterwards."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def open_origin(url: str, config: OriginConfig | None = None) -> Origin:
    """Open an origin by URL ("file:///srv/origin", "s3://...") or plain path."""
    if not url:
        raise ConfigError("empty origin URL")
    match = _URL.match(url)
    scheme = match.group(1).lower() if match else "file"
    if scheme not in ORIGIN_CLASSES:
        known = ", ".join(f"{name}://" for name in ORIGIN_CLASSES)
        raise ConfigError(f"unknown origin scheme in {url!r} (known: {known} or a path)")
    target = ORIGIN_CLASSES[scheme]
    if target is None:
        raise ConfigError(f"{scheme}:// origins are not available yet: {url!r}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # e.g. the S3 client library is not installed
        raise ConfigError(f"{scheme}:// origins cannot be loaded here: {exc}") from exc
    cls = getattr(module, class_name)
    if not (isinstance(cls, type) and issubclass(cls, Origin)):
        raise TypeError(f"{target} is not an Origin")
    return cls.from_url(url, config)


def names_image(text: str) -> bool:
    """Whether TEXT is ``SCHEME://BUCKET/NAME...`` of a bucket scheme (not just an origin)."""
    match = _URL.match(text)
    if match is None or match.group(1).lower() not in BUCKET_SCHEMES:
        return False
    return urllib.parse.urlsplit(text).path.strip("/") != ""


def split_image_url(text: str) -> tuple[str | None, ImageRef]:
    """``s3://BUCKET/NAME[:TAG]`` or ``rados://POOL/NAME[:TAG]`` -> (origin URL, ref).

    Anything else is a plain ``NAME[:TAG]``, with no origin (None). A query
    stays with the origin: ``s3://b/img:1?endpoint=http://gw:7480``.
    """
    match = _URL.match(text) if isinstance(text, str) else None
    if match is None or match.group(1).lower() not in BUCKET_SCHEMES:
        return None, parse_image_ref(text)
    parts = urllib.parse.urlsplit(text)
    name = urllib.parse.unquote(parts.path).lstrip("/")
    if not name:
        raise BadImageName(f"{text!r} names a bucket or pool but no image (add /NAME[:TAG])")
    origin = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))
    return origin, parse_image_ref(name)
