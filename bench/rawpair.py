"""The baseline for the daemon link: a raw Python sender/receiver pair over loopback.

Both ends run as tasks on one uvloop event loop, doing what the daemon's
transport does for one chunk stream, with no protocol at all:

* sender: ``os.sendfile`` from the image file on a non-blocking socket; on
  EAGAIN it waits for writability with ``loop.add_writer`` (uvloop has no
  ``loop.sendfile``);
* receiver: ``loop.sock_recv_into`` one reusable 4 MiB buffer, xxh3-128 of each
  4 MiB, ``os.pwrite`` into the destination file.

So the daemon-link benchmark measured beside it shows what the protocol, the
store and the scheduling cost on top of Python's best case on this machine.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

from p2pcast.hashing import chunk_digest

T = TypeVar("T")

MiB = 1024 * 1024
#: Bytes sent per benchmark run: big enough that setup is noise (~0.1 s or more
#: here), small enough for /dev/shm and a 2-minute benchmark session.
LINK_BYTES = 256 * MiB
#: The receiver's buffer and hashing unit: the default chunk size.
RECV_BUFFER = 4 * MiB


def scratch_dir() -> str:
    """/dev/shm if there is one (no disk in the measurement), else the temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def make_source(size: int = LINK_BYTES, directory: str | None = None) -> str:
    """A file of ``size`` random-looking bytes to send; the caller removes it."""
    fd, path = tempfile.mkstemp(
        prefix="p2pcast-bench-", suffix=".src", dir=directory or scratch_dir()
    )
    try:
        block = os.urandom(RECV_BUFFER)
        for offset in range(0, size, len(block)):
            os.pwrite(fd, block[: size - offset], offset)
    finally:
        os.close(fd)
    return path


def run_uvloop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh uvloop loop (what the daemon runs on)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def raw_pair(
    path: str, size: int, *, keep: str | None = None, sockbuf: int | None = None
) -> float:
    """Send the first ``size`` bytes of ``path`` over a loopback TCP pair.

    Returns the seconds from the first byte sent to the last byte written;
    connection set-up and preallocating the destination are not timed. The
    received file is removed unless ``keep`` names where to put it (for
    checking the copy). ``sockbuf`` sets SO_SNDBUF/SO_RCVBUF on both ends
    (as p2pcast.transport does); None leaves the kernel's autotuning.
    """
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setblocking(False)
    dest = keep or os.path.join(scratch_dir(), f"p2pcast-bench-{os.getpid()}.recv")
    out_fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    in_fd = os.open(path, os.O_RDONLY)
    sockets = [listener, client]
    try:
        # Like the daemon: the downstream connects and receives, the upstream
        # accepts and sends.
        (server, _), _ = await asyncio.gather(
            loop.sock_accept(listener), loop.sock_connect(client, listener.getsockname())
        )
        sockets.append(server)
        for sock in (server, client):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if sockbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockbuf)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sockbuf)
        # The daemon's store preallocates its image file the same way; on tmpfs
        # allocating pages during the writes would cost a third of the time.
        os.posix_fallocate(out_fd, 0, size)
        start = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_send(loop, server, in_fd, size))
            tasks.create_task(_receive(loop, client, out_fd, size))
        return time.perf_counter() - start
    finally:
        for sock in sockets:
            sock.close()
        os.close(in_fd)
        os.close(out_fd)
        if keep is None:
            os.unlink(dest)


async def _send(loop: asyncio.AbstractEventLoop, sock: socket.socket, fd: int, size: int) -> None:
    offset = 0
    while offset < size:
        try:
            sent = os.sendfile(sock.fileno(), fd, offset, size - offset)
        except BlockingIOError:
            await _writable(loop, sock)
            continue
        if sent == 0:
            raise EOFError(f"source file ends at {offset} of {size} bytes")
        offset += sent


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


async def _receive(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, fd: int, size: int
) -> None:
    view = memoryview(bytearray(RECV_BUFFER))
    offset = 0
    while offset < size:
        want = min(RECV_BUFFER, size - offset)
        filled = 0
        while filled < want:
            got = await loop.sock_recv_into(sock, view[filled:want])
            if got == 0:
                raise ConnectionError(f"peer closed at {offset + filled} of {size} bytes")
            filled += got
        chunk_digest(view[:want])
        os.pwrite(fd, view[:want], offset)
        offset += want
