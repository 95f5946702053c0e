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
    ChunkBodyData,
    ChunkBodyEnded,
    ChunkHeaderReceived,
    Event,
    FileSlice,
    PeerConnection,
    Role,
    State,
)

IMG = bytes(range(16))
IMG2 = bytes(range(16, 32))

Outgoing = bytes | Sequence[bytes | FileSlice]


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
        self.down = PeerConnection(Role.DOWNSTREAM, "down-node")
        self.up = PeerConnection(Role.UPSTREAM, "up-node")
        if handshake:
            self.send(self.down, self.down.hello())
            self.send(self.up, self.up.hello())
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
