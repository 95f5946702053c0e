"""Peer authentication: the pure checks, the credential sources, and real links.

Unauthenticated and forged peers (no Auth, the wrong secret, a replayed or
reflected handshake, a munge credential of the wrong uid or payload) are
refused with a logged reason while a legitimate broadcast completes beside
them. The munge tests use a real munged with a private key and socket in a
temporary directory (skipped only when munge is not installed, never in CI).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from p2pcast import auth, control
from p2pcast.auth import (
    LibMunge,
    MungeAuth,
    MungeCredential,
    NoAuth,
    SecretAuth,
    choose,
    load_secret,
    write_secret_file,
)
from p2pcast.errors import AuthenticationError, ConfigError, HandshakeError, PeerError
from p2pcast.protocol import (
    PROTOCOL_VERSION,
    Auth,
    AuthReceived,
    FrameDecoder,
    GoodbyeCode,
    Hello,
    PeerConnection,
    Role,
    Subscribe,
    encode_frame,
)
from p2pcast.protocol import auth as pure
from p2pcast.transport import connect
from tests.helpers_node import (
    HOST,
    STEP_TIMEOUT,
    TEST_SECRET,
    Published,
    cluster_auth,
    publish,
    running,
    sha256_of,
)
from tests.test_protocol_support import ConnectionPair, drain, nonce

MUNGED = shutil.which("munged") or "/usr/sbin/munged"
MUNGE = shutil.which("munge") or "/usr/bin/munge"
#: munged answers on its socket in well under a second; this bounds a bad start.
MUNGED_START_TIMEOUT = 10.0
NOBODY = 65534


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    return publish(tmp_path_factory.mktemp("auth"), members=6)


# ---- the pure part ----------------------------------------------------------------


def _handshaken() -> ConnectionPair:
    pair = ConnectionPair(handshake=False)
    pair.send(pair.down, pair.down.hello())
    pair.send(pair.up, pair.up.hello())
    return pair


def test_each_side_proves_what_the_other_checks() -> None:
    pair = _handshaken()
    assert pair.down.our_transcript() == pair.up.peer_transcript()
    assert pair.up.our_transcript() == pair.down.peer_transcript()
    # The two directions differ: a proof cannot be sent back where it came from.
    assert pair.down.our_transcript() != pair.up.our_transcript()


def test_shared_secret_proofs() -> None:
    good, wrong = SecretAuth(TEST_SECRET), SecretAuth(b"another cluster's secret, 32 bytes+")
    pair = _handshaken()
    proof = good.prove(pair.down.our_transcript())
    good.verify("secret", pair.up.peer_transcript(), proof)
    with pytest.raises(AuthenticationError, match="does not hold this cluster's secret"):
        wrong.verify("secret", pair.up.peer_transcript(), proof)
    # Replayed on another connection: the verifier's nonce differs.
    again = ConnectionPair(handshake=False)
    again.up = PeerConnection(Role.UPSTREAM, "up-node", nonce=nonce(12))
    again.send(again.down, again.down.hello())
    again.send(again.up, again.up.hello())
    with pytest.raises(AuthenticationError):
        good.verify("secret", again.up.peer_transcript(), proof)
    # Reflected: the downstream's own proof handed back to it.
    with pytest.raises(AuthenticationError):
        good.verify("secret", pair.down.peer_transcript(), proof)
    with pytest.raises(AuthenticationError, match="requires 'secret'"):
        good.verify("none", pair.up.peer_transcript(), b"")
    with pytest.raises(AuthenticationError, match="32"):
        good.verify("secret", pair.up.peer_transcript(), proof[:-1])


def test_the_upstream_address_is_bound_into_the_proof() -> None:
    """A host that relays a handshake to a third daemon gets a proof for its own
    address, which the third daemon (seeing its own address) refuses."""
    down = PeerConnection(Role.DOWNSTREAM, "a", nonce=nonce(1), upstream="10.0.0.9:7086")
    up = PeerConnection(Role.UPSTREAM, "b", nonce=nonce(2), upstream="10.0.0.2:7086")
    down.receive_data(up.hello())
    up.receive_data(down.hello())
    drain(down)
    drain(up)
    secret = SecretAuth(TEST_SECRET)
    with pytest.raises(AuthenticationError):
        secret.verify("secret", up.peer_transcript(), secret.prove(down.our_transcript()))


def test_a_reflected_hello_is_refused() -> None:
    conn = PeerConnection(Role.UPSTREAM, "me", nonce=nonce(7))
    conn.receive_data(
        encode_frame(Hello(version=PROTOCOL_VERSION, node="me", nonce=nonce(7)).encode_fields())
    )
    with pytest.raises(AuthenticationError, match="reflected"):
        drain(conn)


class FakeMunge:
    """munged's behaviour that matters here: a credential names the uid that
    made it, carries its payload, and decodes once."""

    def __init__(self, uid: int = 0) -> None:
        self.uid = uid
        self.issued: dict[bytes, MungeCredential] = {}
        self.spent: set[bytes] = set()

    def encode(self, payload: bytes) -> bytes:
        cred = f"MUNGE:{self.uid}:{len(self.issued)}:".encode()
        self.issued[cred] = MungeCredential(self.uid, 0, payload)
        return cred

    def decode(self, credential: bytes) -> MungeCredential:
        if credential not in self.issued:
            raise AuthenticationError("munge credential refused: Invalid credential")
        if credential in self.spent:
            raise AuthenticationError("munge credential refused: Replayed credential")
        self.spent.add(credential)
        return self.issued[credential]


def test_munge_proofs_with_a_fake_munged() -> None:
    munged = FakeMunge()
    daemon = MungeAuth(munged, uid=0)
    pair = _handshaken()
    proof = daemon.prove(pair.down.our_transcript())
    daemon.verify("munge", pair.up.peer_transcript(), proof)
    with pytest.raises(AuthenticationError, match="Replayed"):
        daemon.verify("munge", pair.up.peer_transcript(), proof)
    # A user's process on a node can get a credential too, but of its own uid.
    user = MungeAuth(FakeMunge(uid=1000), uid=1000)
    forged = user.prove(pair.down.our_transcript())
    munged.issued.update(user.client.issued)  # type: ignore[attr-defined]
    with pytest.raises(AuthenticationError, match="uid 1000, not 0"):
        daemon.verify("munge", pair.up.peer_transcript(), forged)
    # A daemon's credential for another handshake.
    other = daemon.prove(b"another transcript")
    with pytest.raises(AuthenticationError, match="another handshake"):
        daemon.verify("munge", pair.up.peer_transcript(), other)
    with pytest.raises(AuthenticationError, match="requires 'munge'"):
        daemon.verify("secret", pair.up.peer_transcript(), proof)


def test_none_accepts_anyone_and_proves_nothing() -> None:
    none = NoAuth()
    assert none.prove(b"x") == b""
    none.verify("secret", b"x", b"garbage")


# ---- where credentials come from ------------------------------------------------


def test_secret_file_checks(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    with pytest.raises(ConfigError, match="does not exist"):
        load_secret(path)
    write_secret_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(load_secret(path)) == 64
    assert write_secret_file(path) == path and len(load_secret(path)) == 64  # kept
    for mode in (0o640, 0o604, 0o620):
        path.chmod(mode)
        with pytest.raises(ConfigError, match=f"open to group or others .mode {mode:04o}"):
            load_secret(path)
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 32"):
        load_secret(path)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_secret(tmp_path)


def test_choosing_a_mode(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret, sock = str(tmp_path / "secret"), str(tmp_path / "no-munge.sock")
    with pytest.raises(ConfigError, match=r"no way to authenticate peers.*--auth none"):
        choose("auto", secret_file=secret, munge_socket=sock)
    with pytest.raises(ConfigError, match="no munged socket"):
        choose("munge", secret_file=secret, munge_socket=sock)
    with pytest.raises(ConfigError, match="does not exist"):
        choose("secret", secret_file=secret, munge_socket=sock)
    write_secret_file(secret)
    assert isinstance(choose("auto", secret_file=secret, munge_socket=sock), SecretAuth)
    with caplog.at_level(logging.WARNING, logger="p2pcast.auth"):
        assert isinstance(choose("none", secret_file=secret, munge_socket=sock), NoAuth)
    assert "peer authentication is OFF" in caplog.text
    with pytest.raises(ConfigError, match="choose one of"):
        choose("kerberos", secret_file=secret, munge_socket=sock)


# ---- real links: intruders refused while a broadcast completes --------------------

Frames = Callable[[int], Awaitable[list[list[object]]]]
#: An attack writes to a raw connection; ``frames(n)`` waits for n frames from the node.
Attack = Callable[[asyncio.StreamWriter, Frames], Awaitable[None]]


async def intrude(port: int, attack: Attack) -> list[list[object]]:
    """Run ``attack`` on a raw connection to a node; every frame it got until EOF."""
    reader, writer = await asyncio.open_connection(HOST, port)
    decoder = FrameDecoder()
    got: list[list[object]] = []

    async def frames(count: int) -> list[list[object]]:
        """Wait until ``count`` frames (or EOF) have come."""
        while len(got) < count:
            data = await reader.read(65536)
            if not data:
                break
            decoder.feed(data)
            while (header := decoder.next_header()) is not None:
                got.append(header)
        return got

    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            await attack(writer, frames)
            await frames(1 << 30)  # to EOF: the node must close on us
    finally:
        writer.close()
    return got


def _hello(node: str = "intruder", n: int = 99) -> bytes:
    return encode_frame(Hello(version=PROTOCOL_VERSION, node=node, nonce=nonce(n)).encode_fields())


def _goodbye(got: list[list[object]]) -> tuple[object, str]:
    assert got and got[-1][0] == 10, got  # the node said why, then closed
    return got[-1][1], str(got[-1][2])


def _transcript(got: list[list[object]], port: int, n: int = 99) -> bytes:
    """The transcript an intruder named "intruder" must prove to the node."""
    hello = Hello.parse(got[0])
    conn = PeerConnection(Role.DOWNSTREAM, "intruder", nonce=nonce(n), upstream=f"{HOST}:{port}")
    conn.hello()
    conn.receive_data(encode_frame(hello.encode_fields()))
    drain(conn)
    return conn.our_transcript()


async def _no_auth(writer: asyncio.StreamWriter, frames: Frames) -> None:
    writer.write(_hello() + encode_frame(Subscribe(bytes(16)).encode_fields()))


async def _auth_none(writer: asyncio.StreamWriter, frames: Frames) -> None:
    writer.write(_hello() + encode_frame(Auth("none", b"").encode_fields()))


async def _reflect(writer: asyncio.StreamWriter, frames: Frames) -> None:
    """Send the node its own Hello and Auth back."""
    got = await frames(1)
    writer.write(encode_frame(got[0]))


def run_with_intruders(
    tmp_path: Path, published: Published, attacks: list[Attack]
) -> tuple[list[list[list[object]]], list[object]]:
    """A 3-node broadcast, with each attack run against node 0 meanwhile."""

    async def main() -> tuple[list[list[list[object]]], list[object]]:
        async with running(tmp_path, published, 3) as cluster:
            port = cluster.nodes[0].service.port
            intruders = asyncio.gather(*(intrude(port, a) for a in attacks))
            broadcasts = await cluster.broadcast(published)
            seen = await intruders
            states = [b.state for b in broadcasts]
            for node in cluster.nodes:
                path = node.service.cache.image_path(broadcasts[0].image_id)
                assert sha256_of(path) == published.sha256
            assert cluster.nodes[0].service.bad_links >= len(attacks)
            assert not any(
                link.peer_node == "intruder" for link in cluster.nodes[0].service.in_links
            )
            return seen, list(states)

    return asyncio.run(main())


def test_intruders_are_refused_while_a_broadcast_completes(
    tmp_path: Path, published: Published, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="p2pcast.transport"):
        seen, states = run_with_intruders(
            tmp_path,
            published,
            [_no_auth, _auth_none, _reflect, _wrong_secret],
        )
    assert states == ["complete"] * 3
    no_auth, auth_none, reflect, wrong = seen
    assert "expected Auth after Hello, got Subscribe" in _goodbye(no_auth)[1]
    assert _goodbye(auth_none) == (GoodbyeCode.HANDSHAKE_FAILED, _goodbye(auth_none)[1])
    assert "authenticates with 'none'" in _goodbye(auth_none)[1]
    assert "reflected" in _goodbye(reflect)[1]
    assert _goodbye(wrong)[0] == GoodbyeCode.HANDSHAKE_FAILED
    assert "does not hold this cluster's secret" in _goodbye(wrong)[1]
    # Nothing but the node's Hello, its Auth and the Goodbye reached an intruder.
    for frames in seen:
        assert {int(f[0]) for f in frames} <= {1, 11, 10}  # type: ignore[call-overload]
    assert "refusing intruder" in caplog.text
    # An unauthenticated peer's name is only its claim: its address is logged too.
    assert re.search(
        r"closing link to intruder \(127\.0\.0\.1:\d+\): expected Auth after Hello", caplog.text
    )


def writer_port(writer: asyncio.StreamWriter) -> int:
    port: int = writer.get_extra_info("peername")[1]
    return port


async def _wrong_secret(writer: asyncio.StreamWriter, frames: Frames) -> None:
    got = await frames(1)
    wrong = SecretAuth(b"not this cluster's secret at all, 32+")
    proof = wrong.prove(_transcript(got, writer_port(writer)))
    writer.write(_hello() + encode_frame(Auth("secret", proof).encode_fields()))


def test_a_replayed_handshake_is_refused(tmp_path: Path, published: Published) -> None:
    """A recorded, valid Hello + Auth fails on any later connection."""

    async def main() -> tuple[list[list[object]], list[list[object]]]:
        async with running(tmp_path, published, 1) as cluster:
            port = cluster.nodes[0].service.port
            sent: list[bytes] = []

            async def genuine(
                writer: asyncio.StreamWriter,
                frames: Frames,
            ) -> None:
                got = await frames(1)
                proof = SecretAuth(TEST_SECRET).prove(_transcript(got, port))
                sent.append(_hello() + encode_frame(Auth("secret", proof).encode_fields()))
                writer.write(sent[0])
                await frames(2)  # its Auth: we are in
                writer.write(encode_frame([10, 0, "bye"]))

            async def replay(writer: asyncio.StreamWriter, frames: Frames) -> None:
                writer.write(sent[0])

            first = await intrude(port, genuine)
            return first, await intrude(port, replay)

    first, replayed = asyncio.run(main())
    assert [int(f[0]) for f in first[:2]] == [1, 11]  # type: ignore[call-overload]
    assert not any(f[0] == 10 and f[1] == GoodbyeCode.HANDSHAKE_FAILED for f in first)
    code, reason = _goodbye(replayed)
    assert code == GoodbyeCode.HANDSHAKE_FAILED and "secret" in reason


def test_a_daemon_with_the_wrong_secret_cannot_join(tmp_path: Path, published: Published) -> None:
    """Node 2 has another secret: the others refuse it, and finish without it."""

    def auth_of(i: int) -> auth.Authenticator:
        return SecretAuth(b"x" * 32) if i == 2 else cluster_auth()

    async def main() -> None:
        async with running(tmp_path, published, 3, auth=auth_of) as cluster:
            outsider = cluster.nodes[2]
            with pytest.raises(PeerError):
                await connect(
                    HOST,
                    cluster.nodes[0].service.port,
                    outsider.name,
                    outsider.service,
                    auth=outsider.service.auth,
                    timeout=STEP_TIMEOUT,
                )
            peers = cluster.peers[:2]
            from p2pcast.node import Broadcast

            started = [
                Broadcast(n.service, published.manifest_bytes, peers, rank, n.origin)
                for rank, n in enumerate(cluster.nodes[:2])
            ]
            for node, b in zip(cluster.nodes, started, strict=False):
                node.broadcasts.append(b)
            async with asyncio.timeout(STEP_TIMEOUT):
                await asyncio.gather(*(b.run() for b in started))
            assert [b.state for b in started] == ["complete", "complete"]
            assert cluster.nodes[0].service.bad_links >= 1

    asyncio.run(main())


def test_handshake_error_is_the_projects_own() -> None:
    assert issubclass(AuthenticationError, HandshakeError)
    assert issubclass(AuthenticationError, PeerError)


# ---- a real munged -------------------------------------------------------------------


@pytest.fixture(scope="module")
def munged() -> Iterator[str]:
    """A munged with a private key and socket (as tools/slurm.py runs one); its socket."""
    if not os.path.exists(MUNGED):
        if os.environ.get("CI"):
            pytest.fail("munged is not installed (apt-get install munge)")
        pytest.skip("munged is not installed")
    if os.geteuid() != 0:
        pytest.skip("munged runs as root here")
    # Not under pytest's 0700 tmp: a user's munge client must reach the socket.
    work = Path(tempfile.mkdtemp(prefix="p2pcast-munge-"))
    work.chmod(0o755)
    key = work / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1024))
    sock = work / "munge.socket"
    proc = subprocess.Popen(
        [
            MUNGED, "--foreground", f"--socket={sock}", f"--key-file={key}",
            f"--pid-file={work / 'munged.pid'}", f"--log-file={work / 'munged.log'}",
            f"--seed-file={work / 'munged.seed'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + MUNGED_START_TIMEOUT
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"munged did not start: {(work / 'munged.log').read_text()[-2000:]}")
            time.sleep(0.02)
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def test_real_munge_auto_mode_and_credentials(munged: str, tmp_path: Path) -> None:
    chosen = choose("auto", secret_file=str(tmp_path / "none"), munge_socket=munged)
    assert isinstance(chosen, MungeAuth) and chosen.uid == 0
    pair = _handshaken()
    proof = chosen.prove(pair.down.our_transcript())
    assert proof.startswith(b"MUNGE:")
    chosen.verify("munge", pair.up.peer_transcript(), proof)
    with pytest.raises(AuthenticationError, match="Replayed"):
        chosen.verify("munge", pair.up.peer_transcript(), proof)
    with pytest.raises(AuthenticationError, match="another handshake"):
        chosen.verify("munge", pair.up.peer_transcript(), chosen.prove(b"other"))
    with pytest.raises(AuthenticationError, match="not a munge credential"):
        chosen.verify("munge", pair.up.peer_transcript(), b"MUNGE:x\0y:")


def _user_credential(munged: str, payload: bytes) -> bytes:
    """What a local user (nobody) gets from munged for ``payload``: a valid credential
    of their own uid."""
    out = subprocess.run(
        [MUNGE, f"--socket={munged}"],
        input=payload,
        capture_output=True,
        check=True,
        user=NOBODY,
        timeout=STEP_TIMEOUT,
    )
    return out.stdout.strip()


def test_real_munge_broadcast_refuses_a_users_credential(
    munged: str, tmp_path: Path, published: Published, caplog: pytest.LogCaptureFixture
) -> None:
    def munge_auth(i: int) -> auth.Authenticator:
        return MungeAuth(LibMunge(munged, restrict_uid=0), uid=0)

    async def forged_uid(writer: asyncio.StreamWriter, frames: Frames) -> None:
        got = await frames(1)
        text = _transcript(got, writer_port(writer))
        cred = await asyncio.to_thread(_user_credential, munged, text)
        writer.write(_hello() + encode_frame(Auth("munge", cred).encode_fields()))

    async def forged_payload(writer: asyncio.StreamWriter, frames: Frames) -> None:
        await frames(1)
        cred = await asyncio.to_thread(LibMunge(munged).encode, b"a credential for something else")
        writer.write(_hello() + encode_frame(Auth("munge", cred).encode_fields()))

    async def main() -> tuple[list[str], list[list[list[object]]]]:
        async with running(tmp_path, published, 3, auth=munge_auth) as cluster:
            port = cluster.nodes[0].service.port
            intruders = asyncio.gather(intrude(port, forged_uid), intrude(port, forged_payload))
            broadcasts = await cluster.broadcast(published)
            return [b.state for b in broadcasts], list(await intruders)

    with caplog.at_level(logging.WARNING, logger="p2pcast.transport"):
        states, (by_user, other_payload) = asyncio.run(main())
    assert states == ["complete"] * 3
    code, reason = _goodbye(by_user)
    assert code == GoodbyeCode.HANDSHAKE_FAILED and f"uid {NOBODY}, not 0" in reason
    code, reason = _goodbye(other_payload)
    assert code == GoodbyeCode.HANDSHAKE_FAILED and "another handshake" in reason
    assert "refusing intruder" in caplog.text


def test_auth_received_event_shape() -> None:
    assert AuthReceived("munge", b"x") == AuthReceived(method="munge", proof=b"x")
    assert pure.NONCE_SIZE == 32 and auth.MUNGE_CREDENTIAL_TTL >= 2 * 10


# ---- the control socket checks its caller (SO_PEERCRED) ---------------------------

_AS_USER = r"""
import asyncio, json, sys
from p2pcast import control
from p2pcast.errors import P2PCastError

async def main(path):
    asks = [
        ("status", {}),
        ("fetch", {"image": "rados://pool/img?conf=/tmp/evil.conf&keyring=/etc/shadow"}),
        ("fetch", {"image": "img", "origin": "s3://b?endpoint=http://203.0.113.9:7480"}),
        ("fetch", {"image": "img", "addresses": {"n1": "203.0.113.9:22"}}),
        ("stage", {"job": "1", "image": "img"}),
        ("release", {"job": "1"}),
        ("cache-gc", {}),
        ("shutdown", {}),
        ("fetch", {"image": "test/node", "peers": "n1", "node": "n1"}),
    ]
    out = []
    for op, args in asks:
        try:
            result = await control.request(path, op, **args)
            out.append(["ok", result.get("state", "")])
        except P2PCastError as exc:
            out.append([type(exc).__name__, str(exc)])
    print(json.dumps(out))

asyncio.run(main(sys.argv[1]))
"""


def test_control_socket_checks_its_caller(published: Published) -> None:
    """A local user may ask for status and fetch the configured origin's images by
    name; origin overrides, peer addresses, staging and stopping are root's."""
    from p2pcast.daemon import Daemon, DaemonConfig

    work = Path(tempfile.mkdtemp(prefix="p2pcast-control-"))  # reachable by nobody
    work.chmod(0o755)
    try:
        config = DaemonConfig(
            node="n1",
            listen=HOST,
            port=0,
            state_dir=work / "state",
            control_socket=str(work / "run" / "control.sock"),
            origin=str(published.origin_dir),
            run_dir=work / "run",
            authenticator=cluster_auth(),
        )

        async def main() -> tuple[list[list[str]], dict[str, object]]:
            daemon = Daemon(config)
            await daemon.start()
            try:
                assert stat.S_IMODE((work / "run").stat().st_mode) == 0o755
                assert stat.S_IMODE(os.stat(config.control_socket).st_mode) == 0o666
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", _AS_USER, config.control_socket,
                    user=NOBODY, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
                )  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), STEP_TIMEOUT)
                assert proc.returncode == 0, err.decode()
                # Root may choose another origin (here the same directory by URL).
                as_root = await control.request(
                    config.control_socket, "fetch", image="test/node",
                    origin=f"file://{published.origin_dir}", peers="n1", node="n1",
                )  # fmt: skip
                return json.loads(out), as_root
            finally:
                await daemon.stop()

        answers, as_root = asyncio.run(main())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    status, rados, s3, addresses, stage, release, gc, shutdown, by_name = answers
    assert status[0] == "ok"
    for answer in (rados, s3):
        assert answer[0] == "NotPermitted" and "only root may choose the origin" in answer[1]
    assert addresses[0] == "NotPermitted" and "addresses" in addresses[1]
    for answer in (stage, release, gc, shutdown):
        assert answer[0] == "NotPermitted" and "only root" in answer[1], answer
    assert by_name == ["ok", "complete"]
    assert as_root["state"] == "complete"
