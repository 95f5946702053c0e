"""bench/slurm_bench.py: a real, small run (N=2, the bare Debian image, fast links)
on the session's Ceph, and its job scripts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from bench import slurm_bench
from tests.helpers_slurm import require_slurm
from tools import slurm as slurm_tool
from tools.ceph import Ceph


class _FakeCeph:
    def curl_args(self) -> list[str]:
        return ["--aws-sigv4", "aws:amz:us-east-1:s3", "http://rgw/b/raw/x.sqfs"]


def test_batch_scripts() -> None:
    stamps = Path("/home/u/run/stamps")
    fake: Any = _FakeCeph()
    p2p = slurm_bench.batch_script("p2pcast", fake, stamps)
    # p2pcast's step runs in the image through the plugin: no ch-run, no download
    assert "ch-run" not in p2p and "curl" not in p2p and "srun sh -c" in p2p
    sb = slurm_bench.batch_script("sbcast", fake, stamps)
    lines = sb.splitlines()
    assert lines[:2] == ["#!/bin/sh", "set -e"]
    # one GET on the batch node, sbcast to every node, then ch-run on the copy
    assert lines[2].startswith("curl ") and "/tmp/slurmbench-src.sqfs" in lines[2]
    assert lines[3] == f"sbcast --force /tmp/slurmbench-src.sqfs {slurm_bench.NODE_IMAGE}"
    assert lines[4].startswith("srun sh -c ") and "ch-run -b" in lines[4]
    http = slurm_bench.batch_script("http", fake, stamps)
    # every node GETs the whole image itself, then runs it
    assert http.count("srun") == 1 and "curl" in http and "exec ch-run" in http
    for script in (p2p, sb, http):
        assert "/etc/p2pcast-test-image" in script  # stamps only inside the image
    with pytest.raises(ValueError):
        slurm_bench.batch_script("nfs", fake, stamps)


def test_unknown_method_is_refused() -> None:
    assert slurm_bench.main(["--methods", "p2pcast,nfs", "--quiet"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_slurm_bench_small(tmp_path: Path, ceph: Ceph) -> None:
    require_slurm()
    name = f"sb{os.getpid() % 100000}"
    out = tmp_path / "slurm.json"
    fuse = Path("/dev/fuse")
    mode = fuse.stat().st_mode if fuse.exists() else None
    try:
        rc = slurm_bench.main([
            "--nodes", "2", "--pad", "0", "--rate", "400mbit", "--ceph-instance", ceph.name,
            "--name", name, "--subnet", "198.19.250.0/24", "--settle", "0.1",
            "--timeout", "120", "--out", str(out), "--quiet", "--plot",
        ])  # fmt: skip
    finally:
        slurm_tool.main(["down", "--name", name])
    result = json.loads(out.read_text())
    assert rc == 0, result["runs"]
    size = result["image"]["size"]
    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == set(slurm_bench.METHODS)
    for method, r in runs.items():
        assert r["ok"] and r["tasks_in_image"] == 2, (method, r)
        assert 0 < r["first_task_seconds"] <= r["last_task_seconds"] <= r["job_seconds"], r
        assert set(r["per_node"]) == {"n1", "n2"}
    # What Ceph served: p2pcast and sbcast read the image about once, http once per node
    # (p2pcast its stored chunks: zstd where it pays).
    stored = result["image"]["stored"]
    assert 0 < stored <= size
    assert stored <= runs["p2pcast"]["origin_bytes"] <= 1.05 * stored
    assert runs["sbcast"]["origin_bytes"] == pytest.approx(size, abs=64)
    assert runs["http"]["origin_bytes"] == pytest.approx(2 * size, abs=128)
    assert (tmp_path / "slurm.png").stat().st_size > 0
    # /dev/fuse's mode is back, the cluster is gone
    if mode is not None:
        assert stat.S_IMODE(fuse.stat().st_mode) == stat.S_IMODE(mode)
    assert not slurm_tool.state_path(name).exists()
