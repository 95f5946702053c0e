"""The message catalog: fixed numbers, field validation, round trips."""

from __future__ import annotations

import importlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcast import limits
from p2pcast.errors import ProtocolError
from p2pcast.protocol import (
    MESSAGE_TYPES,
    Auth,
    Bitfield,
    Cancel,
    Chunk,
    Done,
    FrameDecoder,
    Goodbye,
    Have,
    Hello,
    Message,
    Reject,
    Request,
    Subscribe,
    bit_is_set,
    bitfield_size,
    clean_reason,
    encode_frame,
    pack_bits,
)
from p2pcast.protocol.messages import IMAGE_ID_SIZE, MAX_U16

IMG = bytes(range(16))


def test_type_numbers_are_fixed_forever() -> None:
    # Changing any of these breaks every deployed daemon: add, never renumber.
    assert {n: cls.__name__ for n, cls in MESSAGE_TYPES.items()} == {
        1: "Hello",
        2: "Subscribe",
        3: "Bitfield",
        4: "Have",
        5: "Request",
        6: "Chunk",
        7: "Reject",
        8: "Cancel",
        9: "Done",
        10: "Goodbye",
        11: "Auth",
    }


def test_image_id_size_matches_manifest() -> None:
    # Looked up at run time only, so type-checking the protocol tests does not
    # type-check the manifest module (owned elsewhere).
    assert importlib.import_module("p2pcast.manifest").IMAGE_ID_SIZE == IMAGE_ID_SIZE


SAMPLES: list[Message] = [
    Hello(version=2, node="node-001", nonce=b"n" * 32),
    Auth("munge", b"MUNGE:credential:"),
    Subscribe(IMG),
    Bitfield(IMG, 10, b"\xff\xc0"),
    Have(IMG, 9),
    Request(IMG, limits.MAX_CHUNKS - 1),
    Chunk(IMG, 0, limits.MAX_CHUNK_BODY),
    Reject(IMG, 3, "not here"),
    Cancel(IMG, 0),
    Done(IMG),
    Goodbye(0, ""),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_sample_round_trip(msg: Message) -> None:
    assert msg.problem() is None
    header = msg.encode_fields()
    assert header[0] == msg.TYPE
    assert type(msg).parse(header) == msg
    decoder = FrameDecoder()
    decoder.feed(encode_frame(header))
    assert decoder.next_header() == header


def replace(header: list[object], position: int, value: object) -> list[object]:
    return [*header[:position], value, *header[position + 1 :]]


BAD_FIELDS: list[tuple[Message, str, object]] = [
    (Hello(version=1, node="n"), "proto", b"p2pcast"),
    (Hello(version=1, node="n"), "proto", ""),
    (Hello(version=1, node="n"), "proto", "p" * 17),
    (Hello(version=1, node="n"), "version", True),
    (Hello(version=1, node="n"), "version", 1.0),
    (Hello(version=1, node="n"), "version", -1),
    (Hello(version=1, node="n"), "version", MAX_U16 + 1),
    (Hello(version=1, node="n"), "node", ""),
    (Hello(version=1, node="n"), "node", "n" * (limits.MAX_NODE_NAME + 1)),
    (Hello(version=1, node="n"), "node", "evil\nlog line"),
    (Hello(version=1, node="n"), "node", None),
    (Hello(version=1, node="n"), "nonce", "text"),
    (Hello(version=1, node="n"), "nonce", b"a" * (limits.MAX_AUTH_BYTES + 1)),
    (Auth("secret", b""), "method", ""),
    (Auth("secret", b""), "method", "x" * 17),
    (Auth("secret", b""), "method", b"secret"),
    (Auth("secret", b""), "proof", "text"),
    (Auth("secret", b""), "proof", b"a" * (limits.MAX_AUTH_BYTES + 1)),
    (Subscribe(IMG), "image_id", IMG[:15]),
    (Subscribe(IMG), "image_id", IMG + b"\0"),
    (Subscribe(IMG), "image_id", IMG.hex()),
    (Bitfield(IMG, 8, b"\0"), "chunk_count", 0),
    (Bitfield(IMG, 8, b"\0"), "chunk_count", limits.MAX_CHUNKS + 1),
    (Bitfield(IMG, 8, b"\0"), "chunk_count", False),
    (Bitfield(IMG, 8, b"\0"), "bits", [0]),
    (Have(IMG, 0), "index", -1),
    (Have(IMG, 0), "index", limits.MAX_CHUNKS),
    (Have(IMG, 0), "index", 0.0),
    (Request(IMG, 0), "index", False),
    (Request(IMG, 0), "image_id", None),
    (Chunk(IMG, 0, 1), "length", 0),
    (Chunk(IMG, 0, 1), "length", limits.MAX_CHUNK_BODY + 1),
    (Chunk(IMG, 0, 1), "index", 2**64 - 1),
    (Reject(IMG, 0, ""), "reason", "r" * (limits.MAX_REASON_LENGTH + 1)),
    (Reject(IMG, 0, ""), "reason", b"bytes"),
    (Reject(IMG, 0, ""), "reason", "tab\there"),
    (Cancel(IMG, 0), "index", "0"),
    (Done(IMG), "image_id", b""),
    (Goodbye(0, ""), "code", -1),
    (Goodbye(0, ""), "code", MAX_U16 + 1),
    (Goodbye(0, ""), "code", None),
    (Goodbye(0, ""), "reason", 5),
]


@pytest.mark.parametrize(("msg", "field", "value"), BAD_FIELDS)
def test_bad_field_names_message_and_field(msg: Message, field: str, value: object) -> None:
    header = replace(msg.encode_fields(), 1 + msg.FIELDS.index(field), value)
    with pytest.raises(ProtocolError, match=rf"^{type(msg).__name__}\.{field}: "):
        type(msg).parse(header)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_wrong_field_count(msg: Message) -> None:
    header = msg.encode_fields()
    with pytest.raises(ProtocolError, match=r"expected \d+ fields"):
        type(msg).parse([*header, 0])
    with pytest.raises(ProtocolError, match=r"expected \d+ fields"):
        type(msg).parse(header[:-1])


def test_parse_checks_the_type_number() -> None:
    with pytest.raises(ProtocolError, match="not of type 4"):
        Have.parse(Request(IMG, 1).encode_fields())
    with pytest.raises(ProtocolError, match="not of type 1"):
        Hello.parse([True, "p2pcast", 1, "n", b""])
    with pytest.raises(ProtocolError):
        Done.parse([])


@pytest.mark.parametrize(
    ("count", "bits", "match"),
    [
        (8, b"", "0 bytes, 8 chunks need 1"),
        (8, b"\0\0", "2 bytes, 8 chunks need 1"),
        (9, b"\0", "1 bytes, 9 chunks need 2"),
        (9, b"\xff\x80", None),
        (9, b"\xff\x40", "padding"),
        (10, b"\x00\x01", "padding"),
        (16, b"\xff\xff", None),
    ],
)
def test_bitfield_length_and_padding(count: int, bits: bytes, match: str | None) -> None:
    header = Bitfield(IMG, count, bits).encode_fields()
    if match is None:
        assert Bitfield.parse(header).bits == bits
    else:
        with pytest.raises(ProtocolError, match=rf"Bitfield\.bits: .*{match}"):
            Bitfield.parse(header)


def test_largest_bitfield_fits_a_header() -> None:
    count = limits.MAX_CHUNKS
    msg = Bitfield(IMG, count, b"\xff" * bitfield_size(count))
    decoder = FrameDecoder()
    decoder.feed(encode_frame(msg.encode_fields()))
    header = decoder.next_header()
    assert header is not None and Bitfield.parse(header) == msg


def test_bit_helpers() -> None:
    bits = pack_bits(10, {0, 7, 8, 9})
    assert bits == b"\x81\xc0"
    assert [i for i in range(10) if bit_is_set(bits, i)] == [0, 7, 8, 9]
    assert Bitfield(IMG, 10, bits).problem() is None
    with pytest.raises(ValueError, match="outside"):
        pack_bits(10, [10])


def test_hello_defaults() -> None:
    hello = Hello(version=1, node="n")
    assert hello.proto == "p2pcast" and hello.nonce == b""
    assert hello.encode_fields() == [1, "p2pcast", 1, "n", b""]


# ---- property: every valid message survives encode -> frames -> parse -------------

image_ids = st.binary(min_size=IMAGE_ID_SIZE, max_size=IMAGE_ID_SIZE)
indexes = st.integers(0, limits.MAX_CHUNKS - 1)
reasons = st.text(max_size=limits.MAX_REASON_LENGTH).filter(str.isprintable)


@st.composite
def bitfields(draw: st.DrawFn) -> Bitfield:
    count = draw(st.integers(1, 300))
    present = draw(st.sets(st.integers(0, count - 1)))
    return Bitfield(draw(image_ids), count, pack_bits(count, present))


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Hello,
        version=st.integers(0, MAX_U16),
        node=st.text(min_size=1, max_size=limits.MAX_NODE_NAME).filter(str.isprintable),
        nonce=st.binary(max_size=limits.MAX_AUTH_BYTES),
    ),
    st.builds(
        Auth,
        st.text(min_size=1, max_size=16).filter(str.isprintable),
        st.binary(max_size=limits.MAX_AUTH_BYTES),
    ),
    st.builds(Subscribe, image_ids),
    bitfields(),
    st.builds(Have, image_ids, indexes),
    st.builds(Request, image_ids, indexes),
    st.builds(Chunk, image_ids, indexes, st.integers(1, limits.MAX_CHUNK_BODY)),
    st.builds(Reject, image_ids, indexes, reasons),
    st.builds(Cancel, image_ids, indexes),
    st.builds(Done, image_ids),
    st.builds(Goodbye, st.integers(0, MAX_U16), reasons),
)


@settings(deadline=None)
@given(st.lists(messages, max_size=20), st.data())
def test_random_message_sequences_round_trip(msgs: list[Message], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(msg.encode_fields()) for msg in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    parsed: list[Message] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoder.feed(stream[start:end])
        while (header := decoder.next_header()) is not None:
            assert type(header[0]) is int
            parsed.append(MESSAGE_TYPES[header[0]].parse(header))
    assert parsed == msgs
    assert decoder.buffered == 0


def test_clean_reason_makes_any_text_valid() -> None:
    text = "line one\nline two\t" + "x" * 1000
    reason = clean_reason(text)
    assert reason.startswith("line one?line two?")
    assert Goodbye(2, reason).problem() is None
    assert clean_reason("fine") == "fine"
