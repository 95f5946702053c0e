"""The state table, checked against a real connection for every (state, input) pair."""

from __future__ import annotations

import itertools

import pytest

from p2pcast.errors import LocalProtocolError, ProtocolError
from p2pcast.protocol import (
    MESSAGE_TYPES,
    RECEIVES,
    TRANSITIONS,
    Auth,
    Bitfield,
    Cancel,
    Chunk,
    ChunkBodyData,
    Done,
    Event,
    Goodbye,
    Have,
    Input,
    Message,
    PeerConnection,
    Reject,
    Request,
    Role,
    State,
    Subscribe,
    encode_frame,
    pack_bits,
)
from tests.test_protocol_support import IMG, IMG2, drain, peer_hello
from tests.test_protocol_support import conn as make_conn

#: A peer frame per message input, each legal in OPEN after reach()'s setup.
PEER_FRAMES: dict[Input, Message] = {
    Input.HELLO: peer_hello(),
    Input.AUTH: Auth("none", b""),
    Input.SUBSCRIBE: Subscribe(IMG2),
    Input.BITFIELD: Bitfield(IMG2, 8, b"\0"),
    Input.HAVE: Have(IMG, 3),
    Input.REQUEST: Request(IMG, 1),
    Input.CHUNK: Chunk(IMG, 1, 4),
    Input.REJECT: Reject(IMG, 1, "no"),
    Input.CANCEL: Cancel(IMG, 0),
    Input.DONE: Done(IMG),
    Input.GOODBYE: Goodbye(0, "bye"),
}
BODY_LENGTH = 1000  # longer than any frame above, so a frame fits inside a body


def feed(conn: PeerConnection, msg: Message) -> list[Event]:
    conn.receive_data(encode_frame(msg.encode_fields()))
    return drain(conn)


def role_for(state: State, inp: Input) -> Role:
    if state is State.BODY or inp not in RECEIVES[Role.UPSTREAM]:
        return Role.DOWNSTREAM
    return Role.UPSTREAM


def reach(state: State, role: Role, *, failed: bool = False) -> PeerConnection:
    """A connection in ``state`` with subscriptions and requests set up."""
    conn = make_conn(role)
    conn.hello()
    if state is State.AWAIT_HELLO:
        return conn
    feed(conn, peer_hello())
    if state is State.AWAIT_AUTH:
        return conn
    conn.auth("none", b"")
    feed(conn, Auth("none", b""))
    if state is State.VERIFYING:
        return conn
    conn.accept_peer()
    if role is Role.DOWNSTREAM:
        conn.subscribe(IMG)
        conn.subscribe(IMG2)
        feed(conn, Bitfield(IMG, 8, pack_bits(8, range(8))))
        conn.request(IMG, 0)
        conn.request(IMG, 1)
    else:
        feed(conn, Subscribe(IMG))
        feed(conn, Request(IMG, 0))
    if state is State.BODY:
        feed(conn, Chunk(IMG, 0, BODY_LENGTH))
    elif state is State.CLOSED:
        if failed:
            conn.receive_data(b"\0\0\0\0")
            with pytest.raises(ProtocolError):
                drain(conn)
        else:
            feed(conn, Goodbye(0, "bye"))
    assert conn.state is state
    return conn


def apply(conn: PeerConnection, inp: Input) -> list[Event]:
    """Drive one input through the public API."""
    state = conn.state
    if inp in PEER_FRAMES:
        return feed(conn, PEER_FRAMES[inp])
    if inp is Input.EOF or (inp is Input.PROTOCOL_ERROR and state is State.BODY):
        conn.receive_data(b"")  # mid-body, EOF is how a peer breaks the protocol
        return drain(conn)
    if inp is Input.PROTOCOL_ERROR:
        conn.receive_data(b"\0\0\0\0")
        return drain(conn)
    if inp is Input.SEND_GOODBYE:
        conn.goodbye(0, "bye")
        return []
    if inp is Input.ACCEPT:
        conn.accept_peer()
        return []
    if inp is Input.BODY_DATA:
        if state is not State.BODY:
            conn.readinto_body(memoryview(bytearray(4)))
        conn.receive_data(b"ab")
        return drain(conn)
    assert inp is Input.BODY_END
    if state is not State.BODY:
        conn.body_received(0)
    conn.receive_data(b"x" * BODY_LENGTH)
    return drain(conn)


@pytest.mark.parametrize(("state", "inp"), list(itertools.product(State, Input)))
def test_every_state_input_pair(state: State, inp: Input) -> None:
    conn = reach(state, role_for(state, inp))
    new_state = TRANSITIONS.get((state, inp))
    if inp is Input.PROTOCOL_ERROR and new_state is not None:
        with pytest.raises(ProtocolError):
            apply(conn, inp)
        assert conn.state is new_state
    elif new_state is not None:
        apply(conn, inp)
        assert conn.state is new_state
    elif inp is Input.ACCEPT:
        # Accepting a peer whose proof we have not got is our bug.
        with pytest.raises(LocalProtocolError):
            apply(conn, inp)
        assert conn.state is state
    elif state is State.VERIFYING and inp not in (Input.BODY_DATA, Input.BODY_END):
        # While the peer's proof is checked nothing it sent is looked at: the
        # bytes wait, and count only once it is accepted.
        assert apply(conn, inp) == []
        assert conn.state is State.VERIFYING
    elif inp in (Input.BODY_DATA, Input.BODY_END):
        # Body bytes exist only in BODY; elsewhere the body API is our bug.
        with pytest.raises(LocalProtocolError):
            apply(conn, inp)
        assert conn.state is state
    elif state is State.BODY and inp in PEER_FRAMES:
        # Inside a body, frame-looking bytes are body bytes: never parsed.
        msg = PEER_FRAMES[inp]
        assert apply(conn, inp) == [ChunkBodyData(encode_frame(msg.encode_fields()))]
        assert conn.state is State.BODY
    elif state is State.CLOSED:
        assert apply(conn, inp) == []  # closed cleanly: late input is ignored
        assert conn.state is State.CLOSED
    else:
        with pytest.raises(ProtocolError):
            apply(conn, inp)
        assert conn.state is State.CLOSED


@pytest.mark.parametrize("inp", list(Input))
def test_every_input_after_a_protocol_error(inp: Input) -> None:
    conn = reach(State.CLOSED, role_for(State.OPEN, inp), failed=True)
    if inp is Input.SEND_GOODBYE:
        apply(conn, inp)  # telling the peer why is still allowed
    elif inp in (Input.BODY_DATA, Input.BODY_END, Input.ACCEPT):
        with pytest.raises(LocalProtocolError):
            apply(conn, inp)
    else:
        with pytest.raises(ProtocolError, match="already failed"):
            apply(conn, inp)
    assert conn.state is State.CLOSED


def test_table_shape() -> None:
    assert all(isinstance(s, State) for s in TRANSITIONS.values())
    # Every live state can fail or be closed by us; nothing leaves CLOSED.
    for state in (State.AWAIT_HELLO, State.AWAIT_AUTH, State.OPEN, State.BODY):
        assert TRANSITIONS[state, Input.PROTOCOL_ERROR] is State.CLOSED
        assert TRANSITIONS[state, Input.SEND_GOODBYE] is State.CLOSED
    assert TRANSITIONS[State.VERIFYING, Input.SEND_GOODBYE] is State.CLOSED
    # AWAIT_AUTH takes the Auth (or a Goodbye saying why not), nothing else;
    # VERIFYING parses nothing; only accept_peer() reaches OPEN from it.
    assert {i for (s, i) in TRANSITIONS if s is State.AWAIT_AUTH} & set(PEER_FRAMES) == {
        Input.AUTH,
        Input.GOODBYE,
    }
    assert not {i for (s, i) in TRANSITIONS if s is State.VERIFYING} & set(PEER_FRAMES)
    assert [new for (s, i), new in TRANSITIONS.items() if new is State.OPEN and s is not State.OPEN
            and s is not State.BODY] == [State.OPEN]  # fmt: skip
    assert {new for (old, _), new in TRANSITIONS.items() if old is State.CLOSED} == {State.CLOSED}
    # AWAIT_HELLO accepts no peer message but Hello.
    assert {i for (s, i) in TRANSITIONS if s is State.AWAIT_HELLO} & set(PEER_FRAMES) == {
        Input.HELLO
    }
    # BODY parses no frames at all.
    assert not {i for (s, i) in TRANSITIONS if s is State.BODY} & set(PEER_FRAMES)


def test_every_message_has_its_input() -> None:
    assert {Input(cls.__name__) for cls in MESSAGE_TYPES.values()} == set(PEER_FRAMES)


def test_roles_split_the_messages() -> None:
    down, up = RECEIVES[Role.DOWNSTREAM], RECEIVES[Role.UPSTREAM]
    assert down | up == set(PEER_FRAMES)
    assert down & up == {Input.HELLO, Input.AUTH, Input.GOODBYE}
