"""Wire-protocol costs, per frame, with no I/O.

* encode/decode of single headers (Have, Request, Chunk) in batches of 1000,
  and of a Bitfield of 5000 chunks (a 20 GiB image at 4 MiB);
* the same through a pair of PeerConnections, which adds every per-link rule:
  a stream of Haves, and the request -> chunk header -> body round trip a
  downstream makes per chunk (the body is reported read, as the zero-copy path
  does, so no payload bytes are moved).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from bench.support import Benchmark, record_rate
from p2pcast import limits
from p2pcast.protocol import (
    MESSAGE_TYPES,
    NEED_DATA,
    Bitfield,
    ChunkBodyEnded,
    ChunkHeaderReceived,
    ChunkRequested,
    FileSlice,
    FrameDecoder,
    Have,
    Message,
    PeerConnection,
    Request,
    Role,
    encode_frame,
    pack_bits,
)
from p2pcast.protocol import Chunk as ChunkMsg
from p2pcast.protocol.auth import NONCE_SIZE

IMG = bytes(range(16))
BATCH = 1000
CHUNKS = 5000

SINGLE: dict[str, Callable[[int], Message]] = {
    "have": lambda i: Have(IMG, i),
    "request": lambda i: Request(IMG, i),
    "chunk": lambda i: ChunkMsg(IMG, i, limits.DEFAULT_CHUNK_SIZE),
}


def bitfield_5000() -> Bitfield:
    rng = random.Random(4)
    return Bitfield(IMG, CHUNKS, pack_bits(CHUNKS, rng.sample(range(CHUNKS), CHUNKS // 2)))


def encode_all(messages: list[Message]) -> bytes:
    return b"".join(encode_frame(msg.encode_fields()) for msg in messages)


def decode_all(stream: bytes) -> int:
    """Frame, decode and validate every message in ``stream``; return how many."""
    decoder = FrameDecoder()
    decoder.feed(stream)
    count = 0
    while (header := decoder.next_header()) is not None:
        mtype = header[0]
        assert isinstance(mtype, int)
        MESSAGE_TYPES[mtype].parse(header)
        count += 1
    return count


@pytest.fixture(params=sorted(SINGLE))
def batch(request: pytest.FixtureRequest) -> list[Message]:
    make = SINGLE[request.param]
    return [make(i % CHUNKS) for i in range(BATCH)]


def test_encode_header(benchmark: Benchmark, batch: list[Message]) -> None:
    benchmark(encode_all, batch)
    record_rate(benchmark, BATCH, "frames/s")


def test_decode_header(benchmark: Benchmark, batch: list[Message]) -> None:
    assert benchmark(decode_all, encode_all(batch)) == BATCH
    record_rate(benchmark, BATCH, "frames/s")


def test_encode_bitfield_5000(benchmark: Benchmark) -> None:
    msg = bitfield_5000()
    frame = benchmark(encode_all, [msg])
    benchmark.extra_info["bytes"] = len(frame)
    record_rate(benchmark, 1, "frames/s")


def test_decode_bitfield_5000(benchmark: Benchmark) -> None:
    assert benchmark(decode_all, encode_all([bitfield_5000()])) == 1
    record_rate(benchmark, 1, "frames/s")


def open_pair(chunk_count: int = CHUNKS) -> tuple[PeerConnection, PeerConnection]:
    """A downstream subscribed to IMG at an upstream that has sent its Bitfield."""
    down = PeerConnection(Role.DOWNSTREAM, "down", nonce=b"d" * NONCE_SIZE)
    up = PeerConnection(Role.UPSTREAM, "up", nonce=b"u" * NONCE_SIZE)
    down.receive_data(up.hello())
    up.receive_data(down.hello())
    drain(down)  # HelloReceived
    drain(up)
    down.receive_data(up.auth("none", b""))
    up.receive_data(down.auth("none", b""))
    drain(down)  # AuthReceived
    drain(up)
    down.accept_peer()
    up.accept_peer()
    up.receive_data(down.subscribe(IMG))
    drain(up)  # Subscribed
    down.receive_data(up.bitfield(IMG, chunk_count, bytes(-(-chunk_count // 8))))
    drain(down)  # BitfieldReceived
    return down, up


def drain(conn: PeerConnection) -> None:
    while conn.next_event() is not NEED_DATA:
        pass


def have_stream(down: PeerConnection, up: PeerConnection) -> int:
    down.receive_data(b"".join(up.have(IMG, i % CHUNKS) for i in range(BATCH)))
    count = 0
    while down.next_event() is not NEED_DATA:
        count += 1
    return count


def test_connection_have_stream(benchmark: Benchmark) -> None:
    down, up = open_pair()
    assert benchmark(have_stream, down, up) == BATCH
    record_rate(benchmark, BATCH, "frames/s")


#: Requests in flight per exchange: the per-link bound.
WINDOW = limits.MAX_QUEUED_REQUESTS_PER_LINK


def request_round_trips(down: PeerConnection, up: PeerConnection) -> int:
    """BATCH chunks, WINDOW at a time: requests up, chunk headers down, bodies
    reported read. Returns the chunks completed."""
    body = FileSlice(0, 0, limits.DEFAULT_CHUNK_SIZE)  # only its length is used
    done = 0
    for start in range(0, BATCH, WINDOW):
        indexes = range(start, min(start + WINDOW, BATCH))
        up.receive_data(b"".join(down.request(IMG, i) for i in indexes))
        answers = []
        while (event := up.next_event()) is not NEED_DATA:
            assert isinstance(event, ChunkRequested)
            header, _ = up.send_chunk(event.image_id, event.index, body)
            answers.append(header)
        for header in answers:
            assert isinstance(header, bytes)
            down.receive_data(header)
            event = down.next_event()
            assert isinstance(event, ChunkHeaderReceived)
            down.body_received(event.length)
            assert isinstance(down.next_event(), ChunkBodyEnded)
            done += 1
    return done


def test_connection_request_chunk_round_trip(benchmark: Benchmark) -> None:
    down, up = open_pair()
    assert benchmark(request_round_trips, down, up) == BATCH
    # Each chunk is two frames (Request up, Chunk header down).
    record_rate(benchmark, BATCH, "chunks/s")
    record_rate(benchmark, 2 * BATCH, "frames/s")
