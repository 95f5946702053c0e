"""Shared helpers for the protocol tests (h11's tests/helpers.py, in a module we own).

``ConnectionPair`` plays the transport between a downstream and an upstream
PeerConnection: it writes what commands return (sendfile()ing a FileSlice by
reading the file) and reads what arrives, by either body path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from p2pcast.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    AuthReceived,
    ChunkBodyData,
    ChunkBodyEnded,
    ChunkHeaderReceived,
    Event,
    FileSlice,
    Hello,
    HelloReceived,
    PeerConnection,
    Role,
    State,
)
from p2pcast.protocol.auth import NONCE_SIZE

IMG = bytes(range(16))
IMG2 = bytes(range(16, 32))

Outgoing = bytes | Sequence[bytes | FileSlice]


def nonce(n: int) -> bytes:
    """A fixed nonce for tests (the transport draws real ones)."""
    return bytes([n]) * NONCE_SIZE


#: The nonce a test's own connection uses, and the one its fake peer's Hello has.
MY_NONCE = nonce(1)
PEER_NONCE = nonce(2)


def conn(role: Role, node: str = "me") -> PeerConnection:
    """A connection with MY_NONCE (no handshake yet)."""
    return PeerConnection(role, node, nonce=MY_NONCE)


def peer_hello(node: str = "peer", version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(version=version, node=node, nonce=PEER_NONCE)


def authenticate(conn: PeerConnection) -> None:
    """Finish the handshake of ``conn`` after the peer's Hello: send our Auth,
    take the peer's (method "none") and accept it."""
    from p2pcast.protocol import Auth, encode_frame

    conn.auth("none", b"")
    conn.receive_data(encode_frame(Auth("none", b"").encode_fields()))
    events = drain(conn)
    assert events == [AuthReceived("none", b"")], events
    conn.accept_peer()


def open_conn(role: Role, node: str = "me", peer: str = "peer") -> PeerConnection:
    """A connection whose handshake with a fake peer is complete (state OPEN)."""
    from p2pcast.protocol import encode_frame

    c = conn(role, node)
    c.hello()
    c.receive_data(encode_frame(peer_hello(peer).encode_fields()))
    assert drain(c) == [HelloReceived(peer, PROTOCOL_VERSION, PEER_NONCE)]
    authenticate(c)
    assert c.state is State.OPEN
    return c


def wire_bytes(out: Outgoing) -> bytes:
    """What the transport would put on the wire for a command's return value."""
    if isinstance(out, bytes):
        return out
    parts = []
    for part in out:
        if isinstance(part, FileSlice):
            data = os.pread(part.fd, part.length, part.offset)
            assert len(data) == part.length, "test file too short for the FileSlice"
            parts.append(data)
        else:
            parts.append(part)
    return b"".join(parts)


def drain(conn: PeerConnection) -> list[Event]:
    """Every event available now (fallback body path)."""
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def drain_zero_copy(conn: PeerConnection) -> list[Event]:
    """Every event available now, reading bodies the zero-copy way.

    Body bytes already buffered are taken with readinto_body(); bytes not yet
    received stay due (the caller feeds them with feed_body()). The body
    arrives as one ChunkBodyData so results compare with drain()'s.
    """
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ChunkHeaderReceived):
            buf = bytearray(event.length)
            got = conn.readinto_body(memoryview(buf))
            if got:
                events.append(ChunkBodyData(bytes(buf[:got])))
    return events


def feed_body(conn: PeerConnection, data: bytes, splits: Iterable[int] = ()) -> None:
    """Pretend the transport read ``data`` from the socket straight into its buffer."""
    buf = memoryview(bytearray(len(data)))
    start = 0
    for end in [*sorted(splits), len(data)]:
        buf[start:end] = data[start:end]
        conn.body_received(end - start)
        start = end


def coalesce(events: Iterable[Event]) -> list[Event]:
    """Merge adjacent ChunkBodyData events, so differently split reads compare equal."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, ChunkBodyData) and out and isinstance(out[-1], ChunkBodyData):
            out[-1] = ChunkBodyData(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def body_of(events: Iterable[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ChunkBodyData))


def chunk_events(index: int, body: bytes, image_id: bytes = IMG) -> list[Event]:
    """The events (body coalesced) that one whole chunk produces at the downstream."""
    return [
        ChunkHeaderReceived(image_id, index, len(body)),
        ChunkBodyData(body),
        ChunkBodyEnded(image_id, index),
    ]


class ConnectionPair:
    """A downstream and an upstream connection joined by an in-memory pipe."""

    def __init__(self, *, handshake: bool = True) -> None:
        self.down = PeerConnection(Role.DOWNSTREAM, "down-node", nonce=nonce(10))
        self.up = PeerConnection(Role.UPSTREAM, "up-node", nonce=nonce(11))
        if handshake:
            self.handshake()

    def handshake(self) -> None:
        """Hello both ways, then Auth both ways (method "none"), then accept."""
        self.send(self.down, self.down.hello())
        self.send(self.up, self.up.hello())
        self.send(self.down, self.down.auth("none", b""))
        self.send(self.up, self.up.auth("none", b""))
        self.down.accept_peer()
        self.up.accept_peer()
        assert self.down.state is State.OPEN and self.up.state is State.OPEN

    def peer_of(self, conn: PeerConnection) -> PeerConnection:
        return self.up if conn is self.down else self.down

    def send(
        self,
        sender: PeerConnection,
        out: Outgoing,
        *,
        expect: list[Event] | None = None,
        step: int | None = None,
    ) -> list[Event]:
        """Deliver ``out`` to the sender's peer (all at once, or ``step`` bytes at a
        time) and return its events, body data coalesced."""
        receiver = self.peer_of(sender)
        data = wire_bytes(out)
        events: list[Event] = []
        pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
        for piece in pieces:
            receiver.receive_data(piece)
            events += drain(receiver)
        events = coalesce(events)
        if expect is not None:
            assert events == expect
        return events
