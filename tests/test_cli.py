"""The `p2pcast` command as users run it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pcast.auth import write_secret_file
from p2pcast.demo import free_port, make_image

MiB = 1 << 20


def p2pcast(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pcast", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
        env={**os.environ, "P2PCAST_CONTROL": "/nonexistent/p2pcast.sock"},
    )


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("cli")
    image = work / "base.tar"
    make_image(image, 12 * MiB)
    dest = work / "origin"
    out = p2pcast("push", str(image), str(dest), "--name", "base:1", "--chunk-size", "1M", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["chunks"] == info["chunks_written"] > 10
    return image, dest


def test_push_again_writes_nothing_and_inspect_shows_manifest(origin: tuple[Path, Path]) -> None:
    image, dest = origin
    again = p2pcast(
        "push", str(image), f"file://{dest}", "--name", "base:1", "--chunk-size", "1M", "--json"
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["chunks_written"] == 0
    shown = p2pcast("inspect", "base:1", "--origin", str(dest), "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert info["image_type"] == "tar"
    text = p2pcast("inspect", "base:1", "--origin", str(dest), "--chunks")
    assert "sha256:" in text.stdout and len(text.stdout.splitlines()) > 10


def test_fetch_in_process_alone(origin: tuple[Path, Path], tmp_path: Path) -> None:
    image, dest = origin
    out = tmp_path / "copy.tar"
    result = p2pcast(
        "fetch", "base:1", "--origin", str(dest), "--in-process", "--node", "127.0.0.1",
        "--listen", "127.0.0.1", "--port", str(free_port("127.0.0.1")),
        "--state-dir", str(tmp_path / "state"), "--output", str(out), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == image.read_bytes()
    info = json.loads(result.stdout)
    assert info["state"] == "complete" and info["from_peers"] == 0


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["fetch", "../bad name", "--origin", "{dest}"], 2, "image name"),
        (["fetch", "nosuch:1", "--origin", "{dest}", "--in-process", "--node", "127.0.0.1",
          "--listen", "127.0.0.1", "--port", "0"], 2, "nosuch"),
        (["fetch", "base:1", "--origin", "{dest}", "--peers", "n[1-", "--node", "n1"], 2,
         "hostlist"),
        (["fetch", "base:1", "--origin", "{dest}", "--peers", "n[1-4]", "--node", "x9"], 2,
         "not in the hostlist"),
        (["inspect", "base:1", "--origin", "{tmp}/none"], 2, "base"),
        (["push", "{tmp}/notanimage", "{tmp}/o"], 2, "notanimage"),
        (["status", "--control", "{tmp}/no.sock"], 5, "no p2pcast daemon"),
    ],
)  # fmt: skip
def test_bad_input_one_line_error(
    origin: tuple[Path, Path], tmp_path: Path, args: list[str], code: int, words: str
) -> None:
    _, dest = origin
    (tmp_path / "notanimage").write_bytes(b"hello world" * 100)
    argv = [a.format(dest=dest, tmp=tmp_path) for a in args]
    result = p2pcast(*argv)
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pcast: error:"), result.stderr
    assert words in lines[0]


def test_peers_unreachable_fails_after_timeout(origin: tuple[Path, Path], tmp_path: Path) -> None:
    _, dest = origin
    port = free_port("127.0.0.1")
    result = p2pcast(
        "fetch", "base:1", "--origin", str(dest), "--in-process",
        "--peers", "127.0.0.[1-3]", "--node", "127.0.0.1", "--listen", "127.0.0.1",
        "--port", str(port), "--peer-timeout", "1", "--state-dir", str(tmp_path / "s"),
        "--auth", "secret", "--secret-file", str(write_secret_file(tmp_path / "secret")),
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "no peer answered" in result.stderr and "127.0.0.2" in result.stderr


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path: Path) -> None:
    result = p2pcast("demo", "--nodes", "3", "--size", "24M", "--json", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    nodes = report["p2pcast"]["nodes"]
    assert len(nodes) == 3 and all(n["sha256_ok"] for n in nodes.values())
    assert report["p2pcast"]["origin_reads_per_image"] <= 1.05
    assert report["naive"]["origin_reads_per_image"] == pytest.approx(3.0)
    assert report["staged"]["method"] == "untar" and report["staged"]["files"] > 2
    assert not list((tmp_path / "staged").glob("*")) if (tmp_path / "staged").exists() else True


def test_fetch_status_and_cache_through_a_daemon(origin: tuple[Path, Path], tmp_path: Path) -> None:
    from p2pcast.demo import DemoCluster

    image, dest = origin
    cluster = DemoCluster(tmp_path, 1, dest, "asyncio", True)
    cluster.start()
    try:
        import asyncio

        asyncio.run(cluster.wait_ready())
        sock = cluster.control("n1")
        out = tmp_path / "copy.tar"
        fetched = p2pcast(
            "fetch", "base:1", "--peers", "n1", "--node", "n1", "--job", "42",
            "--control", sock, "--output", str(out), "--json",
        )  # fmt: skip
        assert fetched.returncode == 0, fetched.stderr
        assert out.read_bytes() == image.read_bytes()
        assert json.loads(fetched.stdout)["job"] == "42"
        status = p2pcast("status", "--control", sock)
        assert status.returncode == 0 and "base" in status.stdout and "complete" in status.stdout
        listed = json.loads(p2pcast("cache", "list", "--control", sock, "--json").stdout)
        assert [(e["name"], e["complete"]) for e in listed["images"]] == [("base", True)]
        gc = p2pcast("cache", "gc", "--control", sock)
        assert gc.returncode == 0 and "base" in gc.stdout
        listed = json.loads(p2pcast("cache", "list", "--control", sock, "--json").stdout)
        assert listed["images"] == []
    finally:
        cluster.stop()


def test_progress_bar_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from p2pcast.cli import Progress

    Progress("quiet", enabled=True).update(5, 10)  # not a terminal under pytest
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = Progress("fetch", enabled=True)
    bar.update(5 * MiB, 10 * MiB)
    bar.close()
    err = capsys.readouterr().err
    assert "fetch [###############...............]  50.0%" in err
    assert "5.0 MiB/10.0 MiB" in err


def test_a_daemon_that_cannot_authenticate_peers_does_not_start(tmp_path: Path) -> None:
    base = [
        "daemon", "--listen", "127.0.0.1", "--port", str(free_port("127.0.0.1")),
        "--state-dir", str(tmp_path / "state"), "--control", str(tmp_path / "control.sock"),
        "--munge-socket", str(tmp_path / "no-munged.sock"),
    ]  # fmt: skip
    result = p2pcast(*base, "--secret-file", str(tmp_path / "absent"))
    assert result.returncode == 2, result.stderr
    assert "no way to authenticate peers" in result.stderr and "--auth none" in result.stderr
    secret = write_secret_file(tmp_path / "secret")
    secret.chmod(0o644)
    result = p2pcast(*base, "--secret-file", str(secret))
    assert result.returncode == 2 and "open to group or others" in result.stderr, result.stderr
    assert not (tmp_path / "control.sock").exists()
