"""An origin in an S3 bucket (Ceph's radosgw), over aiobotocore.

URL: ``s3://BUCKET[?endpoint=URL&endpoint=URL2&profile=P&region=R]``; an image
is ``s3://BUCKET/NAME[:TAG]`` (origins.base.split_image_url). Layout in the
bucket, as a directory origin's but for the tags::

    chunks/<first 2 hex>/<32 hex xxh3-128>   stored chunk bytes (content-addressed)
    manifests/by-id/<32 hex image id>        manifest file: never changes
    tags/<name path>/<tag>                   the image id it points to (hex): moves

(names and tag objects: p2pcast.origins.keys, shared by both stores)

Every object is written by one PUT, which S3 makes atomic, and push writes the
manifest last, then the tag, so a reader never sees a tag without its image.

Endpoints and credentials: the URL's query, then p2pcast's configuration
(OriginConfig: ``--s3-endpoint``, P2PCAST_S3_*), then botocore's own
resolution (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE, AWS_ENDPOINT_URL).

Every request is bounded (MAX_REQUESTS at once, REQUEST_TIMEOUT each) and
retried on failures that can pass (connection refused or reset, timeouts, 5xx)
with exponential backoff, moving to the next endpoint after each failure. A
refused credential, a missing bucket or object is not retried: it is mapped
into the p2pcast error tree with what is wrong, as is every foreign exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar

import aiohttp
import botocore.exceptions
import botocore.loaders
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession

from p2pcast import limits, manifest
from p2pcast.errors import (
    ChunkCorrupt,
    ConfigError,
    ImageNotFound,
    InternalError,
    ManifestCorrupt,
    OriginError,
    OriginUnavailable,
    P2PCastError,
)
from p2pcast.manifest import ChunkRef
from p2pcast.names import ImageRef
from p2pcast.origins import keys
from p2pcast.origins.base import Origin, OriginConfig

T = TypeVar("T")

#: Requests in flight per origin client. A 4 MiB GET from RGW takes ~9 ms here
#: and parallel streams gained nothing on 2 cores; 16 covers a few ms of
#: latency on a real network, and each in-flight GET holds up to one chunk.
MAX_REQUESTS = 16

#: Rounds of attempts (each tries every endpoint once), with a backoff before
#: each round after the first: 0.1, 0.2 ... 3.2, 4 s (jittered to 50-100 %), ~10 s
#: in all. That covers radosgw restarting (~1.6 s here) or failing over; a
#: longer outage is the node's to handle (it retries a chunk read 5 times).
RETRY_ROUNDS = 8
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 4.0

#: Seconds for a TCP connect; RGW answers in ms, so 5 s means it is gone.
CONNECT_TIMEOUT = 5.0
#: Seconds of silence on a socket read before the attempt is abandoned.
READ_TIMEOUT = 30.0
#: Seconds for one whole request, body included: a 64 MiB chunk (the largest)
#: at 100 Mbit/s takes ~5.5 s; much slower is broken, not slow.
REQUEST_TIMEOUT = 60.0


#: Read size for a body without a Content-Length (never sent by S3 for GET).
_PIECE = 1 << 20

#: RGW's default region name is accepted by any zonegroup; S3 wants one to sign.
DEFAULT_REGION = "us-east-1"

#: S3 bucket naming rules (RGW without rgw_relaxed_s3_bucket_names).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_QUERY_KEYS = frozenset({"endpoint", "profile", "region"})

#: HTTP statuses and S3 error codes worth another attempt.
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_RETRY_CODES = frozenset(
    {"RequestTimeout", "SlowDown", "ServiceUnavailable", "InternalError", "Throttling"}
)
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)

#: botocore's JSON models (the S3 one is large) are loaded once per process,
#: not once per origin: a test runs many nodes in one process.
_LOADER: botocore.loaders.Loader | None = None


class _Absent(Exception):  # internal, never leaves this module
    """A 404: no such key, or (bucket=True) no such bucket."""

    def __init__(self, bucket: bool) -> None:
        super().__init__("NoSuchBucket" if bucket else "NoSuchKey")
        self.bucket = bucket


class _Retryable(Exception):  # internal, never leaves this module
    """A failure that another attempt (perhaps at another endpoint) may not hit."""


class S3Origin(Origin):
    def __init__(
        self,
        bucket: str,
        *,
        endpoints: tuple[str, ...] = (),
        profile: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise ConfigError(
                f"bad S3 bucket name {bucket!r}: 3-63 lowercase letters, digits, '.' and '-',"
                " starting and ending with a letter or digit"
            )
        for endpoint in endpoints:
            parts = urllib.parse.urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"bad S3 endpoint {endpoint!r}: give http(s)://HOST[:PORT]")
        if (access_key is None) != (secret_key is None):
            raise ConfigError("S3 credentials need both an access key id and a secret key")
        query = [("endpoint", e) for e in endpoints]
        query += [(k, v) for k, v in (("profile", profile), ("region", region)) if v]
        super().__init__(
            urllib.parse.urlunsplit(
                ("s3", bucket, "", urllib.parse.urlencode(query, safe=":/"), "")
            )
        )
        self.bucket = bucket
        #: None: botocore's own choice (AWS_ENDPOINT_URL, the profile, or AWS)
        self.endpoints: tuple[str | None, ...] = endpoints or (None,)
        self.profile = profile
        self.region = region
        self._keys = (access_key, secret_key) if access_key and secret_key else None
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._clients: list[Any] = []
        self._stack = contextlib.AsyncExitStack()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None
        self._slots: asyncio.Semaphore | None = None
        #: the bucket is known to exist (made by us or found), and who makes it
        self._bucket_made = False
        self._making_bucket: asyncio.Lock | None = None
        self._current = 0  # the endpoint that answered last
        self._key_id: str | None = None  # for messages: which key a refusal was about
        #: attempts that failed and were retried; switches to another endpoint
        self.retries = 0
        self.failovers = 0

    @classmethod
    def from_url(cls, url: str, config: OriginConfig | None = None) -> Self:
        config = config or OriginConfig()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() != "s3" or not parts.netloc:
            raise ConfigError(f"not an s3://BUCKET URL: {url!r}")
        if parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(
                f"S3 origin URL {url!r} must be s3://BUCKET[?endpoint=...]: the image name"
                " goes in the image reference (s3://BUCKET/NAME[:TAG])"
            )
        try:
            query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        except ValueError as exc:
            raise ConfigError(f"bad query in {url!r}: {exc}") from exc
        if unknown := sorted(set(query) - _QUERY_KEYS):
            raise ConfigError(f"unknown S3 origin option(s) {unknown} in {url!r}")
        return cls(
            parts.netloc,
            endpoints=tuple(query.get("endpoint", ())) or config.s3_endpoints,
            profile=query.get("profile", [config.s3_profile])[-1],
            region=query.get("region", [config.s3_region])[-1],
            access_key=config.s3_access_key,
            secret_key=config.s3_secret_key,
        )

    # -- reading ---------------------------------------------------------------

    async def get_manifest(self, ref: ImageRef) -> bytes:
        try:
            body = await self._get(keys.tag_key(ref), keys.MAX_TAG_BYTES, f"tag {ref}")
        except _Absent as absent:
            raise ImageNotFound(self._absent(f"image {ref}", absent)) from None
        image_id = keys.tag_image_id(ref, self.url, body)
        try:
            return await self._manifest(image_id)
        except _Absent:
            raise OriginError(
                f"tag {ref} at {self.url} points to manifest {image_id.hex()}, which is missing"
            ) from None

    async def get_manifest_by_id(self, image_id: bytes) -> bytes:
        what = f"image id {image_id.hex()}"
        if len(image_id) != manifest.IMAGE_ID_SIZE:
            raise ImageNotFound(f"{what} not found at {self.url} (ids are 16 bytes)")
        try:
            return await self._manifest(image_id)
        except _Absent as absent:
            raise ImageNotFound(self._absent(what, absent)) from None

    async def _manifest(self, image_id: bytes) -> bytes:
        data = await self._get(keys.manifest_key(image_id), limits.MAX_MANIFEST_BYTES, "a manifest")
        found = manifest.image_id_of(data)
        if found != image_id:
            # Stored under its id, so other bytes were written there.
            raise ManifestCorrupt(
                f"manifest {image_id.hex()} at {self.url} has the id {found.hex()}: altered"
            )
        return data

    async def get_chunk(self, chunk: ChunkRef) -> bytes:
        try:
            data = await self._get(
                keys.chunk_key(chunk), chunk.stored_size, f"chunk {chunk.key}", True
            )
        except _Absent as absent:
            # A manifest names this chunk, so the origin has lost data.
            raise OriginError(self._absent(f"chunk {chunk.key}", absent, "is missing")) from None
        self.bytes_read += len(data)
        self.chunks_read += 1
        return data

    async def has_chunk(self, chunk: ChunkRef) -> bool:
        key = keys.chunk_key(chunk)

        async def head(client: Any) -> int | None:
            try:
                reply = await client.head_object(Bucket=self.bucket, Key=key)
            except botocore.exceptions.ClientError as exc:
                if _status(exc) == 404:  # HEAD has no body: key and bucket look alike
                    return None
                raise
            size = reply.get("ContentLength")
            return size if isinstance(size, int) else None

        # Content-addressed: the size is the cheap check left (a short object
        # from an interrupted upload elsewhere is written again).
        return await self._call(head, f"chunk {chunk.key}") == chunk.stored_size

    async def list_images(self) -> list[tuple[ImageRef, bytes]]:
        names: list[str] = []
        token: str | None = None

        async def page(client: Any) -> dict[str, Any]:
            extra = {"ContinuationToken": token} if token else {}
            reply: dict[str, Any] = await client.list_objects_v2(
                Bucket=self.bucket, Prefix=keys.TAG_PREFIX, **extra
            )
            return reply

        while True:
            try:
                reply = await self._call(page, "the image list")
            except _Absent as absent:
                raise OriginError(self._absent("the image list", absent)) from None
            names += (str(item.get("Key", "")) for item in reply.get("Contents", []))
            if not reply.get("IsTruncated"):
                break
            token = reply.get("NextContinuationToken")
        return await keys.resolve_tags(keys.tag_refs(names), self.get_manifest)

    # -- writing ---------------------------------------------------------------

    async def put_chunk(self, chunk: ChunkRef, data: bytes) -> None:
        if len(data) != chunk.stored_size:
            raise ValueError(f"chunk {chunk.key}: {len(data)} bytes, ref says {chunk.stored_size}")
        await self._put(keys.chunk_key(chunk), data, f"chunk {chunk.key}")

    async def put_manifest(self, ref: ImageRef, data: bytes) -> None:
        # Refuse to publish bytes that no reader could use (ManifestCorrupt).
        await asyncio.to_thread(manifest.decode, data)
        image_id = manifest.image_id_of(data)
        await self._put(keys.manifest_key(image_id), data, f"manifest {image_id.hex()}")
        await self._put(keys.tag_key(ref), keys.tag_body(image_id), f"tag {ref}")

    async def _put(self, key: str, data: bytes, what: str) -> None:
        async def put(client: Any) -> None:
            await client.put_object(Bucket=self.bucket, Key=key, Body=data)

        try:
            await self._call(put, what)
        except _Absent as absent:
            if not absent.bucket:
                raise OriginError(f"cannot write {what} to {self.url}: 404") from None
            # As a directory origin makes its directory: the first push makes the bucket.
            await self._make_bucket()
            try:
                await self._call(put, what)
            except _Absent:
                raise OriginError(f"bucket {self.bucket} vanished while writing {what}") from None

    async def _make_bucket(self) -> None:
        async def create(client: Any) -> None:
            try:
                await client.create_bucket(Bucket=self.bucket)
            except botocore.exceptions.ClientError as exc:
                code = _code(exc)
                if code == "BucketAlreadyOwnedByYou":  # another client's push made it
                    return
                if code != "BucketAlreadyExists":
                    raise
                # radosgw answers this, not ...OwnedByYou, to a create that races
                # another by the same user (seen in CI). Ours if we may reach it;
                # someone else's bucket fails here with a refusal that says so.
                await client.head_bucket(Bucket=self.bucket)

        # The first push's concurrent chunk writes all find no bucket: one creates it.
        if self._making_bucket is None:
            self._making_bucket = asyncio.Lock()
        async with self._making_bucket:
            if self._bucket_made:
                return
            try:
                await self._call(create, f"bucket {self.bucket}")
            except _Absent:
                raise OriginError(f"cannot create bucket {self.bucket} at {self.url}") from None
            self._bucket_made = True

    # -- requests, retries and failover ------------------------------------------

    async def _get(self, key: str, limit: int, what: str, exact: bool = False) -> bytes:
        """A whole object of at most LIMIT bytes (exactly LIMIT if EXACT: a chunk)."""

        def wrong_size(size: int) -> P2PCastError:
            return (ChunkCorrupt if exact else OriginError)(
                f"{what} at {self.url} is {size} bytes, "
                + (f"the manifest says {limit}" if exact else f"at most {limit} belong")
            )

        async def get(client: Any) -> bytes:
            reply = await client.get_object(Bucket=self.bucket, Key=key)
            async with reply["Body"] as body:
                size = reply.get("ContentLength")
                if not isinstance(size, int):
                    # No length announced (not S3's way): read no more than allowed.
                    data = bytearray()
                    while len(data) <= limit and (piece := await body.read(_PIECE)):
                        data += piece
                    size = len(data)
                elif (size != limit) if exact else (size > limit):
                    raise wrong_size(size)
                else:
                    data = await body.read()  # botocore checks it against the length
            if (len(data) != limit) if exact else (len(data) > limit):
                raise wrong_size(len(data))
            if len(data) != size:
                raise _Retryable(f"{what}: {len(data)} of {size} bytes arrived")
            return bytes(data)

        return await self._call(get, what)

    async def _call(self, request: Callable[[Any], Awaitable[T]], what: str) -> T:
        """Run REQUEST(client) with retries and endpoint failover; translate errors."""
        clients = await self._open()
        assert self._slots is not None
        failures: list[str] = []
        for attempt in range(RETRY_ROUNDS * len(clients)):
            if attempt and attempt % len(clients) == 0:
                # Every endpoint failed this round: back off (jittered, so that
                # many nodes do not come back at the same instant).
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempt // len(clients) - 1))
                await self._sleep(delay * self._rng.uniform(0.5, 1.0))
            async with self._slots:
                # Chosen once a slot is free: a request that waited goes where the
                # last failure pointed, not to the endpoint that just failed.
                index = self._current
                endpoint = self.endpoints[index] or "the default S3 endpoint"
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        return await self._translate(request(clients[index]), endpoint, what)
                except _Retryable as exc:
                    failures.append(f"{endpoint}: {exc}")
                except TimeoutError:
                    failures.append(f"{endpoint}: no answer within {REQUEST_TIMEOUT:g} s")
            self.retries += 1
            if len(clients) > 1 and self._current == index:
                self._current = (index + 1) % len(clients)
                self.failovers += 1
        raise OriginUnavailable(
            f"cannot read or write {what} at {self.url} after {len(failures)} attempts;"
            f" last: {failures[-1]}"
        )

    async def _translate(self, request: Awaitable[T], endpoint: str, what: str) -> T:
        """Await one attempt; foreign exceptions become _Retryable, _Absent or ours."""
        try:
            return await request
        except botocore.exceptions.ClientError as exc:
            code, status = _code(exc), _status(exc)
            if code in ("NoSuchKey", "NoSuchBucket") or status == 404:
                raise _Absent(bucket=code == "NoSuchBucket") from None
            if code in _CREDENTIAL_CODES:
                raise ConfigError(
                    f"S3 endpoint {endpoint} refused the credentials ({code}) for access key"
                    f" {self._access_key_id()}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,"
                    " the profile, or P2PCAST_S3_ACCESS_KEY_ID/P2PCAST_S3_SECRET_ACCESS_KEY"
                ) from exc
            if code == "AccessDenied" or status == 403:
                raise ConfigError(
                    f"S3 endpoint {endpoint} denied access key {self._access_key_id()} access"
                    f" to {what} in bucket {self.bucket} ({code})"
                ) from exc
            if status in _RETRY_STATUS or code in _RETRY_CODES:
                raise _Retryable(f"{status} {code}") from exc
            raise OriginError(
                f"S3 endpoint {endpoint} answered {status} {code} for {what}"
            ) from exc
        except (
            botocore.exceptions.NoCredentialsError,
            botocore.exceptions.PartialCredentialsError,
        ):
            raise self._no_credentials() from None
        except (
            botocore.exceptions.HTTPClientError,  # connection closed, read timeout, streaming
            botocore.exceptions.ConnectionError,  # refused, connect timeout
            botocore.exceptions.IncompleteReadError,
            aiohttp.ClientError,
            OSError,
        ) as exc:
            raise _Retryable(str(exc) or type(exc).__name__) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise OriginError(f"S3 request for {what} to {endpoint} failed: {exc}") from exc
        except (P2PCastError, _Absent, _Retryable):
            raise
        except Exception as exc:
            # An answer botocore could not parse (ResponseParserError is no
            # BotoCoreError), from something that is not S3: not retried.
            raise OriginError(
                f"{endpoint} gave no usable S3 answer for {what}: {type(exc).__name__}: {exc}"
            ) from exc

    async def _open(self) -> list[Any]:
        """The clients, one per endpoint, made on first use in this event loop."""
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise InternalError(f"S3 origin {self.url} used from a second event loop")
        if self._clients:
            return self._clients
        self._loop = loop
        if self._opening is None:
            self._opening = asyncio.Lock()
            self._slots = asyncio.Semaphore(MAX_REQUESTS)
        async with self._opening:
            if not self._clients:
                self._clients = await self._make_clients()
        return self._clients

    async def _make_clients(self) -> list[Any]:
        global _LOADER  # noqa: PLW0603 - one loader per process, made when first needed
        try:
            session = AioSession(profile=self.profile)
            if _LOADER is None:
                _LOADER = botocore.loaders.create_loader()
            session.register_component("data_loader", _LOADER)
            if self._keys is None:
                credentials = await session.get_credentials()
                if credentials is None:
                    raise self._no_credentials()
                self._key_id = (await credentials.get_frozen_credentials()).access_key
            region = self.region or session.get_config_variable("region") or DEFAULT_REGION
            config = AioConfig(
                signature_version="s3v4",
                s3={"addressing_style": "path"},  # RGW has no wildcard DNS for virtual hosts
                retries={"total_max_attempts": 1},  # ours do failover too; see _call
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                max_pool_connections=MAX_REQUESTS,
                # Chunks are verified by xxh3 at the reader: no second checksum.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            keys = (
                {"aws_access_key_id": self._keys[0], "aws_secret_access_key": self._keys[1]}
                if self._keys
                else {}
            )
            clients = []
            for endpoint in self.endpoints:
                client = session.create_client(
                    "s3", region_name=region, endpoint_url=endpoint, config=config, **keys
                )
                clients.append(await self._stack.enter_async_context(client))
            return clients
        except botocore.exceptions.ProfileNotFound as exc:
            await self._stack.aclose()
            raise ConfigError(f"S3 origin {self.url}: {exc}") from exc
        except (botocore.exceptions.BotoCoreError, ValueError) as exc:
            await self._stack.aclose()
            raise ConfigError(f"cannot set up an S3 client for {self.url}: {exc}") from exc
        except BaseException:
            await self._stack.aclose()
            raise

    async def close(self) -> None:
        self._clients = []
        await self._stack.aclose()

    # -- messages ---------------------------------------------------------------

    def _access_key_id(self) -> str:
        return self._keys[0] if self._keys is not None else str(self._key_id)

    def _no_credentials(self) -> ConfigError:
        profile = f" (profile {self.profile})" if self.profile else ""
        return ConfigError(
            f"no S3 credentials for {self.url}{profile}: set AWS_ACCESS_KEY_ID and"
            " AWS_SECRET_ACCESS_KEY, a profile in AWS_SHARED_CREDENTIALS_FILE"
            " (~/.aws/credentials) chosen by AWS_PROFILE, or P2PCAST_S3_ACCESS_KEY_ID and"
            " P2PCAST_S3_SECRET_ACCESS_KEY"
        )

    def _absent(self, what: str, absent: _Absent, verb: str = "not found") -> str:
        if absent.bucket:
            return f"{what} {verb}: bucket {self.bucket} does not exist at {self._where()}"
        return f"{what} {verb} in bucket {self.bucket} at {self._where()}"

    def _where(self) -> str:
        return ", ".join(e or "the default S3 endpoint" for e in self.endpoints)


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
