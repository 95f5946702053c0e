"""Node lists: Slurm-style hostlists (``n[1-16]``) and this node's rank."""

from __future__ import annotations

import hostlist

from p2pcast import limits
from p2pcast.errors import BadHostlist


def expand(text: str) -> list[str]:
    """Expand a hostlist, keeping its order (ranks follow it); no duplicates."""
    if not text or not text.strip():
        raise BadHostlist("empty hostlist")
    try:
        names: list[str] = hostlist.expand_hostlist(text.strip())
    except hostlist.BadHostlist as exc:
        raise BadHostlist(f"bad hostlist {text!r}: {exc}") from exc
    if len(names) > limits.MAX_NODES:
        raise BadHostlist(f"hostlist {text!r} has {len(names)} nodes, over {limits.MAX_NODES}")
    if len(set(names)) != len(names):
        raise BadHostlist(f"hostlist {text!r} names a node twice")
    return names


def rank_of(names: list[str], node: str) -> int:
    try:
        return names.index(node)
    except ValueError:
        shown = hostlist.collect_hostlist(names)
        raise BadHostlist(f"this node ({node}) is not in the hostlist {shown}") from None


def compress(names: list[str]) -> str:
    return str(hostlist.collect_hostlist(names))
