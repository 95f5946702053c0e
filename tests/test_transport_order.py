"""What a link sends first: small frames before queued chunk bodies, Goodbye last.

A Have (or a "busy" Reject) queued behind one or two chunk bodies reaches the
very downstream we serve a chunk time or two late. The link's writer sends
every queued small frame before the next chunk, never inside one, and a
Goodbye from ``close()`` only after the chunks already queued.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from pathlib import Path

import pytest

from p2pcast.auth import NoAuth
from p2pcast.protocol import (
    Auth,
    AuthReceived,
    FileSlice,
    HelloReceived,
    PeerConnection,
    Role,
    encode_frame,
)
from p2pcast.protocol.frames import FrameDecoder
from p2pcast.protocol.messages import MESSAGE_TYPES
from p2pcast.transport import PeerLink, tune_socket
from tests.helpers_node import run_on
from tests.test_protocol_support import drain, nonce

IMAGE = bytes(range(16))
BODY = 256 * 1024


class Handler:
    def link_event(self, *args: object) -> None:
        pass

    def link_closed(self, *args: object) -> None:
        pass

    def chunk_length(self, *args: object) -> int | None:
        return None


def _frames(data: bytes) -> list[str]:
    """Message names in wire order; chunk bodies skipped."""
    decoder = FrameDecoder()
    decoder.feed(data)
    names = []
    while (header := decoder.next_header()) is not None:
        message = MESSAGE_TYPES[int(header[0])]  # type: ignore[call-overload]
        names.append(f"{message.__name__}{header[2] if message.__name__ == 'Chunk' else ''}")
        if message.__name__ == "Chunk":
            length = header[3]
            assert isinstance(length, int)
            assert len(decoder.read(length)) == length
    return names


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_small_frames_overtake_queued_chunks_and_goodbye_comes_last(
    tmp_path: Path, loop: str
) -> None:
    path = tmp_path / "image"
    path.write_bytes(os.urandom(2 * BODY))

    async def main() -> list[str]:
        fd = os.open(path, os.O_RDONLY)
        ours, theirs = socket.socketpair()
        tune_socket(ours)
        theirs.setblocking(False)
        link = PeerLink(ours, Role.UPSTREAM, "n1", Handler(), auth=NoAuth())
        try:
            link.start()  # queues our Hello; the tasks run at the first await
            # The downstream's side: Hello, Auth, then Subscribe and two Requests
            # (method "none": this test is about the order of what we send).
            peer = PeerConnection(Role.DOWNSTREAM, "n2", nonce=nonce(3))
            asked = peer.hello()
            stand_in = PeerConnection(Role.UPSTREAM, "n1", nonce=nonce(4))
            peer.receive_data(stand_in.hello() + encode_frame(Auth("none", b"").encode_fields()))
            drain(peer)
            asked += peer.auth("none", b"")
            peer.accept_peer()
            asked += peer.subscribe(IMAGE) + peer.request(IMAGE, 0) + peer.request(IMAGE, 1)
            link.conn.receive_data(asked)
            assert isinstance(link.conn.next_event(), HelloReceived)
            link.send(link.conn.auth("none", b""))
            assert isinstance(link.conn.next_event(), AuthReceived)
            link.conn.accept_peer()
            events = [link.conn.next_event() for _ in range(3)]
            assert len(events) == 3
            # Queued in this order before the writer runs: two chunks, then news.
            for index in (0, 1):
                link.send_chunk(IMAGE, index, functools.partial(FileSlice, fd, index * BODY, BODY))
            link.send(link.conn.bitfield(IMAGE, 8, bytes(1)))
            link.send(link.conn.have(IMAGE, 7))
            closing = asyncio.ensure_future(link.close())
            received = bytearray()
            while data := await asyncio.get_running_loop().sock_recv(theirs, 1 << 20):
                received += data
            await closing
        finally:
            link.abort(None)
            theirs.close()
            os.close(fd)
        return _frames(bytes(received))

    frames = run_on(loop, main())
    assert frames == ["Hello", "Auth", "Bitfield", "Have", "Chunk0", "Chunk1", "Goodbye"]
