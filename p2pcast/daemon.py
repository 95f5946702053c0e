"""The p2pcast daemon: composition root of one node.

It owns the node cache, the peer service (listening socket and links), the
broadcasts, the origins and the control socket, and shuts them down in a fixed
order: control socket, broadcasts, links, origins.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import ipaddress
import logging
import os
import random
import signal
import socket
import struct
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from p2pcast import auth as peer_auth
from p2pcast import control, hostlists, jobspec
from p2pcast import manifest as manifest_mod
from p2pcast.errors import (
    ConfigError,
    ImageTooLarge,
    InternalError,
    LocalError,
    NotPermitted,
    P2PCastError,
    ProtocolError,
    StoreError,
    UserError,
)
from p2pcast.jobstage import JobStaging, StagedEntry
from p2pcast.node import Broadcast, BroadcastOptions, Peer, PeerService
from p2pcast.origins.base import Origin, OriginConfig, open_origin, split_image_url
from p2pcast.sizes import human
from p2pcast.stage.untar import TAR_TYPES
from p2pcast.store import NodeCache, space_needed

log = logging.getLogger(__name__)

#: Default peer port: unassigned by IANA, away from Slurm (6817-6819) and
#: Ceph (3300, 6789, 6800-7300).
DEFAULT_PORT = 7086

#: How often a watching client gets a progress frame (s).
PROGRESS_INTERVAL = 0.25


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    node: str = dataclasses.field(default_factory=lambda: socket.gethostname().split(".")[0])
    listen: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    state_dir: Path = Path("/var/lib/p2pcast")
    control_socket: str = control.DEFAULT_SOCKET
    origin: str | None = None
    #: settings of S3 and RADOS origins (endpoints, profile, ceph.conf, user)
    origin_config: OriginConfig = dataclasses.field(default_factory=OriginConfig)
    zero_copy: bool = True
    #: staged images and Slurm job records (None: the stage/release operations are off)
    run_dir: Path | None = None
    options: BroadcastOptions = dataclasses.field(default_factory=BroadcastOptions)
    #: how peers prove they are daemons of this cluster: auto, munge, secret, none
    #: (p2pcast.auth.choose)
    auth: str = "auto"
    secret_file: str = peer_auth.DEFAULT_SECRET_FILE
    munge_socket: str = peer_auth.DEFAULT_MUNGE_SOCKET
    #: a ready authenticator (tests, a lone in-process fetch); None: from the above
    authenticator: peer_auth.Authenticator | None = None


def listen_address(spec: str) -> str:
    """An IP literal as is, or the IPv4 address of a network interface (``ib0``).

    Sites name the high-speed network by interface more often than by
    address; the address differs on every node while the name does not.
    """
    try:
        ipaddress.ip_address(spec)
        return spec
    except ValueError:
        pass
    if spec not in {name for _, name in socket.if_nameindex()}:
        raise ConfigError(f"--listen {spec!r} is neither an IP address nor a network interface")
    siocgifaddr = 0x8915  # <linux/sockios.h>: get an interface's IPv4 address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = fcntl.ioctl(sock.fileno(), siocgifaddr, struct.pack("256s", spec.encode()[:15]))
        except OSError as exc:
            raise ConfigError(f"interface {spec} has no IPv4 address: {exc.strerror}") from exc
    return socket.inet_ntoa(raw[20:24])


def resolve_peers(
    names: list[str], port: int, addresses: dict[str, str] | None = None
) -> list[Peer]:
    """Turn node names into addresses: an explicit map, an IP literal, or DNS."""
    peers = []
    for name in names:
        target = (addresses or {}).get(name, name)
        host, _, port_text = target.rpartition(":") if target.count(":") == 1 else (target, "", "")
        host = host or target
        peer_port = int(port_text) if port_text else port
        try:
            ipaddress.ip_address(host)
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, peer_port, socket.AF_INET, socket.SOCK_STREAM)
            except OSError as exc:
                raise ConfigError(f"cannot resolve peer {name!r}: {exc}") from exc
            host = str(infos[0][4][0])
        peers.append(Peer(name, host, peer_port))
    return peers


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.cache = NodeCache(config.state_dir / "cache")
        # Recent partial images stay: the same image asked again resumes from
        # its verified chunks (p2pcast.store).
        removed = self.cache.remove_stale_partial()
        if removed:
            log.info("removed %d stale partial image(s) left by an earlier run", removed)
        self.listen = listen_address(config.listen)
        # Before the port opens: a daemon that cannot authenticate peers never
        # starts (auto never falls back to none).
        self.authenticator = config.authenticator or peer_auth.choose(
            config.auth, secret_file=config.secret_file, munge_socket=config.munge_socket
        )
        self.service = PeerService(
            config.node,
            self.listen,
            config.port,
            self.cache,
            auth=self.authenticator,
            zero_copy=config.zero_copy,
        )
        self.origins: dict[str, Origin] = {}
        self.runs: dict[bytes, asyncio.Task[None]] = {}
        self.failed: dict[bytes, dict[str, Any]] = {}
        self.server: asyncio.Server | None = None
        self.stopping = asyncio.Event()
        self.staging = (
            JobStaging(config.run_dir, config.state_dir) if config.run_dir is not None else None
        )

    # ---- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        if self.staging is not None:
            # Before the control socket opens: a Prolog must find the counts
            # of the jobs still running, and no residue of a crash.
            self.staging.recover()
        self.service.start()
        path = Path(self.config.control_socket)
        _control_dir(path.parent)
        if path.exists():
            path.unlink()
        self.server = await asyncio.start_unix_server(self._client, path=str(path))
        # Any local user may ask (status, fetch of the configured origin's
        # images); each request is checked against its caller's uid
        # (SO_PEERCRED), so the socket itself need not be restricted.
        os.chmod(path, 0o666)
        log.info(
            "p2pcast daemon %s listening on %s:%d (peer auth: %s), control %s",
            self.config.node,
            self.config.listen,
            self.service.port,
            self.authenticator.method,
            path,
        )

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        _notify_ready()
        await self.stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for broadcast in list(self.service.broadcasts.values()):
            await broadcast.stop(keep_partial=True)  # a restart resumes it
        for task in self.runs.values():
            task.cancel()
        await asyncio.gather(*self.runs.values(), return_exceptions=True)
        await self.service.close()
        for origin in self.origins.values():
            await origin.close()
        try:
            os.unlink(self.config.control_socket)
        except OSError:
            pass

    # ---- control API ----------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            dec = control.decoder()
            header = None
            while header is None:
                data = await reader.read(65536)
                if not data:
                    return
                dec.feed(data)
                header = dec.next_header()
            kind, body = control.parse(header)
            if kind != control.REQUEST:
                raise ProtocolError("expected a request")
            sock = writer.get_extra_info("socket")
            body["_uid"] = control.peer_uid(sock) if sock is not None else -1
            await self._dispatch(body, writer)
        except P2PCastError as exc:
            writer.write(control.frame(control.ERROR, control.error_body(exc)))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except Exception as exc:  # a bug: say so to the caller and in the log, never silently
            log.exception("control request failed")
            error = InternalError(f"internal error in the daemon: {type(exc).__name__}: {exc}")
            writer.write(control.frame(control.ERROR, control.error_body(error)))
        finally:
            try:
                await writer.drain()
                writer.close()
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _dispatch(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        op = body.get("op")
        if op == "ping":
            result: dict[str, Any] = {
                "node": self.config.node,
                "port": self.service.port,
                "run_dir": str(self.config.run_dir or ""),
            }
        elif op == "fetch":
            self._check_fetch_caller(body)
            try:
                broadcast = await self.fetch(body)
            except LocalError as exc:
                # The caller is told; a fault of this node (a full or broken
                # cache) also goes in the log, where an administrator looks.
                log.warning("fetch of %s failed: %s", body.get("image"), exc)
                raise
            if body.get("wait", True):
                await self._watch(broadcast, writer)
            result = broadcast.progress()
            if broadcast.error is not None:
                raise broadcast.error
        elif op == "stage":
            self._require_root(body, op)
            result = await self.stage(body, writer)
        elif op == "release":
            self._require_root(body, op)
            result = await self._job_staging().release(jobspec.check_job_id(body.get("job")))
        elif op == "status":
            active = [b.progress() for b in self.service.broadcasts.values()]
            result = {"broadcasts": active + list(self.failed.values())}
            if self.staging is not None:
                result["staged"] = self.staging.describe()
        elif op == "cache-list":
            result = {"images": [e.to_dict() for e in self.cache.entries()]}
        elif op == "cache-gc":
            self._require_root(body, op)
            result = {"removed": await self.gc()}
        elif op == "shutdown":
            self._require_root(body, op)
            self.stopping.set()
            result = {}
        else:
            raise UserError(f"unknown control operation {op!r}")
        writer.write(control.frame(control.RESULT, result))

    async def _watch(
        self,
        broadcast: Broadcast,
        writer: asyncio.StreamWriter,
        staging: asyncio.Task[Any] | None = None,
    ) -> None:
        """Send progress frames until the broadcast is done, or ``staging`` failed
        (the Prolog need not wait for a transfer its job can no longer use)."""
        while not broadcast.done.is_set():
            if (
                staging is not None
                and staging.done()
                and (staging.cancelled() or staging.exception() is not None)
            ):
                return
            writer.write(control.frame(control.PROGRESS, broadcast.progress()))
            await writer.drain()
            try:
                await asyncio.wait_for(broadcast.done.wait(), PROGRESS_INTERVAL)
            except TimeoutError:
                pass

    @staticmethod
    def _privileged(body: dict[str, Any]) -> bool:
        """The caller is root, or the user the daemon runs as (who could do it all
        without asking). ``_uid`` is the kernel's word (SO_PEERCRED), never the
        client's: _client overwrites it."""
        uid = body.get("_uid")
        return uid == 0 or uid == os.geteuid()

    @staticmethod
    def _require_root(body: dict[str, Any], op: str) -> None:
        # Staging mounts images and writes the records jobs run from: root's
        # business (the Prolog and Epilog), not any local user's. So are
        # stopping the daemon and emptying its cache.
        if not Daemon._privileged(body):
            raise NotPermitted(f"only root may ask the daemon to {op} (the Slurm Prolog/Epilog)")

    def _check_fetch_caller(self, body: dict[str, Any]) -> None:
        """A local user fetches from the daemon's configured origin, by name.

        The daemon runs as root: an origin URL or its query from a user could
        make it read any file as a ceph.conf or keyring, or send its origin
        credentials to any endpoint; peer addresses and a port could aim its
        connections anywhere. Only root chooses those.
        """
        if self._privileged(body):
            return
        named, _ = split_image_url(str(body.get("image", "")))
        origin = body.get("origin")
        for what, url in (("an image URL", named), ("--origin", origin)):
            if url and url != self.config.origin:
                raise NotPermitted(
                    f"only root may choose the origin ({what} {url!r}): ask for NAME[:TAG],"
                    f" which comes from the daemon's origin {self.config.origin or '(none)'}"
                )
        if body.get("addresses") or body.get("port"):
            raise NotPermitted(
                "only root may give peer addresses or a port: peers are found by their"
                " node names on the daemon's port"
            )

    def _job_staging(self) -> JobStaging:
        if self.staging is None:
            raise ConfigError("this daemon stages no images for jobs: it has no run directory")
        return self.staging

    # ---- operations -----------------------------------------------------------

    async def stage(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> dict[str, Any]:
        """A job's Prolog: broadcast the image across the allocation, stage it, record it.

        A tar image still arriving is unpacked while it arrives (see
        ``_stage_while_arriving``); a SquashFS, or an image already complete,
        is staged after the broadcast completed. Whatever fails, the job's
        record says why (its steps fail with that message); the error also
        goes back to the Prolog, which decides whether the node is at fault.
        """
        staging = self._job_staging()
        job = jobspec.check_job_id(body.get("job"))
        text = str(body.get("image", ""))
        try:
            image = jobspec.parse_image(text)
            mounts = jobspec.parse_mounts(str(body.get("mounts") or ""))
            uid, gid = int(body.get("uid", -1)), int(body.get("gid", -1))
            if uid < 0 or gid < 0:
                raise ConfigError("stage needs the job's uid and gid")
            fetch_body = {k: body.get(k) for k in ("peers", "node", "addresses", "origin", "port")}
            broadcast = await self.fetch({**fetch_body, "image": str(image), "job": job})
            progress = broadcast.progress()
            image_type = str(progress["image_type"])
            if image_type in TAR_TYPES:
                _check_staging_room(staging.staged_dir, str(image), int(progress["size"]))

            def stage_it(growing: bool) -> Coroutine[Any, Any, StagedEntry]:
                return staging.stage(
                    job=job,
                    name=str(image),
                    image_id=broadcast.image_id.hex(),
                    image_path=Path(progress["path"]),
                    image_type=image_type,
                    mounts=mounts,
                    uid=uid,
                    gid=gid,
                    growing=broadcast.prefix if growing else None,
                )

            if image_type in TAR_TYPES and not broadcast.done.is_set():
                entry = await self._stage_while_arriving(broadcast, writer, job, stage_it(True))
            else:
                await self._watch(broadcast, writer)
                if broadcast.error is not None:
                    raise broadcast.error
                entry = await stage_it(False)
            progress = broadcast.progress()
        except P2PCastError as exc:
            log.warning("job %s: cannot provide %s: %s", job, text, exc)
            try:
                await staging.fail(job, text, str(exc))
            except P2PCastError as unrecorded:
                # A full run directory fails the staging and then the record
                # that would say so: the job's steps fail without a record
                # ("no staging record"), and the node is at fault (it cannot
                # keep records), but the Prolog's message keeps the first cause.
                log.error("job %s: %s", job, unrecorded)
                raise StoreError(f"{exc}; and {unrecorded}") from exc
            raise
        return {
            **progress,
            "job": job,
            "root": str(entry.staged.path),
            "method": entry.staged.method,
            "jobs_sharing": len(entry.jobs),
            # image bytes unpacked (by any staging of this image) before its
            # last chunk arrived: 0 when it was unpacked after the transfer
            "unpacked_while_arriving": broadcast.prefix.read_early,
        }

    async def _stage_while_arriving(
        self,
        broadcast: Broadcast,
        writer: asyncio.StreamWriter,
        job: str,
        stage: Coroutine[Any, Any, StagedEntry],
    ) -> StagedEntry:
        """Unpack a tar from the broadcast's verified prefix while the rest arrives.

        The staging publishes its tree only after the whole image's sha256
        matched, and fails (removing its scratch tree) as soon as the
        broadcast fails or stops, so the broadcast's error is the one the job
        gets. The unpacking runs in a thread that cannot be cancelled: it is
        always waited for, never left to publish a copy nobody counts.
        """
        staging = self._job_staging()
        task = asyncio.create_task(stage, name=f"stage job {job}")
        try:
            await self._watch(broadcast, writer, task)
        except asyncio.CancelledError:
            raise  # the daemon is stopping: its broadcasts' stop wakes the thread
        except Exception:
            # The Prolog went away: as before, the job stages nothing.
            try:
                await task
            except P2PCastError:
                pass
            else:
                await staging.release(job)
            raise
        try:
            entry = await task
        except P2PCastError:
            if broadcast.error is not None:
                raise broadcast.error from None  # the cause, not "did not arrive"
            raise
        if broadcast.error is not None:
            # Only a copy staged earlier can be shared before the image
            # verified; this job still has no verified image to run.
            await staging.release(job)
            raise broadcast.error
        return entry

    def origin(self, url: str | None) -> Origin:
        url = url or self.config.origin
        if not url:
            raise ConfigError("no origin given and the daemon has no default origin")
        if url not in self.origins:
            self.origins[url] = open_origin(url, self.config.origin_config)
        return self.origins[url]

    async def fetch(self, body: dict[str, Any]) -> Broadcast:
        """Start (or join) the broadcast of an image to a set of peers."""
        requested_at = time.time()
        # "s3://BUCKET/NAME[:TAG]" names its origin; a plain NAME[:TAG] uses "origin".
        named_origin, ref = split_image_url(str(body.get("image", "")))
        origin = self.origin(named_origin or body.get("origin"))
        names = hostlists.expand(str(body.get("peers") or self.config.node))
        node = str(body.get("node") or self.config.node)
        rank = hostlists.rank_of(names, node)
        addresses = body.get("addresses")
        if addresses is not None and not isinstance(addresses, dict):
            raise UserError("addresses must map node names to addresses")
        port = int(body.get("port") or self.service.port)
        # The image first: a wrong name is the commonest mistake, and says so.
        manifest_bytes = await origin.get_manifest(ref)
        # This node needs no address of its own.
        addresses = {node: f"{self.listen}:{self.service.port}", **(addresses or {})}
        peers = await asyncio.to_thread(resolve_peers, names, port, addresses)
        image_id = manifest_mod.image_id_of(manifest_bytes)
        self.failed.pop(image_id, None)
        existing = self.service.broadcasts.get(image_id)
        if existing is not None and existing.error is None:
            return existing  # running or seeding: join it
        if existing is not None:
            await existing.stop()
        await self._make_room(manifest_bytes, image_id)
        broadcast = Broadcast(
            self.service,
            manifest_bytes,
            peers,
            rank,
            origin,
            job=str(body.get("job", "")),
            options=self.config.options,
            rng=random.Random(),
            requested_at=requested_at,
        )
        task = asyncio.create_task(self._run(broadcast), name=f"broadcast {ref}")
        self.runs[image_id] = task
        task.add_done_callback(lambda _: self.runs.pop(image_id, None))
        return broadcast

    async def _run(self, broadcast: Broadcast) -> None:
        try:
            await broadcast.run()
        except P2PCastError:
            # Recorded in the broadcast for its watchers; the partial image
            # goes at once (nothing half-received stays in the cache), and the
            # failure stays visible in status until the image is asked again.
            await broadcast.stop()
            self.failed[broadcast.image_id] = broadcast.progress()

    def _busy_image_ids(self) -> set[str]:
        """Images that must stay in the cache: being fetched, or staged for a
        running job (a SquashFS is mounted from the cached file)."""
        busy = {b.image_id.hex() for b in self.service.broadcasts.values() if b.state != "complete"}
        if self.staging is not None:
            busy |= self.staging.busy_image_ids()
        return busy

    async def _make_room(self, manifest_bytes: bytes, image_id: bytes) -> None:
        """Before an image is fetched: refuse one that this node's cache could not
        hold even empty (the request is at fault, not the node: no drain), and
        remove complete images nobody uses, least recently used first, until the
        new one fits. Without this the cache only grew, until every new image
        failed on a full disk and the node drained itself."""
        if self.cache.is_complete(image_id):
            return
        manifest = manifest_mod.decode(manifest_bytes)
        need = space_needed(manifest)
        free, total = self.cache.space()
        if need > total:
            raise ImageTooLarge(
                f"image {manifest.name} needs {human(need)} of cache space, more than this"
                f" node's cache ({self.cache.root}) has in all ({human(total)})"
            )
        need -= self.cache.held_bytes(image_id)  # a partial copy resumed keeps its space
        if need <= free:
            return
        for entry in self.cache.least_recently_used(self._busy_image_ids() | {image_id.hex()}):
            old = bytes.fromhex(entry.image_id)
            seeding = self.service.broadcasts.get(old)
            if seeding is not None:
                await seeding.stop()  # closes its files: their blocks are freed only then
            self.cache.discard(old)
            free, _ = self.cache.space()
            log.warning(
                "cache full: removed %s (%s, %s) to make room for %s (%s); %s free now",
                entry.name, entry.image_id[:12], human(entry.size),
                manifest.name, human(need), human(free),
            )  # fmt: skip
            if need <= free:
                return
        # Still short: what fills the disk is not a cached image nobody uses. The
        # cache's open fails with a StoreError that says so (a node fault).

    async def gc(self) -> list[dict[str, Any]]:
        """Drop complete images that no broadcast is fetching."""
        busy = self._busy_image_ids()
        for broadcast in list(self.service.broadcasts.values()):
            if broadcast.state == "complete":
                await broadcast.stop()
        return [e.to_dict() for e in self.cache.gc(busy)]


def _check_staging_room(staged_dir: Path, name: str, size: int) -> None:
    """A tar unpacks to at least its own size (its members' bytes, page-rounded
    on tmpfs): one larger than the whole staging filesystem can never be staged
    here, and that is the image's fault, not the node's (a node fault would
    drain every node of the allocation). A staging area that is merely full
    fails later, while unpacking, as a node fault."""
    try:
        st = os.statvfs(staged_dir if staged_dir.exists() else staged_dir.parent)
    except OSError:
        return  # the staging itself reports a missing or broken directory
    total = st.f_blocks * st.f_frsize
    if size > total:
        raise ImageTooLarge(
            f"image {name} unpacks to at least {human(size)}, more than this node's"
            f" staging area ({staged_dir}) has in all ({human(total)})"
        )


def _control_dir(path: Path) -> None:
    """The control socket's directory: made root's 0755 when missing (users reach
    the socket, only the daemon replaces it); a directory others may write to
    lets a local user put a socket of their own in the daemon's place."""
    if not path.exists():
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
        return
    mode = path.stat().st_mode
    if mode & 0o022 and not mode & 0o1000:
        log.warning(
            "control socket directory %s is writable by others (mode %04o): a local user"
            " could replace the socket; use a root-owned 0755 directory",
            path,
            mode & 0o7777,
        )


def _notify_ready() -> None:
    """sd_notify(READY=1) when started by systemd with Type=notify."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(b"READY=1", path)
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)
