"""The one error tree of p2pcast, split by who is to blame.

    P2PCastError                      anything p2pcast raises on purpose
    ├── UserError                     the caller's input is wrong; fix the command
    │   ├── BadImageName              not a valid image reference
    │   ├── BadHostlist               hostlist does not parse, or lacks this node
    │   ├── ImageNotFound             the origin has no such image
    │   ├── BadImageFile              the file given to push is not a known image
    │   ├── BadMountSpec              a --ch-mount the job asked for is malformed, or
    │   │                             names a mount point the image cannot have
    │   ├── NotPermitted              the caller may not ask for this (stage as non-root)
    │   └── ConfigError               bad option or configuration value
    ├── RemoteError                   another party misbehaved or failed
    │   ├── PeerError                 a peer daemon
    │   │   ├── ProtocolError         malformed or illegal bytes from a peer
    │   │   ├── HandshakeError        wrong magic/version
    │   │   │   └── AuthenticationError  the peer could not prove it is a daemon
    │   │   │                         of this cluster (no, wrong or replayed proof)
    │   │   └── PeersUnreachable      no peer answered within the timeout
    │   └── OriginError               the origin (directory, S3, RADOS)
    │       └── OriginUnavailable     cannot be reached or read right now
    ├── IntegrityError                bytes do not match what the manifest promises
    │   ├── ChunkCorrupt              a chunk's xxh3 differs (from origin or peer)
    │   ├── ImageDigestMismatch       whole-image sha256 differs
    │   └── ManifestCorrupt           manifest truncated, malformed or inconsistent
    ├── LocalError                    this node's resources
    │   ├── StoreError                cache/staging disk problem (full disk, EIO)
    │   ├── StageError                could not stage (mount, unpack)
    │   ├── AuthUnavailable           this node cannot prove or check peers'
    │   │                             identity right now (munged unreachable)
    │   └── DaemonUnavailable         no daemon answers on the control socket
    ├── InternalError                 p2pcast itself is wrong: a bug, not bad input
    │   └── LocalProtocolError        our code used the wire protocol illegally
    └── CancelledBroadcast            the broadcast was cancelled on request

Foreign exceptions (msgpack, zstandard, OSError from sockets or files) are
translated where they enter, with ``raise ... from exc``, so callers catch only
this tree.
"""

from __future__ import annotations


class P2PCastError(Exception):
    """Base of every error p2pcast raises on purpose."""

    #: Exit status the CLI uses for this kind of error.
    exit_code = 1


class UserError(P2PCastError):
    exit_code = 2


class BadImageName(UserError):
    pass


class BadHostlist(UserError):
    pass


class ImageNotFound(UserError):
    pass


class BadImageFile(UserError):
    pass


class ImageTooLarge(UserError):
    """The image cannot fit in this node's cache or staging area even when
    empty: the request, not the node, is at fault (no node would drain for it)."""


class BadMountSpec(UserError):
    pass


class NotPermitted(UserError):
    pass


class ConfigError(UserError):
    pass


class RemoteError(P2PCastError):
    exit_code = 3


class PeerError(RemoteError):
    pass


class ProtocolError(PeerError):
    """The peer sent bytes that break the wire protocol; the link is closed."""


class HandshakeError(ProtocolError):
    pass


class AuthenticationError(HandshakeError):
    """The peer failed the handshake's challenge: it is not (provably) a p2pcast
    daemon of this cluster. The link is closed and nothing it sent is used."""


class PeersUnreachable(PeerError):
    pass


class OriginError(RemoteError):
    pass


class OriginUnavailable(OriginError):
    pass


class IntegrityError(P2PCastError):
    exit_code = 4


class ChunkCorrupt(IntegrityError):
    pass


class ImageDigestMismatch(IntegrityError):
    pass


class ManifestCorrupt(IntegrityError):
    pass


class LocalError(P2PCastError):
    exit_code = 5


class StoreError(LocalError):
    pass


class StageError(LocalError):
    pass


class DaemonUnavailable(LocalError):
    pass


class AuthUnavailable(LocalError):
    """This node cannot authenticate peers now (munged down): not the peer's fault."""


class InternalError(P2PCastError):
    """A bug in p2pcast: no input from a user or peer should cause it."""

    exit_code = 7


class LocalProtocolError(InternalError):
    """This node tried to send something the wire protocol forbids right now.

    The peer is blameless (compare ProtocolError); the caller broke a rule of
    the connection API, e.g. answered a request it never received.
    """


class CancelledBroadcast(P2PCastError):
    exit_code = 6
