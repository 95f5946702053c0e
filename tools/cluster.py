#!/usr/bin/env python3
"""An emulated cluster on one machine: N nodes and an origin host, each in its
own network namespace, joined by a Linux bridge, every link shaped with tc in
both directions.

    python tools/cluster.py up 8 --rate 400mbit     # build (replaces one of the same name)
    python tools/cluster.py exec n3 -- ip -br addr  # run a command in a node's namespace
    python tools/cluster.py status                  # nodes, addresses, rates, PIDs
    python tools/cluster.py down                    # stop everything in it and remove it

From Python (benchmarks, tests)::

    from tools.cluster import Cluster
    with Cluster.up(4, rate_bit=400_000_000) as cluster:
        cluster.run("n1", ["ip", "route"])

Standard library only; needs root and iproute2 (`ip`, `tc`). See tools/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.statefile import StateFiles

STATE_DIR = Path(os.environ.get("P2PCAST_CLUSTER_DIR", "/run/p2pcast-cluster"))
NETNS_DIR = Path("/run/netns")
DEFAULT_NAME = "p2pc"
DEFAULT_SUBNET = "198.18.0.0/24"
DEFAULT_RATE = "400mbit"
# RFC 2544 benchmarking range: the only addresses this tool will configure.
TEST_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
ORIGIN = "origin"
ORIGIN_HOST = 200  # origin address: .200
BRIDGE_HOST = 254  # the root namespace's address on the bridge: .254
MAX_NODES = ORIGIN_HOST - 1
MAX_NAME = 8  # "<name>-origin" must fit IFNAMSIZ (15 characters)
NS_IFACE = "eth0"  # a host's end of its veth pair, inside its namespace
KILL_GRACE_S = 5.0
HTB_QUANTUM = 65536  # only has to exceed the largest (GSO) packet
#: Seconds `restore` waits for a veth to be up and forwarding again (the kernel
#: reports carrier changes within about a second).
RESTORE_TIMEOUT = 3.0
#: /sys/class/net/PORT/brport/state of a bridge port that forwards (BR_STATE_FORWARDING).
BR_FORWARDING = "3"
#: The small-packet (ACK) class is assured rate / this (see _shaping).
ACK_SHARE_DIVISOR = 20
#: Its queue: small packets only, so a packet count, not bytes.
ACK_LEAF = "pfifo limit 1000"
#: set_loss's nftables table, in the lossy host's namespace (it goes with the namespace).
LOSS_TABLE = "p2pcast_loss"
#: set_loss draws numgen random mod LOSS_SCALE: loss is settable in steps of 0.01 %.
LOSS_SCALE = 10_000
#: The "leaf" of a cluster built with shaped=False: no qdisc at all, links run at
#: veth speed (tools/slurm.py's default, where shaping is not the point).
UNSHAPED = "none"
_NAME_RE = re.compile(r"[a-z][a-z0-9]*")
_RATE_UNITS = {"": 1, "bit": 1, "k": 10**3, "kbit": 10**3}
_RATE_UNITS |= {"m": 10**6, "mbit": 10**6, "g": 10**9, "gbit": 10**9}


class ClusterError(RuntimeError):
    """A failure the CLI reports as one line (bad input, not root, a failed ip/tc call)."""


_STATES = StateFiles(STATE_DIR, ClusterError)


# ---- units -----------------------------------------------------------------------


def parse_rate(value: str | int) -> int:
    """Bits per second from `400mbit`, `1gbit`, `2.5gbit`, `500kbit` or a number.

    Units are tc's: SI prefixes of bits (80mbit = 10,000,000 bytes/s)."""
    if isinstance(value, int):
        bits = value
    else:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", value.strip().lower())
        if m is None or m.group(2) not in _RATE_UNITS:
            raise ClusterError(f"bad rate {value!r}: give bits/s like 400mbit, 1gbit, 500kbit")
        bits = round(float(m.group(1)) * _RATE_UNITS[m.group(2)])
    if bits < 100_000:
        raise ClusterError(f"rate {value!r} is below 100kbit")
    return bits


def format_rate(bits: int) -> str:
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits % scale == 0:
            return f"{bits // scale}{unit}"
    return f"{bits}bit"


def parse_delay(value: str | float) -> float:
    """Milliseconds from `0.1ms`, `100us`, `1s` or a number (milliseconds)."""
    if isinstance(value, int | float):
        ms = float(value)
    else:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(us|ms|s)?", value.strip().lower())
        if m is None:
            raise ClusterError(f"bad delay {value!r}: give e.g. 0.1ms, 100us, 2ms")
        ms = float(m.group(1)) * {"us": 1e-3, "s": 1e3}.get(m.group(2) or "ms", 1.0)
    if ms < 0:
        raise ClusterError(f"delay {value!r} is negative")
    return ms


# ---- ip / tc ----------------------------------------------------------------------


def _tool(name: str) -> str:
    found = shutil.which(name)
    for path in (found, f"/usr/sbin/{name}", f"/sbin/{name}"):
        if path and os.access(path, os.X_OK):
            return path
    raise ClusterError(f"`{name}` not found: install iproute2 (apt-get install iproute2)")


def require_privileges() -> None:
    """Fail clearly unless this is root with iproute2 installed."""
    if os.geteuid() != 0:
        raise ClusterError("must run as root (namespaces, veths and tc need CAP_NET_ADMIN)")
    _tool("ip")
    _tool("tc")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _batch(tool: str, lines: Sequence[str], netns: str | None = None, force: bool = False) -> str:
    """Run `ip`/`tc` in batch mode (one process for many commands), in NETNS if given.
    Raise ClusterError naming the failed command unless FORCE (then return stderr)."""
    argv = [_tool(tool), *(["-n", netns] if netns else []), *(["-force"] if force else [])]
    proc = subprocess.run(
        [*argv, "-batch", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 and not force:
        m = re.search(r"-:(\d+)", proc.stderr)
        where = f" `{lines[int(m.group(1)) - 1]}`" if m and int(m.group(1)) <= len(lines) else ""
        detail = [ln for ln in proc.stderr.splitlines() if not ln.startswith("Command failed")]
        inside = f" (in {netns})" if netns else ""
        raise ClusterError(f"{tool}{where}{inside}: {_one_line(' '.join(detail)) or 'failed'}")
    return proc.stderr


def _choose_leaf(name: str, delay_ms: float) -> str:
    """The queue under each shaper: netem if a delay is asked for (an error if this
    kernel lacks it), else fq_codel, else bfifo. Probed on a scratch veth pair before
    anything is torn down or built."""
    ip, tc, probe = _tool("ip"), _tool("tc"), f"{name}-qa"
    subprocess.run([ip, "link", "del", probe], capture_output=True, check=False)  # a stale one
    _batch("ip", [f"link add {probe} type veth peer name {name}-qb"])
    try:
        for kind in ["netem"] if delay_ms > 0 else ["fq_codel"]:
            argv = [tc, "qdisc", "add", "dev", probe, "root", kind]
            if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
                return kind
    finally:
        subprocess.run([ip, "link", "del", probe], capture_output=True, check=False)
    if delay_ms > 0:
        raise ClusterError("--delay needs the netem qdisc (sch_netem), which this kernel lacks")
    return "bfifo"


def _shaping(dev: str, rate_bit: int, leaf: str, delay_ms: float) -> list[str]:
    """tc batch lines shaping DEV's egress at RATE: an htb class with LEAF queue for
    bulk data, and a priority class for small packets (pure TCP ACKs).

    Every node of a broadcast uploads and downloads at once, so the ACKs of its
    download leave through its upload. Behind a 50 ms FIFO of its own bulk data
    they cost every flow in both directions (measured here, one stream each way
    between two nodes at 100 Mbit/s: 0.90 of the rate each, against 0.956 for
    one way; a ring of 16 streams 0.84 on average, one node 0.68). A real host
    does not queue ACKs behind tens of milliseconds of its own data (per-flow
    queues, fast NICs), and with no fq or fq_codel in some kernels the classes
    do it here: both borrow up to the full rate, the ACK class is served first.
    """
    rate_byte = rate_bit // 8
    # Burst: 5 ms at full rate, at least two 64 KiB GSO packets (veths pass GSO
    # packets to the qdisc); enough for a timer-driven shaper, small enough that
    # a transfer of a few MB sees the configured rate.
    burst = max(128 * 1024, rate_byte * 5 // 1000)
    if leaf == "netem":
        leaf_args = f"netem delay {round(delay_ms * 1000)}us limit 10000"
    elif leaf == "fq_codel":
        leaf_args = "fq_codel"
    else:  # bfifo: a 50 ms queue, not a bufferbloated 1000 packets of up to 64 KiB
        leaf_args = f"bfifo limit {max(256 * 1024, rate_byte // 20)}"
    # The ACK class's assured share: ACKs of a full-rate download need ~2-3 %
    # of the link; the rest of the time the bulk class borrows it.
    ack_bit = max(rate_bit // ACK_SHARE_DIVISOR, 8000)
    bulk_bit = max(rate_bit - ack_bit, 8000)
    htb = f"burst {burst} cburst {burst} quantum {HTB_QUANTUM}"
    return [
        f"qdisc replace dev {dev} root handle 1: htb default 20",
        f"class add dev {dev} parent 1: classid 1:1 htb rate {rate_bit}bit ceil {rate_bit}bit "
        f"{htb}",
        f"class add dev {dev} parent 1:1 classid 1:10 htb rate {ack_bit}bit "
        f"ceil {rate_bit}bit prio 0 {htb}",
        f"class add dev {dev} parent 1:1 classid 1:20 htb rate {bulk_bit}bit "
        f"ceil {rate_bit}bit prio 1 {htb}",
        # Packets of an IPv4 total length under 128 bytes: pure ACKs (with
        # timestamps and SACK blocks 52-84 bytes), SYNs, and small frames.
        f"filter add dev {dev} parent 1: protocol ip prio 1 u32 "
        f"match u16 0x0000 0xff80 at 2 flowid 1:10",
        f"qdisc add dev {dev} parent 1:10 handle 11: {ACK_LEAF if leaf == 'bfifo' else leaf_args}",
        f"qdisc add dev {dev} parent 1:20 handle 10: {leaf_args}",
    ]


# ---- state ------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One emulated machine: a node (n1..nN) or the origin."""

    node: str
    namespace: str
    address: str
    veth: str  # its veth's end in the root namespace, a port of the bridge
    rate_bit: int  # its link's rate, each direction


def state_path(name: str) -> Path:
    return _STATES.path(name)


def _read_state(name: str) -> dict[str, Any] | None:
    return _STATES.read(name)


def _write_state(name: str, state: Mapping[str, Any]) -> None:
    _STATES.write(name, state)


def _locked() -> contextlib.AbstractContextManager[None]:
    """Serialize changes to clusters and state files."""
    return _STATES.locked()


def check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name) or len(name) > MAX_NAME:
        raise ClusterError(
            f"bad cluster name {name!r}: lowercase letters and digits, starting with a letter, "
            f"at most {MAX_NAME} characters (interface names are limited to 15)"
        )


# ---- processes --------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of PID, or None if there is none."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def alive(pid: int, start: int | None = None) -> bool:
    """Running (a zombie counts as gone: PID 1 may reap late) and, if START is given,
    still the same process."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and start in (None, stat[1])


def netns_pids(namespace: str) -> list[int]:
    """PIDs whose network namespace is /run/netns/NAMESPACE: what `ip netns pids` prints,
    without a process per call. Includes processes in other mount namespaces (slurmd
    started with nsenter+unshare); never this process."""
    try:
        target = os.stat(NETNS_DIR / namespace)
    except OSError:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry.name))
    return sorted(pids)


def stop_processes(victims: Mapping[int, int]) -> list[int]:
    """SIGTERM the PID -> start-time pairs, wait up to KILL_GRACE_S, SIGKILL the rest.
    Return the PIDs still alive after that (stuck in the kernel)."""
    live = dict(victims)
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 2.0)):
        for pid, start in live.items():
            if alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while True:
            live = {pid: start for pid, start in live.items() if alive(pid, start)}
            if not live or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if not live:
            break
    return sorted(live)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


# ---- build and tear down ----------------------------------------------------------


def _own_namespaces(name: str, state: Mapping[str, Any] | None) -> list[str]:
    pattern = re.compile(rf"{re.escape(name)}-(n\d+|{ORIGIN})")
    found = (
        {e.name for e in NETNS_DIR.iterdir() if pattern.fullmatch(e.name)}
        if NETNS_DIR.is_dir()
        else set()
    )
    if state:
        found |= {
            h["namespace"] for h in state.get("hosts", []) if (NETNS_DIR / h["namespace"]).exists()
        }
    return sorted(found)


def _root_links() -> dict[str, list[str]]:
    """Root-namespace interface name -> its IPv4 addresses (CIDR)."""
    proc = subprocess.run(
        [_tool("ip"), "-j", "addr", "show"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise ClusterError(f"ip -j addr show: {_one_line(proc.stderr)}")
    links: dict[str, list[str]] = {}
    for link in json.loads(proc.stdout or "[]"):
        addrs = [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])]
        links[link["ifname"]] = [a for a in addrs if ":" not in a]
    return links


def _own_links(name: str) -> list[str]:
    pattern = re.compile(rf"{re.escape(name)}-(n\d+|{ORIGIN}|br|qa|qb)")
    return sorted(ifname for ifname in _root_links() if pattern.fullmatch(ifname))


def _release_netns_dir() -> None:
    """`ip netns add` bind-mounts /run/netns onto itself; undo that once it is empty."""
    try:
        if any(NETNS_DIR.iterdir()):
            return
    except OSError:
        return
    umount = ["umount", str(NETNS_DIR)]
    for _ in range(4):  # it may be stacked
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        if not any(line.split()[4] == str(NETNS_DIR) for line in mounts):
            return
        if subprocess.run(umount, capture_output=True, check=False).returncode != 0:
            return


def _nft_tool() -> str:
    found = shutil.which("nft") or "/usr/sbin/nft"
    if not os.access(found, os.X_OK):
        raise ClusterError("`nft` not found: install nftables (apt-get install nftables)")
    return found


def _loss_table(name: str, node: str) -> str:
    """set_loss's nftables table for NODE of cluster NAME. The bridge-side one is in the
    root namespace, shared with other clusters, hence both names in it."""
    return f"{LOSS_TABLE}_{name}_{node}"


def _nft(lines: Sequence[str], netns: str | None = None) -> None:
    """Apply nft LINES as one transaction, in network namespace NETNS if given."""
    argv = [_nft_tool(), "-f", "-"]
    if netns is not None:
        argv = [_tool("ip"), "netns", "exec", netns, *argv]
    proc = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True,
                          text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        inside = f" (in {netns})" if netns else ""
        raise ClusterError(f"nft{inside}: {_one_line(proc.stderr)}")


def _drop_loss_tables(name: str) -> None:
    """Delete cluster NAME's set_loss tables in the root namespace (those in its
    namespaces go with them). Without nft there can be none."""
    nft = shutil.which("nft") or "/usr/sbin/nft"
    if not os.access(nft, os.X_OK):
        return
    proc = subprocess.run([nft, "-j", "list", "tables", "netdev"], capture_output=True,
                          text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        return
    prefix = _loss_table(name, "")
    tables = [
        item["table"]["name"]
        for item in json.loads(proc.stdout or "{}").get("nftables", [])
        if "table" in item and item["table"]["name"].startswith(prefix)
    ]
    if tables:
        _nft([f"delete table netdev {t}" for t in tables])


def _teardown(name: str) -> list[int]:
    """Stop every process in cluster NAME's namespaces, delete its namespaces, veths,
    bridge and state file. Works without a state file (a crashed `up`). Returns the
    PIDs that would not die, if any. The caller holds the lock."""
    state = _read_state(name)
    namespaces = _own_namespaces(name, state)
    background = {b["pid"]: b["start"] for b in (state or {}).get("background", [])}
    stuck: list[int] = []
    for _round in range(3):  # again, in case something forked while being stopped
        victims: dict[int, int] = {}
        for pid in [p for ns in namespaces for p in netns_pids(ns)]:
            if (stat := proc_stat(pid)) and stat[0] not in ("Z", "X"):
                victims[pid] = stat[1]
        # Recorded `exec --background` PIDs, if still the same processes (one may
        # have left the namespace, e.g. by nsenter).
        victims |= {pid: start for pid, start in background.items() if alive(pid, start)}
        if not victims:
            break
        stuck = stop_processes(victims)
        background = {}
    _drop_loss_tables(name)
    links = _own_links(name)
    lines = [f"link del {ln}" for ln in links if not ln.endswith("-br")]
    lines += [f"netns del {ns}" for ns in namespaces]
    lines += [f"link del {ln}" for ln in links if ln.endswith("-br")]
    if lines:
        _batch("ip", lines, force=True)
    left = _own_links(name) + _own_namespaces(name, None)
    if left:
        raise ClusterError(f"could not remove {', '.join(left)} of cluster {name}")
    state_path(name).unlink(missing_ok=True)
    _release_netns_dir()
    return stuck


def _build(
    name: str, n: int, rates: Mapping[str, int], leaf: str, delay_ms: float, subnet: str
) -> dict[str, Any]:
    """Build cluster NAME: N nodes and the origin, RATES (bit/s) by host name."""
    net = ipaddress.IPv4Network(subnet)
    bridge, bridge_address = f"{name}-br", str(net[BRIDGE_HOST])
    hosts = []
    for node, index in [(f"n{i}", i) for i in range(1, n + 1)] + [(ORIGIN, ORIGIN_HOST)]:
        ifname = f"{name}-{node}"
        hosts.append(Host(node, ifname, str(net[index]), ifname, rates[node]))
    for ifname, addrs in _root_links().items():
        for addr in addrs:
            if ipaddress.ip_interface(addr).network.overlaps(net):
                raise ClusterError(
                    f"subnet {net} overlaps {addr} on {ifname}: choose another --subnet"
                )
    lines = [f"link add {bridge} type bridge", f"addr add {bridge_address}/24 dev {bridge}"]
    lines += [f"link set {bridge} up"] + [f"netns add {h.namespace}" for h in hosts]
    lines += [
        f"link add {h.veth} type veth peer name {NS_IFACE} netns {h.namespace}" for h in hosts
    ]
    lines += [f"link set {h.veth} master {bridge} up" for h in hosts]
    _batch("ip", lines)
    shaped = leaf != UNSHAPED
    if shaped:
        # Download: egress of the bridge-side veth, towards the host.
        _batch("tc", [ln for h in hosts for ln in _shaping(h.veth, h.rate_bit, leaf, delay_ms)])
    for h in hosts:
        addr = f"addr add {h.address}/{net.prefixlen} dev {NS_IFACE}"
        _batch("ip", ["link set lo up", addr, f"link set {NS_IFACE} up"], netns=h.namespace)
        if shaped:
            # Upload: egress of the host's own end, towards the bridge.
            _batch("tc", _shaping(NS_IFACE, h.rate_bit, leaf, delay_ms), netns=h.namespace)
    return {
        "name": name,
        "subnet": str(net),
        "bridge": bridge,
        "bridge_address": bridge_address,
        "leaf": leaf,
        "delay_ms": delay_ms,
        "created": time.time(),
        "hosts": [asdict(h) for h in hosts],
        "background": [],
    }


# ---- the Python API ---------------------------------------------------------------


class Cluster:
    """A running emulated cluster. Build with `Cluster.up`, find a running one with
    `Cluster.attach`; `down()` (or leaving a `with` block) removes it."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.name: str = state["name"]
        self.subnet: str = state["subnet"]
        self.bridge: str = state["bridge"]
        self.bridge_address: str = state["bridge_address"]
        self.leaf: str = state["leaf"]
        self.delay_ms: float = state["delay_ms"]
        self.hosts: dict[str, Host] = {h["node"]: Host(**h) for h in state["hosts"]}
        self._procs: list[subprocess.Popen[Any]] = []

    @classmethod
    def up(
        cls,
        n: int,
        rate_bit: int | str = DEFAULT_RATE,
        origin_rate_bit: int | str | None = None,
        delay_ms: float = 0.0,
        *,
        name: str = DEFAULT_NAME,
        subnet: str = DEFAULT_SUBNET,
        rates: Mapping[str, int | str] | None = None,
        shaped: bool = True,
    ) -> Cluster:
        """Build N nodes and an origin, every link at RATE_BIT bits/s each way (the
        origin's at ORIGIN_RATE_BIT; RATES overrides single hosts, e.g. a straggler
        {"n3": "40mbit"}). Replaces a cluster of the same NAME. SHAPED=False adds no
        qdisc at all (rates are then only recorded, and the leaf is UNSHAPED)."""
        check_name(name)
        if not 1 <= n <= MAX_NODES:
            raise ClusterError(f"node count {n} out of range 1..{MAX_NODES}")
        try:
            net = ipaddress.IPv4Network(subnet)
        except ValueError as exc:
            raise ClusterError(f"bad subnet {subnet!r}: {exc}") from exc
        if net.prefixlen != 24 or not net.subnet_of(TEST_RANGE):
            raise ClusterError(f"subnet {subnet} must be a /24 inside {TEST_RANGE} (RFC 2544)")
        rate = parse_rate(rate_bit)
        origin_rate = rate if origin_rate_bit is None else parse_rate(origin_rate_bit)
        link_rates = {f"n{i}": rate for i in range(1, n + 1)} | {ORIGIN: origin_rate}
        overrides = {node: parse_rate(r) for node, r in (rates or {}).items()}
        if unknown := sorted(set(overrides) - set(link_rates)):
            raise ClusterError(
                f"rates for unknown hosts {', '.join(unknown)} (have n1..n{n}, origin)"
            )
        delay = parse_delay(delay_ms)
        require_privileges()
        with _locked():
            if shaped:
                leaf = _choose_leaf(name, delay)  # before tearing down: may refuse --delay
            elif delay:
                raise ClusterError("a delay needs shaped links")
            else:
                leaf = UNSHAPED
            _teardown(name)
            try:
                state = _build(name, n, link_rates | overrides, leaf, delay, str(net))
                _write_state(name, state)
            except BaseException:
                _teardown(name)
                raise
        return cls(state)

    @classmethod
    def attach(cls, name: str = DEFAULT_NAME) -> Cluster:
        """The running cluster NAME (from its state file)."""
        check_name(name)
        state = _read_state(name)
        if state is None:
            raise ClusterError(f"no cluster {name!r} is up (no {state_path(name)})")
        return cls(state)

    def down(self) -> list[int]:
        """Stop every process in the cluster's namespaces and remove them, the veths,
        the bridge and the state file. Returns PIDs that would not die (normally [])."""
        require_privileges()
        with _locked():
            stuck = _teardown(self.name)
        for proc in self._procs:  # reap our own children, now gone or zombies
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        self._procs.clear()
        return stuck

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    @property
    def nodes(self) -> list[str]:
        """n1..nN, in order (the origin is not a node)."""
        return [node for node in self.hosts if node != ORIGIN]

    @property
    def addresses(self) -> dict[str, str]:
        """Node name -> address, n1..nN (not the origin)."""
        return {node: self.hosts[node].address for node in self.nodes}

    @property
    def origin_address(self) -> str:
        return self.hosts[ORIGIN].address

    def host(self, node: str) -> Host:
        """The host named NODE: n3, origin, its address or its namespace."""
        for host in self.hosts.values():
            if node in (host.node, host.address, host.namespace):
                return host
        raise ClusterError(
            f"no host {node!r} in cluster {self.name} (n1..n{len(self.nodes)}, origin)"
        )

    def namespace(self, node: str) -> str:
        return self.host(node).namespace

    def command(self, node: str, argv: Sequence[str]) -> list[str]:
        """ARGV prefixed to run in NODE's namespace (`ip netns exec`; it also gives the
        command a private mount namespace with /sys remounted, see tools/README.md)."""
        return [_tool("ip"), "netns", "exec", self.namespace(node), *argv]

    def popen(self, node: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ARGV inside NODE's namespace (keyword arguments go to Popen). Its PID is
        the command's own (`ip netns exec` execs it); `down()` stops and reaps it."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(node, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, node: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run ARGV inside NODE's namespace to completion (keywords go to subprocess.run)."""
        check = kw.pop("check", False)
        return subprocess.run(self.command(node, argv), check=check, **kw)

    def pids(self) -> dict[str, list[int]]:
        """Host name -> PIDs running in its namespace."""
        return {node: netns_pids(host.namespace) for node, host in self.hosts.items()}

    def shape_host(self, rate_bit: int | str) -> None:
        """Shape what the root namespace (the machine itself) sends into the bridge to
        RATE_BIT, like an origin's link: a service on the host, such as a tools/ceph.py
        Ceph reached through `tools.ceph.route_from`, then serves the nodes at most that
        fast in total. The shaper sits on the bridge device, whose egress is only the
        host's own traffic (node-to-node frames are switched between ports, not sent
        by it); it goes with the bridge on `down`."""
        require_privileges()
        _batch("tc", _shaping(self.bridge, parse_rate(rate_bit), self.leaf, self.delay_ms))

    def cut(self, node: str) -> None:
        """Cut NODE's link (a node or the origin): its veth's bridge-side end goes
        down, so every frame to or from it is lost, as with a pulled cable or a dead
        switch port. Its own end stays up (no carrier), its sockets stay open: TCP
        retransmits until `restore`, or gives up on its own timeouts."""
        require_privileges()
        _batch("ip", [f"link set {self.host(node).veth} down"])

    def restore(self, node: str) -> None:
        """Undo `cut`, and return once the link carries packets again. The bridge has
        no STP, but the kernel reports a veth's carrier asynchronously (link-watch
        events can wait up to a second): until the port is up and forwarding, a
        packet still goes nowhere. An ARP resolution that began during the cut
        keeps its one-second retry, as on a real network: the first reply from
        the cut host can wait for it."""
        require_privileges()
        veth = self.host(node).veth
        _batch("ip", [f"link set {veth} up"])
        sysfs = Path("/sys/class/net") / veth
        deadline = time.monotonic() + RESTORE_TIMEOUT
        while not (
            (sysfs / "operstate").read_text().strip() == "up"
            and (sysfs / "brport" / "state").read_text().strip() == BR_FORWARDING
        ):
            if time.monotonic() > deadline:
                raise ClusterError(f"{veth} is not forwarding {RESTORE_TIMEOUT:g} s after up")
            time.sleep(0.01)

    def set_loss(self, node: str, percent: float) -> None:
        """Lose PERCENT of the packets on NODE's link, each direction on its own, at
        random (0 removes the loss).

        This kernel has neither netem nor tc's gact action, so it is nftables:
        `numgen random mod LOSS_SCALE < k drop` on the netdev ingress hook of each
        receiving end of NODE's veth, its own end (download) and the bridge-side
        end (upload). Dropping where a packet arrives, not where it is sent, is
        what makes it wire loss: a drop on the sender's output hook is reported to
        the sending socket (EPERM), and TCP would just send again at once instead
        of detecting a loss. Needs `nft` (apt-get install nftables)."""
        if not 0 <= percent <= 100:
            raise ClusterError(f"loss {percent} % out of range 0..100")
        require_privileges()
        threshold = round(percent * LOSS_SCALE / 100)
        host = self.host(node)
        for netns, dev in ((host.namespace, NS_IFACE), (None, host.veth)):
            table = _loss_table(self.name, host.node)
            # Declare-then-delete first: idempotent, and 0 leaves no table behind.
            lines = [f"table netdev {table}", f"delete table netdev {table}"]
            if threshold:
                rule = f"numgen random mod {LOSS_SCALE} < {threshold} counter drop"
                lines.append(
                    f"table netdev {table} {{\n  chain ingress {{\n"
                    f"    type filter hook ingress device {dev} priority 0; {rule}\n  }}\n}}"
                )
            _nft(lines, netns)

    def loss_drops(self, node: str) -> dict[str, int]:
        """Packets `set_loss` has dropped so far on NODE's link: {"download": towards
        it, "upload": from it}; {} if it has no loss set."""
        host = self.host(node)
        drops: dict[str, int] = {}
        for way, netns in (("download", host.namespace), ("upload", None)):
            argv = [_nft_tool(), "-j", "list", "table", "netdev", _loss_table(self.name, host.node)]
            if netns is not None:
                argv = self.command(node, argv)
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                continue
            for item in json.loads(proc.stdout).get("nftables", []):
                for expr in item.get("rule", {}).get("expr", []):
                    if "counter" in expr:
                        drops[way] = int(expr["counter"]["packets"])
        return drops

    def host_tx_bytes(self) -> int:
        """Bytes the host has sent into the bridge so far (to the nodes and the origin)."""
        return int(Path(f"/sys/class/net/{self.bridge}/statistics/tx_bytes").read_text())


# ---- the CLI ----------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace, _cmd: list[str]) -> int:
    rates: dict[str, int | str] = {}
    for item in args.node_rate:
        node, sep, rate = item.partition("=")
        if not sep:
            raise ClusterError(f"bad --node-rate {item!r}: give NODE=RATE, e.g. n3=40mbit")
        rates[node] = rate
    began = time.monotonic()
    cluster = Cluster.up(
        args.n,
        args.rate,
        args.origin_rate,
        args.delay,
        name=args.name,
        subnet=args.subnet,
        rates=rates,
    )
    if args.json:
        print(json.dumps(_read_state(cluster.name), indent=2))
        return 0
    print(
        f"cluster {cluster.name} up in {time.monotonic() - began:.2f} s: "
        f"{len(cluster.nodes)} nodes "
        f"{cluster.hosts['n1'].address}..{cluster.hosts[cluster.nodes[-1]].address}, "
        f"origin {cluster.origin_address}, host {cluster.bridge_address} on {cluster.bridge}; "
        f"leaf {cluster.leaf}, delay {cluster.delay_ms:g} ms"
    )
    _print_hosts(cluster)
    return 0


def _print_hosts(cluster: Cluster) -> None:
    print(f"{'host':<8}{'namespace':<16}{'address':<16}{'rate (each way)':<17}pids")
    for node, host in cluster.hosts.items():
        pids = netns_pids(host.namespace)
        shown = ", ".join(f"{pid} ({_comm(pid)})" for pid in pids) or "-"
        rate = "unshaped" if cluster.leaf == UNSHAPED else format_rate(host.rate_bit)
        print(f"{node:<8}{host.namespace:<16}{host.address:<16}{rate:<17}{shown}")


def remove(name: str) -> list[int]:
    """Tear down cluster NAME by name (what `down` does): also after a crashed `up`,
    with or without its state file; nothing to do if it is not there. Returns the
    PIDs that would not die."""
    check_name(name)
    require_privileges()
    with _locked():
        return _teardown(name)


def _cmd_down(args: argparse.Namespace, _cmd: list[str]) -> int:
    stuck = remove(args.name)
    if stuck:
        raise ClusterError(f"cluster {args.name} removed, but PIDs {stuck} would not die")
    return 0


def _cmd_status(args: argparse.Namespace, _cmd: list[str]) -> int:
    cluster = Cluster.attach(args.name)
    if args.json:
        state = _read_state(cluster.name) or {}
        print(json.dumps({**state, "pids": cluster.pids()}, indent=2))
        return 0
    print(
        f"cluster {cluster.name}: subnet {cluster.subnet}, host {cluster.bridge_address} on "
        f"{cluster.bridge}, leaf {cluster.leaf}, delay {cluster.delay_ms:g} ms"
    )
    _print_hosts(cluster)
    return 0


def _cmd_exec(args: argparse.Namespace, cmd: list[str]) -> int:
    cmd = cmd or args.command
    if not cmd:
        raise ClusterError("exec needs a command: exec NODE -- CMD [ARG...]")
    require_privileges()
    cluster = Cluster.attach(args.name)
    argv = cluster.command(args.node, cmd)
    if shutil.which(cmd[0]) is None:
        raise ClusterError(f"command not found: {cmd[0]}")
    if not args.background:
        sys.stdout.flush()
        os.execv(argv[0], argv)  # the command's exit status becomes ours
    with contextlib.ExitStack() as stack:
        out: Any = subprocess.DEVNULL
        if args.log:
            out = stack.enter_context(open(args.log, "ab"))
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stat = proc_stat(proc.pid)
    with _locked():
        state = _read_state(cluster.name)
        if state is None:
            raise ClusterError(f"cluster {cluster.name} went down while starting {cmd[0]}")
        record = {"pid": proc.pid, "start": stat[1] if stat else 0, "node": args.node, "argv": cmd}
        state["background"].append(record)
        _write_state(cluster.name, state)
    proc.returncode = 0  # detached: not ours to wait for (and no ResourceWarning)
    print(proc.pid)
    return 0


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=DEFAULT_NAME, help="cluster name (default %(default)s)")
    parser = argparse.ArgumentParser(
        prog="cluster.py",
        description="An emulated cluster in network namespaces (see tools/README.md).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", parents=[common], help="build N nodes and an origin (replaces NAME)")
    up.add_argument("n", type=int, help=f"number of nodes (1..{MAX_NODES})")
    up.add_argument(
        "--rate", default=DEFAULT_RATE, help="every link, each way (default %(default)s)"
    )
    up.add_argument("--origin-rate", default=None, help="the origin's link (default: --rate)")
    up.add_argument(
        "--node-rate",
        action="append",
        default=[],
        metavar="NODE=RATE",
        help="one host's link, e.g. n3=40mbit",
    )
    up.add_argument("--delay", default="0", help="netem delay per link and direction, e.g. 0.1ms")
    up.add_argument(
        "--subnet", default=DEFAULT_SUBNET, help="a /24 in 198.18.0.0/15 (default %(default)s)"
    )
    up.add_argument("--json", action="store_true", help="print the state file")
    up.set_defaults(func=_cmd_up)
    down = sub.add_parser("down", parents=[common], help="stop its processes, remove the cluster")
    down.set_defaults(func=_cmd_down)
    status = sub.add_parser("status", parents=[common], help="hosts, addresses, rates, PIDs")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)
    ex = sub.add_parser("exec", parents=[common], help="run a command in a host's namespace")
    ex.add_argument(
        "--background", action="store_true", help="detach, print the PID; `down` stops it"
    )
    ex.add_argument("--log", help="with --background: append its output to this file")
    ex.add_argument("node", help="n3, origin, or an address")
    ex.add_argument("command", nargs="*", help="after --: the command and its arguments")
    ex.set_defaults(func=_cmd_exec)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if "--" in args_in:  # everything after -- is the command, options included
        cut = args_in.index("--")
        args_in, cmd = args_in[:cut], args_in[cut + 1 :]
    args = _parser().parse_args(args_in)
    if cmd and args.cmd != "exec":
        print(f"cluster: `{args.cmd}` takes no command after --", file=sys.stderr)
        return 2
    try:
        return int(args.func(args, cmd))
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
