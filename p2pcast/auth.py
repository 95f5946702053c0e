"""Peer authentication, the I/O part: where credentials come from, and munge.

An :class:`Authenticator` makes this daemon's proof over a handshake
transcript and checks a peer's (the transcript and the checks are pure, in
:mod:`p2pcast.protocol.auth`). Three kinds, chosen with ``--auth``:

- ``munge``: a munge credential from the local munged, whose payload is the
  transcript; the peer's is decoded by our munged (MAC, TTL, replay) and must
  carry the daemons' uid and our transcript. libmunge is called through
  ctypes behind :class:`MungeClient`, so tests can use a fake.
- ``secret``: HMAC-SHA256 under a shared key read from a root-only file.
- ``none``: proves nothing, accepts anyone; only when asked for by name.

``auto`` picks munge when its socket exists, else the secret file when it
exists, else refuses to start: a daemon never falls back to ``none``.
"""

from __future__ import annotations

import abc
import ctypes
import dataclasses
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Protocol

from p2pcast.errors import AuthenticationError, AuthUnavailable, ConfigError
from p2pcast.protocol import auth as pure

log = logging.getLogger(__name__)

DEFAULT_SECRET_FILE = "/etc/p2pcast/secret"
DEFAULT_MUNGE_SOCKET = "/run/munge/munge.socket.2"
MODES = ("auto", "munge", "secret", "none")

#: Shortest shared secret accepted: one recorded handshake lets an eavesdropper
#: guess the secret offline against the HMAC, so it must be a random key, not a
#: password (`openssl rand -base64 32` gives 44 characters).
MIN_SECRET_BYTES = 32

#: Longest secret file read: a key, not a document; bounds what a wrong path costs.
MAX_SECRET_BYTES = 4096

#: Lifetime of a handshake credential (s). It binds the verifier's fresh nonce,
#: so it is worthless after its handshake anyway (and munged refuses a second
#: decode); the TTL only needs to cover the handshake (transport
#: HANDSHAKE_TIMEOUT, 10 s) plus clock skew between nodes, which munged
#: counts against it. munged's own default is 300 s.
MUNGE_CREDENTIAL_TTL = 60

#: libmunge's SONAME in Debian's libmunge2.
LIBMUNGE = "libmunge.so.2"


class Authenticator(abc.ABC):
    """Makes our proof and checks the peer's. ``blocking``: call in a thread."""

    method: str
    blocking = False

    @abc.abstractmethod
    def prove(self, transcript: bytes) -> bytes:
        """Our proof over ``transcript`` (AuthUnavailable if we cannot make one)."""

    @abc.abstractmethod
    def verify(self, method: str, transcript: bytes, proof: bytes) -> None:
        """AuthenticationError unless the peer's proof is good."""


class NoAuth(Authenticator):
    """``--auth none``: anyone who reaches the port is a peer."""

    method = pure.NONE

    def prove(self, transcript: bytes) -> bytes:
        return b""

    def verify(self, method: str, transcript: bytes, proof: bytes) -> None:
        return None  # accepted by configuration; the daemon warned at start


class SecretAuth(Authenticator):
    """HMAC-SHA256 under the cluster's shared secret."""

    method = pure.SECRET

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"a shared secret needs at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret

    def __repr__(self) -> str:
        return "SecretAuth(<secret>)"  # never the key, not even in a traceback

    def prove(self, transcript: bytes) -> bytes:
        return pure.secret_proof(self._secret, transcript)

    def verify(self, method: str, transcript: bytes, proof: bytes) -> None:
        pure.check_method(self.method, method)
        pure.check_secret_proof(self._secret, transcript, proof)


@dataclasses.dataclass(frozen=True, slots=True)
class MungeCredential:
    """What munged says about a credential it decoded."""

    uid: int
    gid: int
    payload: bytes


class MungeClient(Protocol):
    """The two munge calls (blocking: they talk to munged over its socket)."""

    def encode(self, payload: bytes) -> bytes:
        """A credential carrying ``payload`` (AuthUnavailable if munged fails)."""
        ...

    def decode(self, credential: bytes) -> MungeCredential:
        """AuthenticationError if invalid, expired or replayed; AuthUnavailable if
        munged cannot be asked."""
        ...


class MungeAuth(Authenticator):
    """A munge credential whose payload is the transcript, from the daemons' uid."""

    method = pure.MUNGE
    blocking = True

    def __init__(self, client: MungeClient, *, uid: int | None = None) -> None:
        self.client = client
        #: every daemon of the cluster runs as this user (root)
        self.uid = os.geteuid() if uid is None else uid

    def prove(self, transcript: bytes) -> bytes:
        return self.client.encode(transcript)

    def verify(self, method: str, transcript: bytes, proof: bytes) -> None:
        pure.check_method(self.method, method)
        cred = self.client.decode(proof)
        pure.check_munge_credential(
            uid=cred.uid, payload=cred.payload, expected_uid=self.uid, expected_payload=transcript
        )

    def self_test(self) -> None:
        """Make and check one credential: a dead or foreign munged fails at start."""
        probe = pure.transcript(
            version=0, prover_role="self-test", prover_node="", prover_nonce=b"",
            verifier_node="", verifier_nonce=secrets.token_bytes(pure.NONCE_SIZE), upstream="",
        )  # fmt: skip
        try:
            self.verify(self.method, probe, self.prove(probe))
        except AuthenticationError as exc:
            raise ConfigError(f"munge self-test failed: {exc}") from exc


# ---- libmunge through ctypes --------------------------------------------------

#: munge.h: munge_opt_t values and the munge_err_t values we tell apart.
_MUNGE_OPT_TTL = 4
_MUNGE_OPT_SOCKET = 8
_MUNGE_OPT_UID_RESTRICTION = 9
#: Errors that are munged's or this host's, not the credential's.
_EMUNGE_LOCAL = {1: "internal error", 5: "out of memory", 6: "socket error", 7: "timeout"}


class LibMunge:
    """libmunge (Debian's libmunge2) through ctypes: no compiled extension needed."""

    def __init__(
        self, socket_path: str, *, ttl: int = MUNGE_CREDENTIAL_TTL, restrict_uid: int | None = None
    ) -> None:
        try:
            lib = ctypes.CDLL(LIBMUNGE)
        except OSError as exc:
            raise ConfigError(
                f"--auth munge needs {LIBMUNGE} (apt-get install libmunge2): {exc}"
            ) from exc
        lib.munge_ctx_create.restype = ctypes.c_void_p
        lib.munge_ctx_create.argtypes = []
        lib.munge_ctx_destroy.restype = None
        lib.munge_ctx_destroy.argtypes = [ctypes.c_void_p]
        lib.munge_ctx_strerror.restype = ctypes.c_char_p
        lib.munge_ctx_strerror.argtypes = [ctypes.c_void_p]
        lib.munge_ctx_set.restype = ctypes.c_int  # variadic: arguments typed per call
        lib.munge_encode.restype = ctypes.c_int
        lib.munge_encode.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
        ]  # fmt: skip
        lib.munge_decode.restype = ctypes.c_int
        lib.munge_decode.argtypes = [
            ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint32),
            ctypes.POINTER(ctypes.c_uint32),
        ]  # fmt: skip
        libc = ctypes.CDLL(None)
        libc.free.restype = None
        libc.free.argtypes = [ctypes.c_void_p]
        self._lib, self._free = lib, libc.free
        self.socket_path = socket_path
        self.ttl = ttl
        #: only this uid's processes may decode our credentials: no other
        #: local user can spend (and so replay-block) one in transit
        self.restrict_uid = restrict_uid

    def _context(self) -> int:
        # One context per call: libmunge contexts are not thread-safe, and the
        # calls run in worker threads.
        ctx = self._lib.munge_ctx_create()
        if not ctx:
            raise AuthUnavailable("munge: cannot create a context (out of memory)")
        err = self._lib.munge_ctx_set(
            ctypes.c_void_p(ctx), ctypes.c_int(_MUNGE_OPT_SOCKET), self.socket_path.encode()
        )
        if err == 0:
            err = self._lib.munge_ctx_set(
                ctypes.c_void_p(ctx), ctypes.c_int(_MUNGE_OPT_TTL), ctypes.c_int(self.ttl)
            )
        if err == 0 and self.restrict_uid is not None:
            err = self._lib.munge_ctx_set(
                ctypes.c_void_p(ctx),
                ctypes.c_int(_MUNGE_OPT_UID_RESTRICTION),
                ctypes.c_uint32(self.restrict_uid),
            )
        if err != 0:
            self._lib.munge_ctx_destroy(ctx)
            raise AuthUnavailable(f"munge: cannot set up a context (error {err})")
        return int(ctx)

    def _why(self, ctx: int, err: int) -> str:
        text = self._lib.munge_ctx_strerror(ctx)
        return text.decode(errors="replace") if text else f"munge error {err}"

    def encode(self, payload: bytes) -> bytes:
        ctx = self._context()
        cred = ctypes.c_void_p()
        try:
            err = self._lib.munge_encode(ctypes.byref(cred), ctx, payload, len(payload))
            if err != 0:
                raise AuthUnavailable(f"munged at {self.socket_path}: {self._why(ctx, err)}")
            return ctypes.string_at(cred.value) if cred.value else b""
        finally:
            if cred.value:
                self._free(cred)
            self._lib.munge_ctx_destroy(ctx)

    def decode(self, credential: bytes) -> MungeCredential:
        # A C string: an embedded NUL would silently cut the credential short.
        if not credential.startswith(b"MUNGE:") or b"\0" in credential:
            raise AuthenticationError("the peer's proof is not a munge credential")
        ctx = self._context()
        buf, length = ctypes.c_void_p(), ctypes.c_int()
        uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
        try:
            err = self._lib.munge_decode(
                credential, ctx, ctypes.byref(buf), ctypes.byref(length),
                ctypes.byref(uid), ctypes.byref(gid),
            )  # fmt: skip
            if err in _EMUNGE_LOCAL:
                raise AuthUnavailable(f"munged at {self.socket_path}: {self._why(ctx, err)}")
            if err != 0:
                raise AuthenticationError(f"munge credential refused: {self._why(ctx, err)}")
            payload = ctypes.string_at(buf.value, length.value) if buf.value else b""
            return MungeCredential(uid.value, gid.value, payload)
        finally:
            if buf.value:
                self._free(buf)
            self._lib.munge_ctx_destroy(ctx)


# ---- the shared secret ----------------------------------------------------------


def load_secret(path: str | Path) -> bytes:
    """The shared secret in ``path``, refused unless only its owner can read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"secret file {path} does not exist (make one on every node: "
            f"umask 077; openssl rand -base64 32 > {path})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"secret file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"secret file {path} is open to group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): anyone who reads it can join"
                f" broadcasts; chmod 600 {path}"
            )
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(f"secret file {path} belongs to uid {st.st_uid}, not root")
        data = os.read(fd, MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    secret = data.strip()
    if len(data) > MAX_SECRET_BYTES:
        raise ConfigError(f"secret file {path} is over {MAX_SECRET_BYTES} bytes: not a key")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"secret file {path} holds {len(secret)} bytes; a key needs at least"
            f" {MIN_SECRET_BYTES} (openssl rand -base64 32)"
        )
    return secret


def write_secret_file(path: str | Path) -> Path:
    """A fresh random secret at ``path`` (mode 0600), unless one is there: for
    tools that start a set of daemons together (demo, benchmarks, tests)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


# ---- choosing ---------------------------------------------------------------------


def choose(mode: str, *, secret_file: str, munge_socket: str) -> Authenticator:
    """The authenticator ``--auth MODE`` asks for; ConfigError says what is missing."""
    if mode not in MODES:
        raise ConfigError(f"--auth {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "auto":
        if os.path.exists(munge_socket):
            mode = "munge"
        elif os.path.exists(secret_file):
            mode = "secret"
        else:
            raise ConfigError(
                f"no way to authenticate peers: no munged socket at {munge_socket} and no"
                f" secret file at {secret_file}. Run munge on every node, or create the"
                f" same secret file on every node (umask 077; openssl rand -base64 32 >"
                f" {secret_file}), or give --auth none to accept any host that reaches"
                " the port"
            )
    if mode == "none":
        log.warning(
            "peer authentication is OFF (--auth none): any host that reaches the peer"
            " port can join broadcasts and fetch images"
        )
        return NoAuth()
    if mode == "secret":
        return SecretAuth(load_secret(secret_file))
    if not os.path.exists(munge_socket):
        raise ConfigError(f"--auth munge: no munged socket at {munge_socket} (--munge-socket)")
    uid = os.geteuid()
    munge = MungeAuth(LibMunge(munge_socket, restrict_uid=uid), uid=uid)
    try:
        munge.self_test()
    except AuthUnavailable as exc:
        raise ConfigError(f"--auth munge: {exc}") from exc
    log.info("peers authenticate with munge (%s, uid %d)", munge_socket, uid)
    return munge
