"""The per-job staging record: the contract between the daemon and the SPANK plugin.

The daemon writes it in the Prolog (through the ``stage`` control operation),
the SPANK plugin reads it as the job's user just before each task starts, and
the daemon removes it in the Epilog (``release``). Plain files, so that C reads
them with open/read/readlink and no parser::

    <run dir>/jobs/<job id>/image    the NAME:TAG asked for, one line
    <run dir>/jobs/<job id>/root     symlink to the staged root filesystem   (staged)
    <run dir>/jobs/<job id>/mounts   one SRC:DST per line (may be empty)       (staged)
    <run dir>/jobs/<job id>/error    one line: why the job cannot run         (failed)

Exactly one of ``root`` and ``error`` exists. A record appears whole: it is
built in a scratch directory beside it and renamed into place. The run
directory belongs to root (mode 0755), so a user cannot forge a record.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from p2pcast.errors import StoreError
from p2pcast.jobspec import check_job_id
from p2pcast.stage.remove import remove_tree

#: Characters of an error message kept: one readable line for slurm_error; the
#: plugin reads at most MAX_ERROR_LINE (slurm/spank_p2pcast.c), which is larger.
MAX_ERROR_CHARS = 1000

#: Default run directory (a tmpfs): staged roots and job records. P2PCAST_RUN_DIR.
DEFAULT_RUN_DIR = "/run/p2pcast"

JOBS = "jobs"


@dataclasses.dataclass(frozen=True)
class JobRecord:
    job: str
    image: str
    root: Path | None
    mounts: tuple[str, ...]
    error: str | None


def jobs_dir(run_dir: Path) -> Path:
    return run_dir / JOBS


def job_dir(run_dir: Path, job: str) -> Path:
    return jobs_dir(run_dir) / check_job_id(job)


def one_line(message: str) -> str:
    line = " ".join(message.split())
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 3] + "..."
    return line or "unknown error"


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o644)


def _publish(run_dir: Path, job: str, fill: dict[str, str], root: Path | None) -> None:
    top = jobs_dir(run_dir)
    final = job_dir(run_dir, job)
    try:
        top.mkdir(parents=True, exist_ok=True)
        os.chmod(top, 0o755)
        work = Path(tempfile.mkdtemp(prefix=f".{job}.new-", dir=top))
        try:
            os.chmod(work, 0o755)
            for name, text in fill.items():
                _write(work / name, text)
            if root is not None:
                os.symlink(root, work / "root")
            # A record of an earlier attempt (a requeued job keeps its id) goes.
            remove_tree(final)
            os.rename(work, final)
        except BaseException:
            remove_tree(work)
            raise
    except OSError as exc:
        raise StoreError(f"cannot write the job record {final}: {exc}") from exc


def write_staged(
    run_dir: Path, job: str, image: str, root: Path, mounts: Sequence[str] = ()
) -> None:
    lines = "".join(f"{m}\n" for m in mounts)
    _publish(run_dir, job, {"image": f"{image}\n", "mounts": lines}, root)


def write_failed(run_dir: Path, job: str, image: str, message: str) -> None:
    _publish(
        run_dir, job, {"image": f"{one_line(image)}\n", "error": f"{one_line(message)}\n"}, None
    )


def exists(run_dir: Path, job: str) -> bool:
    return os.path.lexists(job_dir(run_dir, job))


def remove(run_dir: Path, job: str) -> bool:
    """Remove the job's record; return whether there was one. Harmless twice."""
    path = job_dir(run_dir, job)
    there = os.path.lexists(path)
    try:
        remove_tree(path)
    except OSError as exc:
        raise StoreError(f"cannot remove the job record {path}: {exc}") from exc
    return there


def read(run_dir: Path, job: str) -> JobRecord | None:
    """The record as the plugin sees it (for tests and ``p2pcast slurm show``)."""
    path = job_dir(run_dir, job)
    if not path.is_dir():
        return None

    def text(name: str) -> str | None:
        try:
            return (path / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    root = Path(os.readlink(path / "root")) if os.path.islink(path / "root") else None
    error = text("error")
    return JobRecord(
        job=job,
        image=(text("image") or "").strip(),
        root=root,
        mounts=tuple((text("mounts") or "").splitlines()),
        error=error.strip() if error is not None else None,
    )
