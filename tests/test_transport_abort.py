"""A link aborted while its writer waits for the socket must not crash the daemon.

Regression: ``PeerLink.abort`` closed the socket while ``_writable`` still had
the fd registered with the event loop; the writer's cleanup ran a step later,
when the number already belonged to another file, and libuv aborted the whole
process (SIGABRT, no message). In the cluster benchmark this killed every
survivor of a run in which one daemon was SIGKILLed. The scenario runs in a
child process, because the failure is the process dying.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import asyncio, os, socket, sys
    import uvloop
    from p2pcast.protocol import FileSlice, Role
    from p2pcast.auth import NoAuth
    from p2pcast.transport import PeerLink, tune_socket

    class Handler:
        def link_event(self, *args): pass
        def link_closed(self, *args): pass
        def chunk_length(self, *args): return None

    async def main(path):
        fd = os.open(path, os.O_RDONLY)
        for _ in range(10):
            ours, theirs = socket.socketpair()
            tune_socket(ours)
            link = PeerLink(ours, Role.UPSTREAM, "n1", Handler(), auth=NoAuth())
            link.start()
            # A chunk far larger than the socket buffers, to a peer that reads
            # nothing: the sender ends up waiting in _writable.
            sending = asyncio.ensure_future(link._sendfile(FileSlice(fd, 0, os.path.getsize(path))))
            await asyncio.sleep(0.02)
            assert not sending.done()
            link.abort(None)
            reused = [os.open(path, os.O_RDONLY) for _ in range(3)]  # take the freed number
            await asyncio.sleep(0.02)
            sending.cancel()  # its cleanup runs now, after the close
            await asyncio.sleep(0.02)
            for other in reused:
                os.close(other)
            theirs.close()
        print("survived")

    uvloop.run(main(sys.argv[1]))
    """
)


def test_abort_while_waiting_to_send_does_not_kill_the_process(tmp_path: Path) -> None:
    big = tmp_path / "chunk"
    big.write_bytes(bytes(32 << 20))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(big)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip() == "survived"
