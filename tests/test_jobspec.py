"""The pure part of the Slurm integration: job values, Prolog environment, blame, counts."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pcast import errors, jobspec
from p2pcast.errors import BadImageName, BadMountSpec, ConfigError
from p2pcast.jobspec import Mount, parse_image, parse_mounts, parse_prolog_env
from p2pcast.jobstage import RefTable, StagedEntry, staging_key
from p2pcast.stage import StagedImage

SLURM_ENV = {
    "SPANK_CH_IMAGE": "hpc/pytorch:2.3",
    "SPANK_CH_MOUNT": "/scratch:/scratch",
    "SLURM_JOB_ID": "1234",
    "SLURM_NODELIST": "n[1-4]",
    "SLURMD_NODENAME": "n3",
    "SLURM_JOB_UID": "1000",
    "SLURM_JOB_GID": "100",
    "SLURM_JOB_USER": "alice",
}


def test_mounts_parse() -> None:
    assert parse_mounts("") == ()
    assert parse_mounts("/a:/b,/c/d:/e") == (Mount("/a", "/b"), Mount("/c/d", "/e"))
    assert str(Mount("/a", "/b")) == "/a:/b"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/a", "expected SRC:DST"),
        ("/a:/b:/c", "expected SRC:DST"),
        ("a:/b", "not an absolute path"),
        ("/a:b", "not an absolute path"),
        ("/a:/b/../c", "contains '..'"),
        ("/../a:/b", "contains '..'"),
        ("/a:/", "must not be '/'"),
        ("/a:/b,", "expected SRC:DST"),
        ("/a\n:/b", "control character"),
        ("/a:/b\t", "control character"),
        ("/" + "x" * 4096 + ":/b", "over 4096 bytes"),
        (",".join(["/a:/b"] * 65), "over 64"),
        ("/a:/" + "b" * 16400, "exceeds 16384"),
    ],
)
def test_bad_mounts_are_user_errors(text: str, message: str) -> None:
    with pytest.raises(BadMountSpec, match=message):
        parse_mounts(text)


def test_image_is_a_name_not_a_url() -> None:
    assert str(parse_image("hpc/x")) == "hpc/x:latest"
    for bad in ("s3://bucket/x", "file:///etc", "../x", "a:b:c", "", "x" * 1200):
        with pytest.raises(BadImageName):
            parse_image(bad)


def test_prolog_env_22_05_and_newer() -> None:
    request = parse_prolog_env(SLURM_ENV)
    assert (request.job, request.peers, request.node) == ("1234", "n[1-4]", "n3")
    assert (request.uid, request.gid, request.user) == (1000, 100, "alice")
    # The user's values pass unchecked: the daemon checks and records them.
    assert request.body({"n1": "10.0.0.1"}) == {
        "job": "1234", "image": "hpc/pytorch:2.3", "mounts": "/scratch:/scratch",
        "peers": "n[1-4]", "node": "n3", "uid": 1000, "gid": 100, "user": "alice",
        "addresses": {"n1": "10.0.0.1"},
    }  # fmt: skip
    newer = {**SLURM_ENV, "SLURM_JOB_NODELIST": "n[1-2]"}
    assert parse_prolog_env(newer).peers == "n[1-2]"  # preferred when set


@pytest.mark.parametrize("missing", ["SLURM_JOB_ID", "SLURMD_NODENAME", "SLURM_NODELIST"])
def test_prolog_env_without_slurm_variables(missing: str) -> None:
    env = {k: v for k, v in SLURM_ENV.items() if k != missing}
    with pytest.raises(ConfigError, match=missing):
        parse_prolog_env(env)


def test_job_ids() -> None:
    assert jobspec.check_job_id("42") == "42"
    assert jobspec.check_job_id(42) == "42"
    for bad in ("", "../1", "1/2", "12345678901", "1 ", None):
        with pytest.raises(ConfigError):
            jobspec.check_job_id(bad)


def test_wants_image() -> None:
    assert jobspec.wants_image(SLURM_ENV)
    assert not jobspec.wants_image({"SPANK_CH_IMAGE": "  "})
    assert not jobspec.wants_image({})


def test_peer_addresses() -> None:
    assert jobspec.parse_addresses("") == {}
    assert jobspec.parse_addresses("n1=10.0.0.1, n2=10.0.0.2:7000") == {
        "n1": "10.0.0.1",
        "n2": "10.0.0.2:7000",
    }
    with pytest.raises(ConfigError):
        jobspec.parse_addresses("n1")


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.ImageNotFound, 0),
        (errors.BadImageName, 0),
        (errors.BadMountSpec, 0),
        (errors.ImageTooLarge, 0),
        (errors.BadHostlist, 0),
        (errors.OriginUnavailable, 0),
        (errors.PeersUnreachable, 0),
        (errors.ChunkCorrupt, 0),
        (errors.CancelledBroadcast, 0),
        (errors.DaemonUnavailable, 1),
        (errors.StoreError, 1),
        (errors.StageError, 1),
        (errors.InternalError, 1),
    ],
)
def test_only_node_faults_drain(error: type[errors.P2PCastError], status: int) -> None:
    assert jobspec.hook_exit_status(error("x")) == status


def test_ref_table_counts_and_round_trips(tmp_path: Path) -> None:
    table = RefTable()
    staged = StagedImage(tmp_path / "staged" / "ab", "kernel-mount", tmp_path / "image")
    table.put(StagedEntry("ab", "ab", "hpc/x:1", staged, set()))
    table.add_job("ab", "7")
    table.add_job("ab", "10")
    assert table.keys_of("7") == ["ab"] and table.keys_of("8") == []
    assert table.image_ids() == {"ab"}
    copy = RefTable.from_dict(table.to_dict())
    assert copy.to_dict() == table.to_dict()
    assert table.to_dict()["staged"]["ab"]["jobs"] == ["7", "10"]  # numeric order
    assert not copy.drop_job("ab", "7")
    assert copy.drop_job("ab", "10")  # the last one: unstage now
    assert not copy.drop_job("nosuch", "10")
    with pytest.raises(errors.StoreError):
        RefTable.from_dict({"version": 99, "staged": {}})


def test_staging_keys() -> None:
    # One mount for everybody; unpacked trees per user, who owns them.
    assert staging_key("ab", "squashfs", 1000) == "ab"
    assert staging_key("ab", "tar.zst", 1000) == "ab-u1000"
