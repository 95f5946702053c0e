#!/usr/bin/env python3
"""A real multi-node Slurm cluster on one machine: N nodes n1..nN, each in its own
network namespace (built by tools/cluster.py) and its own mount and UTS namespace,
with munged and slurmctld on the host, one slurmd and one p2pcast daemon per node.

    tools/slurm.py up 4                  # build and start (replaces one of the same name)
    eval "$(tools/slurm.py env)"         # SLURM_CONF for srun/sbatch/salloc on the host
    tools/slurm.py run --user p2pcast-test -- srun -N4 hostname
    tools/slurm.py exec n2 -- p2pcast status   # a command inside node n2
    tools/slurm.py status                # daemons, PIDs, node states
    tools/slurm.py down                  # stop everything by PID, remove everything

From Python (tests)::

    from tools.slurm import Slurm
    with Slurm.up(4, name="t1", subnet="198.18.61.0/24") as slurm:
        slurm.client(["srun", "-N4", "hostname"], user="p2pcast-test")

Standard library only; needs root, iproute2, util-linux (nsenter, unshare) and
Debian's slurmctld, slurmd, slurm-client and munge. The traps it avoids are in
tools/README.md and shared/notes/slurm-charliecloud.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import ceph as ceph_tool
from tools import cluster as net
from tools.cluster import ClusterError
from tools.statefile import StateFiles

#: The checkout this file lives in: its slurm/ hooks and its .venv are the defaults.
REPO = Path(__file__).resolve().parents[1]
STATE_DIR = Path(os.environ.get("P2PCAST_SLURM_DIR", "/run/p2pcast-slurm"))
#: The mount points `up` made on the host (NODE_RUN, NODE_LIB, if missing).
CREATED_FILE = STATE_DIR / "created-mount-points"
DEFAULT_NAME = "slurm"
#: Not tools/cluster.py's 198.18.0.0/24, the bench's 198.18.9.0/24, the tests'
#: 198.19.x or Ceph's 198.19.254.0/24.
DEFAULT_SUBNET = "198.18.60.0/24"
DEFAULT_NODES = 4
#: Slurm's standard ports. slurmctld binds only the bridge address
#: (NoCtldInAddrAny), so clusters on other subnets can use the same port.
SLURMCTLD_PORT = 6817
SLURMD_PORT = 6818
#: p2pcast's default peer port (p2pcast.daemon.DEFAULT_PORT; not imported: stdlib only).
P2PCAST_PORT = 7086
#: Inside every node these are private (bind mounts of per-node directories), so the
#: p2pcast defaults (control socket, state directory) are that node's own.
NODE_RUN = "/run/p2pcast"
NODE_LIB = "/var/lib/p2pcast"
NODE_CONTROL = f"{NODE_RUN}/control.sock"
#: A private tmpfs in every node, so that node-local staging is really per node
#: (and a hook, run inside a node, cannot live there).
NODE_PRIVATE = ("/tmp", "/dev/shm")
#: The unprivileged user of the end-to-end tests (created by tools/setup.sh).
TEST_USER = "p2pcast-test"
#: Bound on `up` (it normally takes 2-3 s); past it, `up` fails with the logs.
READY_TIMEOUT = 30.0
#: Each `sinfo` call is bounded: against an absent controller one blocks ~10 s
#: (MessageTimeout), which would blow the readiness deadline.
SINFO_TIMEOUT_S = 5
POLL_S = 0.05
LOG_TAIL_LINES = 12
#: Slurm gives Prologs no PATH; the wrappers set this one (with /usr/sbin).
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Programs `up` needs, with the Debian package that has each.
BINARIES = {
    "munged": "munge",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sinfo": "slurm-client",
    "nsenter": "util-linux",
    "unshare": "util-linux",
}
#: Daemon roles and their /proc/PID/comm once started (p2pcast's is read at start:
#: "p2pcast" from the venv's script, "python" from the interpreter).
#: sinfo states of a node that works (busy or not).
NODE_UP_STATES = ("idle", "allocated", "mixed", "completing")
COMMS = {"munged": "munged", "slurmctld": "slurmctld", "holder": "sleep", "slurmd": "slurmd"}


class SlurmError(ClusterError):
    """A failure the CLI reports with exit code 1 (a ClusterError, so callers of both
    tools catch one class)."""


_STATES = StateFiles(STATE_DIR, SlurmError)


# ---- small helpers --------------------------------------------------------------------


def _which(name: str) -> str | None:
    for path in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/sbin/{name}"):
        if path and os.access(path, os.X_OK):
            return path
    return None


def _tool(name: str) -> str:
    path = _which(name)
    if path is None:
        package = BINARIES.get(name, name)
        raise SlurmError(f"`{name}` not found: apt-get install {package} (or run tools/setup.sh)")
    return path


def missing_binaries() -> list[str]:
    """The programs `up` needs that are not installed."""
    return [name for name in BINARIES if _which(name) is None]


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"    ({path}: no log)"
    return "\n".join(f"    {line}" for line in text) or f"    ({path}: empty)"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _connects(family: socket.AddressFamily, address: Any) -> bool:
    """Whether something accepts a connection at ADDRESS (a readiness probe)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(address)
        except OSError:
            return False
    return True


def state_path(name: str) -> Path:
    return _STATES.path(name)


def cluster_dir(name: str) -> Path:
    return STATE_DIR / name


def _read_state(name: str) -> dict[str, Any] | None:
    return _STATES.read(name)


def _write_state(state: Mapping[str, Any]) -> None:
    _STATES.write(state["name"], state)


def _locked() -> contextlib.AbstractContextManager[None]:
    """Serialize up and down (flock on the state directory)."""
    return _STATES.locked()


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


# ---- configuration ----------------------------------------------------------------------


def _default_hook(kind: str) -> str | None:
    """<repo>/slurm/prolog or epilog if it is there (another branch writes them)."""
    path = REPO / "slurm" / kind
    return str(path) if os.access(path, os.X_OK) else None


def _p2pcast_bin(d: Path) -> str:
    """The p2pcast command for the daemons and the hooks: the checkout's venv if it
    has one, else a wrapper that runs this interpreter on the checkout's code (a git
    worktree has no venv of its own)."""
    venv = REPO / ".venv" / "bin" / "p2pcast"
    if os.access(venv, os.X_OK):
        return str(venv)
    wrapper = d / "bin" / "p2pcast"
    wrapper.parent.mkdir(mode=0o755, exist_ok=True)
    _write(
        wrapper,
        "#!/bin/sh\n# Generated by tools/slurm.py: the checkout's p2pcast, this interpreter.\n"
        f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        f'exec {shlex.quote(sys.executable)} -m p2pcast "$@"\n',
        0o755,
    )
    return str(wrapper)


def _slurm_conf(state: Mapping[str, Any], host: str) -> str:
    d = Path(state["dir"])
    nodes = state["nodes"]
    first, last = nodes["n1"], nodes[f"n{len(nodes)}"]
    node_range = f"n[1-{len(nodes)}]" if len(nodes) > 1 else "n1"
    addr_range = (
        f"{first.rsplit('.', 1)[0]}.[{first.rsplit('.', 1)[1]}-{last.rsplit('.', 1)[1]}]"
        if len(nodes) > 1
        else first
    )
    lines = [
        f"# Generated by tools/slurm.py for cluster {state['name']}.",
        f"ClusterName={state['name']}",
        # Must be this host's short name; slurmctld binds to what that resolves to
        # in its private /etc/hosts: the bridge address, reachable from every node.
        f"SlurmctldHost={host}({state['bridge_address']})",
        "CommunicationParameters=NoCtldInAddrAny",
        f"SlurmctldPort={SLURMCTLD_PORT}",
        f"SlurmdPort={SLURMD_PORT}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={d / 'munge' / 'munge.socket.2'}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={d / 'ctld'}",
        f"SlurmctldPidFile={d / 'slurmctld.pid'}",
        f"SlurmctldLogFile={d / 'slurmctld.log'}",
        # %n: each slurmd has its own spool, pid and log (slurmd -N nI).
        f"SlurmdSpoolDir={d / 'nodes' / '%n' / 'spool'}",
        f"SlurmdPidFile={d / 'nodes' / '%n' / 'slurmd.pid'}",
        f"SlurmdLogFile={d / 'nodes' / '%n' / 'slurmd.log'}",
        # No cgroups: the nodes share one kernel and cgroup tree.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        # The Prolog runs at allocation on every node at once: the moment for a
        # cooperative download.
        "PrologFlags=Alloc",
        f"PlugStackConfig={d / 'plugstack.conf'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
    ]
    if state.get("prolog"):
        lines.append(f"Prolog={d / 'prolog.sh'}")
    if state.get("epilog"):
        lines.append(f"Epilog={d / 'epilog.sh'}")
    cpus = os.cpu_count() or 1
    lines += [
        f"NodeName={node_range} NodeAddr={addr_range} CPUs={cpus} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def _hook_env(state: Mapping[str, Any]) -> dict[str, str]:
    """What the p2pcast hooks need, which Slurm does not give a Prolog."""
    return {
        "PATH": HOOK_PATH,
        "P2PCAST_BIN": state["p2pcast_bin"],
        "P2PCAST_CONTROL": NODE_CONTROL,
        "P2PCAST_RUN_DIR": NODE_RUN,
        # The hooks source this file (default /etc/default/p2pcast, a real
        # installation's): the cluster's own, so the host's settings stay out.
        "P2PCAST_DEFAULTS": str(Path(state["dir"]) / "p2pcast.defaults"),
        "P2PCAST_SLURM_CLUSTER": state["name"],
    }


def _hook_wrapper(state: Mapping[str, Any], hook: str) -> str:
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in _hook_env(state).items())
    return (
        "#!/bin/sh\n"
        "# Generated by tools/slurm.py: Slurm runs a Prolog/Epilog with no PATH and\n"
        "# without slurmd's environment, so what the hook needs is set here.\n"
        f'{exports}exec {shlex.quote(hook)} "$@"\n'
    )


def _write_config(state: dict[str, Any]) -> None:
    """The cluster's directory: munge key, slurm.conf, plugstack.conf, hosts, hook
    wrappers and each node's directories."""
    d = Path(state["dir"])
    d.mkdir(mode=0o755, parents=True)
    for sub in ("munge", "ctld", "nodes"):
        (d / sub).mkdir(mode=0o755)
    # munged wants the key owned by its user and private; 1024 random bytes is
    # what mungekey makes.
    key = d / "munge" / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(1024))
    host = socket.gethostname().split(".")[0]
    hosts = ["127.0.0.1\tlocalhost", f"{state['bridge_address']}\t{host}"]
    hosts += [f"{addr}\t{node}" for node, addr in state["nodes"].items()]
    _write(d / "hosts", "\n".join(hosts) + "\n")
    state["p2pcast_bin"] = state.get("p2pcast_bin") or _p2pcast_bin(d)
    defaults = {k: v for k, v in _hook_env(state).items() if k != "P2PCAST_DEFAULTS"}
    _write(
        d / "p2pcast.defaults",
        "# Generated by tools/slurm.py: the p2pcast settings of this cluster's nodes.\n"
        + "".join(f"{k}={shlex.quote(v)}\n" for k, v in defaults.items()),
    )
    for kind in ("prolog", "epilog"):
        if state.get(kind):
            _write(d / f"{kind}.sh", _hook_wrapper(state, state[kind]), 0o755)
    # "optional": a plugin that fails to load does not stop srun or slurmd. One
    # that is not built yet is left out all the same: every client would print two
    # dlopen errors (make -C slurm, then `up` again, adds it).
    spank = state["spank"]
    args = "".join(f" {arg}" for arg in state.get("spank_args", []))
    line = (
        f"optional {spank}{args}"
        if os.path.exists(spank)
        else f"# optional {spank}{args}  (not built)"
    )
    _write(d / "plugstack.conf", line + "\n")
    _write(d / "slurm.conf", _slurm_conf(state, host))
    for node in state["nodes"]:
        for sub in ("spool", "run", "lib"):
            (d / "nodes" / node / sub).mkdir(mode=0o755, parents=True)


def _node_private(path: str) -> bool:
    """Whether PATH lies where every node has a directory of its own (/tmp, /dev/shm)."""
    return any(Path(path).resolve().is_relative_to(p) for p in NODE_PRIVATE)


def _holder_script(state: Mapping[str, Any], node: str) -> str:
    """Runs in the node's new mount and UTS namespace, then becomes the process that
    holds them (`sleep`); slurmd and the p2pcast daemon join them with nsenter.
    Propagation is slave, so nothing mounted here (a Prolog's SquashFS too) reaches
    the host."""
    d = Path(state["dir"])
    q = shlex.quote
    # A checkout under /tmp (a clone made there) would vanish behind the node's
    # own /tmp, and with it the hooks and the venv: bind it aside first, then
    # back at the same path on the private tmpfs.
    carried = [p for p in (str(REPO),) if _node_private(p)]
    keep = d / "nodes" / node / "carried"
    return "\n".join(
        [
            f"hostname {q(node)}",
            *(
                f"mkdir -p {q(str(keep / str(i)))} && mount --bind {q(p)} {q(str(keep / str(i)))}"
                for i, p in enumerate(carried)
            ),
            *(f"mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {p}" for p in NODE_PRIVATE),
            *(
                f"mkdir -p {q(p)} && mount --bind {q(str(keep / str(i)))} {q(p)}"
                for i, p in enumerate(carried)
            ),
            f"mount --bind {q(str(d / 'hosts'))} /etc/hosts",
            f"mount --bind {q(str(d / 'nodes' / node / 'run'))} {NODE_RUN}",
            f"mount --bind {q(str(d / 'nodes' / node / 'lib'))} {NODE_LIB}",
            "exec sleep infinity",
        ]
    )


# ---- teardown ----------------------------------------------------------------------------


def _recorded(state: Mapping[str, Any] | None, d: Path) -> dict[int, int]:
    """PID -> start time of the cluster's daemons still running: those recorded in
    the state file, and those in its Slurm/munge pid files (a crashed `up` may not
    have recorded them) whose command line names the cluster's directory."""
    found: dict[int, int] = {}
    for rec in (state or {}).get("daemons", []):
        # The start time makes it the same process; the command name, that it is one
        # of ours (or still the nsenter/unshare/sh that execs it, if `up` crashed).
        names = {rec["comm"], "nsenter", "unshare", "sh"}
        if net.alive(rec["pid"], rec["start"]) and (
            rec["comm"] == "?" or _comm(rec["pid"]) in names
        ):
            found[rec["pid"]] = rec["start"]
    pidfiles = [d / "slurmctld.pid", d / "munge" / "munged.pid"]
    pidfiles += sorted(d.glob("nodes/*/slurmd.pid"))
    for pidfile in pidfiles:
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        stat = net.proc_stat(pid)
        if (
            stat
            and net.alive(pid, stat[1])
            and _comm(pid) in COMMS.values()
            and any(str(d) in arg for arg in _cmdline(pid))
        ):
            found[pid] = stat[1]
    return found


def _teardown(name: str) -> list[int]:
    """Stop everything of cluster NAME, remove its network, directory and state file.
    Works after a crashed `up` and when nothing is there. The caller holds the lock.
    Returns PIDs that would not die."""
    state = _read_state(name)
    d = cluster_dir(name)
    namespaces = [f"{name}-n{i}" for i in range(1, net.MAX_NODES + 1)]
    namespaces = [ns for ns in namespaces if (net.NETNS_DIR / ns).exists()]
    stuck: list[int] = []
    for _round in range(3):  # again, in case something forked while being stopped
        victims = _recorded(state, d)
        # Everything in the nodes' network namespaces: slurmd, slurmstepd, prologs,
        # user tasks, the p2pcast daemons and the namespace holders.
        for pid in (p for ns in namespaces for p in net.netns_pids(ns)):
            if (stat := net.proc_stat(pid)) and net.alive(pid, stat[1]):
                victims[pid] = stat[1]
        if not victims:
            break
        stuck = net.stop_processes(victims)
    # The nodes' mounts (tmpfs, binds, a Prolog's loop mounts) lived only in their
    # mount namespaces, which went with their last process. Anything under the
    # cluster's directory still mounted here would be a leak: detach it.
    for mount_point in _host_mounts_under(d):
        subprocess.run(["umount", "-l", mount_point], capture_output=True, check=False)
    stuck += net.remove(name)
    if d.exists():
        shutil.rmtree(d)
    state_path(name).unlink(missing_ok=True)
    if not any(STATE_DIR.glob("*.json")):  # the last cluster: its mount points go too
        _remove_mount_points()
    return stuck


def _make_mount_points() -> None:
    """The host directories the nodes bind their own over (/run/p2pcast,
    /var/lib/p2pcast): made if missing, and listed in CREATED_FILE so that the
    last cluster to go down removes them (whichever cluster made them)."""
    made = set(created_mount_points())
    for path in (NODE_RUN, NODE_LIB):
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o755)
            made.add(path)
    if made:
        CREATED_FILE.write_text("".join(f"{p}\n" for p in sorted(made)))


def created_mount_points() -> list[str]:
    try:
        return CREATED_FILE.read_text().split()
    except FileNotFoundError:
        return []


def _remove_mount_points() -> None:
    for path in created_mount_points():
        with contextlib.suppress(OSError):  # not empty: someone else's now
            os.rmdir(path)
    CREATED_FILE.unlink(missing_ok=True)


def _host_mounts_under(d: Path) -> list[str]:
    prefix = f"{d}/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point.startswith(prefix) or point == str(d):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def remove(name: str) -> list[int]:
    """Take cluster NAME down by name (what `down` does); safe when nothing is up."""
    net.check_name(name)
    net.require_privileges()
    with _locked():
        return _teardown(name)


def reap_orphans(prefix: str) -> list[str]:
    """Take down clusters named PREFIX... whose owner process (a test run) is gone;
    never one without an owner. Returns their names."""
    reaped = []
    for path in sorted(STATE_DIR.glob(f"{prefix}*.json")) if STATE_DIR.is_dir() else []:
        state = _read_state(path.stem)
        owner = (state or {}).get("owner")
        if isinstance(owner, int) and net.proc_stat(owner) is None:
            remove(path.stem)
            reaped.append(path.stem)
    return reaped


# ---- bring-up --------------------------------------------------------------------------


class _Bringup:
    """Starts the daemons of one cluster in order, recording each in the state file
    as soon as it runs, so that a crash at any point leaves a cleanable state."""

    def __init__(self, state: dict[str, Any], env: Mapping[str, str], deadline: float) -> None:
        self.state = state
        self.d = Path(state["dir"])
        self.env = dict(env)
        self.deadline = deadline
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}
        self.argvs: dict[int, list[str]] = {}
        self.labels: dict[int, str] = {}  # "slurmd n3", "munged"

    def start(
        self, role: str, node: str, argv: Sequence[str], log: Path, env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # no terminal signals from the caller's shell
                cwd="/",
                env=dict(env),
            )
        self.procs.append(proc)
        self.logs[proc.pid] = log
        self.argvs[proc.pid] = list(argv)
        self.labels[proc.pid] = f"{role} {node}".strip()
        stat = net.proc_stat(proc.pid)
        record = {"role": role, "node": node, "pid": proc.pid, "start": stat[1] if stat else 0}
        self.state["daemons"].append(record | {"comm": COMMS.get(role, "?"), "log": str(log)})
        _write_state(self.state)
        return proc

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def wait(
        self, what: str, ready: Callable[[], bool], watch: Sequence[subprocess.Popen[bytes]]
    ) -> None:
        """Poll READY() until true; fail with the log of a process in WATCH that died,
        or of all of them at the deadline."""
        while not ready():
            for proc in watch:
                if proc.poll() is not None:
                    raise SlurmError(
                        f"waiting for {what}: {self.labels[proc.pid]} exited with "
                        f"{proc.returncode} ({shlex.join(self.argvs[proc.pid])}); its log "
                        f"{self.logs[proc.pid]}:\n{_tail(self.logs[proc.pid])}"
                    )
            if self.left() <= 0:
                logs = "\n".join(f"  {self.logs[p.pid]}:\n{_tail(self.logs[p.pid])}" for p in watch)
                raise SlurmError(f"{what}: not ready in time; the logs:\n{logs}")
            time.sleep(POLL_S)

    def run(self) -> None:
        st, d = self.state, self.d
        base_env = {"PATH": HOOK_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
        # munge first: every Slurm daemon and client authenticates through it.
        sock = d / "munge" / "munge.socket.2"
        munged = self.start(
            "munged",
            "",
            [
                _tool("munged"),
                "--foreground",
                f"--socket={sock}",
                f"--key-file={d / 'munge' / 'munge.key'}",
                f"--pid-file={d / 'munge' / 'munged.pid'}",
                f"--log-file={d / 'munge' / 'munged.log'}",
                f"--seed-file={d / 'munge' / 'munged.seed'}",
            ],
            d / "munge" / "munged.out",
            base_env,
        )
        self.wait("munged", lambda: _connects(socket.AF_UNIX, str(sock)), [munged])
        # slurmctld in a mount namespace of its own, for the private /etc/hosts.
        q = shlex.quote
        conf = str(d / "slurm.conf")
        ctld_script = (
            f"mount --bind {q(str(d / 'hosts'))} /etc/hosts && "
            f"exec {q(_tool('slurmctld'))} -D -c -f {q(conf)}"
        )
        unshare = [_tool("unshare"), "--mount", "--propagation", "slave", "--"]
        ctld = self.start(
            "slurmctld", "", [*unshare, "/bin/sh", "-c", ctld_script], d / "slurmctld.out", base_env
        )
        # Node namespaces (mount, UTS) while slurmctld starts.
        holders = {}
        for node in st["nodes"]:
            netns = net.NETNS_DIR / f"{st['name']}-{node}"
            nsenter = [_tool("nsenter"), f"--net={netns}", "--"]
            argv = [*nsenter, _tool("unshare"), "--mount", "--uts", "--propagation", "slave", "--"]
            argv += ["/bin/sh", "-ec", _holder_script(st, node)]
            log = d / "nodes" / node / "holder.out"
            holders[node] = self.start("holder", node, argv, log, base_env)
        holder_list = list(holders.values())
        self.wait(
            "node namespaces",
            lambda: all(_comm(p.pid) == "sleep" for p in holder_list),
            holder_list,
        )
        # slurmd retries a controller that is not there yet only after seconds:
        # start the slurmds once slurmctld accepts connections.
        ctld_addr = (st["bridge_address"], SLURMCTLD_PORT)
        self.wait("slurmctld", lambda: _connects(socket.AF_INET, ctld_addr), [munged, ctld])
        slurmds, daemons = [], {}
        for node, holder in holders.items():
            enter = [_tool("nsenter"), f"--target={holder.pid}", "--net", "--mount", "--uts", "--"]
            argv = [*enter, _tool("slurmd"), "-D", "-N", node, "-f", conf]
            slurmds.append(
                self.start("slurmd", node, argv, d / "nodes" / node / "slurmd.out", base_env)
            )
            if st["p2pcast"]:
                daemon = [
                    *enter,
                    st["p2pcast_bin"],
                    "daemon",
                    f"--node={node}",
                    f"--listen={st['nodes'][node]}",
                    f"--port={P2PCAST_PORT}",
                    f"--state-dir={NODE_LIB}",
                    f"--control={NODE_CONTROL}",
                    *([f"--origin={st['origin']}"] if st.get("origin") else []),
                    # Peers prove themselves with the cluster's munge (its
                    # socket is under the host's run dir, which the node
                    # namespaces see), as on a real Slurm cluster.
                    "--auth=munge",
                    f"--munge-socket={sock}",
                ]
                log = d / "nodes" / node / "p2pcast.log"
                daemons[node] = self.start("p2pcast", node, daemon, log, base_env | self.env)
        watch = [munged, ctld, *holder_list, *slurmds, *daemons.values()]
        self.wait("slurmd (all nodes idle)", lambda: _all_idle(st), watch)
        self.wait("p2pcast daemons", lambda: all(_daemon_answers(st, n) for n in daemons), watch)
        for rec in st["daemons"]:
            rec["comm"] = _comm(rec["pid"])  # p2pcast's: the script's or python's
        _write_state(st)


def sinfo(state: Mapping[str, Any]) -> dict[str, str] | None:
    """Node -> state as sinfo reports it (idle, alloc, down*, ...), or None if the
    controller does not answer within SINFO_TIMEOUT_S."""
    env = os.environ | {"SLURM_CONF": str(Path(state["dir"]) / "slurm.conf")}
    argv = ["timeout", str(SINFO_TIMEOUT_S), _tool("sinfo"), "-h", "-N", "-o", "%N %T"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return None
    return dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)


def _all_idle(state: Mapping[str, Any]) -> bool:
    states = sinfo(state)
    return states is not None and all(states.get(node) == "idle" for node in state["nodes"])


def _daemon_answers(state: Mapping[str, Any], node: str) -> bool:
    """The node's p2pcast daemon accepts on its control socket (seen from the host
    through the node's bind-mounted run directory) and on its peer port."""
    sock = Path(state["dir"]) / "nodes" / node / "run" / "control.sock"
    return _connects(socket.AF_UNIX, str(sock)) and _connects(
        socket.AF_INET, (state["nodes"][node], P2PCAST_PORT)
    )


def _ceph_for(option: str | None) -> ceph_tool.Ceph | None:
    """The Ceph instance to route the nodes to: NAME, "auto" (the default-named one if
    it is up) or "none"."""
    if option in (None, "", "none"):
        return None
    name = ceph_tool.DEFAULT_NAME if option == "auto" else option
    try:
        instance = ceph_tool.Ceph.attach(name)
    except ceph_tool.CephError as exc:
        if option == "auto":
            return None
        raise SlurmError(f"--ceph {option}: {exc}") from exc
    if option == "auto" and not instance.pids():
        return None
    return instance


# ---- the Python API --------------------------------------------------------------------


class Slurm:
    """A running cluster. Build with `Slurm.up`, find a running one with
    `Slurm.attach`; `down()` (or leaving a `with` block) removes it."""

    def __init__(self, state: Mapping[str, Any], procs: Sequence[Any] = ()) -> None:
        self.state = dict(state)
        self.name: str = state["name"]
        self.dir = Path(state["dir"])
        self.nodes: dict[str, str] = dict(state["nodes"])  # node -> address
        self.bridge_address: str = state["bridge_address"]
        self.seconds_up: float = state.get("seconds_up", 0.0)
        self._procs: list[subprocess.Popen[bytes]] = list(procs)

    @classmethod
    def up(
        cls,
        n: int = DEFAULT_NODES,
        *,
        name: str = DEFAULT_NAME,
        subnet: str = DEFAULT_SUBNET,
        rate: str | None = None,
        origin: str | None = None,
        ceph: str | None = "auto",
        prolog: str | None = _default_hook("prolog"),
        epilog: str | None = _default_hook("epilog"),
        spank: str = str(REPO / "slurm" / "build" / "spank_p2pcast.so"),
        spank_args: Sequence[str] = (),
        p2pcast: bool = True,
        p2pcast_bin: str | None = None,
        owner: int | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> Slurm:
        """Build N nodes and start Slurm and the p2pcast daemons in them; replaces a
        cluster of the same NAME. RATE (e.g. "400mbit") shapes every link; ORIGIN is
        the daemons' default origin; SPANK_ARGS ("key=value") follow the plugin in
        plugstack.conf; CEPH routes the nodes to a tools/ceph.py instance
        and gives the daemons its credentials; P2PCAST_BIN replaces the p2pcast command
        (default: the checkout's). OWNER: a PID whose death lets
        `reap_orphans` take the cluster down (test runs)."""
        began = time.monotonic()
        net.check_name(name)
        net.require_privileges()
        if missing := missing_binaries():
            packages = sorted({BINARIES[m] for m in missing})
            raise SlurmError(
                f"{', '.join(missing)} not installed: apt-get install {' '.join(packages)}"
                " (or run tools/setup.sh)"
            )
        for hook in (prolog, epilog):
            if hook and not os.access(hook, os.X_OK):
                raise SlurmError(f"hook {hook} is not an executable file")
            if hook and _node_private(hook) and not Path(hook).resolve().is_relative_to(REPO):
                raise SlurmError(f"hook {hook}: every node has its own /tmp; put it elsewhere")
        instance = _ceph_for(ceph)
        with _locked():
            _teardown(name)
            state: dict[str, Any] = {
                "name": name,
                "dir": str(cluster_dir(name)),
                "owner": owner,
                "daemons": [],
            }
            _write_state(state)
            procs: list[subprocess.Popen[bytes]] = []
            try:
                network = net.Cluster.up(
                    n, rate or net.DEFAULT_RATE, name=name, subnet=subnet, shaped=bool(rate)
                )
                state |= {
                    "subnet": network.subnet,
                    "bridge_address": network.bridge_address,
                    "nodes": network.addresses,
                    "rate": rate,
                    "origin": origin,
                    "ceph": instance.name if instance else None,
                    "prolog": prolog,
                    "epilog": epilog,
                    "spank": spank,
                    "spank_args": list(spank_args),
                    "p2pcast": p2pcast,
                    "p2pcast_bin": p2pcast_bin,
                }
                _make_mount_points()
                _write_config(state)
                _write_state(state)
                env: dict[str, str] = {}
                if instance:
                    for node in network.nodes:
                        ceph_tool.route_from(network.namespace(node), network.bridge_address)
                    env = instance.env() | {
                        "P2PCAST_S3_ACCESS_KEY_ID": instance.access_key,
                        "P2PCAST_S3_SECRET_ACCESS_KEY": instance.secret_key,
                    }
                bringup = _Bringup(state, env, began + timeout)
                procs = bringup.procs
                bringup.run()
                state["seconds_up"] = round(time.monotonic() - began, 2)
                _write_state(state)
            except BaseException:
                _teardown(name)
                for proc in procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=2)
                raise
        return cls(state, procs)

    @classmethod
    def attach(cls, name: str = DEFAULT_NAME) -> Slurm:
        """The running cluster NAME (from its state file)."""
        net.check_name(name)
        state = _read_state(name)
        if state is None or "nodes" not in state:
            raise SlurmError(f"no slurm cluster {name!r} is up (no {state_path(name)})")
        return cls(state)

    def down(self) -> list[int]:
        """Stop every process of the cluster and remove it; PIDs that would not die."""
        stuck = remove(self.name)
        for proc in self._procs:  # reap our own children, now gone or zombies
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2)
        self._procs.clear()
        return stuck

    def detach(self) -> None:
        """Leave the daemons running without this object (the CLI's `up` exits)."""
        for proc in self._procs:
            proc.returncode = 0  # not ours to wait for (and no ResourceWarning)
        self._procs.clear()

    def __enter__(self) -> Slurm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def p2pcast_bin(self) -> str:
        """The p2pcast command the daemons and hooks run (P2PCAST_BIN)."""
        return str(self.state["p2pcast_bin"])

    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (srun, sbatch, salloc, sinfo) on the host."""
        return {"SLURM_CONF": str(self.conf)}

    def daemons(self, role: str | None = None) -> list[dict[str, Any]]:
        """Recorded daemons (role, node, pid, start, comm, log, alive)."""
        recs = (_read_state(self.name) or self.state).get("daemons", [])
        return [
            rec | {"alive": net.alive(rec["pid"], rec["start"])}
            for rec in recs
            if role in (None, rec["role"])
        ]

    def holder(self, node: str) -> int:
        """PID of the process holding NODE's mount and UTS namespaces."""
        for rec in self.daemons("holder"):
            if rec["node"] == node and rec["alive"]:
                return int(rec["pid"])
        raise SlurmError(f"no running node {node!r} in cluster {self.name}")

    def node_command(self, node: str, argv: Sequence[str]) -> list[str]:
        """ARGV prefixed to run inside NODE: its network, mount and UTS namespaces."""
        target = f"--target={self.holder(node)}"
        return [_tool("nsenter"), target, "--net", "--mount", "--uts", "--", *argv]

    def exec(self, node: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run ARGV as root inside NODE (keywords go to subprocess.run)."""
        check = kw.pop("check", False)
        return subprocess.run(self.node_command(node, argv), check=check, **kw)

    def client_command(self, argv: Sequence[str], user: str | None = None) -> list[str]:
        """ARGV run on the host with this cluster's SLURM_CONF, as USER if given."""
        env = [f"{k}={v}" for k, v in self.env().items()]
        as_user = [_tool("runuser"), "-u", user, "--"] if user else []
        return [*as_user, "/usr/bin/env", *env, *argv]

    def client(
        self, argv: Sequence[str], user: str | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run a Slurm client (srun -N4 hostname, sbatch ...) on the host, as USER if
        given (keywords go to subprocess.run)."""
        check = kw.pop("check", False)
        return subprocess.run(self.client_command(argv, user), check=check, **kw)

    def control_socket(self, node: str) -> Path:
        """NODE's /run/p2pcast/control.sock as seen from the host."""
        return self.dir / "nodes" / node / "run" / "control.sock"

    def sinfo(self) -> dict[str, str] | None:
        return sinfo(self.state)

    def problems(self) -> list[str]:
        """What is wrong with the running cluster (a dead daemon, a node not up)."""
        dead = [f"{r['role']} {r['node']} (pid {r['pid']})".replace("  ", " ")
                for r in self.daemons() if not r["alive"]]  # fmt: skip
        states = self.sinfo()
        if states is None:
            return [*dead, "slurmctld does not answer"]
        bad = {n: states.get(n, "missing") for n in self.nodes}
        return dead + [f"{n} is {s}" for n, s in bad.items() if s not in NODE_UP_STATES]


# ---- the CLI ---------------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace, _cmd: list[str]) -> int:
    slurm = Slurm.up(
        args.n,
        name=args.name,
        subnet=args.subnet,
        rate=args.rate,
        origin=args.origin,
        ceph=args.ceph,
        prolog=args.prolog or None,
        epilog=args.epilog or None,
        spank=args.spank,
        spank_args=args.spank_arg,
        p2pcast=not args.no_p2pcast,
        p2pcast_bin=args.p2pcast_bin,
    )
    slurm.detach()
    if args.json:
        print(json.dumps(slurm.state, indent=2))
        return 0
    nodes = list(slurm.nodes)
    print(
        f"slurm cluster {slurm.name} up in {slurm.seconds_up:.2f} s: {len(nodes)} nodes "
        f"{slurm.nodes[nodes[0]]}..{slurm.nodes[nodes[-1]]}, slurmctld on "
        f"{slurm.bridge_address}:{SLURMCTLD_PORT}"
    )
    named = "" if slurm.name == DEFAULT_NAME else f" --name {slurm.name}"
    print(f'clients: export SLURM_CONF={slurm.conf}   (or: eval "$({sys.argv[0]} env{named})")')
    return 0


def _cmd_down(args: argparse.Namespace, _cmd: list[str]) -> int:
    stuck = remove(args.name)
    if stuck:
        raise SlurmError(f"cluster {args.name} removed, but PIDs {stuck} would not die")
    return 0


def _cmd_status(args: argparse.Namespace, _cmd: list[str]) -> int:
    slurm = Slurm.attach(args.name)
    problems = slurm.problems()
    if args.json:
        out = {**slurm.state, "daemons": slurm.daemons(), "sinfo": slurm.sinfo()}
        print(json.dumps(out | {"problems": problems}, indent=2))
        return 1 if problems else 0
    print(
        f"slurm cluster {slurm.name}: subnet {slurm.state['subnet']}, slurmctld on "
        f"{slurm.bridge_address}:{SLURMCTLD_PORT}, SLURM_CONF={slurm.conf}"
    )
    states = slurm.sinfo() or {}
    print(f"{'role':<10}{'node':<6}{'pid':<9}{'comm':<11}{'state':<9}slurm")
    for rec in slurm.daemons():
        alive = "running" if rec["alive"] else "DEAD"
        slurm_state = states.get(rec["node"], "") if rec["role"] == "slurmd" else ""
        print(
            f"{rec['role']:<10}{rec['node'] or '-':<6}{rec['pid']:<9}{rec['comm']:<11}"
            f"{alive:<9}{slurm_state}"
        )
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


def _cmd_env(args: argparse.Namespace, _cmd: list[str]) -> int:
    env = Slurm.attach(args.name).env()
    if args.json:
        print(json.dumps(env, indent=2))
    else:
        print("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()), end="")
    return 0


def _exec_argv(argv: list[str]) -> int:
    sys.stdout.flush()
    try:
        os.execv(argv[0], argv)  # the command's exit status becomes ours
    except OSError as exc:
        raise SlurmError(f"{argv[0]}: {exc.strerror}") from exc


def _cmd_exec(args: argparse.Namespace, cmd: list[str]) -> int:
    if not cmd:
        raise SlurmError("exec needs a command: exec NODE -- CMD [ARG...]")
    net.require_privileges()
    return _exec_argv(Slurm.attach(args.name).node_command(args.node, cmd))


def _cmd_run(args: argparse.Namespace, cmd: list[str]) -> int:
    if not cmd:
        raise SlurmError("run needs a command: run [--user USER] -- srun -N4 hostname")
    return _exec_argv(Slurm.attach(args.name).client_command(cmd, args.user))


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=DEFAULT_NAME, help="cluster name (default %(default)s)")
    parser = argparse.ArgumentParser(
        prog="slurm.py",
        description="A real multi-node Slurm cluster in namespaces (see tools/README.md).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", parents=[common], help="build N nodes, start Slurm and p2pcast")
    up.add_argument("n", type=int, nargs="?", default=DEFAULT_NODES, help="nodes (default 4)")
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help="a /24 in 198.18.0.0/15")
    up.add_argument("--rate", help="shape every link at this rate, e.g. 400mbit (default: not)")
    up.add_argument("--origin", help="the p2pcast daemons' default origin URL")
    up.add_argument(
        "--ceph",
        default="auto",
        help="route the nodes to this tools/ceph.py instance and give the daemons its "
        "credentials; auto (default): the default-named one if it is up; none",
    )
    up.add_argument("--prolog", default=_default_hook("prolog"), help="'' for none")
    up.add_argument("--epilog", default=_default_hook("epilog"), help="'' for none")
    up.add_argument(
        "--spank",
        default=str(REPO / "slurm" / "build" / "spank_p2pcast.so"),
        help="SPANK plugin for plugstack.conf (optional: may not exist)",
    )
    up.add_argument(
        "--spank-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an argument for the plugin in plugstack.conf, e.g. check_image=PATH (repeat)",
    )
    up.add_argument("--no-p2pcast", action="store_true", help="no p2pcast daemons")
    up.add_argument(
        "--p2pcast-bin",
        help="the p2pcast command for the daemons and hooks (default: <repo>/.venv/bin/p2pcast,"
        " else this interpreter on the checkout's code)",
    )
    up.add_argument("--json", action="store_true", help="print the state")
    up.set_defaults(func=_cmd_up)
    down = sub.add_parser("down", parents=[common], help="stop everything, remove the cluster")
    down.set_defaults(func=_cmd_down)
    status = sub.add_parser("status", parents=[common], help="daemons, PIDs, node states")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_cmd_status)
    env = sub.add_parser("env", parents=[common], help="SLURM_CONF for clients, as export lines")
    env.add_argument("--json", action="store_true")
    env.set_defaults(func=_cmd_env)
    ex = sub.add_parser("exec", parents=[common], help="run a command as root inside a node")
    ex.add_argument("node", help="n1..nN")
    ex.set_defaults(func=_cmd_exec)
    run = sub.add_parser("run", parents=[common], help="run a Slurm client with SLURM_CONF")
    run.add_argument("--user", help=f"as this user (e.g. {TEST_USER})")
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if "--" in args_in:  # everything after -- is the command, options included
        cut = args_in.index("--")
        args_in, cmd = args_in[:cut], args_in[cut + 1 :]
    args = _parser().parse_args(args_in)
    if cmd and args.cmd not in ("exec", "run"):
        print(f"slurm: `{args.cmd}` takes no command after --", file=sys.stderr)
        return 2
    try:
        return int(args.func(args, cmd))
    except ClusterError as exc:  # SlurmError, and the network's own errors
        print(f"slurm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
