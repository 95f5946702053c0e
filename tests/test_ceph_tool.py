"""tools/ceph.py: the single-node Ceph the tests, the demo and the cluster
benchmark use. The session's instance (tests/conftest.py) is inspected, one
more small instance is taken through the CLI's up/status/env/down, and a node
in a network namespace reaches the session's instance."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tools import ceph as ceph_tool
from tools.ceph import BIND_PORTS, CEPH_SUBNET, MON_PORTS, RGW_DATA_POOL, Ceph, CephError

TOOL = Path(__file__).resolve().parents[1] / "tools" / "ceph.py"
#: Ceph's default OSD port range, which covers slurmctld (6817) and slurmd (6818).
CEPH_DEFAULT_PORTS = range(6800, 7301)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=120, check=False
    )


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets PID listens on."""
    out = subprocess.run(
        ["ss", "-ltnpH"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    found = set()
    for line in out.splitlines():
        if f"pid={pid}," in line:
            local = line.split()[3]
            host, _, port = local.rpartition(":")
            found.add((host.strip("[]"), int(port)))
    return found


def test_session_instance_listens_on_its_own_address_and_private_ports(ceph: Ceph) -> None:
    pids = ceph.pids()
    assert sorted(pids) == ["client.rgw.gw", "mon.a", "osd.0", "osd.1", "osd.2"]
    for who, pid in pids.items():
        # Started with this instance's configuration (what `down` checks too).
        assert str(ceph.conf) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(), who
        sockets = listening(pid)
        assert sockets and {host for host, _ in sockets} == {ceph.address}, (who, sockets)
        if who.startswith("osd."):
            ports = {port for _, port in sockets}
            assert all(BIND_PORTS[0] <= p <= BIND_PORTS[1] for p in ports), (who, ports)
            assert not ports & set(CEPH_DEFAULT_PORTS), (who, ports)
    assert listening(pids["mon.a"]) == {(ceph.address, MON_PORTS[0]), (ceph.address, MON_PORTS[1])}
    assert listening(pids["client.rgw.gw"]) == {(ceph.address, ceph.rgw_port)}
    if os.geteuid() == 0:
        # An address of its own, on a bridge of its own: reachable from namespaces.
        assert ipaddress.IPv4Address(ceph.address) in CEPH_SUBNET
        links = json.loads(
            subprocess.run(["ip", "-j", "addr", "show", f"{ceph.name}-ceph"],
                           capture_output=True, text=True, check=True).stdout
        )  # fmt: skip
        assert [a["local"] for a in links[0]["addr_info"] if a["family"] == "inet"] == [
            ceph.address
        ]


def test_session_instance_started_in_seconds_with_spread_pools(ceph: Ceph) -> None:
    timings = ceph.state["timings"]
    print(f"Ceph up in {timings['total']:.2f} s: {timings}")
    assert timings["total"] < 30.0  # ~2.6 s with 3 OSDs on this 2-core VM
    assert list(timings) == ["mkfs", "mon", "osds", "rgw", "s3_user", "total"]
    cluster = ceph.rados()
    try:
        for pool in (ceph.pool, RGW_DATA_POOL):
            rc, out, _ = cluster.mon_command(
                json.dumps({"prefix": "osd pool get", "pool": pool, "var": "pg_num",
                            "format": "json"}), b"")  # fmt: skip
            assert rc == 0 and json.loads(out)["pg_num"] >= 32, pool
        rc, out, _ = cluster.mon_command(json.dumps({"prefix": "osd stat", "format": "json"}), b"")
        assert json.loads(out)["num_up_osds"] == 3
    finally:
        cluster.shutdown()


def test_env_gives_what_clients_need(ceph: Ceph) -> None:
    shell = cli("env", "--name", ceph.name)
    assert shell.returncode == 0, shell.stderr
    assert f"export AWS_ENDPOINT_URL={ceph.endpoint}" in shell.stdout.splitlines()
    assert f"export P2PCAST_RADOS_CONF={ceph.conf}" in shell.stdout.splitlines()
    env = json.loads(cli("env", "--name", ceph.name, "--json").stdout)
    assert env["AWS_ACCESS_KEY_ID"] == ceph.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == ceph.secret_key
    status = cli("status", "--name", ceph.name, "--json")
    assert status.returncode == 0
    shown = json.loads(status.stdout)
    assert "secret_key" not in shown and shown["running"] == ceph.pids()


def test_cli_up_status_down_by_pid_and_down_again() -> None:
    name = f"t{os.getpid() % 100000}c"
    address = ceph_tool.free_address(start=200) if os.geteuid() == 0 else "127.77.251.1"
    up = cli("up", "--osds", "1", "--name", name, "--address", address)
    try:
        assert up.returncode == 0, up.stderr
        assert re.match(
            rf"ceph {name} up in \d+\.\d\d s: mon {re.escape(address)}:3300, 1 ", up.stdout
        )
        status = json.loads(cli("status", "--name", name, "--json").stdout)
        pids = status["running"]
        assert sorted(pids) == ["client.rgw.gw", "mon.a", "osd.0"]
        assert status["owner"] is None  # started by hand: no test run's orphan
    finally:
        down = cli("down", "--name", name)
    assert down.returncode == 0, down.stderr
    for who, pid in pids.items():
        stat = Path(f"/proc/{pid}/stat")
        # Gone, or a zombie that PID 1 has not reaped yet.
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX", who
    assert not ceph_tool.state_path(name).exists()
    assert not (ceph_tool.STATE_DIR / name).exists()
    assert f"{name}-ceph" not in subprocess.run(["ip", "-br", "link"], capture_output=True,
                                                text=True, check=True).stdout  # fmt: skip
    again = cli("down", "--name", name)
    assert again.returncode == 0, again.stderr  # idempotent
    gone = cli("status", "--name", name)
    assert gone.returncode == 1 and f"no Ceph instance {name!r} is up" in gone.stderr


def test_orphans_of_a_killed_run_are_reaped() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"t{os.getpid() % 100000}o"
    ceph_tool.STATE_DIR.mkdir(parents=True, exist_ok=True)
    (ceph_tool.STATE_DIR / name / "run").mkdir(parents=True)
    ceph_tool.state_path(name).write_text(
        json.dumps({"name": name, "owner": dead.pid, "daemons": {}})
    )
    ownerless = f"{name}x"  # started from the command line: lives until `down`
    ceph_tool.state_path(ownerless).write_text(
        json.dumps({"name": ownerless, "owner": None, "daemons": {}})
    )
    try:
        assert ceph_tool.reap_orphans(prefix=name) == [name]
        assert not ceph_tool.state_path(name).exists()
        assert not (ceph_tool.STATE_DIR / name).exists()
        assert ceph_tool.state_path(ownerless).exists()
    finally:
        ceph_tool.state_path(ownerless).unlink()


def test_this_run_is_not_an_orphan(ceph: Ceph) -> None:
    assert ceph_tool.reap_orphans(prefix=ceph.name) == []
    assert ceph.pids()


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"name": "Bad-Name"}, "bad instance name"),
        ({"name": "waytoolongname"}, "bad instance name"),
        ({"osds": 4}, "out of range 1..3"),
        ({"osds": 0}, "out of range 1..3"),
    ],
)
def test_bad_arguments_start_nothing(kwargs: dict[str, object], why: str) -> None:
    with pytest.raises(CephError, match=why):
        Ceph.up(**kwargs)  # type: ignore[arg-type]


def test_an_address_outside_its_range_is_refused() -> None:
    if os.geteuid() != 0:
        pytest.skip("the range check applies to the addresses root configures")
    with pytest.raises(CephError, match=r"must be in 198\.19\.254\.0/24 or loopback"):
        Ceph.up(1, name=f"t{os.getpid() % 100000}r", address="192.0.2.77")
    assert not ceph_tool.state_path(f"t{os.getpid() % 100000}r").exists()


def test_keys_are_cephx_secrets() -> None:
    raw = base64.b64decode(ceph_tool.gen_key())
    kind, _created, _nsec, length = struct.unpack("<HIIH", raw[:12])
    assert (kind, length, len(raw)) == (1, 16, 28)
    assert ceph_tool.gen_key() != ceph_tool.gen_key()


def test_reachable_from_a_node_in_a_network_namespace(ceph: Ceph) -> None:
    """What the cluster benchmark needs: a node of an emulated cluster (no default
    route, only its /24) reaches radosgw and the monitor and OSDs once it has a
    route to the Ceph range via its bridge."""
    from tools.cluster import Cluster

    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root: network namespaces must be tested")
        pytest.skip("network namespaces need root")
    with Cluster.up(1, "1gbit", name=f"t{os.getpid() % 100000}k", subnet="198.19.250.0/24") as c:
        ns = c.namespace("n1")
        ceph_tool.route_from(ns, c.bridge_address)
        url = f"{ceph.endpoint}/"
        probe = (
            f"import urllib.request; r = urllib.request.urlopen({url!r}, timeout=5);"
            " print(r.status, r.read().decode())"
        )
        got = c.run("n1", ["/usr/bin/python3", "-c", probe], capture_output=True, text=True,
                    timeout=30)  # fmt: skip
        assert got.returncode == 0, got.stderr
        assert got.stdout.startswith("200 ") and "ListAllMyBucketsResult" in got.stdout
        # librados from inside: the monitor and an OSD answer there too.
        cluster = ceph.rados()
        try:
            with cluster.open_ioctx(ceph.pool) as ioctx:
                ioctx.write_full("probe-from-netns", b"hello from the host")
        finally:
            cluster.shutdown()
        argv = ["rados", "-c", str(ceph.conf), "-p", ceph.pool, "get", "probe-from-netns", "-"]
        rados = c.run("n1", argv, capture_output=True, timeout=30)
        assert rados.returncode == 0, rados.stderr
        assert rados.stdout == b"hello from the host"


def test_demo_seeded_from_ceph_over_s3(ceph: Ceph, tmp_path: Path) -> None:
    """`p2pcast demo --ceph` on the session's instance (it is left running)."""
    out = subprocess.run(
        [sys.executable, "-m", "p2pcast", "demo", "--ceph", "--nodes", "3", "--size", "12M",
         "--chunk-size", "1M", "--json", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "P2PCAST_CEPH_NAME": ceph.name,
             "P2PCAST_CONTROL": "/nonexistent/p2pcast.sock"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["origin"] == "s3://p2pcast-demo"
    assert all(n["sha256_ok"] for n in report["p2pcast"]["nodes"].values())
    # radosgw's own counter: the image once for p2pcast, once per node the naive way.
    assert 1.0 <= report["p2pcast"]["ceph_served_per_image"] <= 1.05
    assert 3.0 <= report["naive"]["ceph_served_per_image"] <= 3.05
    assert sorted(ceph.pids()) == ["client.rgw.gw", "mon.a", "osd.0", "osd.1", "osd.2"]
