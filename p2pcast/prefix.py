"""The trustworthy prefix of an image that is still arriving.

Every chunk is checked against the trusted manifest's xxh3 before it is
written to the cache file, so the bytes of the image below the first chunk
this node lacks are final and trustworthy while the rest still travel (the
whole-image sha256 comes last and only confirms them). Staging reads that
prefix to unpack a tar while the broadcast runs.

    held_chunks(have, start)        pure: the first index not held from ``start``
    prefix_bytes(chunks, ...)       pure: how many image bytes ``chunks`` cover
    readable_span(offset, want, ...) pure: how much of a read can be served now
    ImagePrefix                     thread-safe: the broadcast (event loop)
                                    advances, verifies or fails it; readers in
                                    worker threads wait on it
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from p2pcast.errors import P2PCastError, StageError


def held_chunks(have: Sequence[int] | Sequence[bool], start: int) -> int:
    """The first chunk index at or after ``start`` that is not held.

    ``start`` must itself be a held-prefix end (every chunk before it held),
    so callers advance a cursor instead of rescanning from 0 on each arrival.
    """
    index = start
    while index < len(have) and have[index]:
        index += 1
    return index


def prefix_bytes(chunks: int, chunk_size: int, size: int) -> int:
    """Bytes of the image covered by its first ``chunks`` chunks.

    Every chunk but the last has ``chunk_size`` bytes; the last one is short,
    hence the cap at the image's ``size``.
    """
    if chunks < 0 or chunk_size <= 0 or size < 0:
        raise ValueError(f"bad prefix: {chunks} chunks of {chunk_size} in {size} bytes")
    return min(chunks * chunk_size, size)


def readable_span(offset: int, want: int, available: int, size: int) -> int:
    """How many bytes a read of ``want`` at ``offset`` may return right now.

    0 means "wait for more" when ``offset < size``, and end of file when
    ``offset >= size``; callers tell the two apart with ``offset >= size``.
    """
    if offset < 0 or want < 0:
        raise ValueError(f"bad read: {want} bytes at offset {offset}")
    end = min(available, size)
    return max(0, min(want, end - offset))


class ImagePrefix:
    """How much of one image may be read, shared between the event loop and threads.

    The broadcast calls :meth:`advance` as its contiguous held prefix grows,
    :meth:`verified` once the whole image's sha256 matched, and :meth:`fail`
    when it fails or stops; readers call :meth:`wait_for` and
    :meth:`wait_verified` from worker threads. A failure is final and wakes
    every waiter, so no reader outlives the broadcast it reads from.
    """

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._cond = threading.Condition()
        self._available = 0
        self._verified = False
        self._error: str | None = None
        #: image bytes handed to readers while the image was incomplete (some
        #: chunk still missing): evidence that unpacking overlapped the transfer
        self.read_early = 0

    # ---- the broadcast's side (event loop thread) -----------------------------

    def advance(self, available: int) -> None:
        with self._cond:
            if available > self._available:
                self._available = min(available, self.size)
                self._cond.notify_all()

    def verified(self) -> None:
        with self._cond:
            self._available = self.size
            self._verified = True
            self._cond.notify_all()

    def fail(self, why: P2PCastError | str) -> None:
        """The image will never be complete here; wake and fail every reader."""
        with self._cond:
            if self._error is None and not self._verified:
                self._error = str(why)
                self._cond.notify_all()

    # ---- readers (worker threads) ---------------------------------------------

    @property
    def available(self) -> int:
        with self._cond:
            return self._available

    @property
    def is_verified(self) -> bool:
        with self._cond:
            return self._verified

    def _check(self) -> None:
        if self._error is not None:
            raise StageError(f"image {self.name} did not arrive: {self._error}")

    def wait_for(self, end: int, timeout: float | None = None) -> int:
        """Block until ``end`` bytes (capped at the size) are readable; return
        how many are. StageError if the image fails or ``timeout`` passes."""
        end = min(end, self.size)
        with self._cond:
            if not self._cond.wait_for(lambda: self._available >= end or self._error, timeout):
                raise StageError(f"image {self.name}: no new bytes within {timeout:g} s")
            # Bytes already available stay readable even after a failure:
            # refusing them would only turn a clear error into a later one.
            if self._available < end:
                self._check()
            return self._available

    def wait_verified(self, timeout: float | None = None) -> None:
        """Block until the whole image's sha256 matched; StageError if it never will."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._verified or self._error, timeout):
                raise StageError(f"image {self.name}: not verified within {timeout:g} s")
            self._check()

    def count_read(self, length: int) -> None:
        """Record a read that a reader served (for the early-unpack evidence)."""
        with self._cond:
            if self._available < self.size:
                self.read_early += length
