#!/usr/bin/python3
"""A real single-node Ceph for tests, the cluster benchmark and the demo: one
monitor, 1-3 memstore OSDs and radosgw serving S3, up in a few seconds.

    tools/ceph.py up [--osds 3]        # start (replaces an instance of the same name)
    eval "$(tools/ceph.py env)"        # AWS_*, CEPH_CONF and P2PCAST_* for p2pcast
    tools/ceph.py status               # daemons, PIDs, addresses
    tools/ceph.py down                 # stop exactly the recorded PIDs, remove everything

From Python (tests, benchmarks)::

    from tools.ceph import Ceph
    with Ceph.up(osds=3, name="t1", address="198.19.254.7") as ceph:
        ceph.env()                     # {"AWS_ENDPOINT_URL": "http://198.19.254.7:7480", ...}

Addresses: every daemon listens on one address of the instance's own. As root
that is a /32 in 198.19.254.0/24 (RFC 2544's benchmarking range, which no
tools/cluster.py or bench default uses) on a bridge of its own, `<name>-ceph`;
the host reaches it like any local address, and a node of an emulated
cluster through its bridge once it has a route (`Ceph.route_from(namespace,
via)`; see tools/README.md). Without root it is a loopback address.

The shebang is Debian's Python on purpose: the monitor is driven through
python3-rados, which imports only into Debian's CPython 3.11 (or a venv of it).
Data lives in memory (memstore) and is thrown away by `down`. See
shared/notes/ceph.md for the facts this relies on.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.statefile import StateFiles

#: Where instances keep their state file (NAME.json) and directory (NAME/).
STATE_DIR = Path(
    os.environ.get(
        "P2PCAST_CEPH_DIR",
        "/run/p2pcast-ceph" if os.geteuid() == 0 else f"/tmp/p2pcast-ceph-{os.geteuid()}",
    )
)
DEFAULT_NAME = "p2pc"
#: The instances' addresses (root only): a /24 that tools/cluster.py's default
#: (198.18.0.0/24), bench/cluster_bench.py's (198.18.9.0/24) and the tests'
#: clusters (198.19.1-253.0/24) leave alone.
CEPH_SUBNET = ipaddress.IPv4Network("198.19.254.0/24")
DEFAULT_ADDRESS = "198.19.254.1"
#: Without root no interface can be made; loopback is the host's own.
DEFAULT_LOOPBACK = "127.0.0.1"
MON_PORTS = (3300, 6789)  # msgr v2, v1: the standard ones, on the instance's own address
#: OSD ports: Ceph's default 6800-7300 covers slurmctld's 6817 and slurmd's 6818.
BIND_PORTS = (7310, 7399)
RGW_PORT = 7480
MAX_OSDS = 3
DEFAULT_OSDS = 3
#: PGs per data pool: with 8, one of 3 OSDs got no object in the notes' test.
DATA_PG_NUM = 32
#: PGs of RGW's own small pools: few objects, and every PG costs peering time.
META_PG_NUM = 8
#: memstore keeps every stored byte in RAM; this caps one OSD.
MEMSTORE_BYTES = 4 << 30
#: The pool `p2pcast push ... rados://POOL` uses by default.
RADOS_POOL = "p2pcast"
#: RGW's bucket data pool, made before RGW starts so it gets DATA_PG_NUM PGs.
RGW_DATA_POOL = "default.rgw.buckets.data"
#: RGW's control objects (notify.N), which every radosgw watches.
RGW_CONTROL_POOL = "default.rgw.control"
S3_USER = "p2pcast"
RGW_NAME = "gw"
START_TIMEOUT = 60.0
KILL_GRACE = 5.0
_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,9}")  # "<name>-ceph" must fit IFNAMSIZ (15)
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool")


class CephError(RuntimeError):
    """A failure the CLI reports as one line."""


_STATES = StateFiles(STATE_DIR, CephError, private=True, mode=0o700)


def missing_binaries() -> list[str]:
    """The Ceph programs this tool needs that are not installed."""
    return [b for b in BINARIES if _which(b) is None]


def _which(name: str) -> str | None:
    for path in (shutil.which(name), f"/usr/bin/{name}", f"/usr/sbin/{name}"):
        if path and os.access(path, os.X_OK):
            return path
    return None


def _tool(name: str) -> str:
    path = _which(name)
    if path is None:
        raise CephError(
            f"`{name}` not found: apt-get install ceph-mon ceph-osd radosgw ceph-common"
            " python3-rados (or run tools/setup.sh)"
        )
    return path


def _librados() -> Any:
    try:
        import rados
    except ImportError as exc:
        raise CephError(
            f"python3-rados does not import into {sys.executable} ({exc}): run this tool"
            " with /usr/bin/python3 or the project's .venv (tools/setup.sh)"
        ) from exc
    return rados


def gen_key() -> str:
    """A cephx secret as ceph-authtool --gen-print-key makes it, without a process:
    type 1 (AES), creation time, length 16, 16 random bytes; base64."""
    header = struct.pack("<HIIH", 1, int(time.time()), 0, 16)
    return base64.b64encode(header + secrets.token_bytes(16)).decode()


# ---- processes --------------------------------------------------------------------


def _proc_start(pid: int) -> int | None:
    """Start time (clock ticks) of a running PID; None if gone or a zombie (PID 1 here
    reaps late, so a killed daemon can stay a zombie for seconds)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _alive(pid: int, start: int) -> bool:
    return _proc_start(pid) == start


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _kill(victims: Mapping[int, int], sig: int = signal.SIGKILL) -> list[int]:
    """Signal PID -> start-time pairs, wait until they are gone; PIDs that stay."""
    live = {pid: start for pid, start in victims.items() if _alive(pid, start)}
    for pid in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + KILL_GRACE
    while live and time.monotonic() < deadline:
        time.sleep(0.01)
        live = {pid: start for pid, start in live.items() if _alive(pid, start)}
    return sorted(live)


# ---- state ------------------------------------------------------------------------


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise CephError(
            f"bad instance name {name!r}: 1-10 lowercase letters and digits, starting with"
            " a letter (the bridge is <name>-ceph, and interface names are limited to 15)"
        )


def state_path(name: str) -> Path:
    return _STATES.path(name)


def _read_state(name: str) -> dict[str, Any] | None:
    return _STATES.read(name)


def _write_state(state: Mapping[str, Any]) -> None:
    _STATES.write(state["name"], state)


def _locked() -> contextlib.AbstractContextManager[None]:
    """Serialize up and down (flock on the state directory)."""
    return _STATES.locked()


# ---- network ----------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ip = _which("ip")
    if ip is None:
        raise CephError("`ip` not found: apt-get install iproute2")
    proc = subprocess.run([ip, *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise CephError(f"ip {' '.join(args)}: {' '.join(proc.stderr.split())}")
    return proc


def _local_addresses() -> dict[str, str]:
    """IPv4 address -> the interface that has it."""
    found: dict[str, str] = {}
    for link in json.loads(_ip("-j", "addr", "show").stdout or "[]"):
        for addr in link.get("addr_info", []):
            if addr.get("family") == "inet":
                found[addr["local"]] = link["ifname"]
    return found


def bridge_name(name: str) -> str:
    return f"{name}-ceph"


def free_address(start: int = 1) -> str:
    """The first address of CEPH_SUBNET from host number START on that no interface
    holds (as root), for a test run's own instance."""
    used = _local_addresses()
    hosts = list(CEPH_SUBNET.hosts())
    for offset in range(len(hosts)):
        candidate = str(hosts[(start - 1 + offset) % len(hosts)])
        if candidate not in used:
            return candidate
    raise CephError(f"every address of {CEPH_SUBNET} is taken")


def _add_address(name: str, address: str) -> str | None:
    """Make ADDRESS local: loopback addresses are; one of CEPH_SUBNET goes on a bridge
    of the instance's own. Returns the interface made (for `down`), if any."""
    ip = ipaddress.IPv4Address(address)
    if ip.is_loopback:
        return None
    if ip not in CEPH_SUBNET:
        raise CephError(f"address {address} must be in {CEPH_SUBNET} or loopback")
    if os.geteuid() != 0:
        raise CephError(f"address {address} needs root (a bridge); use --address 127.0.0.1")
    holder = _local_addresses().get(address)
    if holder is not None:
        raise CephError(f"address {address} is already on {holder}: choose another --address")
    bridge = bridge_name(name)
    _ip("link", "del", bridge, check=False)  # a stale one from a crashed `up`
    # A bridge because this kernel has no dummy interfaces; with no ports it carries
    # nothing itself, it only makes the /32 local (reached via any interface).
    _ip("link", "add", bridge, "type", "bridge")
    _ip("addr", "add", f"{address}/32", "dev", bridge)
    _ip("link", "set", bridge, "up")
    return bridge


def route_from(namespace: str, via: str) -> None:
    """Let the network namespace NAMESPACE reach every instance: a route to
    CEPH_SUBNET via VIA, the host's address on that namespace's bridge (a
    tools/cluster.py cluster's `bridge_address`). Idempotent."""
    _ip("-n", namespace, "route", "replace", str(CEPH_SUBNET), "via", via)


# ---- configuration ----------------------------------------------------------------


def _conf(d: Path, fsid: str, address: str, rgw_port: int) -> str:
    mon = f"[v2:{address}:{MON_PORTS[0]},v1:{address}:{MON_PORTS[1]}]"
    return f"""\
[global]
fsid = {fsid}
mon_host = {mon}
public_addr = {address}
cluster_addr = {address}
ms_bind_port_min = {BIND_PORTS[0]}
ms_bind_port_max = {BIND_PORTS[1]}
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = {d}/keyring
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
pid_file = {d}/run/$name.pid
log_file = {d}/log/$name.log
mon_cluster_log_file = {d}/log/cluster.log
# one host: one copy, OSDs (not hosts) as the failure domain, fixed PG counts
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_autoscale_mode = off
osd_pool_default_pg_num = {META_PG_NUM}
osd_pool_default_pgp_num = {META_PG_NUM}
mon_max_pg_per_osd = 1000
mon_allow_pool_delete = true
# the one setting that matters for speed: RGW's first start needs ~10 osdmap
# epochs, 1 s each with the default propose interval
paxos_propose_interval = 0.05
paxos_min_wait = 0.01
# no ceph-mgr: without this health turns MGR_DOWN after 120 s
mon_mgr_mkfs_grace = 31536000
# a nearly full disk must not stop the monitor (nor warn: the data is in RAM)
mon_data_avail_crit = 0
mon_data_avail_warn = 1
# every client here is current: no need to allow (and warn about) old ones
auth_allow_insecure_global_id_reclaim = false
# clients (p2pcast's RADOS origin) give up instead of waiting for ever
rados_osd_op_timeout = 30
rados_mon_op_timeout = 30

[mon]
mon_data = {d}/mon/$cluster-$id

[osd]
osd_objectstore = memstore
osd_data = {d}/osd/$cluster-$id
keyring = $osd_data/keyring
memstore_device_bytes = {MEMSTORE_BYTES}

[client.rgw.{RGW_NAME}]
rgw_frontends = beast endpoint={address}:{rgw_port}
rgw_data = {d}/rgw
rgw_dns_name = {address}
# perf counters (get_b) are what the tests read; the usage log costs a write per request
rgw_enable_usage_log = false
"""


def _keyring(entries: Mapping[str, tuple[str, Mapping[str, str]]]) -> str:
    lines = []
    for entity, (key, caps) in entries.items():
        lines += [f"[{entity}]", f"\tkey = {key}"]
        lines += [f'\tcaps {service} = "{cap}"' for service, cap in caps.items()]
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# ---- the instance -----------------------------------------------------------------


class Ceph:
    """A running instance. Start with `Ceph.up`, find one with `Ceph.attach`;
    `down()` (or leaving a `with` block) stops it and removes everything."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)
        self.name: str = state["name"]
        self.dir = Path(state["dir"])
        self.conf = Path(state["conf"])
        self.address: str = state["address"]
        self.rgw_port: int = state["rgw_port"]
        self.osds: int = state["osds"]
        self.access_key: str = state["access_key"]
        self.secret_key: str = state["secret_key"]
        self.pool: str = state["pool"]

    # -- starting ------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        osds: int = DEFAULT_OSDS,
        *,
        name: str = DEFAULT_NAME,
        address: str | None = None,
        rgw_port: int = RGW_PORT,
        owner: int | None = None,
    ) -> Ceph:
        """Start an instance (replacing one of the same NAME) and return it once S3
        answers and its user exists. OWNER: the PID of a process (a test run) whose
        end makes the instance an orphan for reap_orphans; None: it lives until
        `down`, as one started from the command line does."""
        _check_name(name)
        if not 1 <= osds <= MAX_OSDS:
            raise CephError(f"OSD count {osds} out of range 1..{MAX_OSDS}")
        for binary in BINARIES:
            _tool(binary)
        rados = _librados()
        if address is None:
            address = DEFAULT_ADDRESS if os.geteuid() == 0 else DEFAULT_LOOPBACK
        elif address == "auto":  # the first free one: beside other instances
            address = free_address() if os.geteuid() == 0 else DEFAULT_LOOPBACK
        began = time.monotonic()
        with _locked():
            _teardown(name)
            d = STATE_DIR / name
            state: dict[str, Any] = {
                "name": name,
                "dir": str(d),
                "conf": str(d / "ceph.conf"),
                "address": address,
                "rgw_port": rgw_port,
                "osds": osds,
                "fsid": str(uuid.uuid4()),
                "access_key": "P2P" + secrets.token_hex(8).upper(),
                "secret_key": secrets.token_urlsafe(30),
                "pool": RADOS_POOL,
                "owner": owner,
                "interface": None,
                "daemons": {},
                "timings": {},
            }
            try:
                for sub in ("run", "log", "mon", "osd", "rgw"):
                    (d / sub).mkdir(parents=True, mode=0o700)
                _write_state(state)  # from here on `down` can clean up
                state["interface"] = _add_address(name, address)
                _write_state(state)
                _Bringup(state, rados).run()
                state["timings"]["total"] = round(time.monotonic() - began, 3)
                _write_state(state)
            except BaseException:
                _teardown(name)
                raise
        return cls(state)

    @classmethod
    def attach(cls, name: str = DEFAULT_NAME) -> Ceph:
        _check_name(name)
        state = _read_state(name)
        if state is None:
            raise CephError(f"no Ceph instance {name!r} is up (no {state_path(name)})")
        return cls(state)

    def down(self) -> list[int]:
        """Stop the recorded daemons and remove the instance; PIDs that would not die."""
        with _locked():
            return _teardown(self.name)

    def __enter__(self) -> Ceph:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # -- what clients need -----------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}:{self.rgw_port}"

    @property
    def keyring(self) -> Path:
        return self.dir / "keyring"

    def env(self) -> dict[str, str]:
        """Environment for the AWS SDKs, librados and p2pcast's S3 and RADOS origins."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
            "CEPH_CONF": str(self.conf),
            "P2PCAST_S3_ENDPOINTS": self.endpoint,
            "P2PCAST_RADOS_CONF": str(self.conf),
            "P2PCAST_RADOS_ID": "admin",
        }

    def pids(self) -> dict[str, int]:
        """Daemon name -> PID, for those still running."""
        return {
            who: rec["pid"]
            for who, rec in self.daemons().items()
            if _alive(rec["pid"], rec["start"])
        }

    def daemons(self) -> dict[str, dict[str, int]]:
        state = _read_state(self.name) or self.state
        daemons: dict[str, dict[str, int]] = state["daemons"]
        return daemons

    # -- faults and counters (tests) -------------------------------------------------

    def stop_rgw(self) -> None:
        """SIGKILL radosgw (a crash, as tests want it), then fence it as an operator
        would; start it again with start_rgw."""
        with _locked():
            state = _read_state(self.name) or self.state
            rec = state["daemons"].pop(f"client.rgw.{RGW_NAME}", None)
            if rec is not None:
                stuck = _kill({rec["pid"]: rec["start"]})
                if stuck:
                    raise CephError(f"radosgw {stuck} would not die")
                self._fence_dead_watchers()
            _write_state(state)
            self.state = state

    def _fence_dead_watchers(self) -> None:
        """Blocklist the clients still watching radosgw's control objects (only the
        killed radosgw, as no other runs). Otherwise the OSDs keep its watches for
        osd_client_watch_timeout (30 s), and every metadata change the next radosgw
        makes (a bucket created) waits that long for the dead one's acknowledgement:
        measured, a push to a new bucket after a restart took 28 s instead of 1."""
        cluster = self.rados()
        try:
            with cluster.open_ioctx(RGW_CONTROL_POOL) as ioctx:
                names = [str(o.key) for o in ioctx.list_objects()]
            watchers = set()
            for name in names:
                argv = [_tool("rados"), "-c", str(self.conf), "-p", RGW_CONTROL_POOL,
                        "listwatchers", name]  # fmt: skip
                out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
                watchers |= set(re.findall(r"watcher=(\S+)", out.stdout))
            for addr in sorted(watchers):
                command = {"prefix": "osd blocklist", "blocklistop": "add", "addr": addr}
                rc, _, err = cluster.mon_command(json.dumps(command), b"", timeout=30)
                if rc != 0:
                    raise CephError(f"osd blocklist add {addr}: {err}")
        finally:
            cluster.shutdown()

    def start_rgw(self) -> None:
        """Start radosgw again and wait until S3 answers."""
        with _locked():
            state = _read_state(self.name) or self.state
            _Bringup(state, None).start_rgw()
            _write_state(state)
            self.state = state

    def admin_socket(self, daemon: str, command: Mapping[str, Any]) -> Any:
        """Run COMMAND on DAEMON's admin socket (what `ceph daemon osd.0 perf dump`
        does, without starting the ceph CLI): the JSON it answers."""
        path = self.dir / "run" / f"{daemon}.asok"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            try:
                sock.connect(str(path))
                sock.sendall(json.dumps(command).encode() + b"\0")
                size = struct.unpack(">I", _recv_exactly(sock, 4))[0]
                return json.loads(_recv_exactly(sock, size))
            except (OSError, ValueError) as exc:
                raise CephError(f"admin socket {path}: {exc}") from exc

    def osd_reads(self) -> dict[int, tuple[int, int]]:
        """OSD id -> (client read ops, bytes they returned) since the OSD started:
        its perf counters op_r and op_out_bytes."""
        out = {}
        for osd in range(self.osds):
            counters = self.admin_socket(f"osd.{osd}", {"prefix": "perf dump"})["osd"]
            out[osd] = (int(counters["op_r"]), int(counters["op_out_bytes"]))
        return out

    def rgw_reads(self) -> tuple[int, int]:
        """(GET requests, bytes they sent) since radosgw started: its perf counters."""
        counters = self.admin_socket(f"client.rgw.{RGW_NAME}", {"prefix": "perf dump"})["rgw"]
        return int(counters["get"]), int(counters["get_b"])

    def rados(self) -> Any:
        """A connected librados handle as client.admin (the caller shuts it down)."""
        cluster = _librados().Rados(conffile=str(self.conf), rados_id="admin")
        cluster.connect(timeout=10)
        return cluster


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        data = sock.recv(size - len(buf))
        if not data:
            raise OSError("connection closed early")
        buf += data
    return bytes(buf)


class _Bringup:
    """The steps of `up`, recording each daemon's PID in the state as it starts."""

    def __init__(self, state: dict[str, Any], rados: Any) -> None:
        self.state = state
        self.rados = rados
        self.d = Path(state["dir"])
        self.conf = state["conf"]
        self.deadline = time.monotonic() + START_TIMEOUT

    def mark(self, step: str, since: float) -> None:
        self.state["timings"][step] = round(time.monotonic() - since, 3)

    def run(self) -> None:
        t = time.monotonic()
        st = self.state
        address, osds = st["address"], st["osds"]
        Path(self.conf).write_text(_conf(self.d, st["fsid"], address, st["rgw_port"]))
        keys = {
            "mon.": (gen_key(), {"mon": "allow *"}),
            "client.admin": (
                gen_key(),
                {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"},
            ),
            f"client.rgw.{RGW_NAME}": (gen_key(), {"mon": "allow rw", "osd": "allow rwx"}),
        }
        _write_private(self.d / "keyring", _keyring(keys))
        monmap = str(self.d / "monmap")
        addrs = f"[v2:{address}:{MON_PORTS[0]},v1:{address}:{MON_PORTS[1]}]"
        self.check(
            [_tool("monmaptool"), "--create", "--fsid", st["fsid"], "--addv", "a", addrs, monmap]
        )
        self.check(
            self.argv(
                "ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", self.d / "keyring"
            )
        )
        # OSD stores are made while the monitor starts: mkfs needs no monitor.
        osd_uuids = [str(uuid.uuid4()) for _ in range(osds)]
        osd_keys = [gen_key() for _ in range(osds)]
        mkfs = []
        for i in range(osds):
            data = self.d / "osd" / f"ceph-{i}"
            data.mkdir(mode=0o700)
            _write_private(data / "keyring", _keyring({f"osd.{i}": (osd_keys[i], {})}))
            argv = self.argv(
                "ceph-osd", "-i", i, "--mkfs", "--no-mon-config", "--osd-uuid", osd_uuids[i]
            )
            mkfs.append(self.popen(argv))
        self.start("mon.a", self.argv("ceph-mon", "-i", "a"))
        for i, proc in enumerate(mkfs):
            if proc.wait(timeout=self.left()) != 0:
                raise CephError(f"ceph-osd --mkfs of osd.{i} failed: {self.log_tail('mkfs')}")
        self.mark("mkfs", t)
        cluster = self.rados.Rados(conffile=self.conf, rados_id="admin")
        try:
            cluster.connect(timeout=self.left())
            self.mark("mon", t)
            for i in range(osds):
                secret = json.dumps({"cephx_secret": osd_keys[i]}).encode()
                self.mon(cluster, "osd new", secret, uuid=osd_uuids[i], id=i)
            for i in range(osds):
                self.start(f"osd.{i}", self.argv("ceph-osd", "-i", i))
            for pool, app in ((RADOS_POOL, "rados"), (RGW_DATA_POOL, "rgw")):
                self.mon(
                    cluster, "osd pool create", pool=pool, pg_num=DATA_PG_NUM, pgp_num=DATA_PG_NUM
                )
                self.mon(cluster, "osd pool application enable", pool=pool, app=app)
            while True:
                stat = json.loads(self.mon(cluster, "osd stat", format="json"))
                if stat["num_up_osds"] == osds and stat["num_in_osds"] == osds:
                    break
                self.wait(f"{osds} OSDs up (have {stat['num_up_osds']})")
            self.mark("osds", t)
        finally:
            cluster.shutdown()
        self.start_rgw()
        self.mark("rgw", t)
        keys_args = ("--access-key", st["access_key"], "--secret-key", st["secret_key"])
        user = ("user", "create", "--uid", S3_USER, "--display-name", "p2pcast", *keys_args)
        self.check(self.argv("radosgw-admin", "-n", "client.admin", *user))
        self.mark("s3_user", t)

    def start_rgw(self) -> None:
        st = self.state
        who = f"client.rgw.{RGW_NAME}"
        self.start(who, self.argv("radosgw", "-n", who))
        url = f"http://{st['address']}:{st['rgw_port']}/"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    reply.read()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer: the frontend serves requests
            except OSError:
                if not _alive(st["daemons"][who]["pid"], st["daemons"][who]["start"]):
                    raise CephError(f"radosgw exited: {self.log_tail(who)}") from None
                self.wait(f"radosgw to answer on {url}")

    # -- helpers ---------------------------------------------------------------------

    def left(self) -> float:
        return max(0.1, self.deadline - time.monotonic())

    def wait(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise CephError(f"timed out after {START_TIMEOUT:g} s waiting for {what}")
        time.sleep(0.02)

    def log_tail(self, who: str) -> str:
        for path in (self.d / "log" / f"{who}.out", self.d / "log" / f"{who}.log"):
            with contextlib.suppress(OSError):
                lines = path.read_text(errors="replace").strip().splitlines()
                if lines:
                    return " | ".join(lines[-5:])
        return "(no log)"

    def argv(self, tool: str, *args: object) -> list[str]:
        """TOOL's full path, -c this instance's ceph.conf, then ARGS."""
        return [_tool(tool), "-c", self.conf, *map(str, args)]

    def popen(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        with open(self.d / "log" / "mkfs.out", "ab") as out:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def check(self, argv: Sequence[str]) -> None:
        proc = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=self.left()
        )
        if proc.returncode != 0:
            detail = " ".join((proc.stderr or proc.stdout).split())[-500:]
            raise CephError(f"{Path(argv[0]).name} failed: {detail}")

    def start(self, who: str, argv: Sequence[str]) -> None:
        """Start a daemon (it forks into the background) and record its PID, from
        its pid file, with the process's start time (guards against PID reuse)."""
        pidfile = self.d / "run" / f"{who}.pid"
        pidfile.unlink(missing_ok=True)
        # Output to a file, not a pipe: the daemon keeps its stdio, and a pipe would
        # hold subprocess.run until the daemon exits.
        with open(self.d / "log" / f"{who}.out", "ab") as out:
            rc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                check=False,
                timeout=self.left(),
            ).returncode
        if rc != 0:
            raise CephError(f"{who} did not start (exit {rc}): {self.log_tail(who)}")
        while True:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                start = _proc_start(pid)
                if start is not None:
                    break
            self.wait(f"{who}'s pid file")
        self.state["daemons"][who] = {"pid": pid, "start": start}
        _write_state(self.state)

    def mon(self, cluster: Any, prefix: str, inbuf: bytes = b"", **args: Any) -> bytes:
        """A monitor command through librados (the ceph CLI takes ~0.3 s to start)."""
        command = json.dumps({"prefix": prefix, **args})
        rc, out, err = cluster.mon_command(command, inbuf, timeout=self.left())
        if rc != 0:
            raise CephError(f"ceph {prefix}: {err or os.strerror(-rc)}")
        result: bytes = out
        return result


def _teardown(name: str) -> list[int]:
    """Stop instance NAME's daemons and remove its bridge, directory and state file.
    Works without a state file (a crashed `up`): PIDs come from the recorded state
    and from the pid files in its directory, and each must still be the same
    process (its start time, or its command line naming this instance's ceph.conf).
    Never by process name. The caller holds the lock."""
    state = _read_state(name)
    d = STATE_DIR / name
    conf = str(d / "ceph.conf")
    victims: dict[int, int] = {}
    for rec in (state or {}).get("daemons", {}).values():
        if _alive(rec["pid"], rec["start"]):
            victims[rec["pid"]] = rec["start"]
    for pidfile in (d / "run").glob("*.pid") if (d / "run").is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            start = _proc_start(pid)
            if start is not None and conf in _cmdline(pid):
                victims[pid] = start
    # SIGKILL: the data is thrown away anyway, and SIGTERM to radosgw and the OSDs
    # together makes radosgw hang for about 10 s.
    stuck = _kill(victims)
    interface = (state or {}).get("interface") or bridge_name(name)
    if os.geteuid() == 0 and interface in {i for i in _local_addresses().values()} | set(_links()):
        _ip("link", "del", interface, check=False)
    shutil.rmtree(d, ignore_errors=True)
    state_path(name).unlink(missing_ok=True)
    return stuck


def _links() -> list[str]:
    if _which("ip") is None:
        return []
    return [link["ifname"] for link in json.loads(_ip("-j", "link", "show").stdout or "[]")]


def reap_orphans(prefix: str) -> list[str]:
    """Take down instances named PREFIX... whose owner process is gone (a test run
    killed before its fixture could stop them); never one without an owner.
    Returns their names."""
    reaped = []
    for path in sorted(STATE_DIR.glob(f"{prefix}*.json")) if STATE_DIR.is_dir() else []:
        name = path.stem
        state = _read_state(name) if _NAME_RE.fullmatch(name) else None
        if state is None:
            continue
        owner = state.get("owner")
        if isinstance(owner, int) and _proc_start(owner) is None:
            with _locked():
                _teardown(name)
            reaped.append(name)
    return reaped


# ---- the CLI ----------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    ceph = Ceph.up(args.osds, name=args.name, address=args.address, rgw_port=args.rgw_port)
    if args.json:
        print(json.dumps(_public(ceph.state), indent=2))
        return 0
    timings = ceph.state["timings"]
    print(
        f"ceph {ceph.name} up in {timings['total']:.2f} s: mon {ceph.address}:{MON_PORTS[0]}, "
        f"{ceph.osds} memstore OSD(s), S3 {ceph.endpoint}, RADOS pool {ceph.pool}, "
        f"conf {ceph.conf}"
    )
    print(f"  steps (s since start): {', '.join(f'{k} {v}' for k, v in timings.items())}")
    print(f'  eval "$({Path(sys.argv[0]).name} env --name {ceph.name})"  # for p2pcast, aws, rados')
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    _check_name(args.name)
    with _locked():
        stuck = _teardown(args.name)
    if stuck:
        raise CephError(f"instance {args.name} removed, but PIDs {stuck} would not die")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    ceph = Ceph.attach(args.name)
    daemons = ceph.daemons()
    running = ceph.pids()
    if args.json:
        print(json.dumps({**_public(ceph.state), "running": running}, indent=2))
        return 0 if len(running) == len(daemons) else 1
    print(f"ceph {ceph.name}: {ceph.address}, S3 {ceph.endpoint}, conf {ceph.conf}")
    for who, rec in daemons.items():
        print(f"  {who:<16} pid {rec['pid']:<8} {'running' if who in running else 'GONE'}")
    return 0 if len(running) == len(daemons) else 1


def _cmd_counters(args: argparse.Namespace) -> int:
    ceph = Ceph.attach(args.name)
    gets, sent = ceph.rgw_reads()
    osds = ceph.osd_reads()
    counters = {
        "rgw": {"get": gets, "get_b": sent},
        "osd": {str(osd): {"op_r": ops, "op_out_bytes": read} for osd, (ops, read) in osds.items()},
    }
    if args.json:
        print(json.dumps(counters, indent=2))
        return 0
    print(f"radosgw: {gets} GETs sent {sent} bytes")
    for osd, (ops, read) in osds.items():
        print(f"osd.{osd}: {ops} read ops returned {read} bytes")
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    env = Ceph.attach(args.name).env()
    if args.json:
        print(json.dumps(env, indent=2))
    else:
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()))
    return 0


def _public(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state without the S3 secret (`env` prints it on purpose)."""
    return {k: v for k, v in state.items() if k != "secret_key"}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=DEFAULT_NAME, help="instance (default %(default)s)")
    parser = argparse.ArgumentParser(
        prog="ceph.py", description="A single-node Ceph with S3 for p2pcast (tools/README.md)."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", parents=[common], help="start (replaces an instance of NAME)")
    up.add_argument("--osds", type=int, default=DEFAULT_OSDS, help="1..3 (default %(default)s)")
    up.add_argument(
        "--address",
        default=None,
        help=f"{DEFAULT_ADDRESS} as root (a /32 in {CEPH_SUBNET}; 'auto': the first free"
        f" one), else {DEFAULT_LOOPBACK}",
    )
    up.add_argument("--rgw-port", type=int, default=RGW_PORT)
    up.add_argument("--json", action="store_true", help="print the state (less the secret)")
    up.set_defaults(func=_cmd_up)
    down = sub.add_parser("down", parents=[common], help="stop its daemons, remove it")
    down.set_defaults(func=_cmd_down)
    status = sub.add_parser("status", parents=[common], help="daemons and PIDs (exit 1: one died)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)
    counters = sub.add_parser(
        "counters", parents=[common], help="reads served so far (radosgw and OSD perf counters)"
    )
    counters.add_argument("--json", action="store_true")
    counters.set_defaults(func=_cmd_counters)
    env = sub.add_parser("env", parents=[common], help="print export lines (or --json)")
    env.add_argument("--json", action="store_true")
    env.set_defaults(func=_cmd_env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CephError as exc:
        print(f"ceph: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
