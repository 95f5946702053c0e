"""systemd/p2pcastd.service: valid, restarts, notifies, and mounts where slurmd sees them.

The unit is parsed here (systemd allows repeated keys, so configparser will
not do), checked by ``systemd-analyze verify`` when it is installed, and the
daemon is started with a NOTIFY_SOCKET to see that it really sends READY=1.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from p2pcast.auth import write_secret_file
from tests.helpers_node import closed_port

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "p2pcastd.service"

#: Options that give the service a mount namespace of its own (or a user
#: namespace): its loop mounts would be invisible to slurmd and the jobs.
NAMESPACING_OPTIONS = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
    "ProtectControlGroups", "ProtectProc", "ProcSubset", "ReadWritePaths",
    "ReadOnlyPaths", "InaccessiblePaths", "ExecPaths", "NoExecPaths",
    "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "MountFlags",
    "RootDirectory", "RootImage", "DynamicUser", "PrivateUsers", "PrivateNetwork",
    "NetworkNamespacePath", "MountAPIVFS", "LogNamespace", "ProtectHostname",
}  # fmt: skip

#: The daemon sends READY=1 well within a second; this bounds a broken start.
READY_TIMEOUT = 20.0


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, eq, value = line.partition("=")
        assert eq, f"not KEY=VALUE: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def test_key_settings(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    one = {key: values[-1] for key, values in service.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["Restart"] == "on-failure"
    assert one["StateDirectory"] == "p2pcast" and one["RuntimeDirectory"] == "p2pcast"
    # The staged images of running jobs live in /run/p2pcast: keep it on restart.
    assert one["RuntimeDirectoryPreserve"] == "yes"
    assert one["KillMode"] == "process"
    argv = shlex.split(one["ExecStart"])
    assert argv[argv.index("--run-dir") + 1] == "/run/p2pcast"
    assert argv[argv.index("--control") + 1] == "/run/p2pcast/control.sock"
    assert "slurmd.service" in unit["Unit"]["Before"]


def test_no_private_mount_namespace(unit: dict[str, dict[str, list[str]]]) -> None:
    used = set(unit["Service"]) & NAMESPACING_OPTIONS
    assert not used, f"these would hide the daemon's mounts from slurmd: {sorted(used)}"
    text = UNIT.read_text()
    for option in ("ProtectSystem", "ProtectHome", "PrivateTmp", "ReadWritePaths"):
        assert option in text, f"the comment should say why {option} is left out"


def test_limits_that_do_not_block_mounting(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    caps = service["CapabilityBoundingSet"][-1].split()
    assert "CAP_SYS_ADMIN" in caps  # mount(2) and loop devices
    assert "@mount" in service["SystemCallFilter"][-1].split()
    families = service["RestrictAddressFamilies"][-1].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"} <= set(families)
    assert service["NoNewPrivileges"] == ["yes"]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart exists: point it at one that does.
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/p2pcastd", "/bin/true"))
    out = subprocess.run(
        [analyze, "verify", str(copy)], check=False, capture_output=True, text=True
    )
    problems = [line for line in out.stderr.splitlines() if UNIT.name in line]
    assert out.returncode == 0 and not problems, out.stderr


def test_the_daemon_sends_ready(tmp_path: Path) -> None:
    notify = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(READY_TIMEOUT)
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "p2pcast", "daemon", "--listen", "127.0.0.1",
                "--port", str(closed_port()), "--state-dir", str(tmp_path / "state"),
                "--control", str(tmp_path / "run" / "control.sock"),
                "--auth", "secret", "--secret-file", str(write_secret_file(tmp_path / "secret")),
            ],
            env={**os.environ, "NOTIFY_SOCKET": str(notify)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            message = sock.recv(256)
            # Ready means usable: the control socket answers, the run dir exists.
            assert (tmp_path / "run" / "control.sock").exists()
            assert (tmp_path / "run" / "jobs").is_dir()
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=10)
    assert message == b"READY=1", err
