"""Golden wire vectors: one exact frame per message type, fed whole and byte by byte.

A failure here means the wire format changed, which breaks mixed-version
clusters. If the change is deliberate (a new protocol version), regenerate with
``P2PCAST_REGEN_VECTORS=1 python -m pytest tests/test_protocol_vectors.py``
and review the diff of tests/vectors/protocol/.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from p2pcast.protocol import (
    MESSAGE_TYPES,
    Auth,
    AuthReceived,
    Bitfield,
    BitfieldReceived,
    Cancel,
    Chunk,
    ChunkRequested,
    Done,
    Event,
    FrameDecoder,
    Goodbye,
    Have,
    HaveReceived,
    Hello,
    HelloReceived,
    Message,
    PeerClosed,
    PeerConnection,
    PeerDone,
    Reject,
    Request,
    RequestCancelled,
    RequestRejected,
    Role,
    Subscribe,
    Subscribed,
    encode_frame,
    pack_bits,
)
from tests.test_protocol_support import (
    IMG,
    MY_NONCE,
    ConnectionPair,
    chunk_events,
    coalesce,
    drain,
)

VECTORS = Path(__file__).parent / "vectors" / "protocol"
REGEN = os.environ.get("P2PCAST_REGEN_VECTORS") == "1"
BODY = b"chunk!!\n"
BITS = pack_bits(10, {0, 2, 9})
HELLO_NONCE = bytes(range(32))
AUTH_PROOF = bytes(range(100, 132))


def fresh_upstream() -> PeerConnection:
    conn = PeerConnection(Role.UPSTREAM, "up-node", nonce=MY_NONCE)
    conn.hello()
    return conn


def greeted_upstream() -> PeerConnection:
    """An upstream that has the peer's Hello: the Auth is next."""
    pair = ConnectionPair(handshake=False)
    pair.send(pair.down, pair.down.hello())
    return pair.up


def upstream(*, request: bool = False) -> PeerConnection:
    pair = ConnectionPair()
    pair.send(pair.down, pair.down.subscribe(IMG))
    if request:
        pair.send(pair.down, pair.down.request(IMG, 7))
    return pair.up


def downstream(*, bitfield: bool = True, request: bool = False) -> PeerConnection:
    pair = ConnectionPair()
    pair.send(pair.down, pair.down.subscribe(IMG))
    if bitfield:
        pair.send(pair.up, pair.up.bitfield(IMG, 10, BITS))
    if request:
        pair.send(pair.down, pair.down.request(IMG, 7))
    return pair.down


# name -> (message, body, receiver factory, expected events)
CASES: dict[str, tuple[Message, bytes, Callable[[], PeerConnection], list[Event]]] = {
    "01_hello": (
        Hello(version=2, node="node-001", nonce=HELLO_NONCE),
        b"",
        fresh_upstream,
        [HelloReceived("node-001", 2, HELLO_NONCE)],
    ),
    "02_subscribe": (Subscribe(IMG), b"", lambda: ConnectionPair().up, [Subscribed(IMG)]),
    "03_bitfield": (
        Bitfield(IMG, 10, BITS),
        b"",
        lambda: downstream(bitfield=False),
        [BitfieldReceived(IMG, 10, BITS)],
    ),
    "04_have": (Have(IMG, 7), b"", downstream, [HaveReceived(IMG, 7)]),
    "05_request": (Request(IMG, 7), b"", upstream, [ChunkRequested(IMG, 7)]),
    "06_chunk": (
        Chunk(IMG, 7, len(BODY)),
        BODY,
        lambda: downstream(request=True),
        chunk_events(7, BODY),
    ),
    "07_reject": (
        Reject(IMG, 7, "not cached"),
        b"",
        lambda: downstream(request=True),
        [RequestRejected(IMG, 7, "not cached")],
    ),
    "08_cancel": (
        Cancel(IMG, 7),
        b"",
        lambda: upstream(request=True),
        [RequestCancelled(IMG, 7)],
    ),
    "09_done": (Done(IMG), b"", upstream, [PeerDone(IMG)]),
    "10_goodbye": (Goodbye(0, "bye"), b"", upstream, [PeerClosed(0, "bye")]),
    "11_auth": (
        Auth("secret", AUTH_PROOF),
        b"",
        greeted_upstream,
        [AuthReceived("secret", AUTH_PROOF)],
    ),
}


def test_one_vector_per_message_type() -> None:
    assert sorted(int(name[:2]) for name in CASES) == sorted(MESSAGE_TYPES)
    for name, (msg, _, _, _) in CASES.items():
        assert int(name[:2]) == msg.TYPE


@pytest.mark.parametrize("name", list(CASES))
def test_vector(name: str) -> None:
    msg, body, make_receiver, expected = CASES[name]
    wire = encode_frame(msg.encode_fields()) + body
    path = VECTORS / f"{name}.bin"
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(wire)
    assert path.read_bytes() == wire, f"wire format of {name} changed (see module docstring)"

    decoder = FrameDecoder()
    decoder.feed(path.read_bytes())
    header = decoder.next_header()
    assert header is not None and MESSAGE_TYPES[msg.TYPE].parse(header) == msg
    assert decoder.read(len(body) + 1) == body

    whole = make_receiver()
    whole.receive_data(path.read_bytes())
    byte_by_byte = make_receiver()
    events: list[Event] = []
    for byte in path.read_bytes():
        byte_by_byte.receive_data(bytes([byte]))
        events += drain(byte_by_byte)
    assert coalesce(drain(whole)) == coalesce(events) == expected
