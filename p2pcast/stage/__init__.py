"""Stage: turn a complete, verified image into a root filesystem for ch-run.

    stage_image(image, "squashfs", dest)   kernel loop mount, squashfuse or unsquashfs
    stage_image(image, "tar.zst", dest)    defensive untar (see ``untar``)
    stage_image(..., growing=prefix)       untar while the image still arrives
    StagedImage.unstage() / unstage_path(dest)   unmount and remove, idempotently

``dest`` is either absent or complete: unpacked trees are built in a private
scratch directory beside it and renamed into place, and a mount that fails its
checks is undone before the error is raised. With ``growing`` (the image's
:class:`~p2pcast.prefix.ImagePrefix`), a tar is unpacked from the image's
verified prefix while the broadcast still runs, and published only after the
whole image's sha256 matched: ``dest`` stays absent until then.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pcast.errors import BadImageFile, ConfigError, StageError
from p2pcast.prefix import ImagePrefix
from p2pcast.stage.mounts import mounts_under, unmount_all_under
from p2pcast.stage.remove import remove_tree
from p2pcast.stage.scratch import (
    check_dest_free,
    no_space_or,
    private_workdir,
    publish,
    remove_stale_scratch,
)
from p2pcast.stage.squash import SQUASH_METHODS, mount_squashfs, unavailable, unsquash_into
from p2pcast.stage.stream import open_growing
from p2pcast.stage.tree import O_DIR, resolve_mount_point, split_inside
from p2pcast.stage.untar import TAR_TYPES, ExtractReport, extract_tar_into, safe_extract_tar

__all__ = [
    "IMAGE_TYPES",
    "METHODS",
    "ExtractReport",
    "StagedImage",
    "mounts_under",
    "safe_extract_tar",
    "stage_image",
    "unstage_path",
]

log = logging.getLogger(__name__)

IMAGE_TYPES = ("squashfs", *TAR_TYPES)
METHODS = (*SQUASH_METHODS, "untar")

#: Fewest components a path to unstage may have ("/", "tmp", "x"): a bug that
#: passes "/" or "/home" must not become a recursive delete of it.
MIN_UNSTAGE_DEPTH = 3

#: Fills a new root directory with an unpacked image; returns the count of
#: entries neutralised (for the log).
_Filler = Callable[[Path], int]


@dataclass
class StagedImage:
    """A staged root filesystem; ``to_dict``/``from_dict`` survive a daemon restart."""

    path: Path  #: the root filesystem directory ch-run uses
    method: str  #: one of METHODS
    image_path: Path

    def unstage(self) -> None:
        """Unmount or remove the staged tree; harmless if already done."""
        unstage_path(self.path)

    def to_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "method": self.method, "image_path": str(self.image_path)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> StagedImage:
        path, method, image = data.get("path"), data.get("method"), data.get("image_path")
        if (
            not isinstance(path, str)
            or not isinstance(image, str)
            or not isinstance(method, str)
            or method not in METHODS
        ):
            raise StageError(f"malformed staging record: {dict(data)!r}")
        return cls(Path(path), method, Path(image))


def _anchor(dest: str | os.PathLike[str]) -> Path:
    """Absolute ``dest`` with its parent resolved, its last component not followed.

    The mount table holds resolved paths, and a symlink at ``dest`` itself
    must be removed, not followed.
    """
    absolute = Path(os.path.abspath(dest))
    return Path(os.path.realpath(absolute.parent)) / absolute.name


def stage_image(
    image_path: str | os.PathLike[str],
    image_type: str,
    dest: str | os.PathLike[str],
    *,
    method: str = "auto",
    mount_points: Sequence[str] = (),
    owner: tuple[int, int] | None = None,
    growing: ImagePrefix | None = None,
) -> StagedImage:
    """Stage ``image_path`` at ``dest`` (absent or an empty directory).

    ``method`` "auto" picks, for SquashFS, kernel-mount (when root), then
    squashfuse, then unsquashfs; tar images are always unpacked ("untar").
    Every path in ``mount_points`` ("/data") is made to exist in the image so
    ``ch-run -b SRC:DST`` can bind onto it; a read-only mount that lacks one is
    an error. ``owner`` (uid, gid) gets the unpacked files (default: the
    caller). On any error nothing is left mounted or created at ``dest``.

    ``growing``: the image is still arriving and this tracks its verified
    prefix. A tar is unpacked from that prefix as it grows (blocking this
    thread while it waits) and moved into place only once the whole image
    verified; a SquashFS waits for that before it is mounted. StageError when
    the image fails to arrive.
    """
    if image_type not in IMAGE_TYPES:
        raise BadImageFile(f"unknown image type {image_type!r}; expected one of {IMAGE_TYPES}")
    if method != "auto" and method not in METHODS:
        raise ConfigError(f"unknown staging method {method!r}; expected auto or one of {METHODS}")
    image = Path(os.path.abspath(image_path))
    dest = _anchor(dest)
    for point in mount_points:
        split_inside(point, f"mount point {point!r}")  # fail before any work
    if not image.is_file():
        raise StageError(f"image {image} is not a readable file")
    check_dest_free(dest)

    if image_type in TAR_TYPES:
        if method not in ("auto", "untar"):
            raise ConfigError(f"method {method!r} cannot stage a {image_type} image; use untar")
        neutralised = _unpack(
            dest,
            mount_points,
            lambda root: _untar(image, image_type, root, owner, growing),
            growing.wait_verified if growing is not None else None,
        )
        log.info(
            "staged %s at %s by untar%s (%d entries neutralised)",
            image,
            dest,
            f" while it arrived ({growing.read_early} bytes early)" if growing else "",
            neutralised,
        )
        return StagedImage(dest, "untar", image)

    if growing is not None:
        growing.wait_verified()  # a mount needs the whole image
    if method == "untar":
        raise ConfigError("method 'untar' cannot stage a squashfs image")
    forced = method != "auto"
    failures: list[str] = []
    for candidate in [method] if forced else list(SQUASH_METHODS):
        why = unavailable(candidate)
        if why is None and candidate == "unsquashfs":
            try:
                neutralised = _unpack(
                    dest, mount_points, lambda root: _unsquash(image, root, owner)
                )
            except StageError as exc:
                why = str(exc).removeprefix(f"{candidate}: ")
            else:
                log.info("staged %s at %s by unsquashfs (%d neutralised)", image, dest, neutralised)
                return StagedImage(dest, candidate, image)
        elif why is None:
            try:
                created = _mount(image, dest, candidate)
            except StageError as exc:
                why = str(exc).removeprefix(f"{candidate}: ")
            else:
                # Outside the try: a missing mount point is the image's fault,
                # and another method would only fail the same way, slower.
                _check_mounted_points(dest, mount_points, created)
                log.info("staged %s at %s by %s", image, dest, candidate)
                return StagedImage(dest, candidate, image)
        if forced:
            raise StageError(f"cannot stage {image} with {candidate}: {why}")
        failures.append(f"{candidate}: {why}")
    raise StageError(f"cannot stage {image}: {'; '.join(failures)}")


def _untar(
    image: Path,
    image_type: str,
    root: Path,
    owner: tuple[int, int] | None,
    growing: ImagePrefix | None,
) -> int:
    if growing is None:
        report = extract_tar_into(image, image_type, root, owner=owner, space_on=root.parent.parent)
        return report.neutralised
    with open_growing(image, growing) as source:
        report = extract_tar_into(
            source, image_type, root, owner=owner, space_on=root.parent.parent
        )
    return report.neutralised


def _unsquash(image: Path, root: Path, owner: tuple[int, int] | None) -> int:
    return unsquash_into(image, root, owner or (os.geteuid(), os.getegid()), root.parent.parent)


def _unpack(
    dest: Path,
    mount_points: Sequence[str],
    fill: _Filler,
    before_publish: Callable[[], None] | None = None,
) -> int:
    """Build a tree with ``fill`` in private scratch, add mount points, move it to ``dest``.

    ``before_publish`` runs last before the move and may raise to abandon the
    tree (it waits for the image's sha256 when the tree came from a prefix).
    """
    with private_workdir(dest) as work:
        root = work / "rootfs"
        neutralised = fill(root)
        if mount_points:
            owner = os.stat(root).st_uid, os.stat(root).st_gid
            fd = os.open(root, O_DIR)
            try:
                for point in mount_points:
                    resolve_mount_point(fd, point, create=True, owner=owner)
            except OSError as exc:
                raise no_space_or(exc, dest.parent, f"creating mount points in {dest}") from exc
            finally:
                os.close(fd)
        if before_publish is not None:
            before_publish()
        publish(root, dest)
    return neutralised


def _mount(image: Path, dest: Path, method: str) -> bool:
    """Mount on ``dest``, creating it if needed; return whether it was created."""
    created = False
    try:
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(dest, 0o755)
            created = True
    except OSError as exc:
        raise no_space_or(exc, dest.parent, f"creating mount point {dest}") from exc
    try:
        mount_squashfs(image, dest, method)
    except BaseException:
        _undo_mount(dest, created)
        raise
    return created


def _check_mounted_points(dest: Path, mount_points: Sequence[str], created: bool) -> None:
    try:
        try:
            fd = os.open(dest, O_DIR)
            try:
                for point in mount_points:
                    resolve_mount_point(fd, point, create=False, owner=None)
            finally:
                os.close(fd)
        except OSError as exc:  # EIO from a damaged image, most likely
            raise StageError(f"cannot look for mount points in {dest}: {exc}") from exc
    except BaseException:
        _undo_mount(dest, created)
        raise


def _undo_mount(dest: Path, created: bool) -> None:
    """Whatever went wrong, leave no mount and no directory we made."""
    unmount_all_under(dest)
    if created:
        os.rmdir(dest)


def unstage_path(dest: str | os.PathLike[str]) -> None:
    """Unmount whatever is mounted at ``dest`` or below, then remove ``dest``.

    For epilogs and for recovery after a restart: needs no record of how the
    image was staged, does nothing if ``dest`` is gone, never follows a
    symlink out of ``dest`` and never deletes across a mount it could not undo.
    Scratch directories of a staging that was killed half-way go too.
    """
    path = _anchor(dest)
    if len(path.parts) < MIN_UNSTAGE_DEPTH:
        raise StageError(f"refusing to unstage {path}: too close to the root directory")
    unmount_all_under(path)
    try:
        remove_tree(path)
        remove_stale_scratch(path)
    except OSError as exc:
        raise StageError(f"cannot remove staged image at {path}: {exc}") from exc
    log.info("unstaged %s", path)
