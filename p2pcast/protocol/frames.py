"""Length-prefixed msgpack frames, shared by the peer protocol and the control socket.

Wire layout of one frame::

    u32 big-endian header length | header: msgpack array [type:int, *fields] | body?

Only the peer protocol's CHUNK frame has a body, and its length is a header
field, so this layer never looks at bodies: it hands the connection raw access
to whatever bytes sit in its buffer after a header (``read``/``read_into``).

Everything here is pure: bytes in, values out, no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import msgpack

from p2pcast import limits
from p2pcast.errors import LocalProtocolError, ProtocolError

_PREFIX = struct.Struct(">I")
PREFIX_SIZE = _PREFIX.size

#: The length prefix is a u32; a caller cannot ask for more.
_MAX_PREFIXED = 2**32 - 1

#: Peer-protocol bounds for the msgpack decoder. Strings are node names and
#: reasons, measured in characters by the messages, so the byte bound allows
#: four UTF-8 bytes per character.
PEER_MAX_STR_BYTES = 4 * max(limits.MAX_NODE_NAME, limits.MAX_REASON_LENGTH)
#: The biggest bin field is a bitfield of MAX_CHUNKS bits.
PEER_MAX_BIN_BYTES = max(-(-limits.MAX_CHUNKS // 8), limits.MAX_AUTH_BYTES)
#: The longest peer header (Hello) has 5 elements; a little room, not a lot.
PEER_MAX_ARRAY_LEN = 8


def encode_frame(fields: Sequence[object], *, max_header: int = limits.MAX_HEADER_BYTES) -> bytes:
    """Length prefix + msgpack array of ``fields`` (the first being the type number).

    A header the peer would refuse as too big, or a value msgpack cannot encode,
    is this node's bug, hence LocalProtocolError.
    """
    fields = list(fields)
    if not fields or type(fields[0]) is not int:
        raise LocalProtocolError("a frame header starts with an int type number")
    try:
        header: bytes = msgpack.packb(fields, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode frame header: {exc}") from exc
    if len(header) > max_header:
        raise LocalProtocolError(f"frame header of {len(header)} bytes exceeds {max_header}")
    return _PREFIX.pack(len(header)) + header


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes, take complete headers with ``next_header``.

    The decoder never reads ahead on its own: it holds at most one incomplete
    header (bounded by ``max_header``, checked as soon as the 4-byte prefix is
    in) plus whatever the caller fed since it last drained the buffer. After a
    ProtocolError it stays broken: the stream has lost its framing for good.
    """

    def __init__(
        self,
        *,
        max_header: int = limits.MAX_HEADER_BYTES,
        max_str: int = PEER_MAX_STR_BYTES,
        max_bin: int = PEER_MAX_BIN_BYTES,
        max_array: int = PEER_MAX_ARRAY_LEN,
        max_map: int = 0,
        max_depth: int = 1,
    ) -> None:
        # max_depth counts the header array itself: 1 means "scalars only",
        # which is all the peer protocol needs; the control socket passes more.
        if not 0 < max_header <= _MAX_PREFIXED:
            raise ValueError(f"max_header must be in 1..{_MAX_PREFIXED}, not {max_header}")
        if min(max_str, max_bin, max_array, max_map) < 0 or max_depth < 1:
            raise ValueError("decoder bounds must be non-negative and max_depth >= 1")
        self.max_header = max_header
        self._bounds = {
            "max_str_len": max_str,
            "max_bin_len": max_bin,
            "max_array_len": max_array,
            "max_map_len": max_map,
        }
        self._max_depth = max_depth
        self._buf = bytearray()
        self._failure: ProtocolError | None = None

    def feed(self, data: bytes | memoryview) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet consumed (a partial frame, or body bytes)."""
        return len(self._buf)

    def next_header(self) -> list[object] | None:
        """The next complete header as a list ``[type, *fields]``, or None if incomplete."""
        if self._failure is not None:
            raise ProtocolError(f"frame stream already failed: {self._failure}")
        try:
            return self._next_header()
        except ProtocolError as exc:
            self._failure = exc
            raise

    def _next_header(self) -> list[object] | None:
        if len(self._buf) < PREFIX_SIZE:
            return None
        (size,) = _PREFIX.unpack_from(self._buf)
        # Checked before the header is buffered, so a hostile length costs nothing.
        if size == 0:
            raise ProtocolError("frame header length is 0")
        if size > self.max_header:
            raise ProtocolError(f"frame header length {size} exceeds {self.max_header}")
        end = PREFIX_SIZE + size
        if len(self._buf) < end:
            return None
        raw = bytes(self._buf[PREFIX_SIZE:end])
        del self._buf[:end]
        try:
            header = msgpack.unpackb(
                raw, raw=False, strict_map_key=True, max_ext_len=0, **self._bounds
            )
        except Exception as exc:
            # msgpack raises a zoo (ExtraData, FormatError, StackError,
            # UnicodeDecodeError, plain ValueError/TypeError...); all mean the
            # peer sent garbage.
            raise ProtocolError(f"frame header is not valid msgpack: {exc!r}") from exc
        if not isinstance(header, list) or not header:
            raise ProtocolError("frame header is not a non-empty msgpack array")
        if type(header[0]) is not int:
            raise ProtocolError(f"frame type is {type(header[0]).__name__}, not int")
        _check_shape(header, 1, self._max_depth)
        return header

    def read(self, limit: int) -> bytes:
        """Consume and return up to ``limit`` buffered bytes (body fallback path)."""
        n = min(limit, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def read_into(self, dest: memoryview, limit: int) -> int:
        """Copy up to ``limit`` buffered bytes into ``dest``; return how many (zero-copy path)."""
        n = min(limit, len(self._buf), dest.nbytes)
        if n:
            # The view must be released before ``del`` resizes the bytearray.
            with memoryview(self._buf) as src:
                dest[:n] = src[:n]
            del self._buf[:n]
        return n


def _check_shape(value: object, depth: int, max_depth: int) -> None:
    """Reject nesting deeper than the caller needs and maps with non-str keys."""
    if isinstance(value, list):
        items: list[object] = value
    elif isinstance(value, dict):
        if not all(type(k) is str for k in value):
            raise ProtocolError("frame header has a map with a non-str key")
        items = list(value.values())
    else:
        return
    if depth > max_depth:
        raise ProtocolError(f"frame header nests deeper than {max_depth}")
    for item in items:
        _check_shape(item, depth + 1, max_depth)
