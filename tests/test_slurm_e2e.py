"""End to end in a real Slurm cluster (issue 5, point 5), as an unprivileged user.

A real Debian image (mmdebstrap minbase bookworm, with a marker file the host
lacks), as SquashFS and as tar, is pushed to the session's real Ceph (S3
through radosgw). A 4-node Slurm cluster (tools/slurm.py: slurmctld, a slurmd
and a p2pcast daemon per node, munge) loads the SPANK plugin and the Prolog and
Epilog hooks of this checkout. Then, as the test user:

- ``sbatch -N4 --ch-image=...`` whose ``srun`` runs inside the image on all 4
  nodes, the image read from Ceph about once (radosgw's own counters);
- ``srun -N4 --ch-image=... --ch-mount=SRC:DST`` with the tar image and a bind;
- after each job, no mount and no staging left on any node;
- a second job with the same image reads no chunk from Ceph;
- a wrong image name fails fast with a clear message and drains no node.

The image is built once by tools/testimage.py and kept in its cache
(/var/cache/p2pcast-tests; ~30 s to build), so later runs start at once.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pcast.manifest import Manifest
from p2pcast.names import ImageRef
from tests.helpers_ceph import publish_sync, s3_config
from tests.helpers_slurm import SlurmFactory
from tools.ceph import Ceph
from tools.slurm import TEST_USER, Slurm
from tools.testimage import MARKER, MARKER_TEXT, debian_image

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
BUCKET = "e2e-images"
NODES = 4
#: Bound on one job (they take seconds); a hang becomes a failure with output.
JOB_TIMEOUT = 180.0
#: The Epilog runs after the job is reported done: how long to wait for it.
EPILOG_WAIT = 30.0


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=True, **kw)


class World:
    """The cluster, the Ceph it reads from, the images in it, the user's directory."""

    def __init__(self, slurm: Slurm, ceph: Ceph, images: dict[str, Manifest], home: Path):
        self.slurm, self.ceph, self.images, self.home = slurm, ceph, images, home

    def as_user(
        self, argv: list[str], timeout: float = JOB_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return self.slurm.client(
            argv, user=TEST_USER, capture_output=True, text=True, timeout=timeout, cwd=self.home
        )

    def rgw_get_bytes(self) -> int:
        return self.ceph.rgw_reads()[1]

    def on_node(self, node: str, argv: list[str]) -> str:
        done = self.slurm.exec(node, argv, capture_output=True, text=True, timeout=30)
        return str(done.stdout)

    def leftovers(self) -> dict[str, list[str]]:
        """Per node: staging mounts and job records still there."""
        found: dict[str, list[str]] = {}
        for node in self.slurm.nodes:
            mounts = self.on_node(node, ["findmnt", "-rn", "-o", "TARGET"]).split()
            staged = [m for m in mounts if m.startswith("/run/p2pcast/")]
            listing = self.on_node(
                node, ["sh", "-c", "ls -A /run/p2pcast/jobs /run/p2pcast/staged 2>/dev/null"]
            )
            records = [line for line in listing.split() if line and not line.endswith(":")]
            if staged or records:
                found[node] = staged + records
        return found

    def wait_clean(self) -> None:
        deadline = time.monotonic() + EPILOG_WAIT
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"staging left after the job: {left}"

    def node_states(self) -> dict[str, str]:
        states = self.slurm.sinfo()
        assert states is not None, "slurmctld does not answer"
        return states


@pytest.fixture(scope="module")
def world(slurm_cluster: SlurmFactory, ceph: Ceph) -> Iterator[World]:
    tar, sqfs = debian_image()
    config = s3_config(ceph)
    images = {
        kind: publish_sync(path, f"s3://{BUCKET}", config, ImageRef("debian", kind))
        for kind, path in (("sqfs", sqfs), ("tar", tar))
    }
    # The plugin where every node sees it: /tmp is private to each node.
    build = Path(tempfile.mkdtemp(prefix="p2pcast-e2e-", dir="/var/tmp"))
    user = pwd.getpwnam(TEST_USER)
    home = Path(user.pw_dir) / f"e2e-{os.getpid()}"
    try:
        _run(["make", "-C", str(REPO / "slurm"), f"BUILD={build}"])
        os.chmod(build, 0o755)
        slurm = slurm_cluster(
            NODES, ceph=ceph.name, origin=f"s3://{BUCKET}", spank=str(build / "spank_p2pcast.so")
        )
        home.mkdir()
        (home / "data").mkdir()
        (home / "data" / "hello").write_text("hello from the host\n")
        for path in (home, home / "data", home / "data" / "hello"):
            os.chown(path, user.pw_uid, user.pw_gid)
        yield World(slurm, ceph, images, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(build, ignore_errors=True)


def _lines_by_task(out: str) -> dict[str, str]:
    """srun -l output: "0: text" -> {"0": "text"}."""
    got: dict[str, str] = {}
    for line in out.splitlines():
        task, sep, text = line.partition(": ")
        if sep:
            got[task.strip()] = text.strip()
    return got


def test_sbatch_runs_steps_in_the_squashfs_image(world: World) -> None:
    script = world.home / "job.sh"
    script.write_text(
        f"#!/bin/sh\nsrun -l cat {MARKER}\nsrun -l sh -c 'hostname; grep -c . /etc/os-release'\n"
    )
    os.chown(script, pwd.getpwnam(TEST_USER).pw_uid, -1)
    before = world.rgw_get_bytes()
    done = world.as_user(
        ["sbatch", f"-N{NODES}", "--ch-image=debian:sqfs", "--wait", "-o", "out.%j", str(script)]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    job = done.stdout.split()[-1]
    out = (world.home / f"out.{job}").read_text()
    tasks = _lines_by_task(out)
    marker_lines = [line for line in out.splitlines() if MARKER_TEXT in line]
    assert len(marker_lines) == NODES, out  # every node's task saw the image's file
    assert {"0", "1", "2", "3"} <= set(tasks), out
    # The image came from Ceph about once for the whole allocation.
    stored = world.images["sqfs"].stored_total
    read = world.rgw_get_bytes() - before
    assert stored <= read <= 1.05 * stored, (read, stored)
    world.wait_clean()


def test_srun_tar_image_with_a_bind_mount(world: World) -> None:
    done = world.as_user(
        ["srun", f"-N{NODES}", "-l", "--ch-image=debian:tar",
         f"--ch-mount={world.home / 'data'}:/data", "sh", "-c", f"cat {MARKER} /data/hello"]
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert sum(MARKER_TEXT in line for line in lines) == NODES, done.stdout
    assert sum("hello from the host" in line for line in lines) == NODES, done.stdout
    world.wait_clean()


def test_second_job_with_the_same_image_transfers_nothing(world: World) -> None:
    first = world.as_user(["srun", f"-N{NODES}", "--ch-image=debian:sqfs", "true"])
    assert first.returncode == 0, first.stderr
    world.wait_clean()
    before = world.rgw_get_bytes()
    again = world.as_user(["srun", f"-N{NODES}", "-l", "--ch-image=debian:sqfs", "cat", MARKER])
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(MARKER_TEXT) == NODES
    # Only the tag and the manifest are asked for: not one chunk (each >= 1 MiB).
    read = world.rgw_get_bytes() - before
    assert read < world.images["sqfs"].chunk_size, read
    world.wait_clean()


def test_wrong_image_name_fails_fast_and_drains_no_node(world: World) -> None:
    began = time.monotonic()
    done = world.as_user(["srun", f"-N{NODES}", "--ch-image=nosuch/image:1", "true"], timeout=60)
    took = time.monotonic() - began
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    assert "p2pcast: image nosuch/image:1 not found" in said, said
    assert took < 30, took
    world.wait_clean()
    # The nodes go back to idle once the Epilog is done ("completing" until then);
    # a failed Prolog would have left them drained ("drain", "drained", "draining").
    deadline = time.monotonic() + EPILOG_WAIT
    while set((states := world.node_states()).values()) != {"idle"}:
        assert not any("drain" in s for s in states.values()), states
        assert time.monotonic() < deadline, states
        time.sleep(0.2)
