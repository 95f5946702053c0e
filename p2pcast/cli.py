"""The ``p2pcast`` command: turns arguments into calls of the library or the daemon.

Every p2pcast error ends the command with one line on stderr and the error's
exit code; ``--json`` prints machine-readable results on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from p2pcast import __version__, control, hostlists
from p2pcast import manifest as manifest_mod
from p2pcast.errors import BadHostlist, ConfigError, DaemonUnavailable, P2PCastError
from p2pcast.names import ImageRef, default_name_for, parse_image_ref
from p2pcast.origins.base import OriginConfig, names_image, split_image_url
from p2pcast.sizes import human

LOOPS = ("uvloop", "asyncio")


def run(coro: Coroutine[Any, Any, Any], loop: str = "uvloop") -> Any:
    """Run a coroutine on the chosen event loop (uvloop imported lazily)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1] if value and value[-1] in units else ""
    try:
        number = float(value[: len(value) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    return int(number * units[unit])


class Progress:
    """A one-line progress bar (on stderr) when stdout is a terminal; silent otherwise."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled and sys.stdout.isatty() and sys.stderr.isatty()
        self.started = time.monotonic()

    def update(self, done: int, total: int) -> None:
        if not self.enabled or not total:
            return
        width = 30
        filled = int(width * done / total)
        rate = done / max(time.monotonic() - self.started, 1e-6)
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{100 * done / total:5.1f}% {human(done)}/{human(total)} {human(rate)}/s "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(text)


def origin_config(args: argparse.Namespace) -> OriginConfig:
    """p2pcast's own settings for S3 and RADOS origins: options, then P2PCAST_* variables.

    The S3 keys come only from the environment (P2PCAST_S3_ACCESS_KEY_ID,
    P2PCAST_S3_SECRET_ACCESS_KEY), never from options, which ``ps`` shows; unset,
    botocore's own AWS_* variables and files apply.
    """
    env = os.environ.get
    endpoints = args.s3_endpoint or [
        e.strip() for e in env("P2PCAST_S3_ENDPOINTS", "").split(",") if e.strip()
    ]
    return OriginConfig(
        s3_endpoints=tuple(endpoints),
        s3_profile=args.s3_profile,
        s3_region=args.s3_region,
        s3_access_key=env("P2PCAST_S3_ACCESS_KEY_ID") or None,
        s3_secret_key=env("P2PCAST_S3_SECRET_ACCESS_KEY") or None,
        rados_conf=args.rados_conf,
        rados_id=args.rados_id,
        rados_keyring=args.rados_keyring,
    )


def _image_and_origin(text: str, origin: str | None) -> tuple[ImageRef, str | None]:
    """NAME[:TAG] with --origin, or s3://BUCKET/NAME[:TAG] / rados://POOL/NAME[:TAG],
    whose origin wins (over a default origin from P2PCAST_ORIGIN too)."""
    url, ref = split_image_url(text)
    return ref, url or origin


# ---- commands ------------------------------------------------------------------


def cmd_push(args: argparse.Namespace) -> int:
    from p2pcast.origins.base import open_origin
    from p2pcast.publish import push

    dest: str | None = args.dest
    if names_image(args.dest):  # s3://BUCKET/NAME[:TAG]
        if args.name:
            raise ConfigError(f"{args.dest!r} names the image already; drop --name {args.name}")
        dest, ref = split_image_url(args.dest)
    else:
        ref = parse_image_ref(args.name or default_name_for(args.image))
    assert dest is not None
    bar = Progress(f"push {ref}", not args.json)

    async def go() -> dict[str, Any]:
        async with open_origin(dest, origin_config(args)) as origin:
            result = await push(
                args.image, origin, ref, chunk_size=args.chunk_size, progress=bar.update
            )
        m = result.manifest
        return {
            "image": str(ref),
            "image_id": result.image_id.hex(),
            "origin": dest,
            "size": m.size,
            "stored": m.stored_total,
            "chunks": m.chunk_count,
            "chunks_written": result.chunks_written,
            "chunks_skipped": result.chunks_skipped,
            "image_type": m.image_type,
            "sha256": m.sha256.hex(),
            "seconds": round(result.seconds, 3),
        }

    out = run(go())
    bar.close()
    emit(
        args,
        out,
        f"pushed {out['image']} ({out['image_type']}, {human(out['size'])}, "
        f"{out['chunks']} chunks, {out['chunks_written']} new) as {out['image_id']} "
        f"in {out['seconds']:.2f} s",
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    async def go() -> bytes:
        if os.path.isfile(args.image):
            return Path(args.image).read_bytes()
        ref, url = _image_and_origin(args.image, args.origin)
        if not url:
            raise ConfigError("inspect needs --origin (or a manifest file)")
        from p2pcast.origins.base import open_origin

        async with open_origin(url, origin_config(args)) as origin:
            return await origin.get_manifest(ref)

    m = manifest_mod.decode(run(go()))
    info = m.to_dict()
    if not args.chunks:
        info.pop("chunks")
    lines = [
        f"name:        {m.name}",
        f"image id:    {info['image_id']}",
        f"type:        {m.image_type}",
        f"size:        {m.size} ({human(m.size)})",
        f"stored:      {m.stored_total} ({human(m.stored_total)})",
        f"chunks:      {m.chunk_count} x {human(m.chunk_size)}",
        f"sha256:      {m.sha256.hex()}",
        f"format:      v{m.version}",
    ]
    if args.chunks:
        lines += [
            f"  {c['index']:6d} {c['offset']:14d} {c['stored_size']:10d} {c['codec']:4s} "
            f"{c['xxh3_128']}"
            for c in info["chunks"]
        ]
    emit(args, info, "\n".join(lines))
    return 0


def _fetch_request(args: argparse.Namespace) -> dict[str, Any]:
    # Bad names fail here, before any network.
    ref, args.origin = _image_and_origin(args.image, args.origin)
    args.image = str(ref)
    peers = args.peers or args.node
    names = hostlists.expand(peers) if peers else None
    if args.rank is not None:
        if names is None or not 0 <= args.rank < len(names):
            raise BadHostlist(f"rank {args.rank} is outside the hostlist {peers!r}")
        args.node = names[args.rank]
    if names is not None and args.node:
        hostlists.rank_of(names, args.node)
    return {
        "image": args.image,
        "origin": args.origin,
        "peers": args.peers,
        "node": args.node,
        "job": args.job or "",
        "port": args.port,
    }


def cmd_fetch(args: argparse.Namespace) -> int:
    request = _fetch_request(args)
    bar = Progress(f"fetch {args.image}", not args.json)

    async def via_daemon() -> dict[str, Any]:
        result: dict[str, Any] = {}
        async for kind, body in control.call(args.control, "fetch", **request):
            if kind == control.PROGRESS:
                bar.update(int(body["bytes_done"]), int(body["bytes_total"]))
            else:
                result = body
        return result

    async def in_process() -> dict[str, Any]:
        from p2pcast.auth import SecretAuth
        from p2pcast.daemon import DEFAULT_PORT, Daemon, DaemonConfig
        from p2pcast.node import BroadcastOptions

        node = args.node or DaemonConfig().node
        state = Path(args.state_dir)
        alone = not args.peers or hostlists.expand(args.peers) == [node]
        # Peers find each other on one agreed port; alone, any free port does.
        port = args.port if args.port is not None else (0 if alone else DEFAULT_PORT)
        config = DaemonConfig(
            # Alone, no peer may join at all: a key nobody else has.
            authenticator=SecretAuth(os.urandom(32)) if alone else None,
            auth=args.auth,
            secret_file=args.secret_file,
            munge_socket=args.munge_socket,
            node=node,
            listen=args.listen,
            port=port,
            state_dir=state,
            control_socket=str(state / "fetch.sock"),
            origin=args.origin,
            origin_config=origin_config(args),
            options=BroadcastOptions(peer_timeout=args.peer_timeout),
        )
        daemon = Daemon(config)
        await daemon.start()
        try:
            broadcast = await daemon.fetch({**request, "node": node, "port": port or None})
            while not broadcast.done.is_set():
                bar.update(broadcast.progress()["bytes_done"], broadcast.manifest.stored_total)
                try:
                    await asyncio.wait_for(broadcast.done.wait(), 0.25)
                except TimeoutError:
                    pass
            if broadcast.error is not None:
                raise broadcast.error
            await broadcast.linger()
            return broadcast.progress()
        finally:
            await daemon.stop()

    use_daemon = not args.in_process and os.path.exists(args.control)
    try:
        out = run(via_daemon() if use_daemon else in_process(), args.loop)
    except DaemonUnavailable:
        if args.in_process or use_daemon is False:
            raise
        out = run(in_process(), args.loop)
    bar.close()
    if args.output:
        _copy_out(Path(out["path"]), Path(args.output))
        out["output"] = args.output
    # chunks a partial copy from an earlier run still held (checked again)
    resumed = f" [resumed {human(out['resumed_bytes'])}]" if out.get("resumed_chunks") else ""
    emit(
        args,
        out,
        f"{out['name']}: {out['state']}, {human(out['size'])} in {out['seconds']:.2f} s"
        f" ({human(out['from_origin'])} from origin, {human(out['from_peers'])} from peers)"
        f"{' [cached]' if out.get('cached') else ''}"
        f"{resumed}"
        f"\n{out.get('output') or out['path']}",
    )
    return 0


def _copy_out(src: Path, dest: Path) -> None:
    """Give the user a copy (a hard link when on the same filesystem)."""
    import shutil

    tmp = dest.with_name(dest.name + ".p2pcast-tmp")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def cmd_daemon(args: argparse.Namespace) -> int:
    from p2pcast.daemon import Daemon, DaemonConfig
    from p2pcast.node import BroadcastOptions

    config = DaemonConfig(
        node=args.node or DaemonConfig().node,
        listen=args.listen,
        port=args.port,
        state_dir=Path(args.state_dir),
        control_socket=args.control,
        origin=args.origin,
        origin_config=origin_config(args),
        zero_copy=not args.no_sendfile,
        # Beside the control socket unless given: /run/p2pcast for the system daemon.
        run_dir=Path(args.run_dir or os.path.dirname(os.path.abspath(args.control))),
        options=BroadcastOptions(peer_timeout=args.peer_timeout),
        auth=args.auth,
        secret_file=args.secret_file,
        munge_socket=args.munge_socket,
    )

    async def go() -> None:
        await Daemon(config).serve_forever()

    run(go(), args.loop)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    out = run(control.request(args.control, "status"))
    lines = [
        f"{b['name']:30s} {b['state']:10s} {b['chunks_done']}/{b['chunks_total']} chunks "
        f"{human(b['bytes_done'])}/{human(b['bytes_total'])} {b['seconds']:.1f} s {b['job']}"
        for b in out["broadcasts"]
    ] or ["no broadcasts"]
    emit(args, out, "\n".join(lines))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    out: dict[str, Any]
    if args.state_dir:
        from p2pcast.store import NodeCache

        cache = NodeCache(Path(args.state_dir) / "cache")
        if args.action == "gc":
            out = {"removed": [e.to_dict() for e in cache.gc(set())]}
        else:
            out = {"images": [e.to_dict() for e in cache.entries()]}
    else:
        out = run(control.request(args.control, f"cache-{args.action}"))
    rows: list[dict[str, Any]] = out.get("images", out.get("removed", []))
    lines = [
        f"{e['image_id']} {e['name']:30s} {human(e['size']):>10s} "
        f"{'complete' if e['complete'] else 'partial'}"
        for e in rows
    ] or ["(none)"]
    emit(args, out, ("removed:\n" if args.action == "gc" else "") + "\n".join(lines))
    return 0


def cmd_slurm(args: argparse.Namespace) -> int:
    from p2pcast import slurm_hooks

    hook = slurm_hooks.run_prolog if args.hook == "prolog" else slurm_hooks.run_epilog
    return hook(os.environ, sys.stderr)


def cmd_demo(args: argparse.Namespace) -> int:
    from p2pcast.demo import run_demo

    return run_demo(args)


# ---- argument parsing ----------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    control_default = env("P2PCAST_CONTROL", control.DEFAULT_SOCKET)
    parser = argparse.ArgumentParser(
        prog="p2pcast", description="Peer-to-peer container-image broadcast for HPC clusters."
    )
    parser.add_argument("--version", action="version", version=f"p2pcast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("push", help="publish an image file to an origin")
    p.add_argument("image", help="SquashFS, tar, tar.gz or tar.zst file")
    p.add_argument(
        "dest",
        help="origin: a directory, file:///..., s3://BUCKET or rados://POOL"
        " (s3://BUCKET/NAME[:TAG] names the image too)",
    )
    p.add_argument("--name", help="NAME[:TAG] (default: from the file name, tag latest)")
    p.add_argument(
        "--chunk-size",
        type=parse_size,
        default=None,
        help="e.g. 4M (default: 1-4 MiB, so that the image has at least 1024 chunks)",
    )
    _origin_args(p)
    _common(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("inspect", help="print an image's manifest")
    p.add_argument(
        "image", help="NAME[:TAG] at --origin, s3://BUCKET/NAME[:TAG], or a manifest file"
    )
    p.add_argument("--origin", default=env("P2PCAST_ORIGIN"))
    p.add_argument("--chunks", action="store_true", help="list every chunk")
    _origin_args(p)
    _common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("fetch", help="join a broadcast and get an image")
    p.add_argument("image", help="NAME[:TAG], or s3://BUCKET/NAME[:TAG] / rados://POOL/...")
    p.add_argument("--origin", default=env("P2PCAST_ORIGIN"))
    p.add_argument("--peers", help="hostlist of all nodes, e.g. n[1-16] (default: this node)")
    p.add_argument("--node", help="this node's name in the hostlist")
    p.add_argument("--rank", type=int, help="this node's position in the hostlist (from 0)")
    p.add_argument("--port", type=int, default=None, help="peers' port")
    p.add_argument("--job", help="job id, for status")
    p.add_argument("--output", help="also place the image here")
    p.add_argument("--control", default=control_default)
    p.add_argument("--in-process", action="store_true", help="do not use the local daemon")
    p.add_argument(
        "--peer-timeout", type=float, default=30.0, help="in-process: give up on silent peers (s)"
    )
    p.add_argument("--listen", default="0.0.0.0", help="in-process: address to serve peers on")
    p.add_argument("--state-dir", default=env("P2PCAST_STATE_DIR", "/var/tmp/p2pcast-fetch"))
    p.add_argument("--loop", choices=LOOPS, default="uvloop")
    _auth_args(p, "in-process with peers: ")
    _origin_args(p)
    _common(p)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("daemon", help="run the node daemon")
    _daemon_args(p)
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("status", help="progress of the daemon's broadcasts")
    p.add_argument("--control", default=control_default)
    _common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cache", help="list or clean the node cache")
    p.add_argument("action", choices=("list", "gc"))
    p.add_argument("--control", default=control_default)
    p.add_argument("--state-dir", help="act on this state directory without a daemon")
    _common(p)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser(
        "slurm",
        help="the Slurm Prolog/Epilog (slurm/prolog, slurm/epilog): stage or release"
        " the image of $SPANK_CH_IMAGE through the local daemon",
    )
    p.add_argument("hook", choices=("prolog", "epilog"))
    p.set_defaults(func=cmd_slurm, json=False, verbose=False)

    p = sub.add_parser("demo", help="broadcast to N local daemons and compare (no root)")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--size", type=parse_size, default=256 << 20, help="generated image size")
    p.add_argument("--image", help="use this image file instead of a generated tar")
    p.add_argument(
        "--chunk-size", type=parse_size, default=None, help="default: as push chooses it"
    )
    p.add_argument("--workdir", help="keep everything here (default: a temporary directory)")
    p.add_argument("--loop", choices=LOOPS, default="uvloop")
    p.add_argument("--no-sendfile", action="store_true", help="use the read/write fallback")
    p.add_argument(
        "--ceph",
        nargs="?",
        const="s3",
        choices=("s3", "rados"),
        help="seed from a real Ceph (tools/ceph.py; needs root for its own address):"
        " over S3 from radosgw (default) or RADOS",
    )
    _common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _daemon_args(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    from p2pcast.daemon import DEFAULT_PORT

    p.add_argument("--node", default=env("P2PCAST_NODE"), help="this node's name")
    p.add_argument("--listen", default=env("P2PCAST_LISTEN", "0.0.0.0"), help="HSN address")
    p.add_argument("--port", type=int, default=int(env("P2PCAST_PORT", DEFAULT_PORT)))
    p.add_argument("--state-dir", default=env("P2PCAST_STATE_DIR", "/var/lib/p2pcast"))
    p.add_argument("--control", default=env("P2PCAST_CONTROL", control.DEFAULT_SOCKET))
    p.add_argument(
        "--run-dir",
        default=env("P2PCAST_RUN_DIR"),
        help="staged images and Slurm job records, on a tmpfs (default: the control"
        " socket's directory, /run/p2pcast)",
    )
    p.add_argument("--origin", default=env("P2PCAST_ORIGIN"), help="default origin URL")
    p.add_argument("--peer-timeout", type=float, default=30.0)
    p.add_argument("--loop", choices=LOOPS, default=env("P2PCAST_LOOP", "uvloop"))
    p.add_argument("--no-sendfile", action="store_true", help="use the read/write fallback")
    _auth_args(p)
    _origin_args(p)
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(json=False)


def _auth_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """How peers prove they are daemons of this cluster (p2pcast.auth, THREAT_MODEL.md)."""
    from p2pcast import auth

    env = os.environ.get
    g = p.add_argument_group("peer authentication")
    g.add_argument(
        "--auth",
        choices=auth.MODES,
        default=env("P2PCAST_AUTH", "auto"),
        help=f"{prefix}munge, a shared secret, or none (accept any host); auto: munge if its"
        " socket exists, else the secret file if it exists, else refuse to start"
        " (default: P2PCAST_AUTH, else auto)",
    )
    g.add_argument(
        "--secret-file",
        default=env("P2PCAST_SECRET_FILE", auth.DEFAULT_SECRET_FILE),
        help="the cluster's shared secret, readable by its owner only (default:"
        f" P2PCAST_SECRET_FILE, else {auth.DEFAULT_SECRET_FILE})",
    )
    g.add_argument(
        "--munge-socket",
        default=env("P2PCAST_MUNGE_SOCKET", auth.DEFAULT_MUNGE_SOCKET),
        help=f"munged's socket (default: P2PCAST_MUNGE_SOCKET, else {auth.DEFAULT_MUNGE_SOCKET})",
    )


def _origin_args(p: argparse.ArgumentParser) -> None:
    """Settings of S3 and RADOS origins (see origin_config; keys only from the environment)."""
    env = os.environ.get
    g = p.add_argument_group("S3 and RADOS origins")
    g.add_argument(
        "--s3-endpoint",
        action="append",
        metavar="URL",
        help="an RGW endpoint, e.g. http://rgw1:7480; repeat for failover"
        " (default: P2PCAST_S3_ENDPOINTS, comma-separated, else AWS_ENDPOINT_URL)",
    )
    g.add_argument("--s3-profile", default=env("P2PCAST_S3_PROFILE"), help="AWS profile")
    g.add_argument("--s3-region", default=env("P2PCAST_S3_REGION"))
    g.add_argument(
        "--rados-conf", default=env("P2PCAST_RADOS_CONF"), help="ceph.conf (default: CEPH_CONF)"
    )
    g.add_argument(
        "--rados-id", default=env("P2PCAST_RADOS_ID"), help="cephx user (default: admin)"
    )
    g.add_argument("--rados-keyring", default=env("P2PCAST_RADOS_KEYRING"))


def _guard(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return func(args)
    except P2PCastError as exc:
        print(f"p2pcast: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("p2pcast: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _guard(args.func, args)


def daemon_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2pcastd", description="The p2pcast node daemon.")
    _daemon_args(parser)
    args = parser.parse_args(argv)
    return _guard(cmd_daemon, args)


if __name__ == "__main__":
    sys.exit(main())
