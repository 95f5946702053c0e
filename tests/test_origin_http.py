"""The read-only HTTP origin against a real web server (python -m http.server)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pcast.codec import decode_chunk
from p2pcast.demo import free_port, make_image
from p2pcast.errors import ConfigError, ImageNotFound, OriginUnavailable
from p2pcast.hashing import chunk_digest
from p2pcast.manifest import Manifest, decode
from p2pcast.names import ImageRef
from p2pcast.origins.base import open_origin
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.origins.http import HttpOrigin
from p2pcast.publish import push

MiB = 1 << 20


def _wait_listening(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("http.server did not start")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Manifest]]:
    work = tmp_path_factory.mktemp("http")
    image = work / "image.tar"
    make_image(image, 6 * MiB)
    root = work / "origin"

    async def publish() -> Manifest:
        async with DirectoryOrigin(str(root)) as origin:
            return (
                await push(str(image), origin, ImageRef("web/img", "v1"), chunk_size=MiB)
            ).manifest

    manifest = asyncio.run(publish())
    port = free_port("127.0.0.1")
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
         "--directory", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_listening(port)
        yield f"http://127.0.0.1:{port}", image, manifest
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_reads_manifest_and_every_chunk(served: tuple[str, Path, Manifest]) -> None:
    url, image, manifest = served

    async def go() -> bytes:
        origin = open_origin(url)
        assert isinstance(origin, HttpOrigin)
        data = await origin.get_manifest(ImageRef("web/img", "v1"))
        got = decode(data)
        assert got == manifest
        assert await origin.get_manifest_by_id(manifest.image_id) == data
        parts = []
        for chunk in got.chunks():
            stored = await origin.get_chunk(chunk)
            assert chunk_digest(stored) == chunk.digest
            parts.append(bytes(decode_chunk(chunk.codec, stored, chunk.raw_size)))
        assert origin.bytes_read == got.stored_total
        assert await origin.has_chunk(got.chunk(0))
        return b"".join(parts)

    assert asyncio.run(go()) == image.read_bytes()


def test_missing_image_read_only_and_server_down(served: tuple[str, Path, Manifest]) -> None:
    url, _, manifest = served
    origin = HttpOrigin(url)
    with pytest.raises(ImageNotFound, match="web/img:nosuch"):
        asyncio.run(origin.get_manifest(ImageRef("web/img", "nosuch")))
    with pytest.raises(ConfigError, match="read-only"):
        asyncio.run(origin.put_chunk(manifest.chunk(0), b"x"))
    dead = HttpOrigin(f"http://127.0.0.1:{free_port('127.0.0.1')}")
    with pytest.raises(OriginUnavailable):
        asyncio.run(dead.get_manifest(ImageRef("web/img", "v1")))
    with pytest.raises(ConfigError, match="not an http"):
        HttpOrigin("http:///nohost")


def test_cli_fetch_from_http_origin(served: tuple[str, Path, Manifest], tmp_path: Path) -> None:
    url, image, _ = served
    out = tmp_path / "copy.tar"
    result = subprocess.run(
        [sys.executable, "-m", "p2pcast", "fetch", "web/img:v1", "--origin", url, "--in-process",
         "--node", "127.0.0.1", "--listen", "127.0.0.1", "--port", str(free_port("127.0.0.1")),
         "--state-dir", str(tmp_path / "state"), "--output", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == image.read_bytes()
