"""Object names and tag objects shared by the object-store origins (S3, RADOS).

Both stores hold the same objects under the same names, so an image pushed
through radosgw can be read straight from the OSDs' pool and back::

    chunks/<first 2 hex>/<32 hex xxh3-128>   stored chunk bytes (content-addressed)
    manifests/by-id/<32 hex image id>        manifest file: never changes
    tags/<name path>/<tag>                   the image id it points to (hex): moves
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable

from p2pcast import manifest
from p2pcast.errors import BadImageName, ImageNotFound, OriginError
from p2pcast.manifest import ChunkRef
from p2pcast.names import ImageRef

TAG_PREFIX = "tags/"

#: A tag object holds 32 hex digits and a newline.
MAX_TAG_BYTES = 64

_TAG_BODY = re.compile(rb"[0-9a-f]{32}\n?")


def chunk_key(chunk: ChunkRef) -> str:
    return f"chunks/{chunk.key[:2]}/{chunk.key}"


def manifest_key(image_id: bytes) -> str:
    return f"manifests/by-id/{image_id.hex()}"


def tag_key(ref: ImageRef) -> str:
    # ImageRef guarantees segments without "..", empty parts or a leading "/".
    return f"{TAG_PREFIX}{ref.name}/{ref.tag}"


def tag_body(image_id: bytes) -> bytes:
    return image_id.hex().encode() + b"\n"


def tag_image_id(ref: ImageRef, url: str, body: bytes) -> bytes:
    """The image id a tag object holds; OriginError if it holds anything else."""
    if not _TAG_BODY.fullmatch(body):
        raise OriginError(f"tag {ref} at {url} holds {body[:40]!r}, not an image id")
    return bytes.fromhex(body[:32].decode())


def tag_refs(keys: Iterable[str]) -> list[ImageRef]:
    """The images that tag object names under TAG_PREFIX stand for, sorted;
    names that are not an image's (strays in a shared bucket) are skipped."""
    refs = []
    for key in keys:
        name, _, tag = key.removeprefix(TAG_PREFIX).rpartition("/")
        try:
            refs.append(ImageRef(name, tag))
        except BadImageName:
            continue  # not ours
    return sorted(refs, key=lambda r: (r.name, r.tag))


async def resolve_tags(
    refs: list[ImageRef], get_manifest: Callable[[ImageRef], Awaitable[bytes]]
) -> list[tuple[ImageRef, bytes]]:
    """(ref, image id) for every tag that still points to a manifest."""

    async def resolve(ref: ImageRef) -> tuple[ImageRef, bytes] | None:
        try:
            return ref, manifest.image_id_of(await get_manifest(ref))
        except ImageNotFound:
            return None  # untagged meanwhile

    found = await asyncio.gather(*(resolve(ref) for ref in refs))
    return [item for item in found if item is not None]
