"""Image type detection from real files."""

from __future__ import annotations

import errno
import gzip
import io
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from p2pcast import imagetype
from p2pcast.errors import BadImageFile
from p2pcast.imagetype import detect_image_type
from p2pcast.manifest import IMAGE_TYPES


def tar_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("etc/os-release", b"NAME=demo\n"), ("bin/tool", bytes(3000))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_tar(tmp_path: Path) -> None:
    assert detect_image_type(write(tmp_path / "image", tar_bytes())) == "tar"


def test_gnu_tar(tmp_path: Path) -> None:
    path = tmp_path / "gnu.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(__file__, arcname="x.py")
    assert detect_image_type(path) == "tar"


def test_tar_gz_made_by_tarfile(tmp_path: Path) -> None:
    path = tmp_path / "image.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(__file__, arcname="a/very/long/member/name/" + "x" * 80 + ".py")
    assert detect_image_type(path) == "tar.gz"


def test_tar_gz_with_file_name_in_gzip_header(tmp_path: Path) -> None:
    # gzip -N stores the original name first; the tar header follows it.
    path = tmp_path / "image"
    with path.open("wb") as f, gzip.GzipFile("n" * 2000 + ".tar", "wb", fileobj=f) as gz:
        gz.write(tar_bytes())
    assert detect_image_type(path) == "tar.gz"


def test_tar_zst(tmp_path: Path) -> None:
    data = zstandard.ZstdCompressor().compress(tar_bytes())
    assert detect_image_type(write(tmp_path / "image.tar.zst", data)) == "tar.zst"


def test_tar_zst_streamed_without_content_size(tmp_path: Path) -> None:
    path = tmp_path / "image"
    with path.open("wb") as f, zstandard.ZstdCompressor().stream_writer(f) as writer:
        writer.write(tar_bytes())
    assert detect_image_type(path) == "tar.zst"


def test_fake_squashfs_header(tmp_path: Path) -> None:
    data = b"hsqs" + bytes(92) + random.Random(1).randbytes(4096)
    assert detect_image_type(write(tmp_path / "image", data)) == "squashfs"


def test_real_squashfs(tmp_path: Path) -> None:
    mksquashfs = shutil.which("mksquashfs")
    if mksquashfs is None:
        if os.environ.get("CI"):
            pytest.fail("mksquashfs is missing in CI (apt install squashfs-tools)")
        pytest.skip("mksquashfs is not installed")
    source = tmp_path / "root"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "os-release").write_text("NAME=demo\n")
    image = tmp_path / "image.sqfs"
    subprocess.run(
        [mksquashfs, str(source), str(image), "-noappend", "-no-progress"],
        check=True,
        capture_output=True,
    )
    assert detect_image_type(image) == "squashfs"


def test_accepts_str_paths(tmp_path: Path) -> None:
    assert detect_image_type(str(write(tmp_path / "image", tar_bytes()))) == "tar"


def test_every_result_is_a_manifest_image_type(tmp_path: Path) -> None:
    made = {
        detect_image_type(write(tmp_path / "a", tar_bytes())),
        detect_image_type(write(tmp_path / "b", gzip.compress(tar_bytes()))),
        detect_image_type(write(tmp_path / "c", zstandard.compress(tar_bytes()))),
        detect_image_type(write(tmp_path / "d", b"hsqs" + bytes(100))),
    }
    assert made == set(IMAGE_TYPES)


@pytest.mark.parametrize(
    ("data", "seen"),
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(random.Random(2).randbytes(10_000), "starts with", id="random"),
        pytest.param(b"x" * 100, "starts with 78 78", id="short-text"),
        pytest.param(gzip.compress(b"just a log file\n" * 100), "tar header", id="gzip-not-tar"),
        pytest.param(zstandard.compress(b"log\n" * 1000), "tar header", id="zstd-not-tar"),
        pytest.param(b"\x1f\x8b" + random.Random(3).randbytes(600), "gzip", id="broken-gzip"),
        pytest.param(gzip.compress(tar_bytes())[:30], "gzip", id="truncated-gzip"),
        pytest.param(b"\x28\xb5\x2f\xfd" + bytes(600), "zstd", id="broken-zstd"),
        pytest.param(tar_bytes()[:300], "starts with", id="truncated-tar-header"),
    ],
)
def test_not_an_image(tmp_path: Path, data: bytes, seen: str) -> None:
    path = write(tmp_path / "thing.tar", data)
    with pytest.raises(BadImageFile) as info:
        detect_image_type(path)
    message = str(info.value)
    assert str(path) in message
    assert seen in message
    assert "\n" not in message


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(BadImageFile, match="not a regular file"):
        detect_image_type(tmp_path)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(BadImageFile, match="not a regular file"):
        detect_image_type(fifo)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadImageFile, match=r"missing\.sqfs"):
        detect_image_type(tmp_path / "missing.sqfs")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated: chmod 0 does not stop root, and tests may run as root.
    path = write(tmp_path / "secret.tar", tar_bytes())

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(imagetype, "open", refuse, raising=False)
    with pytest.raises(BadImageFile, match=r"secret\.tar: cannot read: Permission denied"):
        detect_image_type(path)
