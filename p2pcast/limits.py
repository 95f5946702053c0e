"""Every size and count that untrusted input can influence, with its reason.

A limit here is enforced where the bytes enter (the wire protocol, the manifest
decoder, the codec), so hostile input fails early with a p2pcast error instead
of exhausting memory.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Default chunk size: big enough that per-chunk overhead (a header, a hash, a
#: request round trip) is noise at 10-100 Gbit/s, small enough that a 100 MB
#: image still has ~25 chunks to pipeline and spread over nodes.
DEFAULT_CHUNK_SIZE = 4 * MiB

#: Smallest chunk size accepted: below this the per-chunk costs dominate.
MIN_CHUNK_SIZE = 64 * KiB

#: Largest chunk size accepted. Receivers preallocate a buffer of one chunk per
#: link, so this bounds the memory a peer can make us commit per connection.
MAX_CHUNK_SIZE = 64 * MiB

#: Largest chunk body on the wire: a stored chunk is at most MAX_CHUNK_SIZE raw
#: bytes plus zstd's worst-case expansion (manifest.MAX_STORED_OVERHEAD), so a
#: longer body is a lie, and receivers can size one buffer per link by it.
MAX_CHUNK_BODY = MAX_CHUNK_SIZE + 64 * KiB

#: Largest image: 20 GB is the largest seen in practice; 1 TiB leaves headroom
#: without letting a bogus manifest ask for absurd preallocation.
MAX_IMAGE_SIZE = 1024 * GiB

#: Chunks per manifest: 1 TiB at the default 4 MiB chunk size.
MAX_CHUNKS = MAX_IMAGE_SIZE // DEFAULT_CHUNK_SIZE

#: Encoded manifest size: ~40 bytes per chunk entry for MAX_CHUNKS entries plus
#: slack for the fixed fields.
MAX_MANIFEST_BYTES = MAX_CHUNKS * 48 + 64 * KiB

#: Largest header of one wire frame (the msgpack part, not the chunk body).
#: The biggest legitimate header is a HAVE bitfield of MAX_CHUNKS bits.
MAX_HEADER_BYTES = MAX_CHUNKS // 8 + 4 * KiB

#: Longest image name (bucket/name:tag), as S3 keys are bounded by 1024 bytes.
MAX_NAME_LENGTH = 1024

#: Longest node name accepted from a peer's handshake (DNS label limit x4).
MAX_NODE_NAME = 255

#: Longest reason string in a Reject or Goodbye: it is for a log line.
MAX_REASON_LENGTH = 256

#: Largest handshake credential: a munge credential is a few hundred bytes, a
#: shared-secret MAC far less; 4 KiB leaves room without inviting a payload.
MAX_AUTH_BYTES = 4 * KiB

#: Swarms one connection may subscribe to; one per image a job asks for, so a
#: handful in practice.
MAX_SUBSCRIPTIONS_PER_LINK = 64

#: Chunk requests one peer may have queued at us; the requester's window is
#: much smaller, so more is a broken or hostile peer.
MAX_QUEUED_REQUESTS_PER_LINK = 64

#: Nodes in one broadcast (hostlist expansion bound; a hostlist like
#: n[1-99999999] must not allocate a huge list).
MAX_NODES = 65536

#: Frames on the control socket are small requests and progress reports.
MAX_CONTROL_FRAME = 1 * MiB
