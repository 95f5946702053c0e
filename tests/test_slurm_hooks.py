"""The Slurm Prolog and Epilog against real daemons: broadcast, stage, count, release.

Three daemons on 127.0.0.2-4 (each with its own control socket, state and run
directory), images made with mksquashfs and tarfile, real kernel loop mounts
and unpacking (root), the hooks run as slurmd runs them: a shell script with
no PATH and Slurm's variables.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from collections.abc import Iterator, Mapping

import pytest

from p2pcast import jobrecord
from p2pcast.daemon import Daemon
from p2pcast.errors import NotPermitted
from p2pcast.names import ImageRef
from p2pcast.origins.directory import DirectoryOrigin
from p2pcast.publish import push
from tests.helpers_hooks import EPILOG, PROLOG, Nodes
from tests.test_stage_support import (
    add_file,
    build_squashfs,
    is_root,
    mount_guard,
    need,
    proc_mounts_under,
    write_tar,
)

pytestmark = pytest.mark.slow

SQUASH = "hpc/sq:1"
TAR = "hpc/tar:1"
OS_RELEASE = b'PRETTY_NAME="p2pcast slurm test"\n'
#: Random bytes in each image: several 64 KiB chunks, so peers relay some.
PAYLOAD = 640 * 1024
USER_UID = 4321


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    need(is_root(), "root (kernel loop mounts, chown of unpacked trees)")
    work = tmp_path_factory.mktemp("slurm")
    origin = work / "origin"
    payload = random.Random(5).randbytes(PAYLOAD)
    src = work / "src"
    (src / "etc").mkdir(parents=True)
    (src / "data").mkdir()
    (src / "etc" / "os-release").write_bytes(OS_RELEASE)
    (src / "payload").write_bytes(payload)
    squashfs = build_squashfs(src, work / "image.sqfs")

    def build(tf: object) -> None:
        add_file(tf, "etc/os-release", OS_RELEASE)  # type: ignore[arg-type]
        add_file(tf, "payload", payload)  # type: ignore[arg-type]

    tar = write_tar(work / "image.tar", build)

    async def publish() -> None:
        async with DirectoryOrigin(origin) as o:
            await push(squashfs, o, ImageRef("hpc/sq", "1"), chunk_size=64 * 1024)
            await push(tar, o, ImageRef("hpc/tar", "1"), chunk_size=64 * 1024)

    asyncio.run(publish())
    cluster = Nodes(work, 3, origin)
    with mount_guard(work):
        try:
            cluster.start_all()
            yield cluster
        finally:
            cluster.close()


def _ok(results: Mapping[str, subprocess.CompletedProcess[str]]) -> None:
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.stderr}"


def _record(nodes: Nodes, name: str, job: int) -> jobrecord.JobRecord:
    record = jobrecord.read(nodes.run_dir(name), str(job))
    assert record is not None, f"{name} has no record of job {job}"
    return record


def _staged(nodes: Nodes, name: str) -> list[str]:
    return sorted(p.name for p in (nodes.run_dir(name) / "staged").iterdir())


def test_no_image_is_a_noop(nodes: Nodes) -> None:
    # No daemon is asked (the socket does not exist), nothing is written.
    for hook in (PROLOG, EPILOG):
        results = nodes.run_hooks(hook, 1, None, control_path="/nonexistent/sock")
        _ok(results)
        assert all(r.stderr == "" for r in results.values())
    assert not (nodes.run_dir("n1") / "jobs" / "1").exists()


@pytest.mark.parametrize("new_slurm", [False, True], ids=["SLURM_NODELIST", "JOB_NODELIST"])
def test_squashfs_staged_on_every_node_and_released(nodes: Nodes, new_slurm: bool) -> None:
    job = 11 + new_slurm
    _ok(nodes.run_hooks(PROLOG, job, SQUASH, mounts="/tmp:/data", new_slurm=new_slurm))
    from_peers = 0
    for name in nodes.names:
        record = _record(nodes, name, job)
        assert record.error is None and record.root is not None
        assert record.image == SQUASH
        assert record.mounts == ("/tmp:/data",)
        assert str(record.root) in proc_mounts_under(nodes.run_dir(name))  # read-only mount
        assert (record.root / "etc" / "os-release").read_bytes() == OS_RELEASE
        status = nodes.request(name, "status")
        [staged] = status["staged"]
        assert staged["jobs"] == [str(job)] and staged["staged"]["method"] == "kernel-mount"
        from_peers += sum(b["from_peers"] for b in status["broadcasts"])
    if not new_slurm:  # the first broadcast of the image: it travelled between peers
        assert from_peers > 0

    results = nodes.run_hooks(EPILOG, job, SQUASH)
    _ok(results)
    for name in nodes.names:
        assert jobrecord.read(nodes.run_dir(name), str(job)) is None
        assert proc_mounts_under(nodes.run_dir(name)) == []
        assert _staged(nodes, name) == []
        # The verified image stays in the node cache for the next job.
        [entry] = [e for e in nodes.request(name, "cache-list")["images"] if e["name"] == "hpc/sq"]
        assert entry["complete"]
    _ok(nodes.run_hooks(EPILOG, job, SQUASH))  # twice: harmless


def test_tar_unpacked_for_the_user_with_mount_points(nodes: Nodes) -> None:
    job = 15
    _ok(nodes.run_hooks(PROLOG, job, TAR, mounts="/tmp:/scratch/data,/etc:/host-etc", uid=USER_UID))
    for name in nodes.names:
        root = _record(nodes, name, job).root
        assert root is not None and root.name.endswith(f"-u{USER_UID}")
        assert (root / "etc" / "os-release").read_bytes() == OS_RELEASE
        for point in ("scratch/data", "host-etc"):
            assert (root / point).is_dir()
        # The user owns the tree (every file readable to them), nobody else does.
        assert os.stat(root / "payload").st_uid == USER_UID
        assert os.stat(root / "scratch" / "data").st_uid == USER_UID
    _ok(nodes.run_hooks(EPILOG, job, TAR))
    assert all(_staged(nodes, n) == [] for n in nodes.names)


def test_two_jobs_share_one_staged_copy(nodes: Nodes) -> None:
    both = ["n1", "n2"]
    # The two Prologs run at once on the same nodes, as Slurm may run them.
    a = nodes.run_hooks(PROLOG, 21, SQUASH, nodes=both, mounts="/tmp:/data")
    b = nodes.run_hooks(PROLOG, 22, SQUASH, nodes=both)
    _ok(a)
    _ok(b)
    for name in both:
        assert _record(nodes, name, 21).root == _record(nodes, name, 22).root
        assert len(_staged(nodes, name)) == 1
    _ok(nodes.run_hooks(EPILOG, 21, SQUASH, nodes=both))
    for name in both:
        root = _record(nodes, name, 22).root
        assert str(root) in proc_mounts_under(nodes.run_dir(name))  # job 22 still uses it
        [staged] = nodes.request(name, "status")["staged"]
        assert staged["jobs"] == ["22"]
    # Cleaning the cache keeps what a running job has staged.
    removed = nodes.request("n1", "cache-gc")["removed"]
    assert "hpc/sq" not in [e["name"] for e in removed]
    _ok(nodes.run_hooks(EPILOG, 22, SQUASH, nodes=both))
    for name in both:
        assert proc_mounts_under(nodes.run_dir(name)) == []
        assert _staged(nodes, name) == []


@pytest.mark.parametrize(
    ("image", "mounts", "message"),
    [
        ("hpc/nosuch:1", None, "nosuch"),
        ("../etc/passwd", None, "bad image name"),
        ("s3://other-bucket/x", None, "images come from the site's origin"),
        (SQUASH, "tmp:/data", "not an absolute path"),
        (SQUASH, "/tmp:/a/../../etc", "contains '..'"),
        (SQUASH, "/tmp:/not-in-image", "lacks mount point"),
    ],
    ids=["unknown", "bad-name", "url", "relative-src", "dotdot", "missing-dst"],
)
def test_a_bad_request_fails_the_job_never_the_node(
    nodes: Nodes, image: str, mounts: str | None, message: str
) -> None:
    job = 31
    results = nodes.run_hooks(PROLOG, job, image, mounts=mounts)
    _ok(results)  # exit 0: the node is fine
    for name in nodes.names:
        record = _record(nodes, name, job)
        assert record.root is None
        assert record.error is not None and message in record.error, record.error
        assert "the job's steps will fail" in results[name].stderr
        assert proc_mounts_under(nodes.run_dir(name)) == []
    _ok(nodes.run_hooks(EPILOG, job, image))
    assert all(jobrecord.read(nodes.run_dir(n), str(job)) is None for n in nodes.names)


def test_no_daemon_is_a_node_fault_and_the_epilog_still_cleans(nodes: Nodes) -> None:
    results = nodes.run_hooks(PROLOG, 41, SQUASH, nodes=["n1"], control_path="/nonexistent/s")
    assert results["n1"].returncode == 1
    assert "node fault" in results["n1"].stderr
    # A record the Epilog must remove while the daemon is down.
    jobrecord.write_failed(nodes.run_dir("n1"), "41", SQUASH, "whatever")
    _ok(nodes.run_hooks(EPILOG, 41, SQUASH, nodes=["n1"], control_path="/nonexistent/s"))
    assert jobrecord.read(nodes.run_dir("n1"), "41") is None


def test_a_restarted_daemon_keeps_references_and_drops_finished_jobs(nodes: Nodes) -> None:
    alone = ["n1"]
    _ok(nodes.run_hooks(PROLOG, 51, SQUASH, nodes=alone))
    root = _record(nodes, "n1", 51).root
    nodes.stop("n1")
    nodes.start("n1")
    assert str(root) in proc_mounts_under(nodes.run_dir("n1"))
    [staged] = nodes.request("n1", "status")["staged"]
    assert staged["jobs"] == ["51"]
    _ok(nodes.run_hooks(EPILOG, 51, SQUASH, nodes=alone))
    assert proc_mounts_under(nodes.run_dir("n1")) == []

    # The Epilog ran while the daemon was down: the restart releases the image.
    _ok(nodes.run_hooks(PROLOG, 52, SQUASH, nodes=alone))
    nodes.stop("n1")
    _ok(nodes.run_hooks(EPILOG, 52, SQUASH, nodes=alone))
    assert str(root) in proc_mounts_under(nodes.run_dir("n1"))
    nodes.start("n1")
    assert proc_mounts_under(nodes.run_dir("n1")) == []
    assert _staged(nodes, "n1") == []


def test_only_root_may_stage_or_release() -> None:
    with pytest.raises(NotPermitted, match="only root"):
        Daemon._require_root({"_uid": 1000}, "stage")
    Daemon._require_root({"_uid": 0}, "release")
