#!/usr/bin/env python3
"""A real Debian image for the end-to-end tests and the Slurm benchmark.

    tools/testimage.py [--cache /var/cache/p2pcast-tests]    prints the tar and SquashFS paths

Debian bookworm, minbase variant, built by mmdebstrap from the Debian mirror,
with one marker file (MARKER) the host does not have: the host is Debian 12
too, so /etc/os-release alone would not tell the image from the host. Kept
in a cache directory between runs (building takes ~30 s on 2 cores: 14 s of
mmdebstrap, 14 s of mksquashfs); delete the directory to rebuild. Needs root,
mmdebstrap, tar and squashfs-tools (tools/setup.sh installs them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/p2pcast-tests")
MARKER = "/etc/p2pcast-test-image"
MARKER_TEXT = "p2pcast end-to-end test image"
SUITE = "bookworm"
TOOLS = ("mmdebstrap", "tar", "mksquashfs")


class ImageBuildError(RuntimeError):
    """The image could not be built (a tool missing or failing)."""


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise ImageBuildError(f"{argv[0]} failed ({done.returncode}): {tail}")


def debian_image(cache: Path = DEFAULT_CACHE) -> tuple[Path, Path]:
    """(tar, squashfs) of the image, built into CACHE unless both are there."""
    tar, sqfs = cache / f"debian-{SUITE}-minbase.tar", cache / f"debian-{SUITE}-minbase.sqfs"
    if tar.is_file() and sqfs.is_file():
        return tar, sqfs
    if missing := [tool for tool in TOOLS if shutil.which(tool) is None]:
        raise ImageBuildError(f"{', '.join(missing)} missing: run tools/setup.sh")
    cache.mkdir(parents=True, exist_ok=True)
    # Built beside the cache's files and renamed into place: a killed build
    # leaves no half image for the next run to trust.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as work:
        part = Path(work) / "image.tar"
        hook = f'echo "{MARKER_TEXT}" > "$1{MARKER}"'
        _run(["mmdebstrap", "--quiet", "--variant=minbase", f"--customize-hook={hook}",
              SUITE, str(part)])  # fmt: skip
        root = Path(work) / "root"
        root.mkdir()
        _run(["tar", "-C", str(root), "-xf", str(part)])
        squashed = Path(work) / "image.sqfs"
        _run(["mksquashfs", str(root), str(squashed), "-comp", "zstd", "-quiet", "-no-progress"])
        os.replace(part, tar)
        os.replace(squashed, sqfs)
    return tar, sqfs


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args(argv)
    try:
        tar, sqfs = debian_image(args.cache)
    except ImageBuildError as exc:
        print(f"testimage: {exc}", file=sys.stderr)
        return 1
    print(tar)
    print(sqfs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
