"""Hostile bytes against a live daemon while it serves a broadcast (issue 6, point 3).

Three real ``p2pcast daemon`` processes (``--auth secret``) broadcast an image;
meanwhile an attacker opens CONNECTIONS connections to the first one, a
bounded number at a time, and sends one hostile frame (or a hostile byte
stream) on each: oversized and zero length prefixes, bad msgpack, unknown
message types, wrong field counts, lying Chunk lengths, messages in the wrong
direction or order, early EOF mid-frame, byte-at-a-time senders, and a few
that stall in the handshake until the daemon's handshake timeout. Some of it
comes before authentication (garbage instead of Hello or Auth, wrong proofs)
and some after a valid handshake: the attacker holds the cluster's secret and
completes the handshake with the project's own protocol code.

Asserted: the broadcast completes on the other two daemons with the right
sha256; the attacked daemon's RSS stays within RSS_GROWTH_LIMIT of its
baseline; the daemon closed every hostile connection (the attacker saw EOF,
a reset or a Goodbye) and logged a reason for each (one line each, or counted
in the rate-limited summary lines); no daemon logged a traceback.

The listener is the daemon's upstream side, where a Chunk is refused at its
header. Chunk bodies arrive on its downstream side, on links it opens to
peers of its hostlist; the second test therefore puts lying upstreams (hosts
with the secret, claiming every chunk) in the daemons' hostlist, each telling
one lie about a chunk's length: each link is closed with a logged reason, the
liar is never asked again, and the broadcast completes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import re
import secrets
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from p2pcast import control, limits
from p2pcast import transport as transport_mod
from p2pcast.auth import load_secret
from p2pcast.demo import DemoCluster, broadcast, make_image
from p2pcast.errors import ProtocolError
from p2pcast.manifest import Manifest
from p2pcast.names import ImageRef
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.protocol import (
    NEED_DATA,
    AuthReceived,
    ChunkRequested,
    HelloReceived,
    PeerClosed,
    PeerConnection,
    Role,
    Subscribed,
    messages,
    pack_bits,
)
from p2pcast.protocol.auth import NONCE_SIZE, SECRET, check_secret_proof, secret_proof
from p2pcast.protocol.frames import FrameDecoder
from p2pcast.publish import push

MiB = 1 << 20

#: The fuzz generator's seed: a failure replays exactly.
SEED = 6_03

#: Hostile connections (each carries at least one hostile frame): the issue
#: asks for 10,000 frames.
CONNECTIONS = 10_000

#: Hostile connections open at once (besides the stallers): enough to overlap
#: handshakes and closes in the daemon, few enough for a 2-core machine that
#: also runs the broadcast.
CONCURRENCY = 16

#: Connections that stall in the handshake until the daemon gives up on them
#: (transport.HANDSHAKE_TIMEOUT, 10 s, no option shortens it): they run beside
#: the others, so they cost no extra wall time.
STALLERS = 8

#: Gap between the bytes of a byte-at-a-time sender: long enough that each
#: byte arrives in its own segment, short enough to keep the test fast.
SLOW_GAP = 0.001

#: Bytes of a payload sent one at a time; the rest follows in one write.
SLOW_MAX_BYTES = 48

#: Time the daemon has to close a hostile connection once the attacker has
#: said its piece: it closes at the first bad frame, so this is only a bound
#: on a loaded 2-core machine.
CLOSE_TIMEOUT = 15.0

#: A staller is closed after the handshake timeout; the margin is for load.
STALL_CLOSE_TIMEOUT = transport_mod.HANDSHAKE_TIMEOUT + 15.0

#: Bytes the daemon may send a hostile connection (Hello, Auth, Goodbye): it
#: must not be made to send anything of size.
MAX_REPLY_BYTES = 4096

#: Size of the broadcast image: enough that the broadcast overlaps the attack
#: for a while, small enough for a fast test.
IMAGE_SIZE = 64 * MiB

#: Allowed RSS growth of the attacked daemon over its idle baseline. It holds
#: at most CONCURRENCY + STALLERS hostile links, each with at most one
#: READ_SIZE (64 KiB) read and a header under MAX_HEADER_BYTES (~36 KiB)
#: buffered, ~3 MiB in all, plus the broadcast's chunk buffers and zstd
#: contexts (a few MiB). A leak of ~6 KiB per hostile connection would
#: exceed it after 10,000 connections.
RSS_GROWTH_LIMIT = 64 * MiB

#: Seconds between RSS samples of the attacked daemon.
RSS_SAMPLE_PERIOD = 0.25

#: Close reasons the attacked daemon may log beyond one per hostile
#: connection: links of the legitimate broadcast that fail for real.
LEGIT_REASON_SLACK = 10

#: A close reason line of the transport (refusing, closing, cannot authenticate).
REASON_LINE = re.compile(r" WARNING (refusing |closing link to |link to .*: cannot authenticate)")
SUMMARY_LINE = re.compile(rf" WARNING (\d+) {transport_mod.CLOSE_LOG_SUMMARY}")

_PREFIX = struct.Struct(">I")
IMAGE = ImageRef("img")


# ---- what the attacker sends --------------------------------------------------


@dataclasses.dataclass
class Context:
    """What a payload may depend on: the attacker's connection state and the
    daemon's Hello (read before anything is sent)."""

    conn: PeerConnection
    daemon_hello: HelloReceived
    secret: bytes
    image_id: bytes


Payload = Callable[[Context], bytes]


@dataclasses.dataclass(frozen=True)
class Attack:
    """One hostile connection.

    ``stage``: 0 sends the payload right after connecting (instead of Hello),
    1 after a valid Hello (instead of Auth), 2 after a complete, authenticated
    handshake. ``delivery``: "fast" (one write), "slow" (a byte at a time),
    "eof" (part of the payload, then EOF), "stall" (part, then silence).
    """

    kind: str
    stage: int
    delivery: str
    payload: Payload
    #: for "eof" and "stall": the fraction of the payload sent before it
    cut: float = 1.0


def frame(*fields: object) -> bytes:
    header: bytes = msgpack.packb(list(fields), use_bin_type=True)
    return _PREFIX.pack(len(header)) + header


def raw_frame(header: bytes) -> bytes:
    return _PREFIX.pack(len(header)) + header


def const(data: bytes) -> Payload:
    return lambda _ctx: data


def _oversized(rng: random.Random) -> Payload:
    size = rng.choice(
        [limits.MAX_HEADER_BYTES + 1, rng.randint(limits.MAX_HEADER_BYTES + 1, 2**32 - 1)]
    )
    # Mostly only the claim; sometimes the bytes too (the daemon must not wait for them).
    body = rng.randbytes(limits.MAX_HEADER_BYTES + 1) if rng.random() < 0.02 else b""
    return const(_PREFIX.pack(size) + body + rng.randbytes(rng.randint(0, 32)))


def _zero_length(rng: random.Random) -> Payload:
    return const(b"\0\0\0\0" + rng.randbytes(rng.randint(0, 32)))


def _bad_msgpack(rng: random.Random) -> Payload:
    choice = rng.randrange(3)
    if choice == 0:  # 0xc1 is never used by msgpack
        size = rng.choice([rng.randint(0, 64), rng.randint(0, 30_000)])
        return const(raw_frame(b"\xc1" + rng.randbytes(size)))
    if choice == 1:  # a valid header cut short inside its own length
        whole = msgpack.packb([5, rng.randbytes(16), rng.randint(0, 1000)], use_bin_type=True)
        return const(raw_frame(whole[: rng.randint(1, len(whole) - 1)]))
    # a str that is not UTF-8
    return const(raw_frame(b"\x92\x01\xa2\xff\xfe"))


def _not_a_message(rng: random.Random) -> Payload:
    value = rng.choice(
        [{"a": 1}, "hello", 42, None, [], [1.5], ["1"], [True], [[1]], [1, [2]], [1, {"k": 1}]]
    )
    return const(raw_frame(msgpack.packb(value, use_bin_type=True)))


def _unknown_type(rng: random.Random) -> Payload:
    kind = 1
    while kind in messages.MESSAGE_TYPES:
        kind = rng.randint(-(2**40), 2**40) if rng.random() < 0.3 else rng.randint(0, 300)
    fields: list[object] = rng.choice([[], [b"x" * 16], [1, 2, 3]])
    return const(frame(kind, *fields))


def _wrong_fields(rng: random.Random) -> Payload:
    kind = rng.choice(sorted(messages.MESSAGE_TYPES))
    arity = len(messages.MESSAGE_TYPES[kind].FIELDS)
    count = rng.choice([n for n in range(0, 7) if n != arity])
    junk: list[object] = [rng.choice([b"\0" * 16, "x", -1, 2**40, b"", True]) for _ in range(count)]
    return const(frame(kind, *junk))


def _lying_chunk(rng: random.Random) -> Payload:
    # A Chunk header announcing more or fewer body bytes than follow, or a
    # length beyond MAX_CHUNK_BODY. The attacked daemon is an upstream, which
    # never receives a Chunk: it must close at the header, whatever follows.
    announced = rng.choice([0, 1, 4096, limits.MAX_CHUNK_BODY, limits.MAX_CHUNK_BODY + 1, 2**32])
    sent = rng.choice([0, max(0, min(announced, 4096) - 1), min(announced, 4096) + 1])

    def payload(ctx: Context) -> bytes:
        return frame(6, ctx.image_id, rng.randint(0, 10), announced) + bytes(sent)

    return payload


def _wrong_direction(rng: random.Random) -> Payload:
    # Well-formed messages only an upstream sends; the daemon is the upstream here.
    kind = rng.randrange(4)

    def payload(ctx: Context) -> bytes:
        if kind == 0:
            return frame(4, ctx.image_id, 0)  # Have
        if kind == 1:
            return frame(3, ctx.image_id, 8, b"\xff")  # Bitfield
        if kind == 2:
            return frame(7, ctx.image_id, 0, "no")  # Reject
        return frame(6, ctx.image_id, 0, 65536) + bytes(65536)  # Chunk, body and all

    return payload


def _out_of_order(rng: random.Random) -> Payload:
    kind = rng.randrange(6)

    def payload(ctx: Context) -> bytes:
        hello = frame(1, messages.PROTOCOL_NAME, messages.PROTOCOL_VERSION, "x", bytes(NONCE_SIZE))
        if kind == 0:
            return hello  # a second Hello (before Auth: stage 1; or after it)
        if kind == 1:
            return frame(11, SECRET, bytes(32))  # Auth again, or Auth before Hello
        if kind == 2:
            return frame(5, ctx.image_id, 0)  # Request, not subscribed
        if kind == 3:
            return frame(8, ctx.image_id, 0)  # Cancel, not subscribed
        if kind == 4:
            return frame(9, ctx.image_id)  # Done, not subscribed
        return frame(2, ctx.image_id) * 2  # the same Subscribe twice

    return payload


def _bad_hello(rng: random.Random) -> Payload:
    kind = rng.randrange(5)

    def payload(ctx: Context) -> bytes:
        version, proto = messages.PROTOCOL_VERSION, messages.PROTOCOL_NAME
        if kind == 0:
            return frame(1, "notp2p", version, "x", bytes(NONCE_SIZE))
        if kind == 1:
            return frame(1, proto, rng.choice([0, 1, version + 1, 65535]), "x", bytes(NONCE_SIZE))
        if kind == 2:
            return frame(1, proto, version, "x", bytes(rng.choice([0, 1, NONCE_SIZE + 1])))
        if kind == 3:
            return frame(1, proto, version, "x" * (limits.MAX_NODE_NAME + 1), bytes(NONCE_SIZE))
        # the daemon's own Hello sent back: a reflection
        return frame(1, proto, version, ctx.daemon_hello.node, ctx.daemon_hello.nonce)

    return payload


def _bad_auth(rng: random.Random) -> Payload:
    kind = rng.randrange(5)

    def payload(ctx: Context) -> bytes:
        if kind == 0:  # a random MAC
            return frame(11, SECRET, rng.randbytes(32))
        if kind == 1:  # a MAC of the wrong size
            return frame(11, SECRET, rng.randbytes(rng.choice([0, 31, 33, limits.MAX_AUTH_BYTES])))
        if kind == 2:  # another method
            return frame(11, rng.choice(["none", "munge", "x"]), b"")
        if kind == 3:  # the right secret, but the proof of a relayed connection
            text = ctx.conn.our_transcript().replace(b"127.0.0.2", b"127.0.0.9")
            return frame(11, SECRET, secret_proof(ctx.secret, text))
        return frame(11, SECRET, secret_proof(b"not the cluster's secret" * 2, b"x"))

    return payload


def _garbage(rng: random.Random) -> Payload:
    # Random bytes instead of a frame. The first is never 0, so the length they
    # start with is always over the limit: a claim under it would leave the
    # daemon rightly waiting for the rest after the handshake (as would fewer
    # than the 4 bytes of a length).
    return const(bytes([rng.randint(1, 255)]) + rng.randbytes(rng.randint(3, 255)))


#: Payload makers by the stages they are hostile in.
MAKERS: list[tuple[Callable[[random.Random], Payload], tuple[int, ...]]] = [
    (_oversized, (0, 1, 2)),
    (_zero_length, (0, 1, 2)),
    (_bad_msgpack, (0, 1, 2)),
    (_not_a_message, (0, 1, 2)),
    (_unknown_type, (0, 1, 2)),
    (_wrong_fields, (0, 1, 2)),
    (_lying_chunk, (0, 1, 2)),
    (_wrong_direction, (0, 1, 2)),
    (_out_of_order, (1, 2)),
    (_bad_hello, (0,)),
    (_bad_auth, (1,)),
    (_garbage, (0, 1, 2)),
]


def attacks(rng: random.Random, count: int) -> list[Attack]:
    out = []
    for _ in range(count):
        maker, stages = rng.choice(MAKERS)
        stage = rng.choice(stages)
        delivery = rng.choices(["fast", "slow", "eof"], weights=[85, 5, 10])[0]
        cut = rng.uniform(0.0, 0.99)
        out.append(Attack(maker.__name__.strip("_"), stage, delivery, maker(rng), cut))
    return out


def stallers(rng: random.Random, count: int) -> list[Attack]:
    hello = frame(1, messages.PROTOCOL_NAME, messages.PROTOCOL_VERSION, "s", bytes(NONCE_SIZE))
    out = []
    for i in range(count):
        if i % 2:  # a valid Hello, then the Auth never comes whole
            out.append(Attack("stall-auth", 1, "stall", _bad_auth(rng), 0.5))
        else:  # part of a Hello, then nothing
            out.append(Attack("stall-hello", 0, "stall", const(hello), rng.uniform(0.0, 0.9)))
    return out


# ---- the attacker ---------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    kind: str
    #: "goodbye", "eof" or "reset": the daemon closed; "open": it did not
    closed_by: str
    reply_bytes: int


async def attack_one(
    host: str, port: int, attack: Attack, secret: bytes, image_id: bytes, name: str
) -> Outcome:
    reader, writer = await asyncio.open_connection(host, port)
    received = bytearray()
    conn = PeerConnection(
        Role.DOWNSTREAM, name, nonce=secrets.token_bytes(NONCE_SIZE), upstream=f"{host}:{port}"
    )
    try:
        # The daemon says Hello first, without waiting for ours.
        hello = None
        while hello is None:
            data = await asyncio.wait_for(reader.read(65536), CLOSE_TIMEOUT)
            assert data, "the daemon closed before its Hello"
            received += data
            conn.receive_data(data)
            event = conn.next_event()
            if isinstance(event, HelloReceived):
                hello = event
        if attack.stage >= 1:
            writer.write(conn.hello())
        if attack.stage >= 2:
            proof = secret_proof(secret, conn.our_transcript())
            writer.write(conn.auth(SECRET, proof))
        payload = attack.payload(Context(conn, hello, secret, image_id))
        await deliver(writer, attack, payload)
        timeout = STALL_CLOSE_TIMEOUT if attack.delivery == "stall" else CLOSE_TIMEOUT
        closed_by = await read_to_eof(reader, received, timeout)
    except (ConnectionResetError, BrokenPipeError):
        closed_by = "reset"  # the daemon closed while we were still sending
    finally:
        writer.close()
    if closed_by == "eof" and saw_goodbye(received):
        closed_by = "goodbye"
    return Outcome(attack.kind, closed_by, len(received))


async def deliver(writer: asyncio.StreamWriter, attack: Attack, payload: bytes) -> None:
    if attack.delivery == "fast":
        writer.write(payload)
        await writer.drain()
    elif attack.delivery == "slow":
        for i in range(min(len(payload), SLOW_MAX_BYTES)):
            writer.write(payload[i : i + 1])
            await writer.drain()
            await asyncio.sleep(SLOW_GAP)
        writer.write(payload[SLOW_MAX_BYTES:])
        await writer.drain()
    else:  # eof, stall: part of it
        # An EOF at a frame boundary after the handshake would be a clean
        # close, not an attack: there at least one byte of the payload goes.
        part = max(int(len(payload) * attack.cut), 1 if attack.stage == 2 else 0)
        writer.write(payload[:part])
        await writer.drain()
        if attack.delivery == "eof":
            writer.write_eof()


async def read_to_eof(reader: asyncio.StreamReader, received: bytearray, timeout: float) -> str:
    try:
        async with asyncio.timeout(timeout):
            while data := await reader.read(65536):
                received += data
    except TimeoutError:
        return "open"
    return "eof"


def saw_goodbye(received: bytes | bytearray) -> bool:
    decoder = FrameDecoder()
    decoder.feed(bytes(received))
    try:
        while (header := decoder.next_header()) is not None:
            if header[0] == messages.Goodbye.TYPE:
                return True
    except Exception:
        return False  # the stream ended mid-frame (the daemon reset the link)
    return False


class Attacker:
    """Runs the attacks with bounded concurrency; reports progress."""

    def __init__(self, host: str, port: int, secret: bytes, image_id: bytes) -> None:
        self.host, self.port, self.secret, self.image_id = host, port, secret, image_id
        self.outcomes: list[Outcome] = []
        self.done = 0

    async def run(self, plan: list[Attack], concurrency: int) -> None:
        queue: asyncio.Queue[tuple[int, Attack]] = asyncio.Queue()
        for item in enumerate(plan):
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                number, attack = queue.get_nowait()
                outcome = await attack_one(
                    self.host, self.port, attack, self.secret, self.image_id, f"evil{number}"
                )
                self.outcomes.append(outcome)
                self.done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))


# ---- the test ---------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def sha256_of(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def close_reasons(log: str) -> int:
    """Reasons logged one by one plus those counted in summary lines."""
    one_by_one = sum(1 for line in log.splitlines() if REASON_LINE.search(line))
    summed = sum(int(m.group(1)) for m in SUMMARY_LINE.finditer(log))
    return one_by_one + summed


class _Bar:
    def update(self, done: int, total: int) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Published:
    origin: Path
    manifest: Manifest
    sha256: str


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    work = tmp_path_factory.mktemp("fuzz")
    image = work / "image.tar"
    make_image(image, IMAGE_SIZE)
    origin = work / "origin"

    async def publish() -> Manifest:
        async with DirectoryOrigin(str(origin)) as o:
            return (await push(str(image), o, IMAGE)).manifest

    manifest = asyncio.run(publish())
    want = sha256_of(image)
    image.unlink()  # the caches hold the copies
    return Published(origin, manifest, want)


@pytest.mark.slow
def test_daemon_survives_hostile_bytes_while_serving(tmp_path: Path, published: Published) -> None:
    origin, image_id, want = published.origin, published.manifest.image_id, published.sha256
    cluster = DemoCluster(tmp_path / "cluster", 3, origin, "uvloop", True)
    try:
        cluster.start()
        asyncio.run(cluster.wait_ready())
        target = cluster.names[0]
        pid = cluster.procs[target].pid
        secret = load_secret(cluster.secret_file)
        rng = random.Random(SEED)
        plan = attacks(rng, CONNECTIONS)
        stall_plan = stallers(rng, STALLERS)
        baseline = rss_bytes(pid)
        attacker = Attacker(cluster.hosts[target], cluster.port, secret, image_id)
        samples: list[int] = []
        #: hostile connections done when the broadcast started and ended
        overlap: list[int] = []
        started = time.monotonic()

        async def sample_rss(stop: asyncio.Event) -> None:
            while not stop.is_set():
                samples.append(rss_bytes(pid))
                await asyncio.sleep(RSS_SAMPLE_PERIOD)

        async def broadcast_mid_attack() -> dict[str, dict[str, object]]:
            # The broadcast starts once the attack is in full swing.
            while attacker.done < CONNECTIONS // 10:
                await asyncio.sleep(0.05)
            overlap.append(attacker.done)
            results = await broadcast(cluster, IMAGE, cluster.names, _Bar())  # type: ignore[arg-type]
            overlap.append(attacker.done)
            return results

        async def go() -> dict[str, dict[str, object]]:
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_rss(stop))
            stalls = asyncio.create_task(attacker.run(stall_plan, STALLERS))
            results, _ = await asyncio.gather(
                broadcast_mid_attack(), attacker.run(plan, CONCURRENCY)
            )
            await stalls
            stop.set()
            await sampler
            return results

        results = asyncio.run(go())
        attack_time = time.monotonic() - started
        after = rss_bytes(pid)
        assert cluster.procs[target].poll() is None, "the attacked daemon died"
    finally:
        cluster.stop()  # SIGTERM: the daemons flush their logs' rate-limited counts

    # The broadcast went through the attack, and the attacked daemon served it.
    for name in cluster.names:
        assert results[name]["state"] == "complete", (name, results[name])
        assert sha256_of(str(results[name]["path"])) == want, name
    assert overlap[0] < CONNECTIONS, "the broadcast started only after the attack"
    assert sum(int(str(results[name]["from_peers"])) for name in cluster.names[1:]) > 0

    # Memory stayed bounded.
    peak = max([*samples, after])
    assert peak - baseline < RSS_GROWTH_LIMIT, (
        f"RSS grew from {baseline / MiB:.1f} MiB to {peak / MiB:.1f} MiB (after: {after / MiB:.1f})"
    )

    # Every hostile connection was closed by the daemon, having been sent little.
    outcomes = attacker.outcomes
    total = CONNECTIONS + STALLERS
    assert len(outcomes) == total
    still_open = [o.kind for o in outcomes if o.closed_by == "open"]
    assert not still_open, Counter(still_open)
    assert max(o.reply_bytes for o in outcomes) <= MAX_REPLY_BYTES

    # ... and logged why, each one (rate-limited: counted in summaries).
    logs = {
        name: (cluster.work / "nodes" / name / "daemon.log").read_text() for name in cluster.names
    }
    reasons = close_reasons(logs[target])
    assert total <= reasons <= total + LEGIT_REASON_SLACK, (reasons, logs[target][-3000:])
    assert SUMMARY_LINE.search(logs[target]), "10,000 bad links must be rate-limited"
    one_by_one = sum(1 for line in logs[target].splitlines() if REASON_LINE.search(line))
    assert one_by_one < total // 10, "the log is flooded"

    # Untrusted bytes raised only p2pcast's errors: nothing escaped as a traceback.
    for name, text in logs.items():
        assert "Traceback" not in text, (name, text[text.index("Traceback") - 500 :][:3000])
        assert "never retrieved" not in text, name

    print(
        f"\n{total} hostile connections in {attack_time:.1f} s;"
        f" closed by {dict(Counter(o.closed_by for o in outcomes))};"
        f" kinds {dict(Counter(o.kind for o in outcomes))};"
        f" RSS {baseline / MiB:.1f} -> peak {peak / MiB:.1f} -> {after / MiB:.1f} MiB;"
        f" {reasons} reasons logged ({one_by_one} one by one);"
        f" the broadcast ran from connection {overlap[0]} to {overlap[1]};"
        f" from peers {[results[n]['from_peers'] for n in cluster.names]}"
    )


# ---- lying upstreams ----------------------------------------------------------------

#: How each lying upstream answers a Request: Chunk headers announcing more or
#: fewer bytes than the manifest's, more than any chunk may have, or the right
#: number and then fewer body bytes than announced (EOF mid-body), or more
#: (a corrupt body and garbage after it).
LIES = ("longer", "shorter", "zero", "beyond-limit", "eof-mid-body", "bytes-after-body")

#: Loopback addresses of the lying upstreams (the daemons are on 127.0.0.2-4).
LIAR_HOST_BASE = 10


class LyingUpstream:
    """A host that holds the cluster's secret, claims every chunk, and lies.

    The attacked daemons connect to it as to any peer in their hostlist: this
    is the only way to reach their downstream side, where Chunk bodies arrive.
    """

    def __init__(
        self, name: str, host: str, port: int, secret: bytes, manifest: Manifest, lie: str
    ):
        self.name, self.host, self.port, self.secret = name, host, port, secret
        self.manifest, self.lie = manifest, lie
        self.image_id = manifest.image_id
        #: links on which we lied, and of those, the ones the daemon closed
        self.lied = 0
        self.closed_by_daemon = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, self.host, self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def lie_about(self, index: int) -> bytes:
        size = self.manifest.chunk(index).stored_size
        head = {
            "longer": size + 1,
            "shorter": size - 1,
            "zero": 0,
            "beyond-limit": limits.MAX_CHUNK_BODY + 1,
        }.get(self.lie, size)
        body = bytes(min(head, size + 1))
        if self.lie == "eof-mid-body":
            body = body[: size // 2]
        elif self.lie == "bytes-after-body":
            body += b"\xff" * 16
        return frame(6, self.image_id, index, head) + body

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = PeerConnection(
            Role.UPSTREAM,
            self.name,
            nonce=secrets.token_bytes(NONCE_SIZE),
            upstream=f"{self.host}:{self.port}",
        )
        writer.write(conn.hello())
        lied = False
        try:
            while data := await asyncio.wait_for(reader.read(65536), CLOSE_TIMEOUT):
                conn.receive_data(data)
                while (event := conn.next_event()) is not NEED_DATA:
                    if isinstance(event, HelloReceived):
                        proof = secret_proof(self.secret, conn.our_transcript())
                        writer.write(conn.auth(SECRET, proof))
                    elif isinstance(event, AuthReceived):
                        check_secret_proof(self.secret, conn.peer_transcript(), event.proof)
                        conn.accept_peer()
                    elif isinstance(event, Subscribed):
                        count = self.manifest.chunk_count
                        writer.write(
                            conn.bitfield(self.image_id, count, pack_bits(count, range(count)))
                        )
                    elif isinstance(event, ChunkRequested) and not lied:
                        writer.write(self.lie_about(event.index))
                        lied = True
                        self.lied += 1
                        if self.lie == "eof-mid-body":
                            writer.write_eof()
                    elif isinstance(event, PeerClosed):
                        break
                await writer.drain()
            closed = True  # the daemon's Goodbye or EOF ended the loop
        except (ConnectionError, ProtocolError):
            closed = True  # a reset, or the stream cut short by the close
        except TimeoutError:
            closed = False
        finally:
            writer.close()
        if lied and closed:
            self.closed_by_daemon += 1


@pytest.mark.slow
def test_lying_upstreams_are_dropped_and_logged(tmp_path: Path, published: Published) -> None:
    """Daemons whose hostlist includes hosts that hold the secret and lie in
    every Chunk they send: each lie closes the link, with a logged reason, and
    the broadcast completes from the honest daemons."""
    cluster = DemoCluster(tmp_path / "cluster", 3, published.origin, "uvloop", True)
    liar_names = [f"n{i}" for i in range(4, 4 + len(LIES))]
    liar_hosts = {name: f"127.0.0.{LIAR_HOST_BASE + i}" for i, name in enumerate(liar_names)}
    try:
        cluster.start()
        asyncio.run(cluster.wait_ready())
        secret = load_secret(cluster.secret_file)
        liars = [
            LyingUpstream(name, liar_hosts[name], cluster.port, secret, published.manifest, lie)
            for name, lie in zip(liar_names, LIES, strict=True)
        ]

        async def fetch(name: str) -> dict[str, object]:
            result: dict[str, object] = {}
            async for kind, body in control.call(
                cluster.control(name),
                "fetch",
                image=str(IMAGE),
                peers=f"n[1-{3 + len(LIES)}]",
                node=name,
                addresses={**cluster.hosts, **liar_hosts},
                job="liars",
            ):
                if kind == control.RESULT:
                    result = body
            return result

        async def go() -> list[dict[str, object]]:
            for liar in liars:
                await liar.start()
            try:
                return list(await asyncio.gather(*(fetch(name) for name in cluster.names)))
            finally:
                for liar in liars:
                    await liar.stop()

        results = asyncio.run(go())
    finally:
        cluster.stop()

    for name, result in zip(cluster.names, results, strict=True):
        assert result["state"] == "complete", (name, result)
        assert sha256_of(str(result["path"])) == published.sha256, name
    lied = sum(liar.lied for liar in liars)
    assert lied > 0, "no daemon asked a liar for a chunk"
    assert sum(liar.closed_by_daemon for liar in liars) == lied
    logs = {
        name: (cluster.work / "nodes" / name / "daemon.log").read_text() for name in cluster.names
    }
    reasons = sum(
        1
        for text in logs.values()
        for line in text.splitlines()
        if re.search(rf"(closing link to|banning) ({'|'.join(liar_names)})\b", line)
    )
    assert reasons >= lied, "\n".join(logs.values())[-3000:]
    for name, text in logs.items():
        assert "Traceback" not in text, (name, text[text.index("Traceback") - 500 :][:3000])
    print(f"\n{lied} lies told ({[liar.lied for liar in liars]}), {reasons} reasons logged")
