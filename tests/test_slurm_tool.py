"""tools/slurm.py: a real Slurm cluster of 4 nodes in namespaces. One cluster for
the module (it comes up in about a second); jobs run as the unprivileged test
user. Then `down`, checked from outside: no process, namespace, mount, bridge,
loop device or file is left. Skipped only where Slurm is not installed (never
under CI)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers_slurm import NAME_PREFIX, SlurmFactory, require_slurm
from tools import cluster as net_tool
from tools import slurm as slurm_tool
from tools.ceph import Ceph
from tools.slurm import NODE_CONTROL, TEST_USER, Slurm, SlurmError

TOOL = Path(__file__).resolve().parents[1] / "tools" / "slurm.py"
NODES = ["n1", "n2", "n3", "n4"]
#: Bound on one client command (srun of a trivial job takes ~0.1 s here).
JOB_TIMEOUT = 30

#: The test Prolog: records its environment in the node's private /var/lib/p2pcast
#: and, where that holds a SquashFS image, loop-mounts it as a staging Prolog would.
PROLOG = """#!/bin/sh
dir=/var/lib/p2pcast
env > "$dir/prolog-$SLURM_JOB_ID.env"
if [ -f "$dir/image.sqfs" ]; then
    mkdir -p "$dir/mnt-$SLURM_JOB_ID"
    mount -t squashfs -o loop,ro "$dir/image.sqfs" "$dir/mnt-$SLURM_JOB_ID"
fi
exit 0
"""


@pytest.fixture(scope="module")
def hooks() -> Iterator[Path]:
    """The test Prolog, in /var/tmp: every node has its own /tmp."""
    d = Path(tempfile.mkdtemp(prefix="p2pcast-slurm-test-", dir="/var/tmp"))
    (d / "prolog").write_text(PROLOG)
    (d / "prolog").chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.fixture(scope="module")
def slurm(slurm_cluster: SlurmFactory, hooks: Path) -> Slurm:
    return slurm_cluster(4, prolog=str(hooks / "prolog"), epilog=None)


def srun(slurm: Slurm, *args: str) -> str:
    """Run srun as the test user from its home directory (shared by the nodes)."""
    proc = slurm.client(
        ["srun", *args],
        user=TEST_USER,
        cwd=f"/home/{TEST_USER}",
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    return str(proc.stdout)


def in_node(slurm: Slurm, node: str, *argv: str) -> str:
    proc = slurm.exec(node, argv, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return str(proc.stdout)


def mount_points(mountinfo: str) -> list[tuple[str, str]]:
    """(mount point, file system type) of each line of a mountinfo."""
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        found.append((fields[4], fields[fields.index("-") + 1]))
    return found


def test_up_is_quick_and_every_node_is_idle(slurm: Slurm) -> None:
    assert slurm.seconds_up < 10, slurm.seconds_up
    assert slurm.sinfo() == dict.fromkeys(NODES, "idle")
    assert slurm.problems() == []
    roles = sorted(r["role"] for r in slurm.daemons())
    assert roles == sorted(["munged", "slurmctld"] + ["holder", "slurmd", "p2pcast"] * 4)
    # Unshaped by default (tools/cluster.py's shaped=False): no htb on the links.
    assert "htb" not in in_node(slurm, "n1", "tc", "qdisc", "show", "dev", "eth0")


def test_srun_as_the_test_user_runs_on_every_node(slurm: Slurm) -> None:
    out = srun(slurm, "-N4", "sh", "-c", 'echo "$(hostname) $(id -un)"')
    assert sorted(out.splitlines()) == [f"{node} {TEST_USER}" for node in NODES]


def test_each_daemon_answers_on_its_own_control_socket(slurm: Slurm) -> None:
    for node, address in slurm.nodes.items():
        # The p2pcast CLI inside the node, with its default socket path.
        out = in_node(slurm, node, slurm.p2pcast_bin, "status")
        assert "no broadcasts" in out
        # The node's /run/p2pcast is its own directory of the cluster's.
        inode = in_node(slurm, node, "stat", "-c", "%i", NODE_CONTROL)
        assert int(inode) == slurm.control_socket(node).stat().st_ino
        listening = in_node(slurm, node, "ss", "-ltnH")
        assert f"{address}:{slurm_tool.P2PCAST_PORT}" in listening


def test_tmp_and_state_are_private_per_node(slurm: Slurm) -> None:
    marker = f"p2pcast-slurm-test-{os.getpid()}"
    srun(slurm, "-N1", "-w", "n1", "touch", f"/tmp/{marker}", f"/dev/shm/{marker}")
    assert in_node(slurm, "n1", "ls", "/tmp", "/dev/shm").split().count(marker) == 2
    for node in ("n2", "n3", "n4"):
        assert marker not in in_node(slurm, node, "ls", "/tmp", "/dev/shm")
    assert not Path("/tmp", marker).exists() and not Path("/dev/shm", marker).exists()
    # /var/lib/p2pcast: each node's own directory of the cluster's.
    in_node(slurm, "n2", "touch", f"/var/lib/p2pcast/{marker}")
    assert (slurm.dir / "nodes" / "n2" / "lib" / marker).exists()
    assert marker not in in_node(slurm, "n3", "ls", "/var/lib/p2pcast")


def test_prolog_sees_the_job_and_its_mounts_stay_in_the_node(slurm: Slurm) -> None:
    out = srun(slurm, "-N4", "sh", "-c", 'echo "$SLURM_JOB_ID"')
    job = out.split()[0]
    for node in NODES:
        env = dict(
            line.split("=", 1)
            for line in (slurm.dir / "nodes" / node / "lib" / f"prolog-{job}.env")
            .read_text()
            .splitlines()
            if "=" in line
        )
        # Slurm 22.05 sets SLURM_NODELIST; newer ones SLURM_JOB_NODELIST.
        assert env.get("SLURM_NODELIST", env.get("SLURM_JOB_NODELIST")) == "n[1-4]"
        assert env["SLURMD_NODENAME"] == node
        assert env["SLURM_JOB_USER"] == TEST_USER
        # What the wrapper adds: Slurm passes neither PATH nor slurmd's environment.
        assert "/usr/sbin" in env["PATH"].split(":")
        assert env["P2PCAST_CONTROL"] == NODE_CONTROL
        assert env["P2PCAST_RUN_DIR"] == "/run/p2pcast"
        assert Path(env["P2PCAST_DEFAULTS"]).read_text().count("P2PCAST_") >= 3
        assert os.access(env["P2PCAST_BIN"], os.X_OK)

    # A SquashFS loop mount by the Prolog on n1 is visible to the job there, and
    # neither to the host nor to another node.
    source = slurm.dir / "src"
    source.mkdir()
    (source / "hello").write_text("from the image\n")
    image = slurm.dir / "nodes" / "n1" / "lib" / "image.sqfs"
    subprocess.run(
        ["mksquashfs", str(source), str(image), "-quiet", "-noappend"],
        check=True,
        capture_output=True,
        timeout=JOB_TIMEOUT,
    )
    out = srun(
        slurm, "-N1", "-w", "n1", "sh", "-c", 'cat "/var/lib/p2pcast/mnt-$SLURM_JOB_ID/hello"'
    )
    assert out == "from the image\n"
    node_mounts = mount_points(in_node(slurm, "n1", "cat", "/proc/self/mountinfo"))
    assert any(fs == "squashfs" for _, fs in node_mounts)
    assert not any(
        fs == "squashfs"
        for _, fs in mount_points(in_node(slurm, "n2", "cat", "/proc/self/mountinfo"))
    )
    assert not any(
        fs == "squashfs" or point.startswith(str(slurm.dir))
        for point, fs in mount_points(Path("/proc/self/mountinfo").read_text())
    )


def test_status_and_env_commands(slurm: Slurm) -> None:
    env = os.environ | {"PYTHONPATH": str(TOOL.parents[1])}
    proc = subprocess.run(
        [sys.executable, str(TOOL), "env", "--name", slurm.name],
        capture_output=True, text=True, timeout=JOB_TIMEOUT, check=False, env=env,
    )  # fmt: skip
    assert proc.stdout == f"export SLURM_CONF={slurm.conf}\n"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "status", "--name", slurm.name],
        capture_output=True, text=True, timeout=JOB_TIMEOUT, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(re.findall(r"^slurmd .* running\s+idle$", proc.stdout, re.M)) == 4, proc.stdout


def test_hook_in_a_node_private_directory_is_refused(tmp_path: Path) -> None:
    require_slurm()
    hook = tmp_path / "prolog"  # under /tmp, which every node has its own of
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    with pytest.raises(SlurmError, match="own /tmp"):
        Slurm.up(1, name="tsbad", prolog=str(hook))
    assert not slurm_tool.state_path("tsbad").exists()


def test_a_daemon_that_dies_fails_up_with_its_log_and_removes_everything() -> None:
    require_slurm()
    name = f"{NAME_PREFIX}{os.getpid() % 10000}f"
    with pytest.raises(SlurmError) as failed:
        Slurm.up(2, name=name, subnet="198.18.63.0/24", ceph="none", p2pcast_bin="/bin/false")
    assert re.search(r"p2pcast n[12] exited with 1 \(.*/bin/false daemon", str(failed.value))
    assert not slurm_tool.state_path(name).exists() and not slurm_tool.cluster_dir(name).exists()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert f"{name}-n1" not in listed.stdout


def test_clusters_of_a_killed_test_run_are_reaped() -> None:
    require_slurm()
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{NAME_PREFIX}{os.getpid() % 10000}o"
    orphan = Slurm.up(
        1, name=name, subnet="198.18.63.0/24", ceph="none", p2pcast=False, owner=dead.pid
    )
    assert name in slurm_tool.reap_orphans(prefix=NAME_PREFIX)
    assert not slurm_tool.state_path(name).exists()
    assert not any(net_tool.alive(r["pid"]) for r in orphan.daemons())
    assert orphan.down() == []  # nothing left to do; reaps this process's children


def test_ceph_gives_the_nodes_a_route_and_the_daemons_credentials(
    slurm_cluster: SlurmFactory, ceph: Ceph
) -> None:
    slurm = slurm_cluster(1, ceph=ceph.name, prolog=None, epilog=None)
    [daemon] = slurm.daemons("p2pcast")
    environ = Path(f"/proc/{daemon['pid']}/environ").read_bytes().decode().split("\0")
    assert f"P2PCAST_S3_ENDPOINTS={ceph.endpoint}" in environ
    assert f"P2PCAST_S3_ACCESS_KEY_ID={ceph.access_key}" in environ
    # radosgw answers an anonymous request from inside the node.
    code = in_node(
        slurm, "n1", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", ceph.endpoint
    )
    assert code == "200"


def test_down_leaves_nothing(slurm_cluster: SlurmFactory, slurm: Slurm) -> None:
    """Last in the module: take the module's cluster down by hand and look."""
    holders = {r["pid"] for r in slurm.daemons("holder")}
    pids = {r["pid"] for r in slurm.daemons()}
    namespaces = [f"{slurm.name}-{node}" for node in [*NODES, "origin"]]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert "image.sqfs" in loops  # the Prolog's, still mounted in n1
    assert slurm.down() == []
    assert slurm.down() == []  # twice is fine
    slurm_cluster.clusters.remove(slurm)
    for pid in pids | holders:
        assert not net_tool.alive(pid), pid
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert not set(listed.stdout.split()) & set(namespaces)
    bridges = subprocess.run(
        ["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True, check=True
    )
    assert f"{slurm.name}-br" not in bridges.stdout
    assert str(slurm.dir) not in Path("/proc/self/mountinfo").read_text()
    assert not slurm.dir.exists() and not slurm_tool.state_path(slurm.name).exists()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    assert str(slurm.dir) not in loops
    # The host's /run/p2pcast and /var/lib/p2pcast, if `up` made them, go with the
    # last cluster (here: unless another run's cluster is up).
    made = slurm_tool.created_mount_points()
    slurm_cluster.close()
    if not list(slurm_tool.STATE_DIR.glob("*.json")):
        assert not slurm_tool.CREATED_FILE.exists()
        assert not [path for path in made if os.path.exists(path)]
