"""What a Slurm job asks of p2pcast, parsed from strings a user controls.

Pure: no I/O. The SPANK plugin (``slurm/spank_p2pcast.c``) checks the same
grammar at submission; the Prolog, the Epilog and the daemon check it again,
because the values reach root and ``ch-run``'s command line.

    --ch-image=NAME[:TAG]                 as ``p2pcast.names`` accepts it (no URL:
                                          the site's origin only, see below)
    --ch-mount=SRC:DST[,SRC:DST...]       absolute host path : absolute image path

Prolog environment (Slurm 22.05 with PrologFlags=Alloc): ``SPANK_CH_IMAGE``,
``SPANK_CH_MOUNT`` (copied by the plugin with spank_job_control_setenv),
``SLURM_JOB_ID``, ``SLURMD_NODENAME``, ``SLURM_JOB_NODELIST`` (newer Slurm) or
``SLURM_NODELIST`` (22.05), ``SLURM_JOB_UID``, ``SLURM_JOB_GID``, ``SLURM_JOB_USER``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from p2pcast import errors
from p2pcast.errors import BadHostlist, BadMountSpec, ConfigError, P2PCastError
from p2pcast.names import ImageRef, parse_image_ref

#: Bind mounts one job may ask for: a handful in practice (data, scratch,
#: software); each is a ch-run argument and a directory made in the image.
#: Same value as MAX_MOUNTS in slurm/spank_p2pcast.c.
MAX_MOUNTS = 64

#: Bytes in one mount path: PATH_MAX, beyond which the kernel refuses it anyway.
#: Same value as MAX_PATH_LEN in slurm/spank_p2pcast.c.
MAX_PATH_LEN = 4096

#: Bytes in a whole --ch-mount value: it travels in the job's environment,
#: where Slurm and the shell would choke on megabytes long before we do.
#: Same value as MAX_MOUNT_SPEC in slurm/spank_p2pcast.c.
MAX_MOUNT_SPEC = 16384

#: Longest --ch-image value: name (limits.MAX_NAME_LENGTH), ':' and a tag of 128.
#: Same value as MAX_IMAGE_SPEC in slurm/spank_p2pcast.c.
MAX_IMAGE_SPEC = 1024 + 1 + 128

#: Slurm job ids are 32-bit unsigned integers; they become a directory name.
_JOB_ID = re.compile(r"[0-9]{1,10}")

#: Control characters would break the line-based job record (and logs).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclasses.dataclass(frozen=True, slots=True)
class Mount:
    source: str  #: path on the node
    target: str  #: path inside the image

    def __str__(self) -> str:
        return f"{self.source}:{self.target}"


def parse_image(text: str) -> ImageRef:
    """A --ch-image value: NAME[:TAG] only.

    URLs (``s3://...``, ``file:///...``) are refused: the daemon runs as root
    and must read images only from the origin the site configured, not from
    wherever a job points it.
    """
    if len(text) > MAX_IMAGE_SPEC:
        raise errors.BadImageName(f"--ch-image of {len(text)} characters exceeds {MAX_IMAGE_SPEC}")
    if "://" in text:
        raise errors.BadImageName(
            f"--ch-image {text!r}: give NAME[:TAG]; images come from the site's origin"
        )
    return parse_image_ref(text)


def _check_path(path: str, what: str, spec: str) -> None:
    if not path.startswith("/"):
        raise BadMountSpec(f"--ch-mount {spec!r}: {what} {path!r} is not an absolute path")
    if len(path.encode()) > MAX_PATH_LEN:
        raise BadMountSpec(f"--ch-mount {spec[:80]!r}...: {what} is over {MAX_PATH_LEN} bytes")
    if _CONTROL.search(path):
        raise BadMountSpec(f"--ch-mount {spec!r}: {what} contains a control character")
    if ".." in path.split("/"):
        raise BadMountSpec(f"--ch-mount {spec!r}: {what} {path!r} contains '..'")
    if path.strip("/") == "":
        raise BadMountSpec(f"--ch-mount {spec!r}: {what} must not be '/'")


def parse_mounts(text: str) -> tuple[Mount, ...]:
    """SRC:DST[,SRC:DST...]; the empty string is no mounts."""
    if len(text.encode()) > MAX_MOUNT_SPEC:
        raise BadMountSpec(f"--ch-mount of {len(text)} characters exceeds {MAX_MOUNT_SPEC}")
    if not text:
        return ()
    items = text.split(",")
    if len(items) > MAX_MOUNTS:
        raise BadMountSpec(f"--ch-mount asks for {len(items)} mounts, over {MAX_MOUNTS}")
    mounts = []
    for item in items:
        source, colon, target = item.partition(":")
        if not colon or ":" in target:
            raise BadMountSpec(f"--ch-mount {item!r}: expected SRC:DST (one ':', no ':' in paths)")
        _check_path(source, "SRC", item)
        _check_path(target, "DST", item)
        mounts.append(Mount(source, target))
    return tuple(mounts)


def check_job_id(value: object) -> str:
    """A Slurm job id, safe as a path component."""
    text = str(value)
    if not isinstance(value, str | int) or not _JOB_ID.fullmatch(text):
        raise ConfigError(f"bad Slurm job id {text[:40]!r}: expected digits")
    return text


@dataclasses.dataclass(frozen=True)
class PrologRequest:
    """What this node's Prolog asks of its daemon for one job.

    ``image`` and ``mounts`` are the user's text as the plugin passed it: the
    daemon checks them (``parse_image``, ``parse_mounts``) and records a bad
    value in the job record, where the job's steps find it.
    """

    job: str
    image: str
    mounts: str
    peers: str  #: the allocation's hostlist, compressed as Slurm gives it
    node: str  #: this node's name in it
    uid: int
    gid: int
    user: str

    def body(self, addresses: Mapping[str, str] | None = None) -> dict[str, object]:
        """The daemon's ``stage`` request."""
        body: dict[str, object] = {
            "job": self.job,
            "image": self.image,
            "mounts": self.mounts,
            "peers": self.peers,
            "node": self.node,
            "uid": self.uid,
            "gid": self.gid,
            "user": self.user,
        }
        if addresses:
            body["addresses"] = dict(addresses)
        return body


def wants_image(env: Mapping[str, str]) -> bool:
    """Whether the job asked for an image at all (no: the Prolog does nothing)."""
    return bool(env.get("SPANK_CH_IMAGE", "").strip())


def _require(env: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    raise ConfigError(f"the Prolog's environment lacks {' and '.join(names)}: is this Slurm?")


def _int(env: Mapping[str, str], name: str) -> int:
    text = _require(env, name)
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number") from None


def parse_prolog_env(env: Mapping[str, str]) -> PrologRequest:
    """The stage request from a Prolog's environment (call when ``wants_image``).

    Raises ConfigError for a Slurm environment that lacks what a Prolog always
    gets (the node's configuration is wrong, not the job); the user's values
    are passed on unchecked for the daemon to check and record.
    """
    job = check_job_id(_require(env, "SLURM_JOB_ID"))
    peers = _require(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    node = _require(env, "SLURMD_NODENAME")
    return PrologRequest(
        job=job,
        image=env.get("SPANK_CH_IMAGE", "").strip(),
        mounts=env.get("SPANK_CH_MOUNT", "").strip(),
        peers=peers,
        node=node,
        uid=_int(env, "SLURM_JOB_UID"),
        gid=_int(env, "SLURM_JOB_GID"),
        user=env.get("SLURM_JOB_USER", ""),
    )


def parse_addresses(text: str) -> dict[str, str]:
    """``n1=10.0.0.1,n2=10.0.0.2[:PORT]``: peers' addresses where DNS does not
    give the high-speed network's (P2PCAST_PEER_ADDRESSES)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, eq, address = item.strip().partition("=")
        if not eq or not name or not address:
            raise ConfigError(f"P2PCAST_PEER_ADDRESSES item {item!r}: expected NODE=ADDRESS")
        out[name] = address
    return out


#: Exit status of a hook whose failure is this node's fault: Slurm drains the node.
NODE_FAULT = 1


def hook_exit_status(exc: P2PCastError) -> int:
    """0 unless the node itself is broken: a non-zero Prolog drains the node.

    User errors (bad or unknown image, bad --ch-mount, a mount point the image
    lacks, an image larger than the node's whole cache or staging area),
    remote failures (origin down, peers unreachable) and integrity failures
    (a chunk rotted at the origin) are not this node's fault: the error goes
    into the job record and the job's steps fail with it. Draining for them
    would take down every node of the allocation, or the cluster.
    Node faults: no daemon answers (DaemonUnavailable), the cache disk fails
    (StoreError), staging fails for a local reason (StageError: no loop
    device, run directory full), or p2pcast has a bug (InternalError).
    """
    if isinstance(exc, BadHostlist):
        return 0  # Slurm's hostlist, not the node's fault, and draining would not fix it
    if isinstance(exc, errors.LocalError | errors.InternalError):
        return NODE_FAULT
    return 0
