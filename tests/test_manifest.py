"""Manifest encoding: round trip, a golden vector, and hostile bytes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pcast import limits
from p2pcast.codec import Codec
from p2pcast.errors import ManifestCorrupt
from p2pcast.hashing import CHUNK_DIGEST_SIZE, chunk_digest
from p2pcast.manifest import MAGIC, Manifest, decode, image_id_of

VECTOR = Path(__file__).parent / "vectors" / "manifest_v1.bin"

#: image_id of the golden vector; it changes only if the file format does.
VECTOR_IMAGE_ID = "6f9f3ac957cb84de9e0d81f88c0fe5a5"

CHUNK = limits.MIN_CHUNK_SIZE


def golden_manifest() -> Manifest:
    """Fixed fields, three chunks: raw, zstd, raw (a short last chunk)."""
    return Manifest(
        name="hpc/demo",
        image_type="tar.zst",
        size=2 * CHUNK + 1000,
        chunk_size=CHUNK,
        sha256=bytes(range(32)),
        digests=bytes(range(100, 100 + 3 * CHUNK_DIGEST_SIZE)),
        stored_sizes=(CHUNK, 1234, 1000),
        codecs=bytes([Codec.RAW, Codec.ZSTD, Codec.RAW]),
    )


def write_golden_vector() -> None:
    """Recreate the vector; only when P2PCAST_REGEN_VECTORS=1 asks for it."""
    VECTOR.parent.mkdir(parents=True, exist_ok=True)
    VECTOR.write_bytes(golden_manifest().encode())


def golden_fields() -> dict[str, Any]:
    m = golden_manifest()
    return {
        "v": m.version,
        "name": m.name,
        "type": m.image_type,
        "size": m.size,
        "chunk_size": m.chunk_size,
        "sha256": m.sha256,
        "digests": m.digests,
        "stored_sizes": list(m.stored_sizes),
        "codecs": m.codecs,
    }


def frame(body: bytes) -> bytes:
    """A manifest file around any body, with a correct checksum."""
    return MAGIC + body + chunk_digest(body)


def frame_fields(fields: Any) -> bytes:
    body = msgpack.packb(fields, use_bin_type=True)
    assert isinstance(body, bytes)
    return frame(body)


def test_round_trip() -> None:
    m = golden_manifest()
    again = decode(m.encode())
    assert again == m
    assert again.chunk_count == 3
    assert [c.raw_size for c in again.chunks()] == [CHUNK, CHUNK, 1000]
    assert [c.codec for c in again.chunks()] == [Codec.RAW, Codec.ZSTD, Codec.RAW]
    assert again.chunk(1).offset == CHUNK
    assert again.chunk(2).digest == bytes(range(132, 148))
    assert again.stored_total == CHUNK + 1234 + 1000


def test_golden_vector() -> None:
    if os.environ.get("P2PCAST_REGEN_VECTORS") == "1":
        write_golden_vector()
    data = VECTOR.read_bytes()
    assert golden_manifest().encode() == data
    assert decode(data) == golden_manifest()
    assert image_id_of(data).hex() == VECTOR_IMAGE_ID
    assert golden_manifest().image_id.hex() == VECTOR_IMAGE_ID


def test_every_truncation_is_corrupt() -> None:
    data = VECTOR.read_bytes()
    for length in range(len(data)):
        with pytest.raises(ManifestCorrupt):
            decode(data[:length])


def test_every_bit_flip_is_corrupt() -> None:
    data = VECTOR.read_bytes()
    for position in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[position] ^= 1 << bit
            with pytest.raises(ManifestCorrupt):
                decode(bytes(flipped))


def test_trailing_bytes_are_corrupt() -> None:
    with pytest.raises(ManifestCorrupt):
        decode(VECTOR.read_bytes() + b"\0")


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(ManifestCorrupt, match="exceeds"):
        decode(MAGIC + bytes(limits.MAX_MANIFEST_BYTES))


@settings(database=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_manifest_corrupt(data: bytes) -> None:
    with pytest.raises(ManifestCorrupt):
        decode(data)


@settings(database=None)
@given(st.binary(max_size=512))
def test_random_bodies_with_valid_checksum_raise_only_manifest_corrupt(body: bytes) -> None:
    # Gets past the checksum, so the msgpack parser and validation see it.
    with pytest.raises(ManifestCorrupt):
        decode(frame(body))


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@settings(database=None, max_examples=300)
@given(st.data())
def test_golden_fields_with_random_values_decode_or_raise_manifest_corrupt(
    data: st.DataObject,
) -> None:
    fields = golden_fields()
    for key in data.draw(st.sets(st.sampled_from(sorted(fields)), min_size=1)):
        if data.draw(st.booleans()):
            del fields[key]
        else:
            fields[key] = data.draw(_values)
    try:
        m = decode(frame_fields(fields))
    except ManifestCorrupt:
        return
    # Whatever decodes must be a usable manifest.
    assert len(list(m.chunks())) == m.chunk_count


def _with(**changes: Any) -> bytes:
    fields = golden_fields()
    fields.update(changes)
    return frame_fields(fields)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_with(v=2), id="future-version"),
        pytest.param(_with(v=0), id="old-version"),
        pytest.param(_with(v="1"), id="version-string"),
        pytest.param(_with(v=None), id="version-missing"),
        pytest.param(_with(size=3 * CHUNK + 1), id="size-implies-more-chunks"),
        pytest.param(_with(size=CHUNK), id="size-implies-fewer-chunks"),
        pytest.param(_with(size=-1), id="negative-size"),
        pytest.param(_with(size=limits.MAX_IMAGE_SIZE + 1), id="size-over-limit"),
        pytest.param(_with(stored_sizes=[CHUNK - 1, 1234, 1000]), id="raw-stored-size"),
        pytest.param(_with(stored_sizes=[CHUNK, 1234, 999]), id="raw-last-stored-size"),
        pytest.param(_with(stored_sizes=[CHUNK, 0, 1000]), id="zero-stored-size"),
        pytest.param(_with(stored_sizes=[CHUNK, CHUNK + 65 * 1024, 1000]), id="zstd-too-big"),
        pytest.param(_with(stored_sizes=[CHUNK, 1234]), id="too-few-stored-sizes"),
        pytest.param(_with(stored_sizes="x"), id="stored-sizes-not-list"),
        pytest.param(_with(chunk_size=limits.MIN_CHUNK_SIZE - 1), id="chunk-size-too-small"),
        pytest.param(_with(chunk_size=limits.MAX_CHUNK_SIZE + 1), id="chunk-size-too-big"),
        pytest.param(_with(sha256=bytes(31)), id="sha256-short"),
        pytest.param(_with(sha256=bytes(33)), id="sha256-long"),
        pytest.param(_with(sha256="0" * 32), id="sha256-str"),
        pytest.param(_with(digests=bytes(47)), id="digests-short"),
        pytest.param(_with(codecs=bytes([0, 2, 0])), id="unknown-codec"),
        pytest.param(_with(codecs=bytes([0, 1])), id="codecs-short"),
        pytest.param(_with(name=""), id="empty-name"),
        pytest.param(_with(name="x" * (limits.MAX_NAME_LENGTH + 1)), id="name-too-long"),
        pytest.param(_with(type="zip"), id="unknown-type"),
        pytest.param(frame_fields([1, 2, 3]), id="not-a-map"),
        pytest.param(frame(b"\x81"), id="truncated-msgpack"),
        pytest.param(frame(b""), id="empty-body"),
        pytest.param(b"P2PCMANX" + golden_manifest().encode()[8:], id="bad-magic"),
    ],
)
def test_invalid_manifests_are_corrupt(data: bytes) -> None:
    with pytest.raises(ManifestCorrupt):
        decode(data)


@pytest.mark.parametrize("missing", ["name", "type", "size", "chunk_size", "sha256", "codecs"])
def test_missing_field_is_corrupt(missing: str) -> None:
    fields = golden_fields()
    del fields[missing]
    with pytest.raises(ManifestCorrupt):
        decode(frame_fields(fields))


def test_constructor_validates_too() -> None:
    with pytest.raises(ManifestCorrupt, match="stored size"):
        dataclasses.replace(golden_manifest(), stored_sizes=(CHUNK, 1234, 1001))


def test_empty_image_has_no_chunks() -> None:
    m = dataclasses.replace(golden_manifest(), size=0, digests=b"", stored_sizes=(), codecs=b"")
    assert decode(m.encode()).chunk_count == 0
