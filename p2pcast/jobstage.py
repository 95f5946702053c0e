"""Staged images shared by the jobs of one node, with reference counts.

One staged copy per image (SquashFS mounted read-only, shared by every job) or
per image and user (a tar unpacked into a tree the job's user owns, so every
file is readable to them and no user can change what another user's job
runs). Each copy counts the jobs using it; the last job's release unstages it.
The counts live in ``<state dir>/staging.json`` so a daemon restart keeps
them, and are checked against the job records at start-up: a job whose
record is gone (its Epilog ran while the daemon was down) holds nothing.
A tar still arriving is unpacked from the broadcast's verified prefix in a
scratch directory and counted only once the whole image verified (see
``JobStaging.stage``); a restart removes a scratch tree a crash left.

    RefTable        pure: which jobs use which staged copy; to_dict/from_dict
    JobStaging      the daemon's side: locks, threads, the state file, recovery
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from p2pcast import jobrecord
from p2pcast.errors import BadMountSpec, StageError, StoreError
from p2pcast.jobspec import Mount, check_job_id
from p2pcast.prefix import ImagePrefix
from p2pcast.stage import StagedImage, stage_image, unstage_path
from p2pcast.stage.mounts import is_mount_point
from p2pcast.stage.remove import remove_tree
from p2pcast.stage.tree import O_DIR, resolve_mount_point

log = logging.getLogger(__name__)

#: Methods whose result is a read-only mount: mount points cannot be created.
MOUNTED_METHODS = ("kernel-mount", "squashfuse")

STATE_FILE = "staging.json"
STAGED = "staged"
STATE_VERSION = 1


def staging_key(image_id: str, image_type: str, uid: int) -> str:
    """The name of a staged copy: per image, and per user for unpacked tars."""
    return image_id if image_type == "squashfs" else f"{image_id}-u{uid}"


@dataclasses.dataclass
class StagedEntry:
    key: str
    image_id: str
    name: str
    staged: StagedImage
    jobs: set[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "name": self.name,
            "staged": self.staged.to_dict(),
            "jobs": sorted(self.jobs, key=int),
        }

    @classmethod
    def from_dict(cls, key: str, data: dict[str, Any]) -> StagedEntry:
        jobs = data.get("jobs")
        if not isinstance(jobs, list):
            raise StoreError(f"malformed staging entry {key!r}")
        return cls(
            key=key,
            image_id=str(data.get("image_id", "")),
            name=str(data.get("name", "")),
            staged=StagedImage.from_dict(data.get("staged") or {}),
            jobs={check_job_id(j) for j in jobs},
        )


class RefTable:
    """Staged copies by key, and the jobs that use each. No I/O."""

    def __init__(self) -> None:
        self.entries: dict[str, StagedEntry] = {}

    def add_job(self, key: str, job: str) -> None:
        self.entries[key].jobs.add(job)

    def put(self, entry: StagedEntry) -> None:
        self.entries[entry.key] = entry

    def keys_of(self, job: str) -> list[str]:
        return [k for k, e in self.entries.items() if job in e.jobs]

    def drop_job(self, key: str, job: str) -> bool:
        """Remove ``job`` from ``key``; return whether the copy is now unused."""
        entry = self.entries.get(key)
        if entry is None:
            return False
        entry.jobs.discard(job)
        return not entry.jobs

    def image_ids(self) -> set[str]:
        return {e.image_id for e in self.entries.values()}

    def __iter__(self) -> Iterator[StagedEntry]:
        return iter(list(self.entries.values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "staged": {k: e.to_dict() for k, e in sorted(self.entries.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefTable:
        if data.get("version") != STATE_VERSION or not isinstance(data.get("staged"), dict):
            raise StoreError(f"unknown staging state format: version {data.get('version')!r}")
        table = cls()
        for key, entry in data["staged"].items():
            table.put(StagedEntry.from_dict(str(key), entry))
        return table


def ensure_mount_points(
    staged: StagedImage, mounts: Sequence[Mount], owner: tuple[int, int] | None
) -> None:
    """Make every --ch-mount DST exist in the staged root (``ch-run -b`` needs it).

    In a read-only mount a missing one cannot be made: that is the job's
    request not fitting the image, a user error.
    """
    if not mounts:
        return
    create = staged.method not in MOUNTED_METHODS
    try:
        fd = os.open(staged.path, O_DIR)
    except OSError as exc:
        raise StageError(f"cannot open the staged image {staged.path}: {exc.strerror}") from exc
    try:
        for mount in mounts:
            try:
                resolve_mount_point(fd, mount.target, create=create, owner=owner)
            except StageError as exc:
                raise BadMountSpec(f"--ch-mount {mount}: {exc}") from exc
            except OSError as exc:
                raise StageError(f"cannot make mount point {mount.target}: {exc}") from exc
    finally:
        os.close(fd)


def is_present(staged: StagedImage) -> bool:
    """Whether a recorded staged copy is still there (a reboot empties /run)."""
    if not staged.path.is_dir():
        return False
    return staged.method not in MOUNTED_METHODS or is_mount_point(staged.path)


class JobStaging:
    """The daemon's staged copies and job records."""

    def __init__(self, run_dir: Path, state_dir: Path) -> None:
        self.run_dir = run_dir
        self.staged_dir = run_dir / STAGED
        self.state_file = state_dir / STATE_FILE
        self.table = RefTable()
        self._locks: dict[str, asyncio.Lock] = {}

    # ---- persistence and recovery (synchronous: at start-up, before serving) ----

    def _save(self) -> None:
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.table.to_dict(), indent=1, sort_keys=True))
            os.replace(tmp, self.state_file)
        except OSError as exc:
            raise StoreError(f"cannot save staging state {self.state_file}: {exc}") from exc

    def recover(self) -> None:
        """Load the counts, drop what a reboot or a missed Epilog left, unstage orphans."""
        try:
            for d in (self.run_dir, self.staged_dir, jobrecord.jobs_dir(self.run_dir)):
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, 0o755)
        except OSError as exc:
            raise StoreError(f"cannot create the run directory {self.run_dir}: {exc}") from exc
        try:
            self.table = RefTable.from_dict(json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            self.table = RefTable()
        except (OSError, ValueError, StoreError, StageError) as exc:
            # The mounts themselves are found again below as orphans.
            log.warning("ignoring unreadable staging state %s: %s", self.state_file, exc)
            self.table = RefTable()
        for entry in self.table:
            entry.jobs = {j for j in entry.jobs if jobrecord.exists(self.run_dir, j)}
            if not entry.jobs or not is_present(entry.staged):
                log.info("unstaging %s (%s): no job uses it any more", entry.key, entry.name)
                del self.table.entries[entry.key]
                self._unstage_quietly(entry.staged.path)
        for path in sorted(self.staged_dir.iterdir()):
            if path.name not in self.table.entries:
                log.info("removing orphan staged copy %s", path)
                if path.name.startswith("."):
                    self._remove_quietly(path)  # scratch of a staging that was killed
                else:
                    self._unstage_quietly(path)
        self._save()

    @staticmethod
    def _unstage_quietly(path: Path) -> None:
        try:
            unstage_path(path)
        except StageError as exc:
            log.error("cannot unstage %s: %s", path, exc)

    @staticmethod
    def _remove_quietly(path: Path) -> None:
        try:
            remove_tree(path)
        except (OSError, StageError) as exc:
            log.error("cannot remove %s: %s", path, exc)

    # ---- operations ------------------------------------------------------------

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def busy_image_ids(self) -> set[str]:
        return self.table.image_ids()

    def describe(self) -> list[dict[str, Any]]:
        return [{"key": e.key, **e.to_dict()} for e in self.table]

    async def stage(
        self,
        *,
        job: str,
        name: str,
        image_id: str,
        image_path: Path,
        image_type: str,
        mounts: Sequence[Mount],
        uid: int,
        gid: int,
        growing: ImagePrefix | None = None,
    ) -> StagedEntry:
        """Stage (or reuse) the copy for this job, count the job, write its record.

        ``growing``: the image is still arriving (its verified prefix). A tar
        is then unpacked while it arrives, and the copy is published and
        counted only once the whole image verified; a failing broadcast fails
        this call with StageError and leaves nothing staged. Another job
        asking for the same copy meanwhile waits on the copy's lock and then
        shares it, as with a complete image.
        """
        key = staging_key(image_id, image_type, uid)
        # A requeued job keeps its id: what it held before is released first.
        for other in self.table.keys_of(job):
            if other != key:
                await self._drop(other, job)
        owner = None if image_type == "squashfs" else (uid, gid)
        async with self._lock(key):
            entry = self.table.entries.get(key)
            if entry is not None and not await asyncio.to_thread(is_present, entry.staged):
                log.warning("staged copy %s vanished; staging it again", key)
                await asyncio.to_thread(unstage_path, entry.staged.path)
                del self.table.entries[key]
                entry = None
            if entry is None:
                dest = self.staged_dir / key
                await asyncio.to_thread(unstage_path, dest)  # residue of a crash
                staged = await asyncio.to_thread(
                    stage_image, image_path, image_type, dest, owner=owner, growing=growing
                )
                entry = StagedEntry(key, image_id, name, staged, set())
                self.table.put(entry)
            try:
                await asyncio.to_thread(ensure_mount_points, entry.staged, mounts, owner)
            except BaseException:
                if not entry.jobs:  # staged for this job alone: do not keep it
                    del self.table.entries[key]
                    await asyncio.to_thread(unstage_path, entry.staged.path)
                raise
            self.table.add_job(key, job)
            self._save()
            await asyncio.to_thread(
                jobrecord.write_staged,
                self.run_dir,
                job,
                name,
                entry.staged.path,
                [str(m) for m in mounts],
            )
        log.info(
            "job %s: %s staged at %s by %s (%d job(s) use it)",
            job,
            name,
            entry.staged.path,
            entry.staged.method,
            len(entry.jobs),
        )
        return entry

    async def _drop(self, key: str, job: str) -> bool:
        async with self._lock(key):
            if not self.table.drop_job(key, job):
                self._save()
                return False
            entry = self.table.entries.pop(key)
            self._save()
            await asyncio.to_thread(unstage_path, entry.staged.path)
            log.info("unstaged %s (%s): job %s was the last user", key, entry.name, job)
            return True

    async def release(self, job: str) -> dict[str, Any]:
        """The job's Epilog: remove its record, drop its counts, unstage what is unused."""
        job = check_job_id(job)
        had_record = await asyncio.to_thread(jobrecord.remove, self.run_dir, job)
        keys = self.table.keys_of(job)
        unstaged = [key for key in keys if await self._drop(key, job)]
        return {"job": job, "record": had_record, "released": keys, "unstaged": unstaged}

    async def fail(self, job: str, name: str, message: str) -> None:
        """Record why the job cannot run, for its steps to report."""
        await asyncio.to_thread(jobrecord.write_failed, self.run_dir, job, name, message)
