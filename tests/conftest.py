"""Session fixtures: one real single-node Ceph (tools/ceph.py) for the whole run,
and a factory of real multi-node Slurm clusters (tools/slurm.py) per test module.

It starts on first use (a run that selects no Ceph test never starts it) and
stops at the end of the session, by PID. Skipped only when the Ceph programs
are not installed, and never under CI (CI set): there that is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers_slurm import SlurmFactory, slurm_factory
from tools import ceph as ceph_tool
from tools.ceph import Ceph

# botocore's credential chain ends at the EC2 metadata address (169.254.169.254);
# a test without credentials must fail here, not send traffic off the machine.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

#: OSDs of the test instance: three, so that tests see reads spread over OSDs.
CEPH_OSDS = 3


def ceph_unavailable() -> str | None:
    """Why this machine cannot run Ceph here, or None."""
    missing = ceph_tool.missing_binaries()
    if missing:
        return f"Ceph is not installed ({', '.join(missing)} missing; run tools/setup.sh)"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Ceph tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def librados() -> None:
    """python3-rados imports: installed with Ceph (tools/setup.sh), so its absence
    skips only where Ceph itself is absent; elsewhere it is a failure."""
    try:
        import rados  # noqa: F401
    except ImportError as exc:
        reason = ceph_unavailable()
        if reason is None:
            pytest.fail(f"Ceph is installed but python3-rados does not import: {exc}")
        _skip_or_fail(reason)


@pytest.fixture(scope="session")
def ceph(librados: None) -> Iterator[Ceph]:
    reason = ceph_unavailable()
    if reason:
        _skip_or_fail(reason)
    # Instances of earlier runs that were killed before they could stop theirs.
    ceph_tool.reap_orphans(prefix="t")
    # Per run, so that a developer's own instance (and another run) is left alone.
    name = f"t{os.getpid() % 100000}"
    if os.geteuid() == 0:
        address = ceph_tool.free_address(start=2 + os.getpid() % 200)
    else:
        address = f"127.77.{os.getpid() % 250}.1"
    instance = Ceph.up(CEPH_OSDS, name=name, address=address, owner=os.getpid())
    try:
        yield instance
    finally:
        stuck = instance.down()
        assert not stuck, f"Ceph daemons {stuck} would not die"


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmFactory]:
    """Factory of real multi-node Slurm clusters (tools/slurm.py): call it with the
    node count and `Slurm.up` keywords; every cluster it made goes down at the end
    of the test module. See tests/helpers_slurm.py."""
    yield from slurm_factory()
