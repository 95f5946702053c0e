"""A p2pcast daemon that lies: the corrupting peer of the cluster benchmark.

    python -m bench.lying_daemon [p2pcast daemon options]

Exactly ``p2pcast daemon`` (same options, same protocol, same authentication:
a peer with the cluster's credentials, as a node with bad memory or a
compromised daemon would be), except that every LIE_EVERY-th chunk it is asked
for goes out with one byte flipped at a random place: the right length and
framing, so only the receiver's hash check can catch it. Everything it
downloads it verifies as usual, so it ends with a correct copy itself.

Benchmark and test equipment only: it lives in bench/, is not installed, and
no option of the real daemon turns lying on. Each lie is logged on one line
("lying to NODE: chunk I, byte B flipped") for the benchmark to count.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from typing import Any

from p2pcast import daemon as daemon_mod
from p2pcast.cli import main
from p2pcast.node import Broadcast, PeerService
from p2pcast.protocol import ChunkRequested, Event, FileSlice
from p2pcast.transport import PeerLink

log = logging.getLogger("p2pcast.lying")

#: One chunk in this many served is corrupted: the first few are honest, so the
#: peers have started to rely on the liar before it is caught, and each of its
#: downstream peers gets a lie soon after it starts asking.
LIE_EVERY = 4


class LyingPeerService(PeerService):
    """A PeerService that corrupts every LIE_EVERY-th chunk it serves."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.served = 0
        #: link -> the memfd holding the last lie sent on it. A link sends one
        #: chunk at a time, so when it asks for the next body the previous
        #: sendfile has returned and its fd may close (the socket holds its own
        #: page references).
        self._lie_fds: dict[PeerLink, int] = {}

    def _serve(self, link: PeerLink, event: Event) -> None:
        if isinstance(event, ChunkRequested):
            broadcast = self.broadcasts.get(event.image_id)
            if broadcast is not None and broadcast.swarm.have[event.index]:
                self.served += 1
                if self.served % LIE_EVERY == 0:
                    index = event.index
                    link.send_chunk(
                        event.image_id, index, lambda: self._corrupt(link, broadcast, index)
                    )
                    return
        super()._serve(link, event)

    def _corrupt(self, link: PeerLink, broadcast: Broadcast, index: int) -> FileSlice | None:
        """The chunk's stored bytes with one byte flipped, in a memfd for sendfile."""
        if broadcast.image.closed:
            return None
        stored = bytearray(broadcast.image.read_stored(broadcast.manifest.chunk(index)))
        where = random.randrange(len(stored))
        stored[where] ^= 0xFF
        old = self._lie_fds.pop(link, None)
        if old is not None:
            os.close(old)
        fd = os.memfd_create("p2pcast-lie")
        os.write(fd, stored)
        self._lie_fds[link] = fd
        log.warning("lying to %s: chunk %d, byte %d flipped", link.peer_node, index, where)
        return FileSlice(fd, 0, len(stored))


#: What `bench.cluster_bench` counts in the liar's log.
LIE_MARK = "lying to "

if __name__ == "__main__":
    # The daemon builds its PeerService from p2pcast.daemon's namespace.
    setattr(daemon_mod, "PeerService", LyingPeerService)  # noqa: B010
    sys.exit(main(["daemon", *sys.argv[1:]]))
