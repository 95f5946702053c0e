"""Image references: ``NAME[:TAG]``, e.g. ``hpc/pytorch:2.3``.

Names become paths and keys at the origin (directories, S3 keys), so the
grammar is deliberately narrow: every segment starts with a letter or digit,
which rules out ``..``, hidden files, empty segments and absolute paths. An
``ImageRef`` checks itself when built, so code that holds one may use its
parts in a path without checking again.
"""

from __future__ import annotations

import dataclasses
import os
import re

from p2pcast import limits
from p2pcast.errors import BadImageName

DEFAULT_TAG = "latest"

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")

#: Suffixes default_name_for strips, longest first so ".tar.gz" wins over ".gz".
_IMAGE_SUFFIXES = (".tar.gz", ".tar.zst", ".squashfs", ".sqfs", ".tgz", ".tar")
_INVALID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_FALLBACK_NAME = "image"


@dataclasses.dataclass(frozen=True, slots=True)
class ImageRef:
    name: str
    tag: str = DEFAULT_TAG

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_tag(self.tag)

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_image_ref(text: str) -> ImageRef:
    """Parse ``NAME[:TAG]``; the tag defaults to "latest"."""
    name, colon, tag = _require_str(text, "image reference").partition(":")
    if colon and not tag:
        raise BadImageName(f"bad image reference {text!r}: empty tag after ':'")
    if ":" in tag:
        raise BadImageName(f"bad image reference {text!r}: more than one ':'")
    return ImageRef(name, tag if colon else DEFAULT_TAG)


def default_name_for(path: str | os.PathLike[str]) -> str:
    """A valid image name from a file name: "My Image.sqfs" -> "My-Image"."""
    base = os.path.basename(os.fspath(path))
    lowered = base.lower()
    for suffix in _IMAGE_SUFFIXES:
        if lowered.endswith(suffix) and len(base) > len(suffix):
            base = base[: -len(suffix)]
            break
    name = _INVALID_CHARS.sub("-", base).strip("._-")[: limits.MAX_NAME_LENGTH]
    # Truncation may leave a trailing separator; it is legal but ugly.
    return name.rstrip("._-") or _FALLBACK_NAME


def _require_str(value: object, what: str) -> str:
    # Refs also arrive from config files and the control socket, where the
    # type hint is only a hope.
    if not isinstance(value, str):
        raise BadImageName(f"{what} must be a string, not {type(value).__name__}")
    return value


def _check_name(value: object) -> None:
    name = _require_str(value, "image name")
    if not name:
        raise BadImageName("empty image name")
    if len(name) > limits.MAX_NAME_LENGTH:
        raise BadImageName(f"image name of {len(name)} characters exceeds {limits.MAX_NAME_LENGTH}")
    if name.startswith("/"):
        raise BadImageName(f"bad image name {name!r}: must not start with '/'")
    for segment in name.split("/"):
        if not segment:
            raise BadImageName(f"bad image name {name!r}: empty path segment")
        if not _SEGMENT.fullmatch(segment):
            raise BadImageName(
                f"bad image name {name!r}: segment {segment!r} must start with a letter or"
                " digit and hold only letters, digits, '.', '_' and '-'"
            )


def _check_tag(value: object) -> None:
    tag = _require_str(value, "image tag")
    if not _TAG.fullmatch(tag):
        raise BadImageName(
            f"bad image tag {tag!r}: 1-128 letters, digits, '.', '_' or '-',"
            " not starting with '.' or '-'"
        )
