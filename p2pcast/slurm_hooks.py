"""The Slurm Prolog and Epilog: ``p2pcast slurm prolog`` / ``p2pcast slurm epilog``.

Thin: parse the environment (``jobspec``), ask the node's daemon, turn the
outcome into an exit status. The daemon stages, counts and writes the job
record; a hook only decides whether a failure is the node's (exit 1: Slurm
drains the node) or the job's (exit 0: the record carries the message and the
job's steps fail with it). See ``jobspec.hook_exit_status``.

Environment beyond Slurm's: ``P2PCAST_CONTROL`` (the daemon's socket),
``P2PCAST_RUN_DIR`` (where the Epilog finds records when the daemon is down),
``P2PCAST_PEER_ADDRESSES`` (``n1=ADDR,...`` where DNS does not give the
high-speed network's addresses).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from p2pcast import control, jobrecord, jobspec
from p2pcast.errors import DaemonUnavailable, P2PCastError

#: Seconds between progress lines in the slurmd log while an image arrives:
#: enough to see a slow broadcast move without flooding the log.
PROGRESS_LOG_INTERVAL = 10.0


class HookLog:
    """One-line messages on stderr, tagged like a syslog line (slurmd keeps them)."""

    def __init__(self, stream: TextIO, hook: str, env: Mapping[str, str]) -> None:
        self.stream = stream
        job = env.get("SLURM_JOB_ID", "?")
        node = env.get("SLURMD_NODENAME", "?")
        self.prefix = f"p2pcast-{hook}[{os.getpid()}]: job {job} on {node}:"

    def __call__(self, message: str) -> None:
        self.stream.write(f"{self.prefix} {message}\n")
        self.stream.flush()


def _control_path(env: Mapping[str, str]) -> str:
    return env.get("P2PCAST_CONTROL") or control.DEFAULT_SOCKET


def _run_dir(env: Mapping[str, str]) -> Path:
    return Path(env.get("P2PCAST_RUN_DIR") or jobrecord.DEFAULT_RUN_DIR)


async def _stage(path: str, body: dict[str, Any], say: HookLog) -> dict[str, Any]:
    last = time.monotonic()
    async for kind, frame in control.call(path, "stage", **body):
        if kind == control.RESULT:
            return frame
        now = time.monotonic()
        if now - last >= PROGRESS_LOG_INTERVAL:
            last = now
            say(
                f"{frame.get('name')}: {frame.get('chunks_done')}/{frame.get('chunks_total')}"
                f" chunks, {frame.get('from_peers', 0)} bytes from peers"
            )
    raise DaemonUnavailable("the daemon sent no result")


def run_prolog(env: Mapping[str, str], stderr: TextIO) -> int:
    if not jobspec.wants_image(env):
        return 0  # not a container job: nothing to do, and quickly
    say = HookLog(stderr, "prolog", env)
    started = time.monotonic()
    try:
        request = jobspec.parse_prolog_env(env)
        addresses = jobspec.parse_addresses(env.get("P2PCAST_PEER_ADDRESSES", ""))
    except P2PCastError as exc:
        # Slurm's own variables or the node's settings: the node is misconfigured.
        say(f"error: {exc}")
        return jobspec.NODE_FAULT
    say(f"staging {request.image} for {request.user or request.uid} on {request.peers}")
    try:
        result = asyncio.run(_stage(_control_path(env), request.body(addresses), say))
    except P2PCastError as exc:
        status = jobspec.hook_exit_status(exc)
        blame = "node fault, draining" if status else "the job's steps will fail with it"
        say(f"error ({type(exc).__name__}, {blame}): {exc}")
        return status
    say(
        f"{request.image} staged at {result['root']} by {result['method']} in"
        f" {time.monotonic() - started:.2f} s ({result['jobs_sharing']} job(s) share it;"
        f" {result['from_peers']} bytes from peers, {result['from_origin']} from the origin)"
    )
    return 0


def run_epilog(env: Mapping[str, str], stderr: TextIO) -> int:
    say = HookLog(stderr, "epilog", env)
    try:
        job = jobspec.check_job_id(env.get("SLURM_JOB_ID", ""))
    except P2PCastError as exc:
        say(f"error: {exc}")
        return jobspec.NODE_FAULT
    run_dir = _run_dir(env)
    if not jobspec.wants_image(env) and not jobrecord.exists(run_dir, job):
        return 0
    try:
        result = asyncio.run(control.request(_control_path(env), "release", job=job))
    except DaemonUnavailable as exc:
        # The daemon reconciles at start-up: a job without a record holds nothing.
        try:
            jobrecord.remove(run_dir, job)
        except P2PCastError as exc2:
            say(f"error: {exc}; and cannot remove the job record: {exc2}")
            return jobspec.NODE_FAULT
        say(f"{exc}; removed the job record, the daemon releases the image when it starts")
        return 0
    except P2PCastError as exc:
        say(f"error ({type(exc).__name__}): {exc}")
        return jobspec.hook_exit_status(exc)
    if result["released"] or result["record"]:
        say(
            f"released {len(result['released'])} staged image(s),"
            f" unstaged {len(result['unstaged'])}"
        )
    return 0
