"""Byte counts as people read them, for messages and progress lines."""

from __future__ import annotations


def human(n: float) -> str:
    """1536 -> "1.5 KiB"; bytes below 1 KiB as a whole number ("512 B")."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
