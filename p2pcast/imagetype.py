"""Which kind of image a file is, from its first bytes (never from its name).

Staging picks its method (mount a squashfs, unpack a tarball) by the type push
records in the manifest, so a wrong guess here would only surface on every node
at job start. Compressed tarballs are opened far enough to see a tar header,
because a gzip'd log file is not an image.
"""

from __future__ import annotations

import gzip
import os
import stat
import zlib
from typing import BinaryIO

import zstandard

from p2pcast.errors import BadImageFile

SQUASHFS_MAGIC = b"hsqs"  # little-endian superblock, the only kind Linux mounts
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

#: A tar header block; its "ustar" magic sits at TAR_MAGIC_OFFSET (POSIX and
#: GNU tars both start the field with these five bytes).
TAR_BLOCK = 512
TAR_MAGIC = b"ustar"
TAR_MAGIC_OFFSET = 257

#: Bytes shown in an error message about an unknown file: enough to recognise
#: a format by eye, short enough for one line.
SHOWN_BYTES = 8


def detect_image_type(path: str | os.PathLike[str]) -> str:
    """Return one of manifest.IMAGE_TYPES for the file, or raise BadImageFile."""
    name = os.fspath(path)
    try:
        # Stat before open: opening a FIFO would block, and a directory
        # deserves a clearer message than EISDIR.
        st = os.stat(name)
        if not stat.S_ISREG(st.st_mode):
            raise BadImageFile(f"{name}: not a regular file")
        if st.st_size == 0:
            raise BadImageFile(f"{name}: file is empty")
        with open(name, "rb") as f:
            head = f.read(TAR_BLOCK)
            f.seek(0)
            return _detect(name, head, f)
    except OSError as exc:
        raise BadImageFile(f"{name}: cannot read: {exc.strerror or exc}") from exc


def _detect(name: str, head: bytes, f: BinaryIO) -> str:
    if head.startswith(SQUASHFS_MAGIC):
        return "squashfs"
    if head.startswith(GZIP_MAGIC):
        _require_tar(name, "gzip", _gunzip_head(name, f))
        return "tar.gz"
    if head.startswith(ZSTD_MAGIC):
        _require_tar(name, "zstd", _unzstd_head(name, f))
        return "tar.zst"
    if _is_tar_header(head):
        return "tar"
    shown = head[:SHOWN_BYTES].hex(" ")
    raise BadImageFile(
        f"{name}: not a squashfs, tar, tar.gz or tar.zst image (starts with {shown})"
    )


def _is_tar_header(block: bytes) -> bool:
    # A whole block, or a tar cut inside its first header would pass.
    end = TAR_MAGIC_OFFSET + len(TAR_MAGIC)
    return len(block) == TAR_BLOCK and block[TAR_MAGIC_OFFSET:end] == TAR_MAGIC


def _require_tar(name: str, compression: str, block: bytes) -> None:
    if not _is_tar_header(block):
        raise BadImageFile(f"{name}: {compression} data does not start with a tar header")


def _gunzip_head(name: str, f: BinaryIO) -> bytes:
    try:
        with gzip.GzipFile(fileobj=f) as gz:
            return gz.read(TAR_BLOCK)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise BadImageFile(f"{name}: broken gzip data: {exc}") from exc


def _unzstd_head(name: str, f: BinaryIO) -> bytes:
    block = b""
    try:
        with zstandard.ZstdDecompressor().stream_reader(f, closefd=False) as reader:
            # A stream reader may return short reads; loop until a full block
            # or the end of the data.
            while len(block) < TAR_BLOCK:
                more = reader.read(TAR_BLOCK - len(block))
                if not more:
                    break
                block += more
    except zstandard.ZstdError as exc:
        raise BadImageFile(f"{name}: broken zstd data: {exc}") from exc
    return block
