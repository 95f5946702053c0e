"""Digests: xxh3-128 per chunk (fast enough to be free), sha256 per image.

xxh3 is not a cryptographic hash: it guards against corruption and buggy or
confused peers. The whole-image sha256 recorded in the manifest (which comes
from the trusted origin) is checked before an image is used.
"""

from __future__ import annotations

import hashlib
import os

import xxhash

#: What the hashing and codec functions accept without copying.
BytesLike = bytes | bytearray | memoryview

CHUNK_DIGEST_SIZE = 16
IMAGE_DIGEST_SIZE = 32


def chunk_digest(data: BytesLike) -> bytes:
    """xxh3-128 of one chunk's stored bytes (16 bytes)."""
    return xxhash.xxh3_128_digest(data)


def image_hasher() -> hashlib._Hash:
    """A fresh sha256 for a whole image."""
    return hashlib.sha256()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a whole file, read in large blocks (for independent checks)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
