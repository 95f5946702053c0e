"""Per-chunk compression: zstd where it pays, raw otherwise.

SquashFS images are already compressed, so their chunks nearly always stay raw
and can be sent with sendfile straight from the image file. Plain tarballs
shrink a lot, which saves link time on every hop.
"""

from __future__ import annotations

import enum

import zstandard

from p2pcast.errors import ChunkCorrupt
from p2pcast.hashing import BytesLike

#: zstd level 3: ~300 MB/s per core to compress, ~3 GB/s to decompress here;
#: higher levels cost push time for a few percent.
ZSTD_LEVEL = 3

#: Keep a compressed chunk only if it saves at least this fraction: below it,
#: decompression on every node costs more than the link time saved, and raw
#: chunks can be sendfile'd from the image file itself.
MIN_SAVING = 0.10


class Codec(enum.IntEnum):
    """Wire and manifest numbers of the chunk codecs; never reuse a number."""

    RAW = 0
    ZSTD = 1


def encode_chunk(raw: BytesLike) -> tuple[Codec, bytes]:
    """Return (codec, stored bytes) for one chunk, compressing only if it pays."""
    compressed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    if len(compressed) <= len(raw) * (1.0 - MIN_SAVING):
        return Codec.ZSTD, compressed
    return Codec.RAW, bytes(raw)


def decode_chunk(codec: Codec, stored: BytesLike, raw_size: int) -> BytesLike:
    """Return the raw bytes of a chunk; the size is bounded by the manifest.

    ``stored`` must already have passed its xxh3 check: this only guards
    against a manifest that lies about sizes.
    """
    if codec is Codec.RAW:
        if len(stored) != raw_size:
            raise ChunkCorrupt(f"raw chunk has {len(stored)} bytes, manifest says {raw_size}")
        return stored
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise ChunkCorrupt(f"zstd chunk has no valid frame header: {exc}") from exc
    # decompress() allocates the size the frame header declares before it looks
    # at max_output_size, so a header that lies must be refused first (-1 means
    # "not declared"; then max_output_size bounds the buffer).
    if declared not in (-1, raw_size):
        raise ChunkCorrupt(f"zstd chunk declares {declared} bytes, manifest says {raw_size}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_size)
    except zstandard.ZstdError as exc:
        raise ChunkCorrupt(f"zstd chunk does not decompress: {exc}") from exc
    if len(raw) != raw_size:
        raise ChunkCorrupt(f"zstd chunk decompresses to {len(raw)} bytes, manifest says {raw_size}")
    return raw
