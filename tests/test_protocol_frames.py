"""Framing: length prefix, bounded buffering, msgpack's errors turned into ProtocolError."""

from __future__ import annotations

import struct

import msgpack
import pytest

from p2pcast import limits
from p2pcast.errors import LocalProtocolError, ProtocolError
from p2pcast.protocol import FrameDecoder, encode_frame
from p2pcast.protocol.frames import PEER_MAX_ARRAY_LEN, PEER_MAX_BIN_BYTES, PEER_MAX_STR_BYTES


def raw_frame(header: bytes) -> bytes:
    return struct.pack(">I", len(header)) + header


def decode_one(data: bytes, **kwargs: int) -> list[object] | None:
    decoder = FrameDecoder(**kwargs)
    decoder.feed(data)
    return decoder.next_header()


def test_encode_layout() -> None:
    frame = encode_frame([4, b"\x01" * 16, 7])
    assert frame[:4] == struct.pack(">I", len(frame) - 4)
    assert msgpack.unpackb(frame[4:]) == [4, b"\x01" * 16, 7]


def test_round_trip_whole_and_byte_by_byte() -> None:
    headers: list[list[object]] = [[1, "p2pcast", 1, "n", b""], [10, 0, "bye"], [4, b"x" * 16, 3]]
    stream = b"".join(encode_frame(h) for h in headers)
    assert [decode_one(encode_frame(h)) for h in headers] == headers
    decoder = FrameDecoder()
    got = []
    for byte in stream:
        decoder.feed(bytes([byte]))
        while (header := decoder.next_header()) is not None:
            got.append(header)
    assert got == headers
    assert decoder.buffered == 0


def test_incomplete_is_none_and_keeps_bytes() -> None:
    frame = encode_frame([2, b"a" * 16])
    decoder = FrameDecoder()
    decoder.feed(frame[:3])
    assert decoder.next_header() is None
    decoder.feed(frame[3:-1])
    assert decoder.next_header() is None
    assert decoder.buffered == len(frame) - 1
    decoder.feed(memoryview(frame[-1:]))
    assert decoder.next_header() == [2, b"a" * 16]


def test_zero_length_header() -> None:
    with pytest.raises(ProtocolError, match="length is 0"):
        decode_one(b"\0\0\0\0")


def test_oversized_length_rejected_from_prefix_alone() -> None:
    # Only the 4-byte prefix: nothing of the header is buffered or awaited.
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_one(struct.pack(">I", limits.MAX_HEADER_BYTES + 1))
    assert decode_one(struct.pack(">I", limits.MAX_HEADER_BYTES)) is None


def test_caller_chosen_max_header() -> None:
    frame = encode_frame([1, "x" * 100])
    with pytest.raises(ProtocolError, match="exceeds 50"):
        decode_one(frame, max_header=50)
    assert decode_one(frame, max_header=len(frame) - 4) == [1, "x" * 100]
    with pytest.raises(ValueError, match="max_header"):
        FrameDecoder(max_header=0)
    with pytest.raises(ValueError, match="bounds"):
        FrameDecoder(max_depth=0)


def test_control_socket_style_map_header() -> None:
    header: list[object] = [3, {"image": "bucket/x:1", "nodes": ["a", "b"], "force": True}]
    frame = encode_frame(header, max_header=limits.MAX_CONTROL_FRAME)
    kwargs = dict(max_header=limits.MAX_CONTROL_FRAME, max_map=16, max_depth=3)
    assert decode_one(frame, **kwargs) == header
    # The peer defaults allow no maps at all.
    with pytest.raises(ProtocolError):
        decode_one(frame)
    with pytest.raises(ProtocolError, match="deeper"):
        decode_one(encode_frame([3, {"a": {"b": [1]}}]), **kwargs)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (msgpack.packb({"a": 1}), "max_map_len"),
        (msgpack.packb({}), "not a non-empty msgpack array"),
        (msgpack.packb([]), "not a non-empty msgpack array"),
        (msgpack.packb(7), "not a non-empty msgpack array"),
        (msgpack.packb(["hello"]), "frame type is str"),
        (msgpack.packb([True]), "frame type is bool"),
        (msgpack.packb([1.0]), "frame type is float"),
        (msgpack.packb([1, [2]]), "deeper"),
        (msgpack.packb([1, {}]), "deeper"),
        (msgpack.packb([1, 2]) + b"\x00", "ExtraData"),
        (b"\xc1", "FormatError"),
        (b"\x92\x01", "valid msgpack"),  # truncated array
        (b"\x91" * 2000 + b"\x01", "valid msgpack"),  # nesting: msgpack's StackError
        (b"\x92\x01\xd4\x01\x00", "ext"),  # fixext1
        (b"\x92\x01\xa2\xff\xfe", "UnicodeDecodeError"),
        (msgpack.packb([1, "é" * (PEER_MAX_STR_BYTES // 2 + 1)]), "max_str_len"),
        (msgpack.packb([1, b"x" * (PEER_MAX_BIN_BYTES + 1)]), "max_bin_len"),
        (msgpack.packb(list(range(PEER_MAX_ARRAY_LEN + 1))), "max_array_len"),
        (b"\x92\x01\xdd\xff\xff\xff\xff", "max_array_len"),  # array32 claiming 4G items
    ],
)
def test_bad_headers(header: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_one(raw_frame(header))


def test_non_str_map_key() -> None:
    kwargs = dict(max_map=4, max_depth=2)
    with pytest.raises(ProtocolError, match="non-str key"):
        decode_one(raw_frame(msgpack.packb([1, {b"k": 1}])), **kwargs)
    with pytest.raises(ProtocolError):
        decode_one(raw_frame(msgpack.packb([1, {1: 1}], strict_types=False)), **kwargs)


def test_floats_pass_framing_for_messages_to_judge() -> None:
    assert decode_one(encode_frame([4, 1.5])) == [4, 1.5]


def test_decoder_stays_broken_after_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\0\0\0\0")
    with pytest.raises(ProtocolError):
        decoder.next_header()
    decoder.feed(encode_frame([1]))
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.next_header()


def test_buffer_holds_only_what_was_fed() -> None:
    decoder = FrameDecoder()
    frames = [encode_frame([5, b"i" * 16, n]) for n in range(3)]
    decoder.feed(b"".join(frames) + frames[0][:5])
    for _ in frames:
        assert decoder.next_header() is not None
    assert decoder.next_header() is None
    assert decoder.buffered == 5


def test_read_and_read_into() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"abcdefgh")
    assert decoder.read(3) == b"abc"
    buf = bytearray(4)
    assert decoder.read_into(memoryview(buf), 10) == 4
    assert buf == b"defg"
    assert decoder.read_into(memoryview(buf), 0) == 0
    assert decoder.read(100) == b"h"
    assert decoder.buffered == 0
    decoder.feed(b"more")  # the buffer is still usable: no exported view left
    assert decoder.read(4) == b"more"


def test_encode_frame_local_errors() -> None:
    with pytest.raises(LocalProtocolError, match="type number"):
        encode_frame([])
    with pytest.raises(LocalProtocolError, match="type number"):
        encode_frame(["x"])
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        encode_frame([1, object()])
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        encode_frame([1, 2**64])
    with pytest.raises(LocalProtocolError, match="exceeds"):
        encode_frame([1, b"x" * 100], max_header=50)
