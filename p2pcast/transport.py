"""The thin asyncio layer under the protocol: raw sockets, sendfile, recv_into.

Each peer link is one TCP connection driven by two tasks: a reader that feeds
the sans-IO :class:`PeerConnection` and receives chunk bodies straight into a
preallocated buffer with ``sock_recv_into``, and a writer that sends queued
frames and chunk bodies. Bodies go out with ``os.sendfile`` from the cache
file on the raw non-blocking socket (waiting for writability with
``add_writer``), because uvloop has no ``loop.sendfile``; the plain
``pread`` + ``sock_sendall`` fallback is selected with ``zero_copy=False``
and tested too. Nothing here goes through an asyncio transport's buffers, so
the two paths never mix writes on one socket.

The handshake is authenticated (p2pcast.protocol.auth): the reader makes our
proof when the peer's Hello arrives and checks the peer's when its Auth does
(munge calls in a worker thread), reading nothing more meanwhile. A link is
``ready``, and its handler hears of it, only once the peer is authenticated.

A link closed for a reason (bad bytes, a failed or timed-out handshake, a
socket error, a peer gone before authenticating) logs the reason at WARNING;
accepted links do so through their listener's :class:`CloseLog`, which turns
a flood of them into a count.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import ipaddress
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable
from typing import Protocol

from p2pcast.auth import Authenticator
from p2pcast.errors import (
    AuthUnavailable,
    HandshakeError,
    P2PCastError,
    PeerError,
    ProtocolError,
    StoreError,
)
from p2pcast.protocol import (
    NEED_DATA,
    AuthReceived,
    ChunkBodyData,
    ChunkBodyEnded,
    ChunkHeaderReceived,
    Event,
    FileSlice,
    GoodbyeCode,
    HelloReceived,
    PeerClosed,
    PeerConnection,
    Role,
    clean_reason,
)
from p2pcast.protocol.auth import NONCE_SIZE

log = logging.getLogger(__name__)

#: Linux's TCP_NOTSENT_LOWAT (socket module has no name for it on 3.11).
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)

#: Bytes asked of the kernel per read while parsing headers: several small
#: frames at once, without holding a large buffer per idle link.
READ_SIZE = 64 * 1024

#: An accepted connection must complete the handshake within this time (s);
#: a silent client would otherwise hold a link and two tasks for ever.
HANDSHAKE_TIMEOUT = 10.0

#: A chunk body that has started must keep arriving: a peer that sent part of
#: one and then nothing for this long (s) holds a link and a 1-16 MiB buffer
#: for a chunk the swarm has meanwhile asked elsewhere, so the link is closed
#: (not banned: a stopped process or a long network fault looks the same, and
#: the peer may come back). Far above any chunk time on a working link (1 MiB
#: takes 0.17 s at 50 Mbit/s) and above the 5 s outages the cluster benchmark
#: puts links through; an idle link between chunks is not timed.
BODY_STALL_TIMEOUT = 30.0

#: TCP keep-alive on every link: (idle s, probe interval s, probes). A link
#: may be idle for long (a finished node keeps serving), and the protocol has
#: no keep-alive of its own; without these a peer whose host lost power or its
#: network leaves a link that looks open for ever (Linux's default waits 2 h
#: before the first probe). With them it is closed after about 90 s of
#: silence (60 + 3 x 10), as a lost link, and the peer is tried again.
KEEPALIVE = (60, 10, 3)

#: Socket buffer size asked for on each link (None: the kernel's autotuning).
#: Fixed 4 MiB buffers hold about one chunk in flight per direction. Measured
#: here with 8 daemons on 2 cores (256 MiB, 7 links each): autotuning cost
#: ~1.3 s of kernel time per daemon and 4.6 s to the last node; fixed 1-8 MiB
#: buffers 0.4-0.75 s and 3.4-4.1 s. A single raw pair in one process is the
#: one case where autotuning did better (bench/bench_link_raw.py).
SOCKET_BUFFER: int | None = 4 * 1024 * 1024

#: Unsent bytes a link may queue in the kernel beyond what is in flight
#: (TCP_NOTSENT_LOWAT). Without it a whole 4 MiB chunk fits in the socket
#: buffer, ``sendfile`` returns at once, and the upstream believes it is idle
#: while the chunk still trickles out: it then accepts more downstreams than
#: its serve slots and splits its uplink among them (measured: 16 nodes at
#: 100 Mbit/s ran at 70 % of the link rate). 512 KiB is ~40 ms at 100 Mbit/s
#: and a few wakeups per chunk.
NOTSENT_LOWAT = 512 * 1024

#: A link whose socket still holds more than this many bytes (sent but not
#: acknowledged, or not sent) is still serving a chunk.
SERVING_SLACK = 64 * 1024

#: ioctl asking a TCP socket how many bytes its send queue holds (SIOCOUTQ,
#: the same number as TIOCOUTQ; not in Python's ``termios`` on every build).
SIOCOUTQ = 0x5411

#: Why an accepted link was closed is logged one line per link, but anyone who
#: can reach the port can open connections by the thousand: past this many
#: lines per CLOSE_LOG_WINDOW a listener only counts them and sums them up in
#: one line, so a flood of bad connections cannot bury the log or fill a disk.
CLOSE_LOG_BURST = 50

#: Seconds of one rate-limiting window of close reasons (see CLOSE_LOG_BURST).
CLOSE_LOG_WINDOW = 10.0

#: The start of the line that sums up close reasons not logged one by one.
CLOSE_LOG_SUMMARY = "more links closed for a reason"


class CloseLog:
    """Rate-limited log of why links were closed: a burst, then a count.

    Up to ``burst`` lines per ``window`` seconds go to the log as they come;
    the rest are counted, and the count is logged (at WARNING, as
    ``"<n> more links closed for a reason ..."``) when the window ends, or at
    ``flush()``. Every reason thus shows up, one by one or in a sum.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = CLOSE_LOG_BURST,
        window: float = CLOSE_LOG_WINDOW,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self._window_start = -window
        self._logged = 0
        #: reasons counted but not logged yet
        self.suppressed = 0
        self._flush_timer: asyncio.TimerHandle | None = None

    def log(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self.window:
            self.flush()
            self._window_start, self._logged = now, 0
        if self._logged < self.burst:
            self._logged += 1
            self.logger.log(level, msg, *args)
            return
        self.suppressed += 1
        if self._flush_timer is None:
            # The sum must not wait for the next bad connection, which may never come.
            delay = self._window_start + self.window - now
            self._flush_timer = asyncio.get_running_loop().call_later(delay, self.flush)

    def flush(self) -> None:
        """Log the count of reasons not logged one by one (if any)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self.suppressed:
            self.logger.warning(
                "%d %s in the last %g s, not logged one by one (at most %d lines a window)",
                self.suppressed,
                CLOSE_LOG_SUMMARY,
                self.window,
                self.burst,
            )
            self.suppressed = 0


#: A chunk waiting on a link: image id, index, and a callable giving its bytes
#: when its turn comes (None: it left the cache meanwhile).
QueuedChunk = tuple[bytes, int, Callable[[], FileSlice | None]]


class LinkHandler(Protocol):
    """What a link reports to (the node service)."""

    def link_event(self, link: PeerLink, event: Event, body: memoryview | None) -> None: ...

    def link_closed(self, link: PeerLink, error: P2PCastError | None) -> None: ...

    def chunk_length(self, image_id: bytes, index: int) -> int | None:
        """The stored size the manifest gives this chunk (None: unknown here)."""
        ...


def tune_socket(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
        except OSError:
            pass  # an old kernel: the send-queue check in PeerLink.serving still holds
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = KEEPALIVE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    if SOCKET_BUFFER is None:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass  # capped by net.core.*mem_max; the kernel's autotuning still works


def upstream_address(sock: socket.socket, role: Role) -> str:
    """The upstream end of a TCP link, as both ends see it ("ip:port").

    The upstream's own address of an accepted socket is the one the
    downstream dialed (no NAT on a cluster's high-speed network); binding it
    into the proofs makes a proof useless on a connection to anyone else.
    "" for a non-IP socket (a socketpair in tests).
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return ""
    try:
        addr = sock.getsockname() if role is Role.UPSTREAM else sock.getpeername()
    except OSError:
        return ""
    ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 peers this way
    return f"[{ip}]:{addr[1]}" if ip.version == 6 else f"{ip}:{addr[1]}"


class PeerLink:
    """One TCP connection to a peer daemon, in one role."""

    def __init__(
        self,
        sock: socket.socket,
        role: Role,
        node: str,
        handler: LinkHandler,
        *,
        auth: Authenticator,
        zero_copy: bool = True,
        address: str = "",
        close_log: CloseLog | None = None,
    ) -> None:
        """``close_log``: where an accepted link logs why it was closed (the
        listener's, rate-limited); None logs every reason (the links we open:
        as many as the peers we chose, so they cannot flood the log)."""
        self.sock = sock
        self.fd = sock.fileno()
        self.role = role
        self.auth = auth
        self.conn = PeerConnection(
            role,
            node,
            nonce=secrets.token_bytes(NONCE_SIZE),
            upstream=upstream_address(sock, role),
        )
        #: the peer's Hello, handed to the handler once the peer is authenticated
        self._peer_hello: HelloReceived | None = None
        #: why the peer closed the link during the handshake (its Goodbye)
        self._refused: str | None = None
        self.handler = handler
        self.zero_copy = zero_copy
        self.address = address
        self.peer_node: str | None = None
        self.hello = asyncio.get_running_loop().create_future()
        self.closed = False
        #: the peer proved who it is (its Auth checked out)
        self.authenticated = False
        #: close() was called: our decision, not the peer's fault, nothing to report
        self._closing = False
        self.close_log = close_log
        #: Small frames (Have, Reject, Bitfield, Request...) go out before any
        #: chunk still queued: news of a chunk stuck behind one or two chunk
        #: bodies reached the very downstreams we serve up to a second late
        #: (1 MiB chunks, a third of a 100 Mbit/s uplink each), and a "busy"
        #: answer as late. Frames never cut into a chunk: one writer task
        #: sends a chunk's header and body back to back.
        self.control: collections.deque[bytes] = collections.deque()
        #: chunks to send, in order; a Goodbye queued by close() comes last
        self.chunks: collections.deque[
            bytes | tuple[bytes, int, Callable[[], FileSlice | None]]
        ] = collections.deque()
        self.wake = asyncio.Event()
        #: the writer is sending something it took off a queue
        self.writing = False
        self.body_buffer = bytearray()
        self.collected = bytearray()
        self.tasks: list[asyncio.Task[None]] = []
        self.chunks_sent = 0
        #: chunks queued or being sent on this link (the upstream's load)
        self.chunks_pending = 0
        #: set when the link closes, for whoever keeps it up
        self.lost = asyncio.Event()
        #: images whose Bitfield we sent on this link (Have may follow only then)
        self.bitfield_sent: set[bytes] = set()
        #: bytes received so far, and their count when the stall check last ran
        self.rx_bytes = 0
        self._rx_checked = 0
        self._stall_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<PeerLink {self.role.name.lower()} {self.peer_node or self.address}>"

    # ---- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self.control.append(self.conn.hello())
        self.tasks = [
            asyncio.create_task(self._read_loop(), name=f"read {self.address}"),
            asyncio.create_task(self._write_loop(), name=f"write {self.address}"),
        ]
        self.wake.set()
        self._stall_timer = asyncio.get_running_loop().call_later(
            BODY_STALL_TIMEOUT, self._check_stall
        )

    def _check_stall(self) -> None:
        """Close the link if a chunk body is half received and nothing came
        since the last check (one timer per link, every BODY_STALL_TIMEOUT)."""
        if self.closed:
            return
        if self.conn.body_remaining and self.rx_bytes == self._rx_checked:
            who = self.peer_node or self.address
            error = PeerError(
                f"{who} stalled mid-chunk: nothing for {BODY_STALL_TIMEOUT:g} s "
                f"with {self.conn.body_remaining} body bytes due"
            )
            # Only links we opened receive bodies, and those are not logged by
            # _report_close (the node says "link lost" at info): a stall is worth more.
            self._log(logging.WARNING, "closing link to %s: %s", who, error)
            self.abort(error)
            return
        self._rx_checked = self.rx_bytes
        self._stall_timer = asyncio.get_running_loop().call_later(
            BODY_STALL_TIMEOUT, self._check_stall
        )

    async def ready(self, timeout: float) -> None:
        """Wait for the peer's Hello."""
        try:
            await asyncio.wait_for(asyncio.shield(self.hello), timeout)
        except TimeoutError as exc:
            self.abort(PeerError(f"no handshake from {self.address} within {timeout:g} s"))
            raise PeerError(f"no handshake from {self.address} within {timeout:g} s") from exc

    def abort(self, error: P2PCastError | None) -> None:
        """Close now; tell the handler once."""
        if self.closed:
            return
        self.closed = True
        self.lost.set()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        if not self.hello.done():
            self.hello.set_exception(error or PeerError("link closed before handshake"))
            self.hello.exception()  # mark retrieved: the waiter may be gone
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        # Unregister the fd from the event loop before closing it. The tasks'
        # own cleanup (remove_writer in _writable) only runs at their next
        # step, after the close; by then the number may belong to a new file
        # or socket, and libuv aborts the whole daemon (SIGABRT, no message)
        # when epoll_ctl fails on it. Seen killing every survivor of a
        # cluster benchmark run in which one daemon was SIGKILLed.
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.fd)
        loop.remove_writer(self.fd)
        try:
            self.sock.close()
        except OSError:
            pass
        self._report_close(error)
        self.handler.link_closed(self, error)

    def _report_close(self, error: P2PCastError | None) -> None:
        """Log why the link closed, unless it closed cleanly or on our own
        decision. Each hostile connection leaves one reason (or a count of it)."""
        # The node name of an unproven Hello is only the peer's claim: the
        # address is what finds the host that sent the bytes.
        who = self.peer_node if self.authenticated else None
        if who is None:
            who = f"{self.peer_node} ({self.address})" if self.peer_node else self.address
        if isinstance(error, HandshakeError):
            self._log(logging.WARNING, "refusing %s: %s", who, error)
        elif isinstance(error, ProtocolError):
            self._log(logging.WARNING, "closing link to %s: %s", who, error)
        elif isinstance(error, AuthUnavailable):
            self._log(logging.WARNING, "link to %s: cannot authenticate: %s", who, error)
        elif self.role is Role.DOWNSTREAM:
            return  # the node logs a lost link to a peer it chose (Broadcast.link_lost)
        elif error is not None:
            self._log(logging.WARNING, "closing link to %s: %s", who, error)
        elif not self.authenticated and not self._closing:
            self._log(logging.WARNING, "closing link to %s: it closed before authenticating", who)

    def _log(self, level: int, msg: str, *args: object) -> None:
        if self.close_log is not None:
            self.close_log.log(level, msg, *args)
        else:
            log.log(level, msg, *args)

    async def close(self, code: int = GoodbyeCode.NORMAL, reason: str = "") -> None:
        """Say goodbye, flush what is queued (briefly), then close."""
        if self.closed:
            return
        self._closing = True
        try:
            self.chunks.append(self.conn.goodbye(code, clean_reason(reason)))
            self.wake.set()
            deadline = asyncio.get_running_loop().time() + 1.0
            while (self.control or self.chunks or self.writing) and (
                asyncio.get_running_loop().time() < deadline
            ):
                await asyncio.sleep(0.01)
        except P2PCastError:
            pass
        self.abort(None)

    # ---- sending ------------------------------------------------------------

    @property
    def serving(self) -> bool:
        """True while a chunk is queued, being sent, or still in the socket."""
        if self.chunks_pending:
            return True
        if self.closed:
            return False
        try:
            queued = fcntl.ioctl(self.fd, SIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return False
        return int.from_bytes(queued, sys.byteorder, signed=True) > SERVING_SLACK

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.control.append(data)
            self.wake.set()

    def send_chunk(self, image_id: bytes, index: int, body: Callable[[], FileSlice | None]) -> None:
        """Queue a chunk; ``body`` is called when its turn comes (None: send a Reject)."""
        if not self.closed:
            self.chunks.append((image_id, index, body))
            self.chunks_pending += 1
            self.wake.set()

    def unqueue_chunk(self, image_id: bytes, index: int) -> bool:
        for item in self.chunks:
            if isinstance(item, tuple) and item[0] == image_id and item[1] == index:
                self.chunks.remove(item)
                self.chunks_pending -= 1
                return True
        return False

    async def _write_loop(self) -> None:
        try:
            while True:
                while not (self.control or self.chunks):
                    self.wake.clear()
                    await self.wake.wait()
                self.writing = True  # close() waits for what is taken off the queues
                await self._write_next()
                self.writing = False
        except asyncio.CancelledError:
            raise
        except P2PCastError as exc:
            self.abort(exc)
        except OSError as exc:
            self.abort(PeerError(f"sending to {self.peer_node or self.address}: {exc}"))

    async def _write_next(self) -> None:
        """Send every queued small frame (coalesced), else the next chunk."""
        loop = asyncio.get_running_loop()
        if self.control:
            small = list(self.control)
            self.control.clear()
            await loop.sock_sendall(self.sock, b"".join(small))
            return
        entry = self.chunks.popleft()
        if isinstance(entry, bytes):  # the Goodbye, after every chunk
            await loop.sock_sendall(self.sock, entry)
            return
        image_id, index, body = entry
        piece = body()
        if piece is None:  # the image left the cache since the request
            await loop.sock_sendall(self.sock, self.conn.reject(image_id, index, "no longer here"))
            self.chunks_pending -= 1
            return
        header, _ = self.conn.send_chunk(image_id, index, piece)
        assert isinstance(header, bytes)
        await loop.sock_sendall(self.sock, header)
        if self.zero_copy:
            await self._sendfile(piece)
        else:
            await loop.sock_sendall(self.sock, _read_slice(piece))
        self.chunks_sent += 1
        self.chunks_pending -= 1

    async def _sendfile(self, piece: FileSlice) -> None:
        offset, remaining = piece.offset, piece.length
        while remaining:
            try:
                sent = os.sendfile(self.fd, piece.fd, offset, remaining)
            except BlockingIOError:
                await self._writable()
                continue
            if sent == 0:
                raise StoreError("cache file ended before the chunk did")
            offset += sent
            remaining -= sent

    async def _writable(self) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        loop.add_writer(self.fd, wake)
        try:
            await waiter
        finally:
            if not self.closed:  # abort() unregistered it; the number may be reused now
                loop.remove_writer(self.fd)

    # ---- receiving ----------------------------------------------------------

    def _buffer(self, length: int) -> memoryview:
        if len(self.body_buffer) < length:
            self.body_buffer = bytearray(length)
        return memoryview(self.body_buffer)[:length]

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        error: P2PCastError | None = None
        try:
            while True:
                data = await loop.sock_recv(self.sock, READ_SIZE)
                self.rx_bytes += len(data)
                self.conn.receive_data(data)
                if await self._drain_events(loop) or not data:
                    break
            if self._refused is not None:
                error = PeerError(self._refused)
        except asyncio.CancelledError:
            raise
        except ProtocolError as exc:
            # Logged (rate-limited) by abort(), with every other reason to close.
            code = (
                GoodbyeCode.HANDSHAKE_FAILED
                if isinstance(exc, HandshakeError)
                else GoodbyeCode.PROTOCOL_ERROR
            )
            try:
                await loop.sock_sendall(self.sock, self.conn.goodbye(code, clean_reason(str(exc))))
            except (OSError, P2PCastError):
                pass
            error = exc
        except P2PCastError as exc:
            error = exc
        except OSError as exc:
            error = PeerError(f"link to {self.peer_node or self.address}: {exc}")
        self.abort(error)

    async def _call_auth(self, func: Callable[..., bytes | None], *args: object) -> bytes | None:
        """An authenticator call; munge's talk to munged, so off the event loop."""
        if self.auth.blocking:
            return await asyncio.to_thread(func, *args)
        return func(*args)

    async def _handshake_event(self, event: HelloReceived | AuthReceived) -> None:
        if isinstance(event, HelloReceived):
            self.peer_node = event.node
            self._peer_hello = event
            proof = await self._call_auth(self.auth.prove, self.conn.our_transcript())
            self.send(self.conn.auth(self.auth.method, proof or b""))
            return
        await self._call_auth(
            self.auth.verify, event.method, self.conn.peer_transcript(), event.proof
        )
        self.conn.accept_peer()
        self.authenticated = True
        log.debug("%s (%s) authenticated (%s)", self.peer_node, self.address, event.method)
        if not self.hello.done():
            self.hello.set_result(None)
        assert self._peer_hello is not None  # the connection takes Auth only after Hello
        self.handler.link_event(self, self._peer_hello, None)

    def _length_ok(self, event: ChunkHeaderReceived) -> bool:
        """A body is only received if its length is the manifest's: a peer must
        not make us allocate or read more than the chunk it owes us."""
        expected = self.handler.chunk_length(event.image_id, event.index)
        return expected is None or expected == event.length

    async def _drain_events(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Hand every complete event to the handler; True once the peer closed."""
        pending_body: memoryview | None = None
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                return False
            if isinstance(event, HelloReceived | AuthReceived):
                await self._handshake_event(event)
                continue
            if isinstance(event, ChunkHeaderReceived) and not self._length_ok(event):
                raise ProtocolError(
                    f"chunk {event.index} announced with {event.length} bytes, "
                    f"the manifest says {self.handler.chunk_length(event.image_id, event.index)}"
                )
            elif isinstance(event, ChunkHeaderReceived) and self.zero_copy:
                pending_body = self._buffer(event.length)
                got = self.conn.readinto_body(pending_body)
                while got < event.length:
                    n = await loop.sock_recv_into(self.sock, pending_body[got:])
                    if n == 0:
                        # EOF mid-body is the peer's fault: the connection
                        # raises ProtocolError for it at its next event (a
                        # second receive_data(b"") would be LocalProtocolError,
                        # our bug, and the peer would not be banned for it).
                        self.conn.receive_data(b"")
                        self.conn.next_event()
                        raise ProtocolError("connection closed mid-body")  # not reached
                    self.conn.body_received(n)
                    self.rx_bytes += n
                    got += n
                continue
            elif isinstance(event, ChunkHeaderReceived):
                self.collected = bytearray()  # the plain path: bodies arrive as events
                continue
            elif isinstance(event, ChunkBodyData):
                self.collected += event.data
                continue
            elif isinstance(event, ChunkBodyEnded):
                body = pending_body if pending_body is not None else memoryview(self.collected)
                pending_body = None
                self.handler.link_event(self, event, body)
                continue
            elif isinstance(event, PeerClosed):
                if not self.hello.done() and event.code is not None:
                    self._refused = (
                        f"{self.peer_node or self.address} refused the handshake: {event.reason}"
                    )
                return True
            self.handler.link_event(self, event, None)


def _read_slice(piece: FileSlice) -> bytes:
    data = os.pread(piece.fd, piece.length, piece.offset)
    if len(data) != piece.length:
        raise StoreError("cache file ended before the chunk did")
    return data


async def connect(
    host: str,
    port: int,
    node: str,
    handler: LinkHandler,
    *,
    auth: Authenticator,
    timeout: float,
    zero_copy: bool = True,
) -> PeerLink:
    """Open a downstream link to a peer and complete the (authenticated) handshake."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    tune_socket(sock)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise PeerError(f"cannot connect to {host}:{port}: {exc or 'timed out'}") from exc
    except BaseException:
        # Cancelled (the daemon or the broadcast stopping): the socket is ours
        # alone, and left open it stays so until garbage collection (an fd
        # leak; ResourceWarning under uvloop, found by bench/leak_check.py).
        sock.close()
        raise
    link = PeerLink(
        sock,
        Role.DOWNSTREAM,
        node,
        handler,
        auth=auth,
        zero_copy=zero_copy,
        address=f"{host}:{port}",
    )
    link.start()
    try:
        await link.ready(timeout)
    except BaseException:
        # Cancelled mid-handshake: nobody else knows this link, so close it here.
        link.abort(None)
        raise
    return link


class Listener:
    """Accepts upstream links (peers that want chunks from us)."""

    def __init__(
        self,
        host: str,
        port: int,
        node: str,
        handler: LinkHandler,
        *,
        auth: Authenticator,
        zero_copy: bool = True,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise PeerError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        self.sock.listen(512)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.node = node
        self.handler = handler
        self.zero_copy = zero_copy
        self.auth = auth
        self.task: asyncio.Task[None] | None = None
        #: why accepted links were closed, rate-limited: anyone may connect
        self.close_log = CloseLog(log)

    def start(self) -> None:
        self.task = asyncio.create_task(self._accept_loop(), name="accept")

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(self.sock)
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            tune_socket(sock)
            link = PeerLink(
                sock,
                Role.UPSTREAM,
                self.node,
                self.handler,
                auth=self.auth,
                zero_copy=self.zero_copy,
                address=f"{addr[0]}:{addr[1]}",
                close_log=self.close_log,
            )
            link.start()
            link.tasks.append(asyncio.create_task(self._handshake_watch(link)))

    @staticmethod
    async def _handshake_watch(link: PeerLink) -> None:
        try:
            await link.ready(HANDSHAKE_TIMEOUT)
        except PeerError:
            pass  # ready() closed the link

    def close(self) -> None:
        if self.task:
            self.task.cancel()
        self.sock.close()
        self.close_log.flush()  # the count of reasons not logged yet
