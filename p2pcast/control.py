"""The daemon's local control API: msgpack frames on a UNIX socket.

A client sends one request ``[REQUEST, {"op": ..., ...}]``; the daemon answers
with zero or more ``[PROGRESS, {...}]`` frames and then exactly one
``[RESULT, {...}]`` or ``[ERROR, {"error": message, "kind": class name}]``.
The frames are the wire protocol's framing with control-sized limits.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from p2pcast import errors, limits
from p2pcast.errors import DaemonUnavailable, P2PCastError, ProtocolError
from p2pcast.protocol import FrameDecoder, encode_frame

REQUEST = 1
PROGRESS = 2
RESULT = 3
ERROR = 4

#: How often a starting daemon's control socket is tried (s): it opens within
#: a fraction of a second.
READY_POLL = 0.05

#: Default path of the control socket of a system daemon.
DEFAULT_SOCKET = "/run/p2pcast/control.sock"

#: msgpack bounds for control frames: maps of options and lists of images.
_DECODER_BOUNDS = {
    "max_header": limits.MAX_CONTROL_FRAME,
    "max_str": 64 * 1024,
    "max_bin": 1024,
    "max_array": 4096,
    "max_map": 64,
    "max_depth": 6,
}


def decoder() -> FrameDecoder:
    return FrameDecoder(**_DECODER_BOUNDS)


def frame(kind: int, body: dict[str, Any]) -> bytes:
    return encode_frame([kind, body], max_header=limits.MAX_CONTROL_FRAME)


def parse(header: list[object]) -> tuple[int, dict[str, Any]]:
    if len(header) != 2 or header[0] not in (REQUEST, PROGRESS, RESULT, ERROR):
        raise ProtocolError("control frame is not [kind, {...}]")
    body = header[1]
    if not isinstance(body, dict):
        raise ProtocolError("control frame body is not a map")
    kind = header[0]
    assert isinstance(kind, int)
    return kind, body


def error_body(exc: P2PCastError) -> dict[str, Any]:
    return {"error": str(exc), "kind": type(exc).__name__}


def raise_error(body: dict[str, Any]) -> None:
    """Re-raise a daemon-side error as the same class of the error tree."""
    cls = getattr(errors, str(body.get("kind")), None)
    if not (isinstance(cls, type) and issubclass(cls, P2PCastError)):
        cls = P2PCastError
    raise cls(str(body.get("error", "daemon error")))


async def call(path: str, op: str, **args: Any) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """Send one request; yield (kind, body) frames until RESULT (raises on ERROR)."""
    if not os.path.exists(path):
        raise DaemonUnavailable(f"no p2pcast daemon: {path} does not exist")
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise DaemonUnavailable(f"no p2pcast daemon answers on {path}: {exc.strerror}") from exc
    try:
        writer.write(frame(REQUEST, {"op": op, **args}))
        await writer.drain()
        dec = decoder()
        while True:
            data = await reader.read(65536)
            if not data:
                raise DaemonUnavailable("the daemon closed the control connection")
            dec.feed(data)
            while (header := dec.next_header()) is not None:
                kind, body = parse(header)
                if kind == ERROR:
                    raise_error(body)
                yield kind, body
                if kind == RESULT:
                    return
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def request(path: str, op: str, **args: Any) -> dict[str, Any]:
    """One request, ignoring progress; returns the RESULT body."""
    async for kind, body in call(path, op, **args):
        if kind == RESULT:
            return body
    raise DaemonUnavailable("no result from the daemon")


async def wait_ready(
    path: str, poll: Callable[[], int | None], log: Path, deadline: float, name: str = "daemon"
) -> None:
    """Wait until a daemon we just started answers `ping` on PATH, until DEADLINE
    (time.monotonic()); if it exits first (POLL, its Popen.poll, says so), raise
    with the tail of its LOG."""
    while True:
        if poll() is not None:
            try:
                tail = log.read_text()[-2000:]
            except OSError as exc:
                tail = f"(no log {log}: {exc.strerror})"
            raise DaemonUnavailable(f"{name} exited: {tail}")
        try:
            await request(path, "ping")
            return
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(READY_POLL)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a UNIX socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[4:8], "little")
