"""The catalog of peer-protocol messages, and the events a connection delivers.

One frozen dataclass per wire message. Its type number is fixed forever: a
retired message keeps its number reserved, so an old and a new daemon can never
read the same frame two ways. Dataclass field order is wire order. Every field is
validated on parse (peer's fault: ProtocolError) and on send (our fault:
LocalProtocolError), with one rule table per message (``CHECKS``).

Events are past tense and say what the *peer* did; commands (on the connection)
are verbs and say what we do.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeVar, cast

from p2pcast import limits
from p2pcast.errors import ProtocolError
from p2pcast.protocol.auth import MAX_METHOD_NAME

#: An image id: the first 16 bytes of the manifest's sha256. Equal to
#: manifest.IMAGE_ID_SIZE (a test checks); not imported, so the wire protocol
#: does not drag in the manifest's codec dependencies.
IMAGE_ID_SIZE = 16

PROTOCOL_NAME = "p2pcast"
#: 2: Hello carries a challenge nonce and an Auth message follows it (peer
#: authentication, p2pcast.protocol.auth). 1: no authentication.
PROTOCOL_VERSION = 2

#: Hello.proto is compared with PROTOCOL_NAME; anything longer is not a name.
MAX_PROTO_NAME = 16
#: Versions and Goodbye codes are small numbers; bound them like a u16.
MAX_U16 = 0xFFFF

#: A field check returns None if the value is fine, else what is wrong with it.
FieldCheck = Callable[[object], str | None]


def _int(lo: int, hi: int) -> FieldCheck:
    def check(value: object) -> str | None:
        # type() is exact on purpose: bool is an int subclass, and msgpack
        # turns true/false into bools, which must not pass for 1/0.
        if type(value) is not int:
            return f"must be an int, not {type(value).__name__}"
        return None if lo <= value <= hi else f"{value} is outside {lo}..{hi}"

    return check


def _bin(lo: int, hi: int) -> FieldCheck:
    def check(value: object) -> str | None:
        if type(value) is not bytes:
            return f"must be bytes, not {type(value).__name__}"
        if lo == hi and len(value) != lo:
            return f"must be exactly {lo} bytes, not {len(value)}"
        return None if lo <= len(value) <= hi else f"length {len(value)} is outside {lo}..{hi}"

    return check


def _str(lo: int, hi: int) -> FieldCheck:
    def check(value: object) -> str | None:
        if type(value) is not str:
            return f"must be a str, not {type(value).__name__}"
        if not lo <= len(value) <= hi:
            return f"length {len(value)} is outside {lo}..{hi}"
        # Node names and reasons end up in logs; no newlines or escapes there.
        return None if value.isprintable() else "contains unprintable characters"

    return check


def clean_reason(text: str) -> str:
    """Any text (say ``str(exc)``) made into a valid Reject/Goodbye reason."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text[: limits.MAX_REASON_LENGTH]


IMAGE_ID = _bin(IMAGE_ID_SIZE, IMAGE_ID_SIZE)
INDEX = _int(0, limits.MAX_CHUNKS - 1)
REASON = _str(0, limits.MAX_REASON_LENGTH)


class Message:
    """Base of the wire messages; subclasses are frozen dataclasses made by ``_message``."""

    __slots__ = ()
    TYPE: ClassVar[int]
    CHECKS: ClassVar[tuple[FieldCheck, ...]]
    FIELDS: ClassVar[tuple[str, ...]]

    def encode_fields(self) -> list[object]:
        """The frame header: ``[TYPE, *fields]`` in wire order."""
        return [self.TYPE, *(getattr(self, name) for name in self.FIELDS)]

    def problem(self) -> str | None:
        """What is wrong with this message, naming message and field, or None."""
        for name, check in zip(self.FIELDS, self.CHECKS, strict=True):
            why = check(getattr(self, name))
            if why is not None:
                return f"{type(self).__name__}.{name}: {why}"
        return self._cross_check()

    def _cross_check(self) -> str | None:
        """Rules that involve several fields; the single-field checks have passed."""
        return None

    @classmethod
    def parse(cls, header: Sequence[object]) -> Self:
        """Build and validate from a decoded frame header; any defect is a ProtocolError."""
        if not header or type(header[0]) is not int or header[0] != cls.TYPE:
            raise ProtocolError(f"{cls.__name__}: header is not of type {cls.TYPE}")
        if len(header) != 1 + len(cls.FIELDS):
            raise ProtocolError(
                f"{cls.__name__}: expected {len(cls.FIELDS)} fields, got {len(header) - 1}"
            )
        msg = cast(Any, cls)(**dict(zip(cls.FIELDS, header[1:], strict=True)))
        why = msg.problem()
        if why is not None:
            raise ProtocolError(why)
        return cast(Self, msg)


#: Every message class by type number, for dispatch on receive.
MESSAGE_TYPES: dict[int, type[Message]] = {}

_M = TypeVar("_M", bound=type[Message])


def _message(type_number: int, *checks: FieldCheck) -> Callable[[_M], _M]:
    """Register a message class under its type number with one check per field."""

    def register(cls: _M) -> _M:
        names = tuple(f.name for f in dataclasses.fields(cast(Any, cls)))
        if len(names) != len(checks) or type_number in MESSAGE_TYPES:
            raise TypeError(f"{cls.__name__}: one check per field, and a fresh type number")
        cls.TYPE, cls.CHECKS, cls.FIELDS = type_number, checks, names
        MESSAGE_TYPES[type_number] = cls
        return cls

    return register


@_message(
    1,
    _str(1, MAX_PROTO_NAME),
    _int(0, MAX_U16),
    _str(1, limits.MAX_NODE_NAME),
    _bin(0, limits.MAX_AUTH_BYTES),
)
@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Message):
    """First frame in each direction; ``nonce`` is the sender's challenge.

    The layout is version 1's (whose last field, always empty, was reserved for
    authentication), so that an old peer's Hello still parses and is refused
    for its version, not for its shape. The nonce's size is checked with the
    version (the connection's handshake check), for the same reason.
    """

    proto: str = PROTOCOL_NAME
    version: int
    node: str
    nonce: bytes = b""


@_message(2, IMAGE_ID)
@dataclass(frozen=True, slots=True)
class Subscribe(Message):
    """Downstream -> upstream: tell me what you have of this swarm."""

    image_id: bytes


def bitfield_size(chunk_count: int) -> int:
    """Bytes of a bitfield of ``chunk_count`` bits."""
    return -(-chunk_count // 8)


def bit_is_set(bits: bytes, index: int) -> bool:
    """Bit ``index`` of a bitfield, MSB first within each byte."""
    return bool(bits[index >> 3] & (0x80 >> (index & 7)))


def pack_bits(chunk_count: int, present: Iterable[int]) -> bytes:
    """The bitfield of ``chunk_count`` bits with the ``present`` indexes set."""
    out = bytearray(bitfield_size(chunk_count))
    for index in present:
        if not 0 <= index < chunk_count:
            raise ValueError(f"index {index} outside 0..{chunk_count - 1}")
        out[index >> 3] |= 0x80 >> (index & 7)
    return bytes(out)


@_message(3, IMAGE_ID, _int(1, limits.MAX_CHUNKS), _bin(0, bitfield_size(limits.MAX_CHUNKS)))
@dataclass(frozen=True, slots=True)
class Bitfield(Message):
    """Upstream -> downstream, once per subscription: the chunks it has (bit i = chunk i)."""

    image_id: bytes
    chunk_count: int
    bits: bytes

    def _cross_check(self) -> str | None:
        size = bitfield_size(self.chunk_count)
        if len(self.bits) != size:
            return f"Bitfield.bits: {len(self.bits)} bytes, {self.chunk_count} chunks need {size}"
        # Padding must be zero so one set of chunks has exactly one encoding.
        padding = size * 8 - self.chunk_count
        if padding and self.bits[-1] & ((1 << padding) - 1):
            return "Bitfield.bits: padding bits past chunk_count are set"
        return None


@_message(4, IMAGE_ID, INDEX)
@dataclass(frozen=True, slots=True)
class Have(Message):
    """Upstream -> downstream: I now have this chunk too."""

    image_id: bytes
    index: int


@_message(5, IMAGE_ID, INDEX)
@dataclass(frozen=True, slots=True)
class Request(Message):
    """Downstream -> upstream: send me this chunk.

    It gets exactly one answer, a Chunk or a Reject, and stays pending on both
    ends until then; the chunk may not be requested again on the link meanwhile.
    """

    image_id: bytes
    index: int


@_message(6, IMAGE_ID, INDEX, _int(1, limits.MAX_CHUNK_BODY))
@dataclass(frozen=True, slots=True)
class Chunk(Message):
    """Upstream -> downstream: ``length`` raw body bytes follow this header."""

    image_id: bytes
    index: int
    length: int


@_message(7, IMAGE_ID, INDEX, REASON)
@dataclass(frozen=True, slots=True)
class Reject(Message):
    """Upstream -> downstream: I will not serve this request (``reason`` says why).

    Also the answer to a cancelled request that was not being sent yet: every
    request is answered, cancelled or not.
    """

    image_id: bytes
    index: int
    reason: str


@_message(8, IMAGE_ID, INDEX)
@dataclass(frozen=True, slots=True)
class Cancel(Message):
    """Downstream -> upstream: I no longer want this chunk. Advisory, once per request.

    The request stays pending: the upstream still answers it, with the chunk if
    it is sending it already, else with a Reject. A Cancel that crossed the
    answer on the wire is ignored by the upstream.
    """

    image_id: bytes
    index: int


@_message(9, IMAGE_ID)
@dataclass(frozen=True, slots=True)
class Done(Message):
    """Downstream -> upstream: I have the whole image and will request no more of it."""

    image_id: bytes


@_message(10, _int(0, MAX_U16), REASON)
@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """Either way: the last frame before closing. ``code`` is a GoodbyeCode or private."""

    code: int
    reason: str


@_message(11, _str(1, MAX_METHOD_NAME), _bin(0, limits.MAX_AUTH_BYTES))
@dataclass(frozen=True, slots=True)
class Auth(Message):
    """Either way, second frame: proof that the sender is a daemon of this cluster.

    ``proof`` covers the handshake's transcript (p2pcast.protocol.auth): an
    HMAC for method "secret", a munge credential for "munge", empty for "none".
    """

    method: str
    proof: bytes


class GoodbyeCode(enum.IntEnum):
    """Well-known Goodbye codes; never reuse a number."""

    NORMAL = 0  # done with this link
    SHUTTING_DOWN = 1  # the daemon is stopping
    PROTOCOL_ERROR = 2  # your bytes broke the protocol (reason says how)
    HANDSHAKE_FAILED = 3  # wrong protocol, version or credentials
    INTERNAL_ERROR = 4  # our bug


@dataclass(frozen=True, slots=True)
class FileSlice:
    """``length`` bytes at ``offset`` of open file ``fd``: the transport sendfile()s them.

    The protocol never reads it, it only counts ``length``.
    """

    fd: int
    offset: int
    length: int


# ---- events: what the peer did ------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloReceived:
    node: str
    version: int
    nonce: bytes


@dataclass(frozen=True, slots=True)
class AuthReceived:
    """The peer's proof: check it, then accept_peer() (or say Goodbye)."""

    method: str
    proof: bytes


@dataclass(frozen=True, slots=True)
class Subscribed:
    image_id: bytes


@dataclass(frozen=True, slots=True)
class BitfieldReceived:
    image_id: bytes
    chunk_count: int
    bits: bytes


@dataclass(frozen=True, slots=True)
class HaveReceived:
    image_id: bytes
    index: int


@dataclass(frozen=True, slots=True)
class ChunkRequested:
    image_id: bytes
    index: int


@dataclass(frozen=True, slots=True)
class ChunkHeaderReceived:
    """A chunk body of ``length`` bytes follows: read it with readinto_body/body_received,
    or keep calling next_event for ChunkBodyData."""

    image_id: bytes
    index: int
    length: int


@dataclass(frozen=True, slots=True)
class ChunkBodyData:
    """Fallback path: the next bytes of the current chunk body."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ChunkBodyEnded:
    image_id: bytes
    index: int


@dataclass(frozen=True, slots=True)
class RequestRejected:
    image_id: bytes
    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class RequestCancelled:
    """The downstream cancelled a request we have not answered yet.

    The request stays pending and must still be answered: with the chunk if it
    is being sent, else with a Reject. A Cancel that crossed our answer is
    dropped without an event.
    """

    image_id: bytes
    index: int


@dataclass(frozen=True, slots=True)
class PeerDone:
    image_id: bytes


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer said Goodbye, or (``code`` None) closed the stream between frames."""

    code: int | None
    reason: str


Event = (
    HelloReceived
    | AuthReceived
    | Subscribed
    | BitfieldReceived
    | HaveReceived
    | ChunkRequested
    | ChunkHeaderReceived
    | ChunkBodyData
    | ChunkBodyEnded
    | RequestRejected
    | RequestCancelled
    | PeerDone
    | PeerClosed
)


class NeedData(enum.Enum):
    """Type of the NEED_DATA sentinel (an enum so ``is`` narrows types)."""

    NEED_DATA = "NEED_DATA"


#: next_event() found no complete event: feed more bytes with receive_data().
NEED_DATA = NeedData.NEED_DATA
