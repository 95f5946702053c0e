"""PeerConnection: a whole conversation, both body paths, and every rule it enforces."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from p2pcast import limits
from p2pcast.errors import HandshakeError, LocalProtocolError, ProtocolError
from p2pcast.protocol import (
    NEED_DATA,
    Auth,
    AuthReceived,
    Bitfield,
    BitfieldReceived,
    Cancel,
    Chunk,
    ChunkBodyData,
    ChunkBodyEnded,
    ChunkHeaderReceived,
    ChunkRequested,
    Done,
    FileSlice,
    GoodbyeCode,
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
    State,
    Subscribe,
    Subscribed,
    encode_frame,
    pack_bits,
)
from tests.test_protocol_support import (
    IMG,
    IMG2,
    MY_NONCE,
    PEER_NONCE,
    ConnectionPair,
    body_of,
    chunk_events,
    coalesce,
    drain,
    drain_zero_copy,
    feed_body,
    nonce,
    open_conn,
    peer_hello,
)
from tests.test_protocol_support import conn as make_conn


def frame(msg: Message) -> bytes:
    """Raw frame bytes, bypassing a sender's checks (for playing a bad peer)."""
    return encode_frame(msg.encode_fields())


def pair_with_chunks(count: int = 10) -> ConnectionPair:
    """A pair with IMG subscribed and a bitfield of ``count`` chunks delivered."""
    pair = ConnectionPair()
    pair.send(pair.down, pair.down.subscribe(IMG))
    pair.send(pair.up, pair.up.bitfield(IMG, count, pack_bits(count, range(count))))
    return pair


def test_full_conversation(tmp_path: Path) -> None:
    pair = ConnectionPair(handshake=False)
    down, up = pair.down, pair.up
    pair.send(down, down.hello(), expect=[HelloReceived("down-node", 2, nonce(10))])
    pair.send(up, up.hello(), expect=[HelloReceived("up-node", 2, nonce(11))])
    assert (down.peer_node, up.peer_node) == ("up-node", "down-node")
    pair.send(down, down.auth("secret", b"d"), expect=[AuthReceived("secret", b"d")])
    pair.send(up, up.auth("secret", b"u"), expect=[AuthReceived("secret", b"u")])
    down.accept_peer()
    up.accept_peer()
    pair.send(down, down.subscribe(IMG), expect=[Subscribed(IMG)])
    bits = pack_bits(10, {0, 1, 2})
    pair.send(up, up.bitfield(IMG, 10, bits), expect=[BitfieldReceived(IMG, 10, bits)])
    pair.send(up, up.have(IMG, 3), expect=[HaveReceived(IMG, 3)])

    pair.send(down, down.request(IMG, 3), expect=[ChunkRequested(IMG, 3)])
    body = bytes(range(256)) * 4
    out = up.send_chunk(IMG, 3, body)
    assert out[1] is body  # untouched, never copied
    pair.send(up, out, expect=chunk_events(3, body))

    image = tmp_path / "image.sqfs"
    image.write_bytes(bytes(reversed(range(256))) * 8)
    pair.send(down, down.request(IMG, 4), expect=[ChunkRequested(IMG, 4)])
    with image.open("rb") as f:
        piece = FileSlice(f.fileno(), 100, 500)
        out = up.send_chunk(IMG, 4, piece)
        assert out[1] is piece
        pair.send(up, out, expect=chunk_events(4, image.read_bytes()[100:600]))

    pair.send(down, down.request(IMG, 5), expect=[ChunkRequested(IMG, 5)])
    pair.send(up, up.reject(IMG, 5, "evicted"), expect=[RequestRejected(IMG, 5, "evicted")])
    pair.send(down, down.request(IMG, 6), expect=[ChunkRequested(IMG, 6)])
    pair.send(down, down.cancel(IMG, 6), expect=[RequestCancelled(IMG, 6)])
    # A Cancel does not end the request: it is answered all the same.
    assert up.pending_requests == down.pending_requests == 1
    reject = up.reject(IMG, 6, "cancelled")
    pair.send(up, reject, expect=[RequestRejected(IMG, 6, "cancelled")])
    assert up.pending_requests == down.pending_requests == 0
    pair.send(down, down.done(IMG), expect=[PeerDone(IMG)])
    pair.send(down, down.goodbye(0, "all done"), expect=[PeerClosed(0, "all done")])
    assert down.state is State.CLOSED and up.state is State.CLOSED

    assert down.bytes_sent == up.bytes_received and up.bytes_sent == down.bytes_received
    assert up.bytes_sent > len(body) + 500


def test_both_sides_can_say_goodbye_and_late_bytes_are_ignored() -> None:
    pair = ConnectionPair()
    bye_up = pair.up.goodbye(1, "shutting down")
    bye_down = pair.down.goodbye(0, "done")  # crossing on the wire
    assert pair.send(pair.up, bye_up) == []  # down already closed: ignored
    assert pair.send(pair.down, bye_down) == []
    with pytest.raises(LocalProtocolError, match="after goodbye"):
        pair.down.goodbye(0, "")


def test_goodbye_takes_a_goodbye_code() -> None:
    # GoodbyeCode is an IntEnum; the message's field check wants a plain int.
    # Before this was handled, every PeerLink.close() and every protocol-error
    # Goodbye failed that check and the link closed without a word.
    pair = ConnectionPair()
    bye = pair.up.goodbye(GoodbyeCode.SHUTTING_DOWN, "daemon stopping")
    assert pair.send(pair.up, bye) == [PeerClosed(1, "daemon stopping")]


def test_reply_goodbye_after_peer_goodbye() -> None:
    pair = ConnectionPair()
    pair.send(pair.up, pair.up.goodbye(0, "bye"), expect=[PeerClosed(0, "bye")])
    with pytest.raises(LocalProtocolError, match="closed"):
        pair.down.subscribe(IMG)
    assert pair.send(pair.down, pair.down.goodbye(0, "bye too")) == []


# ---- chunk bodies: zero-copy and fallback must give the same bytes ------------------

BODY = bytes(range(251)) * 40  # 10040 bytes, no repeating alignment


def chunk_wire(pair: ConnectionPair, index: int = 0) -> tuple[bytes, int]:
    """The wire bytes of a chunk answering a fresh request, and its header size."""
    pair.send(pair.down, pair.down.request(IMG, index))
    header, body = pair.up.send_chunk(IMG, index, BODY)
    assert isinstance(header, bytes) and body is BODY
    return header + BODY, len(header)


@pytest.mark.parametrize("in_first_read", [0, 1, 100, len(BODY) - 1, len(BODY), len(BODY) + 3, -1])
@pytest.mark.parametrize("splits", [(), (1,), (5, 6, 4000), tuple(range(0, len(BODY), 999))])
def test_zero_copy_body(in_first_read: int, splits: tuple[int, ...]) -> None:
    pair = pair_with_chunks()
    wire, header_len = chunk_wire(pair)
    stream = wire + frame(Have(IMG, 9))  # the next frame may come with the body's tail
    down = pair.down
    down.receive_data(stream[:2])  # a socket read can end inside the prefix
    assert down.next_event() is NEED_DATA
    # The next read: the header and some body bytes (-1: everything, next frame too).
    first_end = len(stream) if in_first_read < 0 else header_len + in_first_read
    down.receive_data(stream[2:first_end])
    events = drain_zero_copy(down)
    assert events[0] == ChunkHeaderReceived(IMG, 0, len(BODY))
    rest = BODY[len(body_of(events)) :]
    assert down.body_remaining == len(rest)
    if rest:
        # The transport reads the rest straight from the socket into its buffer.
        feed_body(down, rest, [s for s in splits if s < len(rest)])
        events += [ChunkBodyData(rest)]
    events += drain(down)
    if first_end < len(stream):
        down.receive_data(stream[max(first_end, len(wire)) :])
        events += drain(down)
    assert coalesce(events) == [*chunk_events(0, BODY), HaveReceived(IMG, 9)]
    assert down.state is State.OPEN
    assert down.bytes_received == pair.up.bytes_sent + len(stream) - len(wire)


@pytest.mark.parametrize("step", [1, 2, 7, 1000, 100_000])
def test_fallback_body_gives_same_bytes(step: int) -> None:
    pair = pair_with_chunks()
    wire, _ = chunk_wire(pair)
    events = []
    for i in range(0, len(wire), step):
        pair.down.receive_data(wire[i : i + step])
        events += drain(pair.down)
    assert all(len(e.data) <= step for e in events if isinstance(e, ChunkBodyData))
    assert coalesce(events) == chunk_events(0, BODY)


def test_body_data_never_exceeds_the_body() -> None:
    pair = pair_with_chunks()
    wire, _ = chunk_wire(pair)
    pair.down.receive_data(wire + frame(Have(IMG, 1)))
    assert coalesce(drain(pair.down)) == [*chunk_events(0, BODY), HaveReceived(IMG, 1)]


def test_body_path_misuse_is_local_error() -> None:
    pair = pair_with_chunks()
    with pytest.raises(LocalProtocolError, match="readinto_body"):
        pair.down.readinto_body(memoryview(bytearray(10)))
    with pytest.raises(LocalProtocolError, match="body_received"):
        pair.down.body_received(0)
    wire, header_len = chunk_wire(pair)
    pair.down.receive_data(wire[: header_len + 10])
    assert pair.down.next_event() == ChunkHeaderReceived(IMG, 0, len(BODY))
    with pytest.raises(LocalProtocolError, match="drained"):
        pair.down.body_received(5)  # 10 bytes still buffered: they come first
    assert pair.down.readinto_body(memoryview(bytearray(4))) == 4  # small buffers are fine
    assert pair.down.readinto_body(memoryview(bytearray(100))) == 6
    with pytest.raises(LocalProtocolError, match="due"):
        pair.down.body_received(len(BODY))
    with pytest.raises(LocalProtocolError, match="due"):
        pair.down.body_received(-1)
    pair.down.body_received(len(BODY) - 10)
    assert pair.down.next_event() == ChunkBodyEnded(IMG, 0)


# ---- the peer breaks a rule: ProtocolError ------------------------------------------

UPSTREAM_ONLY = [Subscribe(IMG), Request(IMG, 0), Cancel(IMG, 0), Done(IMG)]
DOWNSTREAM_ONLY = [Bitfield(IMG, 8, b"\0"), Have(IMG, 0), Chunk(IMG, 0, 4), Reject(IMG, 0, "")]


@pytest.mark.parametrize("msg", UPSTREAM_ONLY, ids=lambda m: type(m).__name__)
def test_downstream_rejects_upstream_bound_messages(msg: Message) -> None:
    pair = ConnectionPair()
    pair.down.receive_data(frame(msg))
    with pytest.raises(ProtocolError, match="downstream must not receive"):
        pair.down.next_event()


@pytest.mark.parametrize("msg", DOWNSTREAM_ONLY, ids=lambda m: type(m).__name__)
def test_upstream_rejects_downstream_bound_messages(msg: Message) -> None:
    pair = ConnectionPair()
    pair.up.receive_data(frame(msg))
    with pytest.raises(ProtocolError, match="upstream must not receive"):
        pair.up.next_event()


def expect_protocol_error(conn: PeerConnection, data: bytes, match: str) -> None:
    conn.receive_data(data)
    with pytest.raises(ProtocolError, match=match):
        drain(conn)
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("msg", [Chunk(IMG, 2, 10), Reject(IMG, 2, "no")])
def test_unsolicited_answers(msg: Message) -> None:
    pair = pair_with_chunks()
    pair.send(pair.down, pair.down.request(IMG, 1))
    expect_protocol_error(pair.down, frame(msg), "unsolicited")


def test_answer_twice_is_unsolicited() -> None:
    pair = pair_with_chunks()
    pair.send(pair.down, pair.down.request(IMG, 1))
    pair.send(pair.up, pair.up.reject(IMG, 1, "no"))
    expect_protocol_error(pair.down, frame(Reject(IMG, 1, "no")), "unsolicited")


def test_chunk_crossing_cancel_is_legal() -> None:
    pair = pair_with_chunks()
    pair.send(pair.down, pair.down.request(IMG, 1))
    answer = pair.up.send_chunk(IMG, 1, b"abc")
    cancel = pair.down.cancel(IMG, 1)  # both in flight at once
    assert pair.send(pair.down, cancel) == []  # upstream answered already: ignored
    assert not pair.up.is_pending(IMG, 1)
    assert pair.down.is_pending(IMG, 1)  # cancelled, but the answer has not come yet
    assert pair.send(pair.up, answer) == chunk_events(1, b"abc")
    assert pair.down.pending_requests == pair.up.pending_requests == 0
    expect_protocol_error(pair.down, frame(Chunk(IMG, 1, 3)), "unsolicited")


def test_crossing_cancel_then_request_again() -> None:
    # The conversation that once killed links: the upstream answered request
    # 1, the downstream cancelled it meanwhile and asked again. Now the second
    # Request waits for the answer, and the upstream never sees a duplicate.
    pair = pair_with_chunks()
    pair.send(pair.down, pair.down.request(IMG, 0))
    answer = pair.up.send_chunk(IMG, 0, b"first")
    pair.send(pair.down, pair.down.cancel(IMG, 0), expect=[])  # crossed the answer
    with pytest.raises(LocalProtocolError, match="duplicate Request"):
        pair.down.request(IMG, 0)
    pair.send(pair.up, answer, expect=chunk_events(0, b"first"))
    pair.send(pair.down, pair.down.request(IMG, 0), expect=[ChunkRequested(IMG, 0)])
    pair.send(pair.up, pair.up.send_chunk(IMG, 0, b"again"), expect=chunk_events(0, b"again"))
    pair.send(pair.down, pair.down.request(IMG, 0), expect=[ChunkRequested(IMG, 0)])
    assert pair.up.pending_requests == pair.down.pending_requests == 1


@pytest.mark.parametrize("cancel", [False, True])
def test_request_again_while_pending_is_local_error(cancel: bool) -> None:
    pair = pair_with_chunks()
    pair.send(pair.down, pair.down.request(IMG, 1))
    if cancel:
        pair.send(pair.down, pair.down.cancel(IMG, 1), expect=[RequestCancelled(IMG, 1)])
    with pytest.raises(LocalProtocolError, match="duplicate Request"):
        pair.down.request(IMG, 1)
    assert pair.down.pending_requests == pair.up.pending_requests == 1
    # Once answered, the chunk may be asked for again.
    pair.send(pair.up, pair.up.reject(IMG, 1, "cancelled" if cancel else "busy"))
    pair.send(pair.down, pair.down.request(IMG, 1), expect=[ChunkRequested(IMG, 1)])


@pytest.mark.parametrize("answer", ["reject", "chunk"])
def test_cancelled_request_must_still_be_answered(answer: str) -> None:
    pair = pair_with_chunks()
    pair.send(pair.down, pair.down.request(IMG, 1))
    pair.send(pair.down, pair.down.cancel(IMG, 1), expect=[RequestCancelled(IMG, 1)])
    assert pair.up.is_pending(IMG, 1) and pair.down.is_pending(IMG, 1)
    assert pair.up.pending_requests == pair.down.pending_requests == 1
    if answer == "reject":
        out = pair.up.reject(IMG, 1, "cancelled")
        pair.send(pair.up, out, expect=[RequestRejected(IMG, 1, "cancelled")])
    else:  # it was being sent already: the chunk is the answer, and welcome
        pair.send(pair.up, pair.up.send_chunk(IMG, 1, b"late"), expect=chunk_events(1, b"late"))
    assert pair.up.pending_requests == pair.down.pending_requests == 0
    # Exactly one answer: a second one is the upstream's mistake, or a broken peer.
    with pytest.raises(LocalProtocolError, match="unsolicited Reject"):
        pair.up.reject(IMG, 1, "cancelled")
    with pytest.raises(LocalProtocolError, match="unsolicited Chunk"):
        pair.up.send_chunk(IMG, 1, b"late")
    expect_protocol_error(pair.down, frame(Reject(IMG, 1, "cancelled")), "unsolicited")


def test_cancel_twice_is_an_error() -> None:
    pair = pair_with_chunks()
    pair.send(pair.down, pair.down.request(IMG, 1))
    assert pair.down.may_cancel(IMG, 1)
    pair.send(pair.down, pair.down.cancel(IMG, 1), expect=[RequestCancelled(IMG, 1)])
    assert not pair.down.may_cancel(IMG, 1) and pair.down.is_pending(IMG, 1)
    with pytest.raises(LocalProtocolError, match="second Cancel"):
        pair.down.cancel(IMG, 1)
    # The next request of the chunk may be cancelled once again.
    pair.send(pair.up, pair.up.reject(IMG, 1, "cancelled"))
    assert not pair.down.may_cancel(IMG, 1)  # nothing pending
    pair.send(pair.down, pair.down.request(IMG, 1))
    assert pair.down.may_cancel(IMG, 1)
    pair.send(pair.down, pair.down.cancel(IMG, 1), expect=[RequestCancelled(IMG, 1)])
    # A peer that cancels one request twice breaks the protocol: both Cancels
    # came before our answer, so they were for the same request.
    expect_protocol_error(pair.up, frame(Cancel(IMG, 1)), "second Cancel")


def test_upstream_ignores_cancel_of_answered_request() -> None:
    pair = pair_with_chunks()
    pair.send(pair.down, pair.down.request(IMG, 1))
    pair.send(pair.down, pair.down.request(IMG, 2))
    reject = pair.up.reject(IMG, 1, "busy")
    # Crossing the Reject: reported for the pending request only.
    cancels = pair.down.cancel(IMG, 1) + pair.down.cancel(IMG, 2)
    assert pair.send(pair.down, cancels) == [RequestCancelled(IMG, 2)]
    assert pair.send(pair.up, reject) == [RequestRejected(IMG, 1, "busy")]
    assert pair.down.pending_requests == 1


def test_upstream_cannot_answer_what_was_not_requested() -> None:
    pair = pair_with_chunks()
    with pytest.raises(LocalProtocolError, match="unsolicited Chunk"):
        pair.up.send_chunk(IMG, 3, b"x")
    with pytest.raises(LocalProtocolError, match="unsolicited Reject"):
        pair.up.reject(IMG, 3, "no")
    assert pair.up.bytes_sent == pair.down.bytes_received  # nothing was framed


def test_subscription_bounds() -> None:
    pair = ConnectionPair()
    ids = [i.to_bytes(16, "big") for i in range(limits.MAX_SUBSCRIPTIONS_PER_LINK + 1)]
    for image_id in ids[:-1]:
        pair.send(pair.down, pair.down.subscribe(image_id))
    with pytest.raises(LocalProtocolError, match="subscriptions"):
        pair.down.subscribe(ids[-1])
    expect_protocol_error(pair.up, frame(Subscribe(ids[-1])), "subscriptions")


def test_duplicate_subscribe() -> None:
    pair = ConnectionPair()
    pair.send(pair.down, pair.down.subscribe(IMG))
    with pytest.raises(LocalProtocolError, match="twice"):
        pair.down.subscribe(IMG)
    expect_protocol_error(pair.up, frame(Subscribe(IMG)), "twice")


def test_request_bounds() -> None:
    pair = pair_with_chunks(count=1000)
    for index in range(limits.MAX_QUEUED_REQUESTS_PER_LINK):
        pair.send(pair.down, pair.down.request(IMG, index))
    assert pair.up.pending_requests == limits.MAX_QUEUED_REQUESTS_PER_LINK
    with pytest.raises(LocalProtocolError, match="requests pending"):
        pair.down.request(IMG, 999)
    expect_protocol_error(pair.up, frame(Request(IMG, 999)), "requests pending")


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (Request(IMG, 0), "duplicate"),
        (Request(IMG2, 0), "not subscribed"),
        (Request(IMG, 10), "beyond chunk count"),
        (Cancel(IMG2, 0), "not subscribed"),
        (Done(IMG2), "not subscribed"),
    ],
)
def test_upstream_request_rules(msg: Message, match: str) -> None:
    pair = pair_with_chunks()
    pair.send(pair.down, pair.down.request(IMG, 0))
    expect_protocol_error(pair.up, frame(msg), match)


def test_request_and_done_after_done() -> None:
    pair = pair_with_chunks()
    pair.send(pair.down, pair.down.done(IMG))
    with pytest.raises(LocalProtocolError, match="after Done"):
        pair.down.request(IMG, 0)
    with pytest.raises(LocalProtocolError, match="twice"):
        pair.down.done(IMG)
    expect_protocol_error(pair.up, frame(Request(IMG, 0)), "after Done")
    pair = pair_with_chunks()
    pair.send(pair.down, pair.down.done(IMG))
    expect_protocol_error(pair.up, frame(Done(IMG)), "twice")


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (Bitfield(IMG, 8, b"\0"), "second Bitfield"),
        (Bitfield(IMG2, 8, b"\0"), "not subscribed"),
        (Have(IMG, 10), "not covered"),
        (Have(IMG2, 0), "not subscribed"),
    ],
)
def test_downstream_bitfield_rules(msg: Message, match: str) -> None:
    pair = pair_with_chunks()
    expect_protocol_error(pair.down, frame(msg), match)


def test_have_before_bitfield() -> None:
    pair = ConnectionPair()
    pair.send(pair.down, pair.down.subscribe(IMG))
    with pytest.raises(LocalProtocolError, match="not covered"):
        pair.up.have(IMG, 0)
    expect_protocol_error(pair.down, frame(Have(IMG, 0)), "not covered")


@pytest.mark.parametrize(
    ("hello", "match"),
    [
        (Hello(version=1, node="n"), "version 1"),  # the last one without auth
        (Hello(version=3, node="n", nonce=PEER_NONCE), "version 3"),
        (Hello(version=0, node="n"), "version 0"),
        (Hello(proto="bittorrent", version=2, node="n", nonce=PEER_NONCE), "bittorrent"),
        (Hello(version=2, node="n"), "nonce of 0 bytes"),
        (Hello(version=2, node="n", nonce=b"x" * 31), "nonce of 31 bytes"),
    ],
)
@pytest.mark.parametrize("role", list(Role))
def test_handshake_mismatch(hello: Hello, match: str, role: Role) -> None:
    conn = make_conn(role)
    conn.hello()
    conn.receive_data(frame(hello))
    with pytest.raises(HandshakeError, match=match):
        conn.next_event()
    # We may still tell the peer why, once.
    assert conn.goodbye(3, "version mismatch").startswith(b"\0\0\0")
    with pytest.raises(ProtocolError, match="already failed"):
        conn.next_event()


def test_hello_twice_and_hello_first() -> None:
    pair = ConnectionPair()
    expect_protocol_error(pair.up, frame(peer_hello("x")), "twice")
    conn = make_conn(Role.UPSTREAM)
    expect_protocol_error(conn, frame(Subscribe(IMG)), "Hello first")
    conn = make_conn(Role.UPSTREAM)
    conn.receive_data(frame(peer_hello()))
    drain(conn)
    expect_protocol_error(conn, frame(Subscribe(IMG)), "Auth after Hello")


def test_unknown_type() -> None:
    pair = ConnectionPair()
    expect_protocol_error(pair.up, encode_frame([12, b"x"]), "unknown message type 12")
    pair = ConnectionPair()
    expect_protocol_error(pair.up, encode_frame([0]), "unknown message type 0")


def test_header_too_big_fails_on_the_prefix() -> None:
    pair = ConnectionPair()
    pair.up.receive_data(struct.pack(">I", limits.MAX_HEADER_BYTES + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        pair.up.next_event()


def test_zero_length_header() -> None:
    expect_protocol_error(ConnectionPair().up, b"\0\0\0\0", "length is 0")


# ---- EOF ------------------------------------------------------------------------------


def test_eof_between_frames_delivers_pending_frames_first() -> None:
    pair = ConnectionPair()
    pair.up.receive_data(pair.down.subscribe(IMG))
    pair.up.receive_data(b"")
    assert drain(pair.up) == [
        Subscribed(IMG),
        PeerClosed(None, "connection closed without Goodbye"),
    ]
    assert pair.up.state is State.CLOSED
    assert pair.up.next_event() is NEED_DATA


def test_eof_before_hello() -> None:
    conn = make_conn(Role.UPSTREAM)
    conn.receive_data(b"")
    assert conn.next_event() == PeerClosed(None, "connection closed without Goodbye")


@pytest.mark.parametrize("cut", [1, 3, 4, 10])
def test_eof_mid_frame(cut: int) -> None:
    pair = ConnectionPair()
    data = pair.down.subscribe(IMG)[:cut]
    pair.up.receive_data(data)
    pair.up.receive_data(b"")
    with pytest.raises(ProtocolError, match="mid-frame"):
        drain(pair.up)


@pytest.mark.parametrize("zero_copy", [False, True])
def test_eof_mid_body(zero_copy: bool) -> None:
    pair = pair_with_chunks()
    wire, header_len = chunk_wire(pair)
    pair.down.receive_data(wire[: header_len + 100])
    events = drain_zero_copy(pair.down) if zero_copy else drain(pair.down)
    assert body_of(events) == BODY[:100]
    if zero_copy:
        feed_body(pair.down, BODY[100:200])
    pair.down.receive_data(b"")
    with pytest.raises(ProtocolError, match="mid-frame"):
        pair.down.next_event()
    with pytest.raises(ProtocolError, match="already failed"):
        pair.down.receive_data(b"more")


def test_receive_after_eof_is_local_error() -> None:
    conn = make_conn(Role.UPSTREAM)
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        conn.receive_data(b"x")


# ---- our own mistakes: LocalProtocolError -------------------------------------------


def test_commands_need_the_handshake_first() -> None:
    conn = make_conn(Role.DOWNSTREAM)
    with pytest.raises(LocalProtocolError, match="hello"):
        conn.subscribe(IMG)
    with pytest.raises(LocalProtocolError, match="hello"):
        conn.goodbye(0, "")
    conn.hello()
    with pytest.raises(LocalProtocolError, match="twice"):
        conn.hello()
    # Nothing but our Auth before the peer is authenticated: an unknown
    # peer learns nothing and can make us do nothing.
    with pytest.raises(LocalProtocolError, match="before the peer's Hello"):
        conn.auth("none", b"")
    with pytest.raises(LocalProtocolError, match="before the handshake"):
        conn.subscribe(IMG)
    conn.receive_data(frame(peer_hello()))
    drain(conn)
    with pytest.raises(LocalProtocolError, match="before the handshake"):
        conn.subscribe(IMG)
    conn.auth("none", b"")
    with pytest.raises(LocalProtocolError, match="twice"):
        conn.auth("none", b"")
    with pytest.raises(LocalProtocolError, match="before the handshake"):
        conn.subscribe(IMG)
    with pytest.raises(LocalProtocolError, match="accept_peer"):
        conn.accept_peer()  # no Auth received yet
    conn.receive_data(frame(Auth("none", b"")))
    assert drain(conn) == [AuthReceived("none", b"")]
    with pytest.raises(LocalProtocolError, match="before the handshake"):
        conn.subscribe(IMG)
    conn.accept_peer()
    conn.subscribe(IMG)


@pytest.mark.parametrize(
    ("role", "command"),
    [
        (Role.UPSTREAM, lambda c: c.subscribe(IMG)),
        (Role.UPSTREAM, lambda c: c.request(IMG, 0)),
        (Role.UPSTREAM, lambda c: c.cancel(IMG, 0)),
        (Role.UPSTREAM, lambda c: c.done(IMG)),
        (Role.DOWNSTREAM, lambda c: c.bitfield(IMG, 8, b"\0")),
        (Role.DOWNSTREAM, lambda c: c.have(IMG, 0)),
        (Role.DOWNSTREAM, lambda c: c.send_chunk(IMG, 0, b"x")),
        (Role.DOWNSTREAM, lambda c: c.reject(IMG, 0, "")),
    ],
)
def test_commands_of_the_other_role(role: Role, command: object) -> None:
    conn = open_conn(role)
    assert callable(command)
    with pytest.raises(LocalProtocolError, match="cannot send"):
        command(conn)


def test_invalid_arguments_are_local_errors() -> None:
    pair = pair_with_chunks()
    with pytest.raises(LocalProtocolError, match=r"Subscribe\.image_id"):
        pair.down.subscribe(b"short")
    with pytest.raises(LocalProtocolError, match=r"Request\.index"):
        pair.down.request(IMG, True)
    with pytest.raises(LocalProtocolError, match=r"Goodbye\.reason"):
        pair.down.goodbye(0, "x" * 1000)
    pair.send(pair.down, pair.down.request(IMG, 0))
    with pytest.raises(LocalProtocolError, match=r"Chunk\.length"):
        pair.up.send_chunk(IMG, 0, b"")
    with pytest.raises(LocalProtocolError, match="FileSlice"):
        pair.up.send_chunk(IMG, 0, FileSlice(-1, 0, 10))
    with pytest.raises(LocalProtocolError, match="bytes or FileSlice"):
        pair.up.send_chunk(IMG, 0, bytearray(b"x"))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="not pending"):
        pair.down.cancel(IMG, 5)
    with pytest.raises(LocalProtocolError, match="second Bitfield"):
        pair.up.bitfield(IMG, 8, b"\0")
    with pytest.raises(LocalProtocolError, match="node"):
        PeerConnection(Role.UPSTREAM, "", nonce=MY_NONCE)
    with pytest.raises(LocalProtocolError, match="nonce"):
        PeerConnection(Role.UPSTREAM, "me", nonce=b"short")
    assert pair.up.is_pending(IMG, 0)  # failed commands changed nothing


def test_failed_connection_refuses_everything_but_goodbye() -> None:
    pair = ConnectionPair()
    expect_protocol_error(pair.up, b"\0\0\0\0", "length is 0")
    for call in (lambda: pair.up.receive_data(b"x"), pair.up.next_event):
        with pytest.raises(ProtocolError, match="already failed"):
            call()
    with pytest.raises(LocalProtocolError, match="closed"):
        pair.up.bitfield(IMG, 8, b"\0")
    pair.up.goodbye(2, "length is 0")
    with pytest.raises(LocalProtocolError):
        pair.up.goodbye(2, "again")
