"""The S3 origin: URL and configuration (no Ceph needed), then against the real
radosgw of the session fixture: layout, push, tags, credentials from every
source, failover, and bad input ending in clear p2pcast errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pcast import manifest as manifest_mod
from p2pcast.codec import Codec, decode_chunk
from p2pcast.errors import (
    BadImageName,
    ConfigError,
    ImageNotFound,
    ManifestCorrupt,
    OriginError,
    OriginUnavailable,
)
from p2pcast.hashing import chunk_digest
from p2pcast.manifest import ChunkRef, Manifest
from p2pcast.names import ImageRef
from p2pcast.origins import s3 as s3_module
from p2pcast.origins.base import (
    ORIGIN_CLASSES,
    OriginConfig,
    names_image,
    open_origin,
    split_image_url,
)
from p2pcast.origins.s3 import S3Origin
from p2pcast.publish import push
from tests.helpers_ceph import MiB, s3_config
from tests.helpers_node import make_tar
from tools.ceph import Ceph

BUCKET = "origin-s3"
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


@pytest.fixture(autouse=True)
def no_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials only from what a test sets: none from the machine's ~/.aws."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))


def closed_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


# -- URLs and configuration (no Ceph) ------------------------------------------------


def test_s3_and_rados_schemes_are_registered() -> None:
    assert ORIGIN_CLASSES["s3"] == "p2pcast.origins.s3:S3Origin"
    assert ORIGIN_CLASSES["rados"] == "p2pcast.origins.rados:RadosOrigin"


def test_url_query_overrides_config_and_url_is_canonical() -> None:
    config = OriginConfig(s3_endpoints=("http://a:7480",), s3_region="r1", s3_profile="p1")
    origin = open_origin("s3://images?endpoint=http://b:1&endpoint=http://c:2", config)
    assert isinstance(origin, S3Origin)
    assert origin.bucket == "images"
    assert origin.endpoints == ("http://b:1", "http://c:2")
    assert (origin.region, origin.profile) == ("r1", "p1")
    assert origin.url == "s3://images?endpoint=http://b:1&endpoint=http://c:2&profile=p1&region=r1"
    # The URL alone opens the same origin again (no secret is in it).
    again = open_origin(origin.url)
    assert isinstance(again, S3Origin)
    assert (again.endpoints, again.profile, again.region) == (origin.endpoints, "p1", "r1")
    plain = S3Origin.from_url("s3://images", config)
    assert plain.endpoints == ("http://a:7480",)
    assert S3Origin.from_url("s3://images").endpoints == (None,)  # botocore decides


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("s3://Bad_Bucket", "bad S3 bucket name"),
        ("s3://ab", "bad S3 bucket name"),
        ("s3://a..b", "bad S3 bucket name"),
        ("s3://images?endpoint=ftp://x", "bad S3 endpoint"),
        ("s3://images?endpoint=", "bad S3 endpoint"),
        ("s3://images?colour=blue", "unknown S3 origin option"),
        ("s3://images/hpc/x:1", "goes in the image reference"),
        ("s3://", "not an s3://BUCKET URL"),
    ],
)
def test_bad_s3_urls_are_config_errors(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        open_origin(url)


def test_half_a_key_pair_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="both an access key id and a secret key"):
        S3Origin.from_url("s3://images", OriginConfig(s3_access_key="AK"))


def test_image_urls_split_into_origin_and_reference() -> None:
    assert split_image_url("s3://images/hpc/torch:2.3") == (
        "s3://images",
        ImageRef("hpc/torch", "2.3"),
    )
    assert split_image_url("s3://images/x?endpoint=http://gw:7480") == (
        "s3://images?endpoint=http://gw:7480",
        ImageRef("x"),
    )
    assert split_image_url("rados://pool/a/b") == ("rados://pool", ImageRef("a/b"))
    assert split_image_url("hpc/torch:2.3") == (None, ImageRef("hpc/torch", "2.3"))
    assert names_image("s3://images/x") and not names_image("s3://images")
    assert not names_image("file:///srv/origin") and not names_image("/srv/origin")
    with pytest.raises(BadImageName, match="no image"):
        split_image_url("s3://images/")
    with pytest.raises(BadImageName):
        split_image_url("s3://images/../etc:1")


def test_retry_backoff_is_bounded_and_jittered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry budget covers a radosgw restart (~2 s) and stays ~10 s."""
    sleeps: list[float] = []

    async def fake_sleep(delay: float) -> None:
        sleeps.append(delay)

    async def run() -> None:
        # Two endpoints where nothing listens: every attempt is refused at once.
        dead = tuple(f"http://127.0.0.1:{closed_port('127.0.0.1')}" for _ in range(2))
        origin = S3Origin(
            "images", endpoints=dead, access_key="AK", secret_key="SK",
            rng=random.Random(1), sleep=fake_sleep,
        )  # fmt: skip
        async with origin:
            with pytest.raises(OriginUnavailable, match=r"after 16 attempts; last: http://127"):
                await origin.get_manifest(ImageRef("x"))
        assert origin.retries == 16
        assert origin.failovers == 16  # each failure moves to the other endpoint

    asyncio.run(run())
    # A sleep per round after the first (both endpoints tried in each round).
    assert len(sleeps) == s3_module.RETRY_ROUNDS - 1
    for i, delay in enumerate(sleeps):
        full = min(s3_module.BACKOFF_MAX, s3_module.BACKOFF_FIRST * 2**i)
        assert 0.5 * full <= delay <= full
    assert 3.0 < sum(sleeps) < 12.0


# -- against radosgw -----------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tar(tmp_path_factory.mktemp("s3-image") / "image.tar", members=5, seed=11)


@pytest.fixture(scope="module")
def pushed(ceph: Ceph, image: Path) -> Iterator[Manifest]:
    async def run() -> Manifest:
        async with S3Origin.from_url(f"s3://{BUCKET}", s3_config(ceph)) as origin:
            result = await push(image, origin, ImageRef("hpc/app", "1.0"), chunk_size=MiB)
            assert result.chunks_written == result.manifest.chunk_count  # a new bucket
            return result.manifest

    yield asyncio.run(run())


def bucket_keys(ceph: Ceph, bucket: str) -> dict[str, bytes]:
    """Every object of a bucket, read with a plain client: what p2pcast laid out."""

    async def run() -> dict[str, bytes]:
        origin = S3Origin.from_url(f"s3://{bucket}", s3_config(ceph))
        async with origin:
            [client] = await origin._open()
            listing = await client.list_objects_v2(Bucket=bucket)
            out = {}
            for item in listing.get("Contents", []):
                reply = await client.get_object(Bucket=bucket, Key=item["Key"])
                async with reply["Body"] as body:
                    out[item["Key"]] = await body.read()
            return out

    return asyncio.run(run())


def test_layout_chunks_by_content_manifest_by_id_tag_holds_the_id(
    ceph: Ceph, pushed: Manifest
) -> None:
    keys = bucket_keys(ceph, BUCKET)
    image_id = pushed.image_id
    chunks = {f"chunks/{c.key[:2]}/{c.key}" for c in pushed.chunks()}
    assert chunks <= set(keys)
    assert keys[f"manifests/by-id/{image_id.hex()}"] == pushed.encode()
    assert keys["tags/hpc/app/1.0"] == image_id.hex().encode() + b"\n"
    for chunk in pushed.chunks():
        assert chunk_digest(keys[f"chunks/{chunk.key[:2]}/{chunk.key}"]) == chunk.digest


def test_push_again_skips_every_chunk_and_reads_back(
    ceph: Ceph, pushed: Manifest, image: Path
) -> None:
    async def run() -> None:
        async with S3Origin.from_url(f"s3://{BUCKET}", s3_config(ceph)) as origin:
            result = await push(image, origin, ImageRef("hpc/app", "1.0-copy"), chunk_size=MiB)
            assert result.chunks_written == 0
            assert result.chunks_skipped == pushed.chunk_count
            assert await origin.get_manifest(ImageRef("hpc/app", "1.0-copy")) == pushed.encode()
            assert await origin.get_manifest_by_id(pushed.image_id) == pushed.encode()
            data = await asyncio.gather(*(origin.get_chunk(c) for c in pushed.chunks()))
            joined = b"".join(
                decode_chunk(c.codec, d, c.raw_size)
                for c, d in zip(pushed.chunks(), data, strict=True)
            )
            assert joined == image.read_bytes()
            assert origin.bytes_read == pushed.stored_total
            assert origin.chunks_read == pushed.chunk_count

    asyncio.run(run())


def test_a_tag_moves_a_manifest_never_changes(ceph: Ceph, pushed: Manifest, tmp_path: Path) -> None:
    newer = make_tar(tmp_path / "newer.tar", members=2, seed=12)

    async def run() -> None:
        async with S3Origin.from_url(f"s3://{BUCKET}", s3_config(ceph)) as origin:
            tag = ImageRef("hpc/app", "stable")
            await origin.put_manifest(tag, pushed.encode())
            second = (await push(newer, origin, tag, chunk_size=MiB)).manifest
            assert manifest_mod.decode(await origin.get_manifest(tag)) == second
            # A broadcast that started from the old id can still finish.
            assert await origin.get_manifest_by_id(pushed.image_id) == pushed.encode()
            listed = dict(await origin.list_images())
            assert listed[tag] == second.image_id
            assert listed[ImageRef("hpc/app", "1.0")] == pushed.image_id

    asyncio.run(run())


# -- credentials from every source ----------------------------------------------------


def get_manifest(url: str, ref: ImageRef, config: OriginConfig | None = None) -> bytes:
    async def run() -> bytes:
        async with open_origin(url, config) as origin:
            return await origin.get_manifest(ref)

    return asyncio.run(run())


def test_credentials_and_endpoint_from_aws_variables(
    ceph: Ceph, pushed: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ceph.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ceph.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", ceph.endpoint)
    assert get_manifest(f"s3://{BUCKET}", ImageRef("hpc/app", "1.0")) == pushed.encode()


def test_credentials_and_endpoint_from_aws_files_and_profile(
    ceph: Ceph, pushed: Manifest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[ceph]\naws_access_key_id = {ceph.access_key}\n"
        f"aws_secret_access_key = {ceph.secret_key}\n"
    )
    config = tmp_path / "config"
    config.write_text(f"[profile ceph]\nendpoint_url = {ceph.endpoint}\nregion = us-east-1\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "ceph")
    assert get_manifest(f"s3://{BUCKET}", ImageRef("hpc/app", "1.0")) == pushed.encode()
    # The same profile named in p2pcast's configuration instead.
    monkeypatch.delenv("AWS_PROFILE")
    config_named = OriginConfig(s3_profile="ceph")
    assert get_manifest(f"s3://{BUCKET}", ImageRef("hpc/app", "1.0"), config_named)
    with pytest.raises(ConfigError, match="could not be found"):
        get_manifest(f"s3://{BUCKET}", ImageRef("x"), OriginConfig(s3_profile="nosuch"))


def test_p2pcast_configuration_wins_over_aws_variables(
    ceph: Ceph, pushed: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "WRONGWRONGWRONG")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    got = get_manifest(f"s3://{BUCKET}", ImageRef("hpc/app", "1.0"), s3_config(ceph))
    assert got == pushed.encode()


def test_no_credentials_anywhere_is_a_config_error_naming_the_sources(ceph: Ceph) -> None:
    config = OriginConfig(s3_endpoints=(ceph.endpoint,))
    with pytest.raises(ConfigError, match="no S3 credentials") as caught:
        get_manifest(f"s3://{BUCKET}", ImageRef("hpc/app", "1.0"), config)
    for source in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "P2PCAST_S3_ACCESS_KEY_ID"):
        assert source in str(caught.value)


def test_wrong_credentials_are_a_config_error_naming_the_key(ceph: Ceph) -> None:
    for access, secret, code in [
        ("NOSUCHKEY0000000", "whatever", "InvalidAccessKeyId"),
        (ceph.access_key, "not-the-secret", "SignatureDoesNotMatch"),
    ]:
        config = OriginConfig(
            s3_endpoints=(ceph.endpoint,), s3_access_key=access, s3_secret_key=secret
        )
        with pytest.raises(ConfigError, match=f"refused the credentials \\({code}\\)") as caught:
            get_manifest(f"s3://{BUCKET}", ImageRef("hpc/app", "1.0"), config)
        assert access in str(caught.value) and secret not in str(caught.value)


# -- absent things, failover, corruption ---------------------------------------------------


def test_the_first_pushes_to_a_new_bucket_race_to_make_it(ceph: Ceph) -> None:
    """Regression (CI): a push's concurrent chunk writes all found no bucket and
    all created it; radosgw answered one of the racing creates 409
    BucketAlreadyExists, and the push failed. Now one create per client, and a
    BucketAlreadyExists that we can reach is ours. Two clients race here too."""
    config = s3_config(ceph)

    async def run() -> None:
        async with (
            S3Origin.from_url("s3://race-bucket", config) as one,
            S3Origin.from_url("s3://race-bucket", config) as two,
        ):
            chunks = [ChunkRef(i, 0, 100, 100, Codec.RAW, bytes([i]) * 16) for i in range(8)]
            writes = [
                origin.put_chunk(chunk, bytes([chunk.index]) * 100)
                for chunk in chunks
                for origin in (one, two)
            ]
            await asyncio.gather(*writes)

    asyncio.run(run())
    keys = bucket_keys(ceph, "race-bucket")
    assert len(keys) == 8, sorted(keys)


def test_no_such_bucket_or_image_is_image_not_found(ceph: Ceph) -> None:
    config = s3_config(ceph)
    with pytest.raises(ImageNotFound, match="bucket no-such-bucket does not exist"):
        get_manifest("s3://no-such-bucket", ImageRef("hpc/app", "1.0"), config)
    with pytest.raises(
        ImageNotFound, match=f"image hpc/nosuch:latest not found in bucket {BUCKET}"
    ):
        get_manifest(f"s3://{BUCKET}", ImageRef("hpc/nosuch"), config)

    async def by_id() -> None:
        async with S3Origin.from_url(f"s3://{BUCKET}", config) as origin:
            with pytest.raises(ImageNotFound, match="image id 00000000"):
                await origin.get_manifest_by_id(bytes(16))

    asyncio.run(by_id())


def test_a_missing_chunk_is_an_origin_error(ceph: Ceph, pushed: Manifest) -> None:
    async def run() -> None:
        async with S3Origin.from_url("s3://empty-bucket", s3_config(ceph)) as origin:
            chunk = pushed.chunk(0)
            assert not await origin.has_chunk(chunk)
            with pytest.raises(OriginError, match=f"chunk {chunk.key} is missing"):
                await origin.get_chunk(chunk)

    asyncio.run(run())


def test_a_dead_endpoint_fails_over_to_the_next(ceph: Ceph, pushed: Manifest) -> None:
    dead = f"http://{ceph.address}:{closed_port(ceph.address)}"
    config = s3_config(ceph, endpoints=(dead, ceph.endpoint))

    async def run() -> None:
        async with S3Origin.from_url(f"s3://{BUCKET}", config) as origin:
            data = await asyncio.gather(*(origin.get_chunk(c) for c in pushed.chunks()))
            assert [len(d) for d in data] == [c.stored_size for c in pushed.chunks()]
            # The first request found the dead one; every later one went straight on.
            assert origin.failovers == 1
            assert origin.retries >= 1

    asyncio.run(run())


def test_an_altered_manifest_and_a_garbage_tag_are_detected(ceph: Ceph, pushed: Manifest) -> None:
    async def run() -> None:
        async with S3Origin.from_url(f"s3://{BUCKET}", s3_config(ceph)) as origin:
            [client] = await origin._open()
            # Some valid manifest, stored under an id that is not its own.
            await client.put_object(
                Bucket=BUCKET, Key="manifests/by-id/" + "ab" * 16, Body=pushed.encode()
            )
            await client.put_object(Bucket=BUCKET, Key="tags/hpc/forged/1", Body=b"ab" * 16)
            with pytest.raises(ManifestCorrupt, match="altered"):
                await origin.get_manifest(ImageRef("hpc/forged", "1"))
            await client.put_object(Bucket=BUCKET, Key="tags/hpc/garbage/1", Body=b"<html>")
            with pytest.raises(OriginError, match="not an image id"):
                await origin.get_manifest(ImageRef("hpc/garbage", "1"))
            await client.put_object(Bucket=BUCKET, Key="tags/hpc/huge/1", Body=bytes(4096))
            with pytest.raises(OriginError, match="at most 64 belong"):
                await origin.get_manifest(ImageRef("hpc/huge", "1"))
            dangling = "cd" * 16 + "\n"
            await client.put_object(Bucket=BUCKET, Key="tags/hpc/dangling/1", Body=dangling)
            with pytest.raises(OriginError, match="which is missing"):
                await origin.get_manifest(ImageRef("hpc/dangling", "1"))
            for key in ("forged", "garbage", "huge", "dangling"):
                await client.delete_object(Bucket=BUCKET, Key=f"tags/hpc/{key}/1")
            await client.delete_object(Bucket=BUCKET, Key="manifests/by-id/" + "ab" * 16)

    asyncio.run(run())


# -- the CLI ----------------------------------------------------------------------------


def p2pcast(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pcast", *args], capture_output=True, text=True, timeout=120,
        check=False, env={**os.environ, "P2PCAST_CONTROL": "/nonexistent/p2pcast.sock", **env},
    )  # fmt: skip


def test_cli_push_inspect_fetch_by_s3_image_url(ceph: Ceph, tmp_path: Path) -> None:
    image = make_tar(tmp_path / "cli.tar", members=3, seed=13)
    url = "s3://cli-bucket/hpc/cli:1"
    env = ceph.env()  # AWS_* as `eval "$(tools/ceph.py env)"` sets them
    pushed = p2pcast("push", str(image), url, "--chunk-size", "1M", "--json", env=env)
    assert pushed.returncode == 0, pushed.stderr
    info = json.loads(pushed.stdout)
    assert (info["image"], info["origin"]) == ("hpc/cli:1", "s3://cli-bucket")
    assert info["chunks_written"] == info["chunks"] > 3
    shown = p2pcast("inspect", url, "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    out = tmp_path / "copy.tar"
    fetched = p2pcast(
        "fetch", url, "--in-process", "--state-dir", str(tmp_path / "state"),
        "--output", str(out), "--json", env=env,
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    assert out.read_bytes() == image.read_bytes()
    assert json.loads(fetched.stdout)["from_origin"] > 0
    # p2pcast's own settings only: endpoint option, keys from P2PCAST_S3_* variables.
    own = {
        "P2PCAST_S3_ACCESS_KEY_ID": ceph.access_key,
        "P2PCAST_S3_SECRET_ACCESS_KEY": ceph.secret_key,
    }
    again = p2pcast("inspect", "hpc/cli:1", "--origin", "s3://cli-bucket",
                    "--s3-endpoint", ceph.endpoint, env=own)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "sha256:" in again.stdout


def test_cli_errors_are_one_line_with_the_user_error_exit_code(
    ceph: Ceph, pushed: Manifest
) -> None:
    env = ceph.env()
    cases = [
        ("s3://cli-errors/hpc/nosuch", env, "bucket cli-errors does not exist"),
        ("s3://origin-s3/hpc/nosuch", env, "image hpc/nosuch:latest not found in bucket"),
        ("s3://origin-s3/x", {**env, "AWS_SECRET_ACCESS_KEY": "wrong"}, "refused the credentials"),
        ("s3://origin-s3/x", {"P2PCAST_S3_ENDPOINTS": ceph.endpoint}, "no S3 credentials"),
        ("s3://Bad_Bucket/x", env, "bad S3 bucket name"),
    ]
    for image, extra, why in cases:
        shown = p2pcast("inspect", image, env=extra)
        assert shown.returncode == 2, (image, shown.stderr)
        [line] = shown.stderr.splitlines()
        assert line.startswith("p2pcast: error: ") and why in line, (image, line)
    clash = p2pcast("push", "x.tar", "s3://b/name:1", "--name", "other", env=env)
    assert clash.returncode == 2 and "drop --name" in clash.stderr


def test_a_web_server_that_is_not_s3_gives_origin_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a wrong endpoint answers ends in p2pcast's errors, not botocore's."""
    monkeypatch.setattr(s3_module, "RETRY_ROUNDS", 2)
    monkeypatch.setattr(s3_module, "BACKOFF_FIRST", 0.01)
    root = tmp_path / "www"
    (root / "images" / "tags" / "hpc" / "x").mkdir(parents=True)
    (root / "images" / "tags" / "hpc" / "x" / "1").write_text("<html>not a tag</html>")
    port = closed_port("127.0.0.1")
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
         "--directory", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):  # up in well under a second
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.02)
        config = OriginConfig(
            s3_endpoints=(f"http://127.0.0.1:{port}",), s3_access_key="AK", s3_secret_key="SK"
        )

        async def run() -> None:
            async with S3Origin.from_url("s3://images", config) as origin:
                with pytest.raises(OriginError, match="not an image id"):
                    await origin.get_manifest(ImageRef("hpc/x", "1"))
                with pytest.raises(ImageNotFound):  # a plain 404
                    await origin.get_manifest(ImageRef("hpc/y", "1"))
                # A directory listing (200, HTML) where S3 sends XML: botocore takes
                # it for a failed request (500), so it is retried, then given up.
                with pytest.raises(OriginUnavailable, match="after 2 attempts"):
                    await origin.list_images()

        asyncio.run(run())
    finally:
        server.terminate()
        server.wait()
