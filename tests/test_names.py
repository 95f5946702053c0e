"""Image references: what parses, what does not, and default names."""

from __future__ import annotations

import pytest

from p2pcast import limits
from p2pcast.errors import BadImageName
from p2pcast.names import ImageRef, default_name_for, parse_image_ref

LONGEST_NAME = "/".join(["a" * 99] * 10) + "/" + "b" * (limits.MAX_NAME_LENGTH - 1000)


@pytest.mark.parametrize(
    ("text", "name", "tag"),
    [
        ("ubuntu", "ubuntu", "latest"),
        ("ubuntu:22.04", "ubuntu", "22.04"),
        ("hpc/pytorch:2.3.1-cuda12", "hpc/pytorch", "2.3.1-cuda12"),
        ("A/b.c/d_e-f:_tag", "A/b.c/d_e-f", "_tag"),
        ("a..b:x", "a..b", "x"),  # dots inside a segment are harmless
        ("0:0", "0", "0"),
        ("x:" + "t" * 128, "x", "t" * 128),
        (LONGEST_NAME, LONGEST_NAME, "latest"),
    ],
)
def test_valid_refs(text: str, name: str, tag: str) -> None:
    ref = parse_image_ref(text)
    assert ref == ImageRef(name, tag)
    assert (ref.name, ref.tag) == (name, tag)
    assert str(ref) == f"{name}:{tag}"
    assert parse_image_ref(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty image name"),
        (":tag", "empty image name"),
        ("name:", "empty tag"),
        ("a:b:c", "more than one"),
        ("/abs/path", "must not start with '/'"),
        ("a//b", "empty path segment"),
        ("a/", "empty path segment"),
        ("../etc/passwd", "segment '..'"),
        ("a/../b", "segment '..'"),
        ("a/./b", "segment '.'"),
        (".hidden", "segment '.hidden'"),
        ("-rf", "segment '-rf'"),
        ("_x", "segment '_x'"),
        ("a b", "segment 'a b'"),
        ("ubuntu\n", "segment"),
        ("caf\u00e9", "segment"),
        ("a\\b", "segment"),
        ("x" * (limits.MAX_NAME_LENGTH + 1), "exceeds"),
        ("x:" + "t" * 129, "bad image tag"),
        ("x:.hidden", "bad image tag"),
        ("x:-v1", "bad image tag"),
        ("x:v/1", "bad image tag"),
        ("x:v 1", "bad image tag"),
        ("x:v1\n", "bad image tag"),
    ],
)
def test_invalid_refs(text: str, why: str) -> None:
    with pytest.raises(BadImageName) as info:
        parse_image_ref(text)
    assert why in str(info.value)


def test_imageref_checks_itself() -> None:
    # Origins build paths from ImageRef parts, so a bad one must not exist.
    with pytest.raises(BadImageName):
        ImageRef("../x", "latest")
    with pytest.raises(BadImageName):
        ImageRef("x", "../../etc")
    with pytest.raises(BadImageName, match="must be a string"):
        ImageRef(b"x", "latest")  # type: ignore[arg-type]
    with pytest.raises(BadImageName, match="must be a string"):
        parse_image_ref(None)  # type: ignore[arg-type]


def test_imageref_is_frozen_and_hashable() -> None:
    ref = ImageRef("a", "b")
    assert ImageRef("a") == ImageRef("a", "latest")
    assert len({ref, ImageRef("a", "b")}) == 1
    with pytest.raises(AttributeError):
        ref.name = "c"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/srv/images/pytorch-2.3.sqfs", "pytorch-2.3"),
        ("ubuntu.squashfs", "ubuntu"),
        ("rootfs.tar", "rootfs"),
        ("rootfs.tar.gz", "rootfs"),
        ("rootfs.TGZ", "rootfs"),
        ("rootfs.tar.zst", "rootfs"),
        ("My Image (v2).sqfs", "My-Image-v2"),
        ("caf\u00e9.tar", "caf"),
        (".hidden.sqfs", "hidden"),
        ("__init__.tar", "init"),
        ("image.img", "image.img"),
        (".tar", "tar"),
        ("\u00e9\u00e9.sqfs", "image"),
        ("---", "image"),
    ],
)
def test_default_name_for(path: str, name: str) -> None:
    assert default_name_for(path) == name
    assert parse_image_ref(default_name_for(path)).name == name


def test_default_name_for_long_file_name_is_valid() -> None:
    name = default_name_for("x" * 5000 + ".sqfs")
    assert len(name) == limits.MAX_NAME_LENGTH
    assert parse_image_ref(name).name == name
