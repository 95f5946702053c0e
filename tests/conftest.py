"""Session fixtures: one real single-node Ceph (tools/ceph.py) for the whole run.

It starts on first use (a run that selects no Ceph test never starts it) and
stops at the end of the session, by PID. Skipped only when the Ceph programs
are not installed, and never under CI (CI set): there that is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

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


@pytest.fixture(scope="session")
def ceph() -> Iterator[Ceph]:
    reason = ceph_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Ceph tests: {reason}")
        pytest.skip(reason)
    # Instances of earlier runs that were killed before they could stop theirs.
    ceph_tool.reap_orphans(prefix="t")
    # Per run, so that a developer's own instance (and another run) is left alone.
    name = f"t{os.getpid() % 100000}"
    if os.geteuid() == 0:
        address = ceph_tool.free_address(start=2 + os.getpid() % 200)
    else:
        address = f"127.77.{os.getpid() % 250}.1"
    instance = Ceph.up(CEPH_OSDS, name=name, address=address)
    try:
        yield instance
    finally:
        stuck = instance.down()
        assert not stuck, f"Ceph daemons {stuck} would not die"
