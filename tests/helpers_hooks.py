"""Helpers for the Slurm hook tests: per-node daemons, images, hook runs.

Each node is a real ``p2pcast daemon`` process on its own 127.0.0.x address
with its own state directory, control socket and run directory, as on a
cluster node; the hooks run as subprocesses with the environment slurmd
gives a Prolog or Epilog (no PATH, SPANK_CH_IMAGE, SLURM_NODELIST, ...).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from p2pcast import control
from p2pcast.auth import write_secret_file
from p2pcast.demo import free_port, stop_processes
from p2pcast.stage import unstage_path

REPO = Path(__file__).resolve().parent.parent
PROLOG = REPO / "slurm" / "prolog"
EPILOG = REPO / "slurm" / "epilog"

#: A daemon is up in well under a second; this bounds a broken start.
START_TIMEOUT = 20.0

#: A hook stages a small image in about a second; this bounds a hang.
HOOK_TIMEOUT = 120.0


class Nodes:
    """Daemons n1..nN, each with its own directories; stopped and cleaned by ``close``."""

    def __init__(self, work: Path, count: int, origin: Path) -> None:
        self.work = work
        self.origin = origin
        self.names = [f"n{i}" for i in range(1, count + 1)]
        self.hosts = {name: f"127.0.0.{i + 1}" for i, name in enumerate(self.names, start=1)}
        self.port = free_port("127.0.0.2")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # The hooks' p2pcast: this interpreter and this checkout.
        self.bin = work / "p2pcast-bin"
        self.bin.write_text(f'#!/bin/sh\nexec {sys.executable} -m p2pcast "$@"\n')
        self.bin.chmod(0o755)

    def dir(self, name: str) -> Path:
        return self.work / "nodes" / name

    def control(self, name: str) -> str:
        return str(self.dir(name) / "control.sock")

    def run_dir(self, name: str) -> Path:
        return self.dir(name) / "run"

    def start(self, name: str) -> None:
        state = self.dir(name)
        state.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "p2pcast", "daemon", "-v",
            "--node", name, "--listen", self.hosts[name], "--port", str(self.port),
            "--state-dir", str(state / "state"), "--control", self.control(name),
            "--run-dir", str(self.run_dir(name)), "--origin", str(self.origin),
            "--auth", "secret", "--secret-file", str(write_secret_file(self.work / "secret")),
        ]  # fmt: skip
        with open(state / "daemon.log", "ab") as log:
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        asyncio.run(self._wait_ready(name))

    def start_all(self) -> None:
        for name in self.names:
            self.start(name)

    async def _wait_ready(self, name: str) -> None:
        proc = self.procs[name]
        await control.wait_ready(
            self.control(name), proc.poll, self.dir(name) / "daemon.log",
            time.monotonic() + START_TIMEOUT, f"daemon {name}",
        )  # fmt: skip

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        stop_processes([proc])

    def close(self) -> None:
        """Stop every daemon, then unstage whatever a failed test left staged."""
        for name in list(self.procs):
            self.stop(name)
        for name in self.names:
            staged = self.run_dir(name) / "staged"
            if staged.is_dir():
                for path in staged.iterdir():
                    unstage_path(path)

    def request(self, name: str, op: str, **args: object) -> dict[str, Any]:
        return asyncio.run(control.request(self.control(name), op, **args))

    # ---- hooks ---------------------------------------------------------------

    def hook_env(
        self, name: str, job: int, image: str | None, mounts: str | None = None,
        nodelist: str | None = None, new_slurm: bool = False, uid: int | None = None,
    ) -> dict[str, str]:  # fmt: skip
        """What slurmd 22.05 gives a Prolog (no PATH), plus p2pcast's settings."""
        hostlist = nodelist or f"n[1-{len(self.names)}]"
        env = {
            "SLURM_JOB_ID": str(job),
            "SLURM_JOB_UID": str(os.getuid() if uid is None else uid),
            "SLURM_JOB_GID": str(os.getgid() if uid is None else uid),
            "SLURM_JOB_USER": "root",
            "SLURMD_NODENAME": name,
            "SLURM_JOB_NUM_NODES": str(len(self.names)),
            "SLURM_SCRIPT_CONTEXT": "prolog_slurmd",
            # 22.05 sets SLURM_NODELIST only; newer Slurm SLURM_JOB_NODELIST.
            ("SLURM_JOB_NODELIST" if new_slurm else "SLURM_NODELIST"): hostlist,
            "P2PCAST_BIN": str(self.bin),
            "P2PCAST_DEFAULTS": "/nonexistent",
            "P2PCAST_CONTROL": self.control(name),
            "P2PCAST_RUN_DIR": str(self.run_dir(name)),
            "P2PCAST_PEER_ADDRESSES": ",".join(f"{n}={h}" for n, h in self.hosts.items()),
            "PYTHONPATH": str(REPO),
        }
        if image is not None:
            env["SPANK_CH_IMAGE"] = image
        if mounts is not None:
            env["SPANK_CH_MOUNT"] = mounts
        return env

    def run_hooks(
        self,
        hook: Path,
        job: int,
        image: str | None,
        nodes: list[str] | None = None,
        mounts: str | None = None,
        new_slurm: bool = False,
        uid: int | None = None,
        control_path: str | None = None,
    ) -> dict[str, subprocess.CompletedProcess[str]]:
        """Run ``hook`` on ``nodes`` (default: all) at once, as slurmd does."""
        nodes = nodes or self.names
        hostlist = f"n[{','.join(n[1:] for n in nodes)}]"  # the allocation: these nodes
        envs = {
            n: self.hook_env(n, job, image, mounts, hostlist, new_slurm=new_slurm, uid=uid)
            for n in nodes
        }
        if control_path is not None:
            for env in envs.values():
                env["P2PCAST_CONTROL"] = control_path
        procs = {
            name: subprocess.Popen(
                [str(hook)],
                env=envs[name],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in nodes
        }
        out = {}
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=HOOK_TIMEOUT)
            out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        return out
