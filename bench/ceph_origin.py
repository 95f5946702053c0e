"""Ceph as the cluster benchmark's origin (``cluster_bench --origin ceph``).

A real single-node Ceph (tools/ceph.py: a monitor, 3 memstore OSDs, radosgw)
runs on the host for the whole invocation. The image is pushed to a bucket in
p2pcast's layout (chunk objects, manifest, tag) and, for the status quo, also
as one plain object that every node GETs whole with curl (signed with SigV4,
as any S3 client would). Each cluster of the run reaches Ceph through its
bridge, and what the host sends into the bridge is shaped to the origin's
rate (``Cluster.shape_host``), so that Ceph stands where the HTTP origin's
namespace stands with the directory origin: one link of --origin-rate.

What Ceph served is read from its own perf counters around each run: radosgw's
GET bytes (``rgw get_b``) and each OSD's client read bytes (``op_out_bytes``);
the host's bytes into the bridge are the origin's wire bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any, BinaryIO

from p2pcast.manifest import Manifest
from p2pcast.names import ImageRef
from p2pcast.origins.base import OriginConfig, open_origin
from p2pcast.publish import push
from tools import ceph as ceph_tool
from tools.ceph import Ceph
from tools.cluster import Cluster

#: The bucket the benchmark pushes to, and the key of the whole image in it.
BUCKET = "p2pcast-bench"
RAW_KEY = "raw/image.tar"
#: Instance name: apart from a developer's default one and the tests' t<pid>.
CEPH_NAME = "cbench"
#: OSDs: three, so that the chunk reads spread as they would over a real pool.
OSDS = 3
#: SigV4 for curl: RGW accepts any region name in the signature's scope, and
#: it needs the payload hash header, which curl 7.88 does not add itself.
SIGV4 = "aws:amz:us-east-1:s3"
UNSIGNED_PAYLOAD = "x-amz-content-sha256: UNSIGNED-PAYLOAD"


@dataclasses.dataclass(frozen=True)
class Counters:
    """Ceph's read counters at one moment (cumulative since each daemon started)."""

    rgw_gets: int
    rgw_get_bytes: int
    osd_read_bytes: dict[int, int]

    def minus(self, before: Counters) -> dict[str, Any]:
        per_osd = {
            str(osd): n - before.osd_read_bytes.get(osd, 0)
            for osd, n in sorted(self.osd_read_bytes.items())
        }
        return {
            "rgw_gets": self.rgw_gets - before.rgw_gets,
            "rgw_get_bytes": self.rgw_get_bytes - before.rgw_get_bytes,
            "osd_read_bytes": sum(per_osd.values()),
            "osd_read_bytes_per_osd": per_osd,
        }


class CephOrigin:
    """The running instance, the bucket and how each method reaches it."""

    def __init__(self, ceph: Ceph, owned: bool = True, raw_key: str = RAW_KEY) -> None:
        self.ceph = ceph
        self.owned = owned  # started for this run: `down` stops it
        self.endpoint = ceph.endpoint
        self.url = f"s3://{BUCKET}"
        self.raw_key = raw_key
        self.raw_url = f"{self.endpoint}/{BUCKET}/{raw_key}"

    @classmethod
    def up(cls, instance: str | None = None, raw_key: str = RAW_KEY) -> CephOrigin:
        """Start the benchmark's own instance, or use the running INSTANCE (left running);
        RAW_KEY names the object that holds the whole image."""
        if instance is not None:
            return cls(Ceph.attach(instance), owned=False, raw_key=raw_key)
        return cls(Ceph.up(OSDS, name=CEPH_NAME, address="auto"), raw_key=raw_key)

    def down(self) -> list[int]:
        """Stop the instance if this run started it; the PIDs that would not die."""
        return self.ceph.down() if self.owned else []

    def config(self) -> OriginConfig:
        return OriginConfig(
            s3_endpoints=(self.endpoint,),
            s3_access_key=self.ceph.access_key,
            s3_secret_key=self.ceph.secret_key,
        )

    def publish(self, image: Path, ref: ImageRef, chunk_size: int | None) -> Manifest:
        """Push IMAGE as REF in p2pcast's layout, then the same file as one object."""

        async def run(body: BinaryIO) -> Manifest:
            async with open_origin(self.url, self.config()) as origin:
                manifest = (await push(str(image), origin, ref, chunk_size=chunk_size)).manifest
            from aiobotocore.session import get_session

            async with get_session().create_client(
                "s3",
                endpoint_url=self.endpoint,
                region_name="us-east-1",
                aws_access_key_id=self.ceph.access_key,
                aws_secret_access_key=self.ceph.secret_key,
            ) as client:
                await client.put_object(Bucket=BUCKET, Key=self.raw_key, Body=body)
            return manifest

        with open(image, "rb") as body:
            return asyncio.run(run(body))

    def attach(self, cluster: Cluster, rate_bit: int) -> None:
        """Give CLUSTER's nodes and origin a route to Ceph, at RATE_BIT in total."""
        for host in cluster.hosts.values():
            ceph_tool.route_from(host.namespace, cluster.bridge_address)
        cluster.shape_host(rate_bit)

    def daemon_env(self) -> dict[str, str]:
        """What a p2pcast daemon needs besides --origin s3://BUCKET: keys stay out of argv."""
        return {
            "P2PCAST_S3_ENDPOINTS": self.endpoint,
            "P2PCAST_S3_ACCESS_KEY_ID": self.ceph.access_key,
            "P2PCAST_S3_SECRET_ACCESS_KEY": self.ceph.secret_key,
        }

    def curl_args(self) -> list[str]:
        """curl options and URL for a signed GET of the whole image."""
        user = f"{self.ceph.access_key}:{self.ceph.secret_key}"
        return ["--aws-sigv4", SIGV4, "--user", user, "-H", UNSIGNED_PAYLOAD, self.raw_url]

    def counters(self) -> Counters:
        gets, get_bytes = self.ceph.rgw_reads()
        osds = {osd: out for osd, (_ops, out) in self.ceph.osd_reads().items()}
        return Counters(gets, get_bytes, osds)

    def pids(self) -> list[int]:
        """Ceph's daemons (their CPU belongs to the origin's share of a run)."""
        return list(self.ceph.pids().values())
