"""External tools (mount, squashfuse, unsquashfs) and the mount table.

Every tool runs with a timeout, stdin closed, a fixed PATH and the C locale,
and its stderr goes to a temporary file rather than a pipe: squashfuse
daemonises, and a daemon holding our pipe open would make us wait forever.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pcast.errors import StageError

#: Searched after $PATH: a Slurm prolog runs with no PATH at all, and mount
#: helpers live in sbin.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: A loop or FUSE mount takes well under a second; a minute bounds a hung
#: helper (no free loop device, a stuck FUSE daemon) so a prolog cannot hang.
MOUNT_TIMEOUT_S = 60.0

#: umount of an idle filesystem is instant; a busy or dead FUSE one is what
#: the lazy fallback is for, so do not wait long for the first attempt.
UMOUNT_TIMEOUT_S = 30.0

#: unsquashfs of a 20 GB image to tmpfs takes minutes on a few cores; an hour
#: means something is stuck, not slow.
UNSQUASHFS_TIMEOUT_S = 3600.0

#: Characters of a tool's stderr kept in an error message.
MAX_STDERR_CHARS = 300

#: Bytes of a tool's stderr read back at all (unsquashfs can print a line per file).
MAX_STDERR_READ = 64 * 1024

#: Rounds of "unmount the deepest mount" before giving up on a path: mounts
#: can be stacked, but not without bound in any real configuration.
MAX_UNMOUNT_ROUNDS = 64


def find_tool(*names: str) -> str | None:
    """Absolute path of the first of ``names`` found on $PATH or the system path."""
    search = os.pathsep.join(p for p in (os.environ.get("PATH", ""), SYSTEM_PATH) if p)
    for name in names:
        found = shutil.which(name, path=search)
        if found:
            return found
    return None


@dataclass(frozen=True)
class ToolResult:
    returncode: int
    stderr: str  #: one line, trimmed
    raw_stderr: str = ""  #: the first 64 KiB, lines intact

    @property
    def ok(self) -> bool:
        return self.returncode == 0


#: Boilerplate that mount(8) appends to every failure; it says nothing about the image.
_MOUNT_HINT = "dmesg(1) may have more information after failed mount system call."


def summarise(text: str) -> str:
    """Squash a tool's stderr into one line for an error message."""
    line = " ".join(text.replace(_MOUNT_HINT, "").split())
    if len(line) > MAX_STDERR_CHARS:
        line = line[: MAX_STDERR_CHARS - 3] + "..."
    return line or "no error message"


def run_tool(argv: Sequence[str], *, timeout: float) -> ToolResult:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(p for p in (SYSTEM_PATH, env.get("PATH", "")) if p)
    env["LC_ALL"] = "C"  # stderr is summarised into our messages: keep it English
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                timeout=timeout,
                check=False,
            )
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = -1
            err.write(f"\n{os.path.basename(argv[0])} timed out after {timeout:.0f}s".encode())
        except OSError as exc:
            return ToolResult(127, f"cannot run {argv[0]}: {exc.strerror}")
        err.seek(0)
        text = err.read(MAX_STDERR_READ).decode("utf-8", "replace")
    return ToolResult(code, summarise(text), text)


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def mount_points() -> list[str]:
    """Mount points of this mount namespace, in mount-table order."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise StageError(f"cannot read the mount table: {exc.strerror}") from exc
    points = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            # The kernel escapes space, tab, newline and backslash as \ooo.
            points.append(_OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def mounts_under(path: Path) -> list[str]:
    """Mount points at ``path`` or below it, deepest last."""
    top = str(path).rstrip("/") or "/"
    prefix = top if top.endswith("/") else top + "/"
    return [p for p in mount_points() if p == top or p.startswith(prefix)]


def is_mount_point(path: Path) -> bool:
    return str(path) in mount_points()


def unmount(path: str) -> None:
    """Unmount the top-most mount at ``path``; lazily if it is busy."""
    if os.geteuid() == 0 or find_tool("fusermount3", "fusermount") is None:
        umount = find_tool("umount") or "umount"
        normal, lazy = [umount, path], [umount, "-l", path]
    else:
        # Without root only FUSE mounts of our own can be undone, by fusermount.
        fusermount = find_tool("fusermount3", "fusermount") or "fusermount"
        normal, lazy = [fusermount, "-u", path], [fusermount, "-u", "-z", path]
    first = run_tool(normal, timeout=UMOUNT_TIMEOUT_S)
    if first.ok:
        return
    # Busy (a process still has a cwd or open file inside): detach it now; the
    # kernel finishes when the last user goes, and the path is free at once.
    second = run_tool(lazy, timeout=UMOUNT_TIMEOUT_S)
    if not second.ok:
        raise StageError(f"cannot unmount {path}: {first.stderr}; lazy unmount: {second.stderr}")


def unmount_all_under(path: Path) -> None:
    """Unmount everything mounted at ``path`` or below it, deepest first."""
    for _ in range(MAX_UNMOUNT_ROUNDS):
        found = mounts_under(path)
        if not found:
            return
        deepest = max(found, key=lambda p: p.count("/"))
        unmount(deepest)
    raise StageError(f"cannot unmount everything below {path}: {len(found)} mounts remain")
