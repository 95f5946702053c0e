"""The manifest: what an image is, chunk by chunk, in a versioned msgpack file.

File layout::

    MAGIC (8 bytes) | msgpack body | xxh3-128 of the body (16 bytes)

The trailing digest makes a truncated or bit-flipped manifest fail with a clear
``ManifestCorrupt`` instead of decoding into nonsense. The manifest is the
trusted root of a broadcast: it comes from the origin, never from a peer, and
its sha256 is the image id that peers use to name the broadcast.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import msgpack

from p2pcast import limits
from p2pcast.codec import Codec
from p2pcast.errors import ManifestCorrupt
from p2pcast.hashing import CHUNK_DIGEST_SIZE, IMAGE_DIGEST_SIZE, chunk_digest

MAGIC = b"P2PCMANI"
FORMAT_VERSION = 1

#: Image types push knows; staging picks its method by this.
IMAGE_TYPES = ("squashfs", "tar", "tar.gz", "tar.zst")

#: zstd's worst-case expansion of incompressible data is tiny; a stored chunk
#: bigger than raw size plus this is a lie (and push stores such chunks raw).
MAX_STORED_OVERHEAD = 64 * 1024

#: Length of an image id: the first 16 bytes of the manifest file's sha256.
IMAGE_ID_SIZE = 16


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk as stored at the origin and sent on the wire."""

    index: int
    offset: int  # in the image
    raw_size: int  # bytes of the image it covers
    stored_size: int  # bytes at the origin and on the wire
    codec: Codec
    digest: bytes  # xxh3-128 of the stored bytes; also its name at the origin

    @property
    def key(self) -> str:
        """Content address of the stored chunk."""
        return self.digest.hex()


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    image_type: str
    size: int
    chunk_size: int
    sha256: bytes
    digests: bytes  # CHUNK_DIGEST_SIZE bytes per chunk, concatenated
    stored_sizes: tuple[int, ...]
    codecs: bytes  # one Codec number per chunk
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def chunk_count(self) -> int:
        return len(self.stored_sizes)

    def chunk(self, index: int) -> ChunkRef:
        if not 0 <= index < self.chunk_count:
            raise IndexError(index)
        offset = index * self.chunk_size
        start = index * CHUNK_DIGEST_SIZE
        return ChunkRef(
            index=index,
            offset=offset,
            raw_size=min(self.chunk_size, self.size - offset),
            stored_size=self.stored_sizes[index],
            codec=Codec(self.codecs[index]),
            digest=self.digests[start : start + CHUNK_DIGEST_SIZE],
        )

    def chunks(self) -> Iterator[ChunkRef]:
        for index in range(self.chunk_count):
            yield self.chunk(index)

    @property
    def stored_total(self) -> int:
        """Bytes at the origin (and on each hop) for the whole image."""
        return sum(self.stored_sizes)

    def encode(self) -> bytes:
        body: bytes = msgpack.packb(
            {
                "v": self.version,
                "name": self.name,
                "type": self.image_type,
                "size": self.size,
                "chunk_size": self.chunk_size,
                "sha256": self.sha256,
                "digests": self.digests,
                "stored_sizes": list(self.stored_sizes),
                "codecs": self.codecs,
            },
            use_bin_type=True,
        )
        return MAGIC + body + chunk_digest(body)

    @property
    def image_id(self) -> bytes:
        return image_id_of(self.encode())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view for `p2pcast inspect`."""
        return {
            "format_version": self.version,
            "name": self.name,
            "image_id": self.image_id.hex(),
            "image_type": self.image_type,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunk_count": self.chunk_count,
            "stored_total": self.stored_total,
            "sha256": self.sha256.hex(),
            "chunks": [
                {
                    "index": c.index,
                    "offset": c.offset,
                    "raw_size": c.raw_size,
                    "stored_size": c.stored_size,
                    "codec": c.codec.name.lower(),
                    "xxh3_128": c.key,
                }
                for c in self.chunks()
            ],
        }


def image_id_of(encoded: bytes) -> bytes:
    """The image id: sha256 of the manifest file, first IMAGE_ID_SIZE bytes."""
    return hashlib.sha256(encoded).digest()[:IMAGE_ID_SIZE]


def chunk_count_for(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size)) if size else 0


def decode(data: bytes) -> Manifest:
    """Parse and validate a manifest file; any defect raises ManifestCorrupt."""
    if len(data) > limits.MAX_MANIFEST_BYTES:
        raise ManifestCorrupt(f"manifest of {len(data)} bytes exceeds the limit")
    if len(data) < len(MAGIC) + CHUNK_DIGEST_SIZE or not data.startswith(MAGIC):
        raise ManifestCorrupt("not a p2pcast manifest (bad magic or truncated)")
    body, check = data[len(MAGIC) : -CHUNK_DIGEST_SIZE], data[-CHUNK_DIGEST_SIZE:]
    if chunk_digest(body) != check:
        raise ManifestCorrupt("manifest checksum mismatch (truncated or corrupted)")
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ManifestCorrupt(f"manifest body is not valid msgpack: {exc}") from exc
    if not isinstance(fields, dict):
        raise ManifestCorrupt("manifest body is not a map")
    version = fields.get("v")
    if version != FORMAT_VERSION:
        raise ManifestCorrupt(f"unsupported manifest format version {version!r}")
    try:
        stored_sizes = fields["stored_sizes"]
        if not isinstance(stored_sizes, list):
            raise ManifestCorrupt("stored_sizes is not a list")
        return Manifest(
            name=fields["name"],
            image_type=fields["type"],
            size=fields["size"],
            chunk_size=fields["chunk_size"],
            sha256=fields["sha256"],
            digests=fields["digests"],
            stored_sizes=tuple(stored_sizes),
            codecs=fields["codecs"],
            version=version,
        )
    except KeyError as exc:
        raise ManifestCorrupt(f"manifest lacks field {exc}") from exc


def _validate(m: Manifest) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ManifestCorrupt(f"invalid manifest: {what}")

    need(isinstance(m.version, int) and m.version == FORMAT_VERSION, "version")
    need(isinstance(m.name, str) and 0 < len(m.name) <= limits.MAX_NAME_LENGTH, "name")
    need(m.image_type in IMAGE_TYPES, f"image type {m.image_type!r}")
    need(type(m.size) is int and 0 <= m.size <= limits.MAX_IMAGE_SIZE, "size")
    need(
        type(m.chunk_size) is int
        and limits.MIN_CHUNK_SIZE <= m.chunk_size <= limits.MAX_CHUNK_SIZE,
        "chunk size",
    )
    need(isinstance(m.sha256, bytes) and len(m.sha256) == IMAGE_DIGEST_SIZE, "sha256")
    count = chunk_count_for(m.size, m.chunk_size)
    need(count <= limits.MAX_CHUNKS, "too many chunks")
    need(len(m.stored_sizes) == count, f"{len(m.stored_sizes)} chunks, size implies {count}")
    need(isinstance(m.digests, bytes) and len(m.digests) == count * CHUNK_DIGEST_SIZE, "digests")
    need(isinstance(m.codecs, bytes) and len(m.codecs) == count, "codecs")
    for index, (stored, codec) in enumerate(zip(m.stored_sizes, m.codecs, strict=True)):
        raw = min(m.chunk_size, m.size - index * m.chunk_size)
        need(codec in (c.value for c in Codec), f"chunk {index} codec {codec}")
        need(type(stored) is int and stored > 0, f"chunk {index} stored size")
        if codec == Codec.RAW:
            need(stored == raw, f"raw chunk {index} stored size {stored} != {raw}")
        else:
            need(stored <= raw + MAX_STORED_OVERHEAD, f"chunk {index} stored size {stored}")
