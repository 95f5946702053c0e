"""Reading an image file while its chunks still arrive, for unpacking as it grows.

:class:`GrowingImageReader` is a raw binary file over the node cache's image
file that serves only bytes of the verified prefix (see
:class:`p2pcast.prefix.ImagePrefix`): a read beyond it blocks the calling
worker thread until the prefix grows, and fails with StageError when the
broadcast fails or stops, so an unpacking thread never hangs on an image that
will not come. The arithmetic lives in :mod:`p2pcast.prefix`.

The reader has its own descriptor: the broadcast closes its own when it stops,
and a failed image's directory is removed from the cache, neither of which
may pull the file from under a thread still reading it.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, cast

from p2pcast.errors import StageError
from p2pcast.prefix import ImagePrefix, readable_span

#: Buffer of the reader handed to the unpacker: tarfile, gzip and zstd ask for
#: small pieces (tar blocks, 128 KiB); one pread per MiB keeps syscalls rare
#: without holding much memory.
READ_BUFFER = 1024 * 1024


class GrowingImageReader(io.RawIOBase):
    """Sequential reads of an image file, never beyond its verified prefix."""

    def __init__(
        self, path: str | os.PathLike[str], prefix: ImagePrefix, *, timeout: float | None = None
    ) -> None:
        """``timeout``: longest wait for the prefix to grow (None: as long as
        the broadcast runs, which fails on its own when peers and origin do)."""
        super().__init__()
        self.name = os.fspath(path)
        self.prefix = prefix
        self.timeout = timeout
        self.offset = 0
        self._fd = -1  # close() (also from __del__) must find it even if open fails
        try:
            self._fd = os.open(self.name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StageError(f"cannot open image {self.name}: {exc.strerror}") from exc

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        size = self.prefix.size
        span = readable_span(self.offset, len(view), self.prefix.available, size)
        if span == 0:
            if self.offset >= size or not len(view):
                return 0  # end of the image, or an empty read
            available = self.prefix.wait_for(self.offset + 1, self.timeout)
            span = readable_span(self.offset, len(view), available, size)
        try:
            got = os.preadv(self._fd, [view[:span]], self.offset)
        except OSError as exc:
            raise StageError(f"cannot read image {self.name}: {exc.strerror}") from exc
        if got == 0:
            # The prefix says these bytes were written: a shorter file is a
            # damaged cache, never a normal end.
            raise StageError(f"image {self.name} is shorter than its verified prefix")
        self.prefix.count_read(got)
        self.offset += got
        return got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


def open_growing(
    path: str | os.PathLike[str], prefix: ImagePrefix, *, timeout: float | None = None
) -> BinaryIO:
    """A buffered reader over the growing image (full reads except at the end)."""
    raw = GrowingImageReader(path, prefix, timeout=timeout)
    return cast(BinaryIO, io.BufferedReader(raw, buffer_size=READ_BUFFER))
