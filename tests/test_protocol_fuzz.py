"""Property tests: hostile bytes only ever raise ProtocolError; legal traffic always works."""

from __future__ import annotations

import itertools
import os
from collections import deque

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from p2pcast import limits
from p2pcast.errors import LocalProtocolError, ProtocolError
from p2pcast.protocol import (
    NEED_DATA,
    BitfieldReceived,
    ChunkBodyData,
    ChunkBodyEnded,
    ChunkHeaderReceived,
    ChunkRequested,
    Event,
    HaveReceived,
    PeerConnection,
    PeerDone,
    RequestCancelled,
    RequestRejected,
    Role,
    Subscribed,
    encode_frame,
    pack_bits,
)
from tests.test_protocol_support import IMG, IMG2, ConnectionPair, drain, open_conn, peer_hello
from tests.test_protocol_support import conn as make_conn

FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])


def prepared(role: Role, stage: int) -> PeerConnection:
    """A connection before the peer's Hello (0), after it (1), or with traffic set up (2)."""
    if stage >= 2:
        conn = open_conn(role)  # authenticated: everything after Auth is parsed
    else:
        conn = make_conn(role)
        conn.hello()
    if stage == 1:
        conn.receive_data(encode_frame(peer_hello().encode_fields()))
        drain(conn)
    if stage >= 2 and role is Role.DOWNSTREAM:
        # Subscribed with requests out, so random Chunk/Have frames can be legal.
        conn.subscribe(IMG)
        for index in range(4):
            conn.request(IMG, index)
    return conn


def feed_hostile(conn: PeerConnection, pieces: list[bytes], zero_copy: bool) -> None:
    """Feed ``pieces`` then EOF; the only acceptable exception is ProtocolError."""
    try:
        for piece in [*pieces, b""]:
            conn.receive_data(piece)
            while (event := conn.next_event()) is not NEED_DATA:
                if zero_copy and isinstance(event, ChunkHeaderReceived):
                    conn.readinto_body(memoryview(bytearray(event.length)))
    except ProtocolError:
        # The failure sticks, and stays a ProtocolError.
        with pytest.raises(ProtocolError):
            conn.next_event()
        with pytest.raises(ProtocolError):
            conn.receive_data(b"x")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@FUZZ
@given(
    st.sampled_from(Role),
    st.integers(0, 2),
    st.binary(max_size=2000),
    st.lists(st.integers(0, 2000), max_size=8),
    st.booleans(),
)
def test_random_bytes_only_raise_protocol_error(
    role: Role, stage: int, data: bytes, cuts: list[int], zero_copy: bool
) -> None:
    feed_hostile(prepared(role, stage), [data] if data else [], zero_copy)
    feed_hostile(prepared(role, stage), split(data, cuts), zero_copy)


# Frames that parse as msgpack with plausible types and random fields reach much
# deeper than random bytes: message validation, role and tracking rules, bodies.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.integers(0, 12),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.just(IMG),
    st.just(IMG2),
)
headers = st.tuples(st.integers(0, 12), st.lists(scalars, max_size=5)).map(
    lambda t: encode_frame([t[0], *t[1]])
)
chunks_on_the_wire = st.tuples(st.integers(0, 5), st.binary(min_size=1, max_size=50)).map(
    lambda t: encode_frame([6, IMG, t[0], len(t[1])]) + t[1]
)


@FUZZ
@given(
    st.sampled_from(Role),
    st.integers(0, 2),
    st.lists(st.one_of(headers, chunks_on_the_wire, st.binary(max_size=8)), max_size=12),
    st.lists(st.integers(0, 2000), max_size=8),
    st.booleans(),
)
def test_random_frames_only_raise_protocol_error(
    role: Role, stage: int, frames: list[bytes], cuts: list[int], zero_copy: bool
) -> None:
    data = b"".join(frames)
    feed_hostile(prepared(role, stage), split(data, cuts), zero_copy)


# ---- legal traffic, with crossing messages and partial deliveries ----------------------

COUNTS = {IMG: 6, IMG2: 3}  # the manifests' chunk counts
Key = tuple[bytes, int]


class Conversation(RuleBasedStateMachine):
    """Random legal commands on both sides, bytes delivered in random pieces.

    Every command queues what the peer must see; each delivery checks the events
    in order. A RequestCancelled may be missing: that Cancel crossed the answer.
    Body bytes are read the zero-copy way or the fallback way, at random.

    The model of requests: each gets exactly one answer, a Cancel does not end
    it, and the downstream requests a chunk again only once the answer arrived.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pair = ConnectionPair()
        self.down, self.up = self.pair.down, self.pair.up
        self.outbox = {Role.DOWNSTREAM: bytearray(), Role.UPSTREAM: bytearray()}
        # What each side must receive next; bytes stand for chunk body bytes.
        self.expected: dict[Role, deque[Event | bytes]] = {r: deque() for r in Role}
        self.bitfield_sent: set[bytes] = set()
        self.done: set[bytes] = set()
        self.down_pending: set[Key] = set()  # requested, answer not received yet
        self.down_cancelled: set[Key] = set()  # of down_pending: Cancel sent
        self.up_pending: set[Key] = set()  # ChunkRequested seen, not answered yet

    @initialize()
    def start(self) -> None:
        # Most runs should get to chunks, so one swarm is set up from the start.
        self.subscribe(IMG)
        self.deliver(Role.DOWNSTREAM, 100, zero_copy=False)

    def send(self, sender: PeerConnection, data: bytes, *expect: Event | bytes) -> None:
        self.outbox[sender.role] += data
        self.expected[sender.peer_role].extend(expect)

    @rule(image_id=st.sampled_from([IMG, IMG2]))
    def subscribe(self, image_id: bytes) -> None:
        if image_id not in self.down.subscriptions:
            self.send(self.down, self.down.subscribe(image_id), Subscribed(image_id))

    @rule(image_id=st.sampled_from([IMG, IMG2]), data=st.data())
    def bitfield(self, image_id: bytes, data: st.DataObject) -> None:
        if image_id in self.up.subscriptions and image_id not in self.bitfield_sent:
            count = COUNTS[image_id]
            bits = pack_bits(count, data.draw(st.sets(st.integers(0, count - 1))))
            self.bitfield_sent.add(image_id)
            event = BitfieldReceived(image_id, count, bits)
            self.send(self.up, self.up.bitfield(image_id, count, bits), event)

    @rule(image_id=st.sampled_from([IMG, IMG2]), index=st.integers(0, 5))
    def have(self, image_id: bytes, index: int) -> None:
        if image_id in self.bitfield_sent and index < COUNTS[image_id]:
            event = HaveReceived(image_id, index)
            self.send(self.up, self.up.have(image_id, index), event)

    @rule(image_id=st.sampled_from([IMG, IMG2]), index=st.integers(0, 5))
    def request(self, image_id: bytes, index: int) -> None:
        key = (image_id, index)
        if (
            image_id in self.down.subscriptions
            and image_id not in self.done
            and index < COUNTS[image_id]
            and key not in self.down_pending
        ):
            self.down_pending.add(key)
            self.send(self.down, self.down.request(*key), ChunkRequested(*key))

    @precondition(lambda self: self.down_pending - self.down_cancelled)
    @rule(data=st.data(), roll=st.integers(0, 2))
    def cancel(self, data: st.DataObject, roll: int) -> None:
        if roll:
            return  # rarer than answers, or few requests would ever be answered
        key = data.draw(st.sampled_from(sorted(self.down_pending - self.down_cancelled)))
        assert self.down.may_cancel(*key)
        self.down_cancelled.add(key)
        self.send(self.down, self.down.cancel(*key), RequestCancelled(*key))
        assert not self.down.may_cancel(*key) and self.down.is_pending(*key)

    @precondition(lambda self: self.down_pending)
    @rule(data=st.data())
    def misuse_pending(self, data: st.DataObject) -> None:
        """Asking again for an unanswered chunk, or cancelling it twice, is our bug."""
        key = data.draw(st.sampled_from(sorted(self.down_pending)))
        with pytest.raises(LocalProtocolError):
            self.down.request(*key)
        if key in self.down_cancelled:
            with pytest.raises(LocalProtocolError, match="second Cancel"):
                self.down.cancel(*key)
        # The invariants check that the refused commands changed nothing.

    @precondition(lambda self: self.up_pending)
    @rule(data=st.data(), size=st.integers(1, 3000), roll=st.integers(0, 3))
    def answer(self, data: st.DataObject, size: int, roll: int) -> None:
        key = data.draw(st.sampled_from(sorted(self.up_pending)))
        self.up_pending.remove(key)
        # Sizes drawn as ints: hypothesis keeps drawn binaries tiny, bodies need bulk.
        body = bytes((i * 7 + size) & 0xFF for i in range(size))
        if roll == 0:
            # Cancelled or not, a request may be refused or served.
            reason = "cancelled" if size % 2 else "busy"
            self.send(self.up, self.up.reject(*key, reason), RequestRejected(*key, reason))
        else:
            header, sent = self.up.send_chunk(*key, body)
            assert isinstance(header, bytes) and sent is body
            expect = (ChunkHeaderReceived(*key, len(body)), body, ChunkBodyEnded(*key))
            self.send(self.up, header + body, *expect)

    @rule(image_id=st.sampled_from([IMG, IMG2]), roll=st.integers(0, 9))
    def finish(self, image_id: bytes, roll: int) -> None:
        # Rare on purpose: Done ends the requests for an image.
        if roll == 0 and image_id in self.down.subscriptions and image_id not in self.done:
            self.done.add(image_id)
            self.send(self.down, self.down.done(image_id), PeerDone(image_id))

    @rule(role=st.sampled_from(Role), size=st.integers(1, 64), zero_copy=st.booleans())
    def deliver(self, role: Role, size: int, zero_copy: bool) -> None:
        """Move up to ``size`` bytes from ``role``'s outbox to its peer."""
        receiver = self.up if role is Role.DOWNSTREAM else self.down
        outbox = self.outbox[role]
        while size and outbox:
            if zero_copy and receiver.body_remaining:
                # drain() left nothing buffered, so the transport reads the body
                # straight from the "socket" into its chunk buffer.
                n = min(size, receiver.body_remaining, len(outbox))
                self.check(receiver, bytes(outbox[:n]))
                receiver.body_received(n)
            else:
                n = min(size, len(outbox))
                receiver.receive_data(bytes(outbox[:n]))
            del outbox[:n]
            size -= n
            self.drain(receiver, zero_copy)

    def drain(self, conn: PeerConnection, zero_copy: bool) -> None:
        while (event := conn.next_event()) is not NEED_DATA:
            self.check(conn, event)
            if zero_copy and isinstance(event, ChunkHeaderReceived):
                buf = bytearray(event.length)
                got = conn.readinto_body(memoryview(buf))
                if got:
                    self.check(conn, bytes(buf[:got]))

    def check(self, conn: PeerConnection, got: Event | bytes) -> None:
        expected = self.expected[conn.role]
        if isinstance(got, ChunkBodyData):
            got = got.data
        if isinstance(got, bytes):
            head = expected[0]
            assert isinstance(head, bytes) and head.startswith(got)
            if len(got) < len(head):
                expected[0] = head[len(got) :]
            else:
                expected.popleft()
            return
        while isinstance(dropped := expected[0], RequestCancelled) and dropped != got:
            # Crossed our answer: the upstream drops it silently.
            expected.popleft()
            assert (dropped.image_id, dropped.index) not in self.up_pending
            event("a Cancel crossed the answer")
        assert expected.popleft() == got
        if isinstance(got, ChunkRequested):
            key = (got.image_id, got.index)
            assert key not in self.up_pending  # the bug: a second request for one chunk
            self.up_pending.add(key)
        elif isinstance(got, RequestCancelled):
            # Advisory: the request stays pending and will be answered.
            assert (got.image_id, got.index) in self.up_pending
        elif isinstance(got, ChunkHeaderReceived | RequestRejected):
            if (got.image_id, got.index) in self.down_cancelled:
                event(f"a cancelled request was answered ({type(got).__name__})")
            self.down_pending.remove((got.image_id, got.index))
            self.down_cancelled.discard((got.image_id, got.index))

    @invariant()
    def pending_counts_agree(self) -> None:
        assert self.up.pending_requests == len(self.up_pending)
        assert self.down.pending_requests == len(self.down_pending)
        assert self.down.pending_requests <= limits.MAX_QUEUED_REQUESTS_PER_LINK
        # What the upstream still owes, the downstream still waits for.
        assert self.up_pending <= self.down_pending
        for key in self.down_pending:
            assert self.down.is_pending(*key)
            assert self.down.may_cancel(*key) == (key not in self.down_cancelled)
        for key in self.up_pending:
            assert self.up.is_pending(*key)

    def teardown(self) -> None:
        # Small pieces, alternating body paths, so bodies straddle deliveries.
        zero_copy = False
        while any(self.outbox.values()):
            for role in Role:
                self.deliver(role, 37, zero_copy)
            zero_copy = not zero_copy
        for role in Role:
            assert all(isinstance(e, RequestCancelled) for e in self.expected[role])
        # With everything delivered, both ends agree on what is unanswered.
        assert self.up_pending == self.down_pending
        assert self.down.bytes_sent == self.up.bytes_received
        assert self.up.bytes_sent == self.down.bytes_received


#: P2PCAST_FUZZ_EXAMPLES raises the example count for a long hunt.
Conversation.TestCase.settings = settings(
    max_examples=int(os.environ.get("P2PCAST_FUZZ_EXAMPLES", "150")),
    stateful_step_count=60,
    deadline=None,
)
test_conversation = Conversation.TestCase
