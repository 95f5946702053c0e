"""Peer authentication, the pure part: what each side proves, and checking a proof.

The handshake (both directions at once, see ``PeerConnection``)::

    A -> B  Hello(node=A, nonce=Na)          B -> A  Hello(node=B, nonce=Nb)
    A -> B  Auth(method, proof_A)            B -> A  Auth(method, proof_B)

Each side proves knowledge of the cluster's credential over a *transcript*:
the protocol version, the prover's role and node name and nonce, the
verifier's node name and nonce, and the upstream's address as both ends see
it. So a proof is worth something only on the one connection it was made for:

- replayed: the verifier's nonce is fresh for every connection;
- reflected (a peer sends our own Hello or Auth back): the roles and node
  names differ, and a Hello carrying our own nonce is refused outright;
- relayed to another daemon (a host that connects onward and passes proofs
  through): the upstream address in the transcript is the one the prover
  dialed or accepted on, not the relaying host's.

Methods: ``secret`` is an HMAC-SHA256 of the transcript under a shared key;
``munge`` is a munge credential whose payload is the transcript, checked by
decoding it (munged verifies its MAC and TTL and refuses a replay) and
comparing its uid and payload; ``none`` proves nothing and is accepted only
by a daemon told to accept anyone. Nothing here does I/O: the munge calls are
made by ``p2pcast.auth``.
"""

from __future__ import annotations

import hashlib
import hmac

import msgpack

from p2pcast.errors import AuthenticationError

#: Bytes of each side's challenge nonce: 256 random bits, so no two handshakes
#: in a cluster's lifetime share one (birthday bound ~2^128 handshakes).
NONCE_SIZE = 32

#: Longest method name on the wire ("secret", "munge", "none").
MAX_METHOD_NAME = 16

NONE = "none"
SECRET = "secret"
MUNGE = "munge"
METHODS = (NONE, SECRET, MUNGE)

#: Domain separation: a MAC or credential made for this purpose can never be
#: mistaken for one another program (or another p2pcast message) asks for.
_LABEL = "p2pcast peer auth v1"

#: An HMAC-SHA256 proof is a SHA-256 digest.
SECRET_PROOF_SIZE = hashlib.sha256().digest_size


def transcript(
    *,
    version: int,
    prover_role: str,
    prover_node: str,
    prover_nonce: bytes,
    verifier_node: str,
    verifier_nonce: bytes,
    upstream: str,
) -> bytes:
    """The bytes one side proves, unambiguously encoded (a msgpack array)."""
    fields = [
        _LABEL,
        version,
        prover_role,
        prover_node,
        prover_nonce,
        verifier_node,
        verifier_nonce,
        upstream,
    ]
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def secret_proof(secret: bytes, text: bytes) -> bytes:
    """HMAC-SHA256 of a transcript under the cluster's shared secret."""
    return hmac.new(secret, text, hashlib.sha256).digest()


def check_secret_proof(secret: bytes, text: bytes, proof: bytes) -> None:
    """AuthenticationError unless ``proof`` is our secret's MAC of ``text``."""
    if len(proof) != SECRET_PROOF_SIZE:
        raise AuthenticationError(
            f"shared-secret proof of {len(proof)} bytes, not {SECRET_PROOF_SIZE}"
        )
    # Constant time: the comparison must not tell a forger how much matched.
    if not hmac.compare_digest(secret_proof(secret, text), proof):
        raise AuthenticationError(
            "wrong shared-secret proof: the peer does not hold this cluster's secret"
            " (or replayed another connection's handshake)"
        )


def check_munge_credential(
    *, uid: int, payload: bytes, expected_uid: int, expected_payload: bytes
) -> None:
    """Check what munged decoded from a peer's credential (its MAC and TTL are
    munged's to check): made by the daemons' user, for this very handshake."""
    if uid != expected_uid:
        raise AuthenticationError(
            f"munge credential of uid {uid}, not {expected_uid}: made by a user's"
            " process, not by a p2pcast daemon"
        )
    if not hmac.compare_digest(payload, expected_payload):
        raise AuthenticationError(
            "munge credential binds another handshake (replayed, reflected or forged)"
        )


def check_method(ours: str, theirs: str) -> None:
    """The peer must authenticate the way this daemon does."""
    if theirs != ours:
        raise AuthenticationError(
            f"peer authenticates with {theirs!r}, this daemon requires {ours!r}"
            " (every daemon of a cluster needs the same --auth)"
        )
