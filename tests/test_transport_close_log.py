"""Every link closed for a reason leaves a log line, rate-limited per listener;
a reason that is the peer's fault is a ProtocolError."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import pytest

from p2pcast import transport
from p2pcast.auth import NoAuth, SecretAuth
from p2pcast.errors import P2PCastError, PeerError, ProtocolError
from p2pcast.protocol import Auth, Chunk, Event, PeerConnection, Role, encode_frame
from p2pcast.transport import CLOSE_LOG_SUMMARY, CloseLog, PeerLink, tune_socket
from tests.helpers_node import TEST_SECRET, run_on
from tests.test_protocol_support import nonce

LOGGER = "p2pcast.test.closelog"
IMAGE = bytes(range(16))


class Handler:
    def link_event(self, link: PeerLink, event: Event, body: memoryview | None) -> None:
        pass

    def link_closed(self, link: PeerLink, error: P2PCastError | None) -> None:
        pass

    def chunk_length(self, image_id: bytes, index: int) -> int | None:
        return None


def test_burst_then_a_count_flushed_when_the_window_ends(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> CloseLog:
        close_log = CloseLog(logging.getLogger(LOGGER), burst=3, window=0.2)
        for i in range(10):
            close_log.log(logging.WARNING, "closing link %d", i)
        assert close_log.suppressed == 7
        await asyncio.sleep(0.4)  # the window ends: the count is logged without new events
        close_log.log(logging.WARNING, "closing link %d", 10)  # a new window
        close_log.flush()
        return close_log

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        close_log = asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["closing link 0", "closing link 1", "closing link 2"]
    assert lines[3].startswith(f"7 {CLOSE_LOG_SUMMARY}")
    assert lines[4:] == ["closing link 10"]  # nothing suppressed: flush() adds nothing
    assert close_log.suppressed == 0


async def _accepted_link(close_log: CloseLog) -> tuple[PeerLink, socket.socket]:
    ours, theirs = socket.socketpair()
    tune_socket(ours)
    link = PeerLink(
        ours,
        Role.UPSTREAM,
        "n1",
        Handler(),
        auth=SecretAuth(TEST_SECRET),
        address="peer:1",
        close_log=close_log,
    )
    link.start()
    return link, theirs


def test_accepted_links_log_why_they_closed(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        close_log = CloseLog(logging.getLogger("p2pcast.transport"))
        # Closed by the peer before it authenticated: no error, but a reason.
        link, theirs = await _accepted_link(close_log)
        theirs.close()
        await asyncio.wait_for(link.lost.wait(), 5)
        # Silent until the handshake timeout (shortened here through ready()).
        link, theirs = await _accepted_link(close_log)
        with pytest.raises(P2PCastError):
            await link.ready(0.05)
        theirs.close()
        # Closed by us (the daemon stopping): our decision, nothing to report.
        link, theirs = await _accepted_link(close_log)
        await link.close()
        theirs.close()

    with caplog.at_level(logging.WARNING, logger="p2pcast.transport"):
        asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "closing link to peer:1: it closed before authenticating",
        "closing link to peer:1: no handshake from peer:1 within 0.05 s",
    ]


class Recorder(Handler):
    def __init__(self) -> None:
        self.errors: list[P2PCastError | None] = []

    def link_closed(self, link: PeerLink, error: P2PCastError | None) -> None:
        self.errors.append(error)


def _downstream_link(handler: Handler, *, zero_copy: bool) -> tuple[PeerLink, socket.socket]:
    """A started downstream link over a socketpair, and the upstream's end of it."""
    ours, theirs = socket.socketpair()
    tune_socket(ours)
    theirs.setblocking(False)
    link = PeerLink(ours, Role.DOWNSTREAM, "n1", handler, auth=NoAuth(), zero_copy=zero_copy)
    link.start()
    return link, theirs


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_eof_mid_body_is_the_peers_protocol_error(loop: str) -> None:
    """Regression: an upstream that closed in the middle of a chunk body made
    the zero-copy reader call receive_data(b"") twice, a LocalProtocolError
    (our bug): the liar was not banned, and a daemon reconnected to it in a
    tight loop (130,000 times in 2 minutes in tests/test_daemon_fuzz.py)."""

    async def main() -> list[P2PCastError | None]:
        handler = Recorder()
        link, theirs = _downstream_link(handler, zero_copy=True)
        try:
            # A header announcing 1000 bytes, 10 of them, then EOF.
            await _upstream_sending(theirs, link, bytes(10), 0, 1)
            theirs.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(link.lost.wait(), 5)
        finally:
            link.abort(None)
            theirs.close()
        return handler.errors

    errors = run_on(loop, main())
    assert len(errors) == 1 and isinstance(errors[0], ProtocolError), errors
    assert "closed mid-frame (990 body bytes due)" in str(errors[0])


async def _upstream_sending(
    theirs: socket.socket, link: PeerLink, body: bytes, pace: float, pieces: int
) -> None:
    """Authenticate as an upstream, then send a 1000-byte chunk's header and BODY in
    PIECES pieces PACE seconds apart (then nothing more)."""
    loop = asyncio.get_running_loop()
    upstream = PeerConnection(Role.UPSTREAM, "n2", nonce=nonce(5))
    hello_and_auth = upstream.hello() + encode_frame(Auth("none", b"").encode_fields())
    await loop.sock_sendall(theirs, hello_and_auth)
    await asyncio.wait_for(link.ready(5), 5)
    link.send(link.conn.subscribe(IMAGE) + link.conn.request(IMAGE, 0))
    await loop.sock_sendall(theirs, encode_frame(Chunk(IMAGE, 0, 1000).encode_fields()))
    step = -(-len(body) // pieces)
    for start in range(0, len(body), step):
        await loop.sock_sendall(theirs, body[start : start + step])
        await asyncio.sleep(pace)


class BodyRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def link_event(self, link: PeerLink, event: Event, body: memoryview | None) -> None:
        if body is not None:  # a whole body, on either path
            self.bodies.append(bytes(body))


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "plain"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_body_that_stops_arriving_closes_the_link(
    loop: str, zero_copy: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream that sends 10 bytes of a 1000-byte body and then nothing, without
    closing, loses the link after the stall timeout: a PeerError (the peer may be
    stopped, not lying, so it is not banned), logged with the reason."""
    monkeypatch.setattr(transport, "BODY_STALL_TIMEOUT", 0.2)

    async def main() -> tuple[list[P2PCastError | None], float]:
        handler = Recorder()
        link, theirs = _downstream_link(handler, zero_copy=zero_copy)
        try:
            await _upstream_sending(theirs, link, bytes(10), 0, 1)
            t0 = time.monotonic()
            await asyncio.wait_for(link.lost.wait(), 5)
            return handler.errors, time.monotonic() - t0
        finally:
            link.abort(None)
            theirs.close()

    with caplog.at_level(logging.WARNING, logger="p2pcast.transport"):
        errors, waited = run_on(loop, main())
    assert len(errors) == 1 and type(errors[0]) is PeerError, errors
    assert "n2 stalled mid-chunk: nothing for 0.2 s with 990 body bytes due" in str(errors[0])
    assert waited <= 1.0  # within two checks (0.4 s) and some scheduling
    assert any("stalled mid-chunk" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "plain"])
def test_a_slow_body_that_keeps_arriving_is_not_cut(
    zero_copy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body trickling in (10 pieces 0.1 s apart, 1 s in all) outlives a 0.3 s stall
    timeout: only a body that stops is a stall."""
    monkeypatch.setattr(transport, "BODY_STALL_TIMEOUT", 0.3)
    body = os.urandom(1000)

    async def main() -> tuple[BodyRecorder, bool, list[P2PCastError | None]]:
        handler = BodyRecorder()
        link, theirs = _downstream_link(handler, zero_copy=zero_copy)
        try:
            await _upstream_sending(theirs, link, body, 0.1, 10)
            await asyncio.sleep(0.1)
            return handler, link.closed, list(handler.errors)
        finally:
            link.abort(None)
            theirs.close()

    handler, closed, errors = run_on("uvloop", main())
    assert not closed and errors == []
    assert b"".join(handler.bodies) == body


def test_tcp_links_probe_a_silent_peer() -> None:
    """Every TCP link asks the kernel for keep-alive probes (transport.KEEPALIVE), so
    a peer whose host vanished without a FIN or RST is found in ~90 s, not 2 h."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        for sock in (client, accepted):
            tune_socket(sock)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            got = tuple(
                sock.getsockopt(socket.IPPROTO_TCP, option)
                for option in (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)
            )
            assert got == transport.KEEPALIVE
            sock.close()
    finally:
        server.close()
