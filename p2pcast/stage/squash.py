"""The three ways to make a SquashFS image runnable, cheapest first.

kernel-mount (root, a loop device) costs nothing and reads at kernel speed;
squashfuse needs only /dev/fuse (squashfuse_ll preferred: multithreaded, about
1.5x faster than the high-level squashfuse, apptainer#665); unsquashfs copies
the whole image to the staging disk and is the last resort (pyxis#24: minutes
per job for large images).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from p2pcast.errors import StageError
from p2pcast.stage.mounts import (
    MOUNT_TIMEOUT_S,
    UNSQUASHFS_TIMEOUT_S,
    find_tool,
    is_mount_point,
    run_tool,
    unmount_all_under,
)
from p2pcast.stage.tree import O_DIR, neutralise_tree

SQUASH_METHODS = ("kernel-mount", "squashfuse", "unsquashfs")

#: Mount options for an image: read-only, and nothing in it (device nodes,
#: setuid binaries) can act on the host.
MOUNT_OPTIONS = "ro,nodev,nosuid"

#: The non-fatal errors unsquashfs reports (exit status 2) when it runs
#: without root and meets device nodes or FIFOs: we would delete them anyway.
_UNPRIVILEGED_SPECIAL = re.compile(
    r"could not create (character device|block device|fifo|socket) .*not superuser"
)


def unavailable(method: str) -> str | None:
    """Why ``method`` cannot run on this node, or None if it can be tried."""
    if method == "kernel-mount":
        if os.geteuid() != 0:
            return "needs root"
        if find_tool("mount") is None:
            return "mount(8) not found"
        return None
    if method == "squashfuse":
        if find_tool("squashfuse_ll", "squashfuse") is None:
            return "neither squashfuse_ll nor squashfuse is installed"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        return None
    if find_tool("unsquashfs") is None:
        return "unsquashfs (squashfs-tools) is not installed"
    return None


def _said(tool: str, stderr: str) -> str:
    """A tool's one-line complaint, prefixed with its name unless it says it itself."""
    name = os.path.basename(tool)
    return stderr if stderr.startswith(f"{name}:") else f"{name}: {stderr}"


def mount_squashfs(image: Path, dest: Path, method: str) -> None:
    """Mount ``image`` read-only on the existing empty directory ``dest``.

    On failure nothing is left mounted, and StageError carries the tool's
    stderr in one line.
    """
    if method == "kernel-mount":
        tool = find_tool("mount") or "mount"
        argv = [tool, "-t", "squashfs", "-o", f"loop,{MOUNT_OPTIONS}", str(image), str(dest)]
    else:
        tool = find_tool("squashfuse_ll", "squashfuse") or "squashfuse"
        options = MOUNT_OPTIONS
        if os.geteuid() == 0:
            # A FUSE mount is private to the mounting user unless allow_other;
            # the prolog mounts as root for the job's user.
            options += ",allow_other"
        argv = [tool, "-o", options, str(image), str(dest)]
    result = run_tool(argv, timeout=MOUNT_TIMEOUT_S)
    if not result.ok:
        unmount_all_under(dest)  # a timed-out mount may have completed after all
        raise StageError(_said(tool, result.stderr))
    if not is_mount_point(dest):
        raise StageError(f"{os.path.basename(tool)} exited 0 but nothing is mounted at {dest}")
    try:
        # squashfuse_ll mounts an image with a garbled inode table and only
        # fails on first access: look at the root now, not in the job.
        fd = os.open(dest, O_DIR)
        try:
            with os.scandir(fd) as it:
                for _ in it:
                    pass
        finally:
            os.close(fd)
    except OSError as exc:
        unmount_all_under(dest)
        raise StageError(
            f"{os.path.basename(tool)} mounted {image} but its root is unreadable "
            f"({exc.strerror}): corrupt SquashFS?"
        ) from exc


def unsquash_into(image: Path, root: Path, owner: tuple[int, int], space_on: Path) -> int:
    """Unpack ``image`` into the new directory ``root``, then neutralise it.

    Returns the number of entries removed or changed by neutralisation.
    """
    tool = find_tool("unsquashfs") or "unsquashfs"
    # -no-xattrs: security.capability is as dangerous as a setuid bit.
    argv = [tool, "-no-progress", "-quiet", "-no-xattrs", "-d", str(root), str(image)]
    result = run_tool(argv, timeout=UNSQUASHFS_TIMEOUT_S)
    if not result.ok:
        lines = [ln for ln in result.raw_stderr.splitlines() if ln.strip()]
        harmless = (
            result.returncode == 2
            and lines
            and all(_UNPRIVILEGED_SPECIAL.search(ln) for ln in lines)
        )
        if not harmless:
            if "No space left on device" in result.raw_stderr:
                raise StageError(
                    f"no space left on {space_on} while unsquashing {image}: {result.stderr}"
                )
            raise StageError(_said(tool, result.stderr))
    try:
        fd = os.open(root, O_DIR)
    except OSError as exc:
        raise StageError(f"unsquashfs left no tree at {root}: {exc.strerror}") from exc
    try:
        removed, changed = neutralise_tree(fd, owner)
    except OSError as exc:
        raise StageError(f"cannot neutralise the unsquashed tree: {exc}") from exc
    finally:
        os.close(fd)
    return removed + changed
