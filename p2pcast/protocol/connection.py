"""One peer link as a sans-IO state machine (h11 style).

Bytes in with ``receive_data``, events out with ``next_event``; commands return
the bytes to send. The connection owns every protocol rule (handshake, who may
send what, per-link bounds, which answers were asked for) so the transport and
the swarm layer can trust each event they get.

The state of the receive side is in one table, ``TRANSITIONS``: a pair missing
from it is illegal. Send-side rules (role, hello first, nothing after our
goodbye) are checked per command and raise LocalProtocolError.

Requests: every Request gets exactly one answer, a Chunk or a Reject, and is
pending on both ends until then; the downstream may not request a chunk again
on the link while a request for it is pending. A Cancel (at most one per
request) is advisory and does not end the request: the upstream still answers
it, with the chunk if it is sending it already, else with a Reject. A Cancel
that crosses the answer on the wire finds nothing pending at the upstream and
is ignored. Both ends therefore always agree which request an answer belongs
to, which no counting of answers could guarantee while an upstream was free
to drop a cancelled request without a word.

Handshake: Hello (with a nonce) then Auth, both ways at once. The peer's Auth
comes out as AuthReceived; the caller checks the proof over
``peer_transcript()`` (p2pcast.protocol.auth; a munge check needs I/O, so it is
not done here) and calls ``accept_peer()``. Until then nothing else the peer
sent is parsed (it waits in the buffer), and we send nothing but our Auth or
a Goodbye: an unauthenticated peer can neither make us act nor learn anything.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, cast

from p2pcast import limits
from p2pcast.errors import (
    AuthenticationError,
    HandshakeError,
    LocalProtocolError,
    P2PCastError,
    ProtocolError,
)
from p2pcast.protocol import auth as auth_mod
from p2pcast.protocol import messages as m
from p2pcast.protocol.frames import FrameDecoder, encode_frame
from p2pcast.protocol.messages import NEED_DATA, Event, FileSlice, NeedData


class Role(enum.Enum):
    DOWNSTREAM = "downstream"  # connected; wants chunks
    UPSTREAM = "upstream"  # accepted; serves chunks


class State(enum.Enum):
    AWAIT_HELLO = "AWAIT_HELLO"  # nothing but the peer's Hello is acceptable
    AWAIT_AUTH = "AWAIT_AUTH"  # nothing but the peer's Auth (or Goodbye)
    VERIFYING = "VERIFYING"  # the peer's proof is being checked; later frames wait
    OPEN = "OPEN"
    BODY = "BODY"  # the bytes coming in are a chunk body, not frames
    CLOSED = "CLOSED"  # Goodbye either way, EOF, or a ProtocolError


class Input(enum.Enum):
    """What can move the receive-side state: a peer message, or something else.

    A message's member has the message class name as its value (``Input("Have")``).
    """

    HELLO = "Hello"
    AUTH = "Auth"
    SUBSCRIBE = "Subscribe"
    BITFIELD = "Bitfield"
    HAVE = "Have"
    REQUEST = "Request"
    CHUNK = "Chunk"
    REJECT = "Reject"
    CANCEL = "Cancel"
    DONE = "Done"
    GOODBYE = "Goodbye"
    BODY_DATA = "body bytes"
    BODY_END = "end of body"
    EOF = "EOF"
    SEND_GOODBYE = "our goodbye()"
    ACCEPT = "our accept_peer()"
    PROTOCOL_ERROR = "protocol error"


_S, _I = State, Input
_MESSAGE_INPUTS = (_I.SUBSCRIBE, _I.BITFIELD, _I.HAVE, _I.REQUEST, _I.REJECT, _I.CANCEL, _I.DONE)

#: The receive-side state machine; a pair that is missing is illegal.
TRANSITIONS: dict[tuple[State, Input], State] = {
    (_S.AWAIT_HELLO, _I.HELLO): _S.AWAIT_AUTH,
    (_S.AWAIT_HELLO, _I.EOF): _S.CLOSED,
    (_S.AWAIT_HELLO, _I.SEND_GOODBYE): _S.CLOSED,
    (_S.AWAIT_HELLO, _I.PROTOCOL_ERROR): _S.CLOSED,
    (_S.AWAIT_AUTH, _I.AUTH): _S.VERIFYING,
    # A peer that refuses our Hello or our proof says why before closing.
    (_S.AWAIT_AUTH, _I.GOODBYE): _S.CLOSED,
    (_S.AWAIT_AUTH, _I.EOF): _S.CLOSED,
    (_S.AWAIT_AUTH, _I.SEND_GOODBYE): _S.CLOSED,
    (_S.AWAIT_AUTH, _I.PROTOCOL_ERROR): _S.CLOSED,
    # Peer frames and EOF are not looked at while VERIFYING (they wait in the
    # buffer), so only our own decisions move it.
    (_S.VERIFYING, _I.ACCEPT): _S.OPEN,
    (_S.VERIFYING, _I.SEND_GOODBYE): _S.CLOSED,
    **{(_S.OPEN, kind): _S.OPEN for kind in _MESSAGE_INPUTS},
    (_S.OPEN, _I.CHUNK): _S.BODY,
    (_S.OPEN, _I.GOODBYE): _S.CLOSED,
    (_S.OPEN, _I.EOF): _S.CLOSED,
    (_S.OPEN, _I.SEND_GOODBYE): _S.CLOSED,
    (_S.OPEN, _I.PROTOCOL_ERROR): _S.CLOSED,
    (_S.BODY, _I.BODY_DATA): _S.BODY,
    (_S.BODY, _I.BODY_END): _S.OPEN,
    (_S.BODY, _I.SEND_GOODBYE): _S.CLOSED,
    (_S.BODY, _I.PROTOCOL_ERROR): _S.CLOSED,
    # Replying to the peer's Goodbye, or telling it why we fail it, is allowed
    # once (the _goodbye_sent flag), though nothing more will be received.
    (_S.CLOSED, _I.SEND_GOODBYE): _S.CLOSED,
}

#: Which peer messages each role may receive (the other role may send them).
RECEIVES: dict[Role, frozenset[Input]] = {
    Role.DOWNSTREAM: frozenset(
        {_I.HELLO, _I.AUTH, _I.BITFIELD, _I.HAVE, _I.CHUNK, _I.REJECT, _I.GOODBYE}
    ),
    Role.UPSTREAM: frozenset(
        {_I.HELLO, _I.AUTH, _I.SUBSCRIBE, _I.REQUEST, _I.CANCEL, _I.DONE, _I.GOODBYE}
    ),
}

_Key = tuple[bytes, int]  # (image_id, index) of one chunk request

#: Until the peer is authenticated we send only our Hello, our Auth or a Goodbye.
_HANDSHAKE_STATES = frozenset({State.AWAIT_HELLO, State.AWAIT_AUTH, State.VERIFYING})


class _Swarm:
    """What one link knows about one image it is subscribed to."""

    __slots__ = ("chunk_count", "done")

    def __init__(self) -> None:
        self.chunk_count: int | None = None  # set by the Bitfield
        self.done = False  # the downstream said Done


#: The event reporting each peer message; its fields are a subset of the message's.
_EVENT_OF: dict[type[m.Message], type[Event]] = {
    m.Hello: m.HelloReceived,
    m.Auth: m.AuthReceived,
    m.Subscribe: m.Subscribed,
    m.Bitfield: m.BitfieldReceived,
    m.Have: m.HaveReceived,
    m.Request: m.ChunkRequested,
    m.Chunk: m.ChunkHeaderReceived,
    m.Reject: m.RequestRejected,
    m.Cancel: m.RequestCancelled,
    m.Done: m.PeerDone,
    m.Goodbye: m.PeerClosed,
}


def _event_for(msg: m.Message) -> Event:
    event_cls = _EVENT_OF[type(msg)]
    names = (f.name for f in dataclasses.fields(cast(Any, event_cls)))
    return event_cls(**{name: getattr(msg, name) for name in names})


class PeerConnection:
    """The protocol state of one TCP link, seen from one end."""

    def __init__(
        self,
        role: Role,
        node: str,
        *,
        nonce: bytes,
        upstream: str = "",
        version: int = m.PROTOCOL_VERSION,
    ) -> None:
        """``nonce``: NONCE_SIZE fresh random bytes (randomness is the caller's);
        ``upstream``: the upstream end's address as both ends see it ("ip:port",
        "" for a socketpair), bound into both proofs."""
        self.role = role
        self.peer_role = Role.UPSTREAM if role is Role.DOWNSTREAM else Role.DOWNSTREAM
        if type(nonce) is not bytes or len(nonce) != auth_mod.NONCE_SIZE:
            raise LocalProtocolError(f"a nonce is {auth_mod.NONCE_SIZE} random bytes")
        self._hello = m.Hello(version=version, node=node, nonce=nonce)
        if (why := self._hello.problem()) is not None:
            raise LocalProtocolError(why)
        self.node = node
        self.version = version
        self.nonce = nonce
        self.upstream = upstream
        self.peer_node: str | None = None
        self.peer_nonce: bytes | None = None
        self._auth_sent = False
        self.bytes_received = 0
        self.bytes_sent = 0  # headers and bodies
        self._state = State.AWAIT_HELLO
        self._failure: ProtocolError | None = None
        self._decoder = FrameDecoder()
        self._eof = False
        self._hello_sent = False
        self._goodbye_sent = False
        self._swarms: dict[bytes, _Swarm] = {}
        # Every Request gets exactly one answer (a Chunk or a Reject), and a
        # Cancel does not end it. So both ends agree which request an answer
        # belongs to: at most one per key is ever pending on a link.
        # Upstream: requests received and not answered yet.
        # Downstream: requests sent and not answered yet.
        self._pending: set[_Key] = set()
        # The pending requests a Cancel was sent (downstream) or received
        # (upstream) for: one Cancel per request, so the upstream reports each
        # at most once. A subset of _pending; answering clears the key.
        self._cancelled: set[_Key] = set()
        self._body_key: _Key = (b"", 0)
        self._body_remaining = 0

    @property
    def state(self) -> State:
        return self._state

    @property
    def body_remaining(self) -> int:
        """Bytes of the current chunk body still to come (0 outside BODY)."""
        return self._body_remaining if self._state is State.BODY else 0

    @property
    def subscriptions(self) -> frozenset[bytes]:
        return frozenset(self._swarms)

    @property
    def pending_requests(self) -> int:
        """Requests not answered yet, cancelled or not (sent; received if upstream)."""
        return len(self._pending)

    def is_pending(self, image_id: bytes, index: int) -> bool:
        """A request for this chunk is unanswered: a downstream may not request it again yet."""
        return (image_id, index) in self._pending

    def may_cancel(self, image_id: bytes, index: int) -> bool:
        """Downstream: cancel() of this chunk is legal (pending, and not cancelled yet)."""
        key = (image_id, index)
        return self.role is Role.DOWNSTREAM and key in self._pending and key not in self._cancelled

    # ---- receiving ----------------------------------------------------------

    def receive_data(self, data: bytes | memoryview) -> None:
        """Feed bytes from the socket; ``b""`` means the peer closed its end."""
        if self._state is State.CLOSED:
            self._raise_if_failed()
            return  # after a clean close, late bytes are irrelevant
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
            return
        self.bytes_received += data.nbytes if isinstance(data, memoryview) else len(data)
        self._decoder.feed(data)

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA; peer misbehaviour raises ProtocolError."""
        if self._state is State.CLOSED:
            self._raise_if_failed()
            return NEED_DATA
        try:
            return self._next_event()
        except ProtocolError as exc:
            self._failure = exc
            self._state = TRANSITIONS[self._state, _I.PROTOCOL_ERROR]
            raise

    def _next_event(self) -> Event | NeedData:
        while True:
            if self._state is State.VERIFYING:
                return NEED_DATA  # whatever follows the Auth waits for accept_peer()
            if self._state is State.BODY:
                return self._next_body_event()
            header = self._decoder.next_header()
            if header is None:
                if not self._eof:
                    return NEED_DATA
                if self._decoder.buffered:
                    raise ProtocolError("connection closed mid-frame")
                self._state = self._transition(_I.EOF)
                return m.PeerClosed(None, "connection closed without Goodbye")
            mtype = header[0]  # the decoder checked it is an int
            cls = m.MESSAGE_TYPES.get(mtype) if isinstance(mtype, int) else None
            if cls is None:
                raise ProtocolError(f"unknown message type {mtype!r}")
            msg = cls.parse(header)
            kind = Input(cls.__name__)  # Input values are the message class names
            if kind not in RECEIVES[self.role]:
                raise ProtocolError(f"a {self.role.value} must not receive {cls.__name__}")
            new_state = self._transition(kind)
            if isinstance(msg, m.Hello):
                self._check_hello(msg)
            report = self._track(msg, ProtocolError)
            self._state = new_state
            if report:
                return _event_for(msg)
            # else: a frame with nothing to report; look at the next one

    def _next_body_event(self) -> Event | NeedData:
        if self._body_remaining == 0:
            self._state = self._transition(_I.BODY_END)
            return m.ChunkBodyEnded(*self._body_key)
        if self._decoder.buffered:
            data = self._decoder.read(self._body_remaining)
            self._body_remaining -= len(data)
            return m.ChunkBodyData(data)
        if self._eof:
            self._transition(_I.EOF)  # (BODY, EOF) is not in the table: raises
        return NEED_DATA

    def readinto_body(self, buf: memoryview) -> int:
        """Zero-copy path: copy body bytes already buffered into ``buf``; return how many.

        The transport then reads the rest of the body from the socket straight
        into ``buf`` after them and reports it with body_received().
        """
        if self._state is not State.BODY:
            raise LocalProtocolError(f"readinto_body() in state {self._state.name}")
        n = self._decoder.read_into(buf, self._body_remaining)
        self._body_remaining -= n
        return n

    def body_received(self, n: int) -> None:
        """Zero-copy path: the transport read ``n`` body bytes from the socket itself."""
        if self._state is not State.BODY:
            raise LocalProtocolError(f"body_received() in state {self._state.name}")
        if type(n) is not int or not 0 <= n <= self._body_remaining:
            raise LocalProtocolError(f"body_received({n!r}) with {self._body_remaining} due")
        if n and self._decoder.buffered:
            # Bytes read from the socket would overtake the buffered ones.
            raise LocalProtocolError("body_received() before readinto_body() drained the buffer")
        self.bytes_received += n
        self._body_remaining -= n

    def _transition(self, kind: Input) -> State:
        new_state = TRANSITIONS.get((self._state, kind))
        if new_state is not None:
            return new_state
        if kind is _I.HELLO:
            raise ProtocolError("Hello received twice")
        if self._state is State.AWAIT_HELLO:
            raise ProtocolError(f"expected Hello first, got {kind.value}")
        if self._state is State.AWAIT_AUTH:
            raise ProtocolError(f"expected Auth after Hello, got {kind.value}")
        if kind is _I.EOF:
            raise ProtocolError(
                f"connection closed mid-frame ({self.body_remaining} body bytes due)"
            )
        raise ProtocolError(f"{kind.value} is illegal in state {self._state.name}")

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise ProtocolError(f"connection already failed: {self._failure}")

    def _check_hello(self, msg: m.Hello) -> None:
        if msg.proto != m.PROTOCOL_NAME:
            raise HandshakeError(f"peer speaks {msg.proto!r}, not {m.PROTOCOL_NAME!r}")
        if msg.version != self.version:
            raise HandshakeError(f"peer speaks version {msg.version}, we speak {self.version}")
        if len(msg.nonce) != auth_mod.NONCE_SIZE:
            raise HandshakeError(
                f"Hello.nonce of {len(msg.nonce)} bytes, not {auth_mod.NONCE_SIZE}"
            )
        if msg.nonce == self.nonce:
            raise AuthenticationError("the peer sent our own nonce back: a reflected Hello")
        self.peer_node = msg.node
        self.peer_nonce = msg.nonce

    # ---- authentication -------------------------------------------------------

    def _transcript(self, prover: Role) -> bytes:
        if self.peer_node is None or self.peer_nonce is None:
            raise LocalProtocolError("no transcript before the peer's Hello")
        ours = prover is self.role
        return auth_mod.transcript(
            version=self.version,
            prover_role=prover.value,
            prover_node=self.node if ours else self.peer_node,
            prover_nonce=self.nonce if ours else self.peer_nonce,
            verifier_node=self.peer_node if ours else self.node,
            verifier_nonce=self.peer_nonce if ours else self.nonce,
            upstream=self.upstream,
        )

    def our_transcript(self) -> bytes:
        """What our Auth proves (available once the peer's Hello is in)."""
        return self._transcript(self.role)

    def peer_transcript(self) -> bytes:
        """What the peer's Auth must prove."""
        return self._transcript(self.peer_role)

    def auth(self, method: str, proof: bytes) -> bytes:
        """Our Auth: once, after the peer's Hello, before anything but a Goodbye."""
        if not self._hello_sent or self._goodbye_sent:
            raise LocalProtocolError("auth() needs our hello() first, and no goodbye()")
        if self._auth_sent:
            raise LocalProtocolError("auth() called twice")
        if self.peer_nonce is None or self._state is State.CLOSED:
            raise LocalProtocolError(f"auth() before the peer's Hello (state {self._state.name})")
        msg = m.Auth(method, proof)
        if (why := msg.problem()) is not None:
            raise LocalProtocolError(why)
        self._auth_sent = True
        data = encode_frame(msg.encode_fields())
        self.bytes_sent += len(data)
        return data

    def accept_peer(self) -> None:
        """The peer's proof checked out: parse what it sent after it, and talk."""
        if self._state is not State.VERIFYING:
            raise LocalProtocolError(f"accept_peer() in state {self._state.name}")
        self._state = TRANSITIONS[self._state, _I.ACCEPT]

    # ---- per-link rules, one copy for both directions -------------------------

    def _track(self, msg: m.Message, err: type[P2PCastError]) -> bool:
        """Check and record one message, sent (err=LocalProtocolError) or received
        (err=ProtocolError). Each message goes one way only, so our role says which.
        Returns False for a received message with nothing to report.
        """
        upstream = self.role is Role.UPSTREAM
        match msg:
            case m.Subscribe(image_id=image_id):
                if image_id in self._swarms:
                    # Each Subscribe costs a Bitfield of up to 32 KiB: no repeats.
                    raise err(f"Subscribe to image {image_id.hex()} twice")
                if len(self._swarms) >= limits.MAX_SUBSCRIPTIONS_PER_LINK:
                    raise err(f"over {limits.MAX_SUBSCRIPTIONS_PER_LINK} subscriptions on a link")
                self._swarms[image_id] = _Swarm()
            case m.Bitfield(image_id=image_id, chunk_count=count):
                swarm = self._swarm(msg, image_id, err)
                if swarm.chunk_count is not None:
                    raise err(f"second Bitfield for image {image_id.hex()}")
                swarm.chunk_count = count
            case m.Have(image_id=image_id, index=index):
                known = self._swarm(msg, image_id, err).chunk_count
                if known is None or index >= known:
                    raise err(f"Have {index} not covered by a Bitfield (chunk count {known})")
            case m.Request(image_id=image_id, index=index):
                swarm = self._swarm(msg, image_id, err)
                if swarm.done:
                    raise err("Request after Done")
                if swarm.chunk_count is not None and index >= swarm.chunk_count:
                    raise err(f"Request {index} beyond chunk count {swarm.chunk_count}")
                if (image_id, index) in self._pending:
                    raise err(f"duplicate Request for chunk {index}")
                # The upstream's pending set is always a subset of the
                # downstream's, so a downstream that keeps this bound is safe.
                if len(self._pending) >= limits.MAX_QUEUED_REQUESTS_PER_LINK:
                    raise err(f"over {limits.MAX_QUEUED_REQUESTS_PER_LINK} requests pending")
                self._pending.add((image_id, index))
            case m.Cancel(image_id=image_id, index=index):
                self._swarm(msg, image_id, err)
                key = (image_id, index)
                if key not in self._pending:
                    if upstream:
                        # We answered it already: the Cancel crossed our answer.
                        # It cannot be for a later request of the chunk: the
                        # downstream requests it again only after our answer
                        # arrived, so after this Cancel on the wire.
                        return False
                    raise err(f"Cancel of chunk {index}, which is not pending")
                if key in self._cancelled:
                    raise err(f"second Cancel of chunk {index} for one request")
                # Advisory: the request stays pending until it is answered.
                self._cancelled.add(key)
            case m.Done(image_id=image_id):
                swarm = self._swarm(msg, image_id, err)
                if swarm.done:
                    raise err(f"Done for image {image_id.hex()} twice")
                swarm.done = True
            case m.Chunk(image_id=image_id, index=index) | m.Reject(image_id=image_id, index=index):
                self._answered(msg, (image_id, index), err)
                if isinstance(msg, m.Chunk) and not upstream:
                    self._body_key, self._body_remaining = (image_id, index), msg.length
        return True

    def _swarm(self, msg: m.Message, image_id: bytes, err: type[P2PCastError]) -> _Swarm:
        swarm = self._swarms.get(image_id)
        if swarm is None:
            raise err(f"{type(msg).__name__} for image {image_id.hex()}, not subscribed")
        return swarm

    def _answered(self, msg: m.Message, key: _Key, err: type[P2PCastError]) -> None:
        # The same rule both ways: exactly one answer per request, cancelled or not.
        if key not in self._pending:
            raise err(
                f"unsolicited {type(msg).__name__} for chunk {key[1]} of {key[0].hex()}:"
                " no request for it is pending"
            )
        self._pending.remove(key)
        self._cancelled.discard(key)

    # ---- commands (send side) -------------------------------------------------

    def _send(self, msg: m.Message) -> bytes:
        """Check the send rules and the message, record it, and frame it."""
        kind = Input(type(msg).__name__)
        if not self._hello_sent:
            raise LocalProtocolError("hello() must be the first command")
        if self._goodbye_sent:
            raise LocalProtocolError("nothing may be sent after goodbye()")
        if kind is not _I.GOODBYE:
            if self._state is State.CLOSED:
                raise LocalProtocolError("the connection is closed; only goodbye() is left")
            if not self._auth_sent or self._state in _HANDSHAKE_STATES:
                raise LocalProtocolError(
                    f"{kind.value} before the handshake is complete (state {self._state.name})"
                )
            if kind not in RECEIVES[self.peer_role]:
                raise LocalProtocolError(f"a {self.role.value} cannot send {kind.value}")
        if (why := msg.problem()) is not None:
            raise LocalProtocolError(why)
        self._track(msg, LocalProtocolError)
        data = encode_frame(msg.encode_fields())
        self.bytes_sent += len(data)
        return data

    def hello(self) -> bytes:
        """Our Hello; both sides send it first, without waiting for the peer's."""
        if self._hello_sent:
            raise LocalProtocolError("hello() called twice")
        self._hello_sent = True
        data = encode_frame(self._hello.encode_fields())
        self.bytes_sent += len(data)
        return data

    def subscribe(self, image_id: bytes) -> bytes:
        return self._send(m.Subscribe(image_id))

    def bitfield(self, image_id: bytes, chunk_count: int, bits: bytes) -> bytes:
        return self._send(m.Bitfield(image_id, chunk_count, bits))

    def have(self, image_id: bytes, index: int) -> bytes:
        return self._send(m.Have(image_id, index))

    def request(self, image_id: bytes, index: int) -> bytes:
        return self._send(m.Request(image_id, index))

    def send_chunk(
        self, image_id: bytes, index: int, body: bytes | FileSlice
    ) -> list[bytes | FileSlice]:
        """``[header, body]``: the body object comes back untouched; only its length counts."""
        if isinstance(body, FileSlice):
            if not all(type(v) is int and v >= 0 for v in (body.fd, body.offset)):
                raise LocalProtocolError(f"bad {body!r}")
            length = body.length
        elif isinstance(body, bytes):
            length = len(body)
        else:
            raise LocalProtocolError(f"chunk body must be bytes or FileSlice, not {type(body)}")
        header = self._send(m.Chunk(image_id, index, length))
        self.bytes_sent += length
        return [header, body]

    def reject(self, image_id: bytes, index: int, reason: str) -> bytes:
        return self._send(m.Reject(image_id, index, reason))

    def cancel(self, image_id: bytes, index: int) -> bytes:
        return self._send(m.Cancel(image_id, index))

    def done(self, image_id: bytes) -> bytes:
        return self._send(m.Done(image_id))

    def goodbye(self, code: int, reason: str) -> bytes:
        """Our last frame: allowed once, even after the peer's Goodbye or a ProtocolError.

        ``code`` is usually a GoodbyeCode; the message's check wants a plain
        int (an IntEnum member is not one), and a Goodbye that fails it was
        never sent at all.
        """
        data = self._send(m.Goodbye(int(code), reason))
        self._goodbye_sent = True
        self._state = TRANSITIONS[self._state, _I.SEND_GOODBYE]
        return data
