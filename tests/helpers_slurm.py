"""A real multi-node Slurm cluster (tools/slurm.py) for tests: the factory behind
the `slurm_cluster` fixture of tests/conftest.py.

    def test_something(slurm_cluster: SlurmFactory) -> None:
        slurm = slurm_cluster(4, prolog="/var/tmp/my-prolog")
        out = slurm.client(["srun", "-N4", "hostname"], user=TEST_USER, ...)

Every cluster gets a name and a subnet of its own (from the test run's PID), an
owner (the test run, so that the next run reaps it if this one is killed) and
is taken down, by PID, when the fixture's scope ends. Skipped only where Slurm
or munge is not installed, and never under CI (CI set): there that fails.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from typing import Any

import pytest

from tools import slurm as slurm_tool
from tools.slurm import TEST_USER, Slurm

#: Names of the tests' clusters: PREFIX, the run's PID, a counter (at most 8
#: characters, cluster.py's limit). reap_orphans looks for this prefix.
NAME_PREFIX = "ts"
#: Test clusters take a /24 among 198.18.64-127.0/24, by PID: no default of
#: tools/cluster.py (198.18.0), the bench (198.18.9), tools/slurm.py (198.18.60)
#: or the other tests (198.19.x) is there.
SUBNET_BASE, SUBNET_SPAN = 64, 64


def slurm_unavailable() -> str | None:
    """Why this machine cannot run the Slurm tests, or None."""
    missing = slurm_tool.missing_binaries()
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing; run tools/setup.sh)"
    return None


def require_slurm() -> None:
    """Skip without Slurm, except under CI; fail where a precondition that
    tools/setup.sh provides (root, the test user) is missing."""
    reason = slurm_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Slurm tests: {reason}")
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests need root (network and mount namespaces)")
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.fail(f"no user {TEST_USER}: run tools/setup.sh as root")


class SlurmFactory:
    """Makes clusters (keywords go to `Slurm.up`) and takes them all down at the end."""

    def __init__(self) -> None:
        self.clusters: list[Slurm] = []

    def __call__(self, n: int = 4, **kw: Any) -> Slurm:
        require_slurm()
        k = len(self.clusters)
        pid = os.getpid()
        kw.setdefault("name", f"{NAME_PREFIX}{pid % 10000}{k}")
        kw.setdefault("subnet", f"198.18.{SUBNET_BASE + (pid + k) % SUBNET_SPAN}.0/24")
        kw.setdefault("ceph", "none")  # a test that wants Ceph passes its name
        cluster = Slurm.up(n, owner=pid, **kw)
        self.clusters.append(cluster)
        return cluster

    def close(self) -> None:
        stuck: list[int] = []
        for cluster in reversed(self.clusters):
            stuck += cluster.down()
        self.clusters.clear()
        assert not stuck, f"Slurm cluster processes {stuck} would not die"


def slurm_factory() -> Iterator[SlurmFactory]:
    """The body of the `slurm_cluster` fixture: reaps the clusters of killed runs
    first (only on use, so that a run without Slurm tests never touches them)."""
    factory = SlurmFactory()
    if slurm_unavailable() is None and os.geteuid() == 0:
        slurm_tool.reap_orphans(prefix=NAME_PREFIX)
    try:
        yield factory
    finally:
        factory.close()
