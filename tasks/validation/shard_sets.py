"""A shard set as the checks see it: its manifest read and its shards listed, without decoding an image (and
without torch or WebDataset, so the ``dino`` command can check one before starting anything heavy)."""

from __future__ import annotations

import contextlib
import json
import tarfile
from dataclasses import dataclass

from dino_model.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from dino_model.storage import ObjectNotFound, ObjectStore, StorageError, open_store


@dataclass
class ShardSet:
    """An opened shard set: where it is and what its manifest says."""

    store: ObjectStore
    manifest: Manifest

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.classes)


def open_shard_set(uri: str) -> ShardSet:
    """The shard set at ``uri`` (local path, ``file://`` or ``s3://``). Raises :class:`ValueError` when the URI is
    malformed, when there is no ``manifest.json`` (not a shard set) or when it lists no sample, and
    :class:`~dino_model.storage.StorageError` when the storage cannot be read."""
    return load_shard_set(open_store(uri), uri)


def load_shard_set(store: ObjectStore, uri: str) -> ShardSet:
    """:func:`open_shard_set` of a store already open (``uri``: how the caller named it, for the messages)."""
    try:
        manifest = load_manifest(store)
    except ObjectNotFound as e:
        raise ValueError(f"{uri} holds no {MANIFEST_NAME}, so it is not a shard set: write one with "
                         f"`dino shard IMAGES {uri}`") from e
    if not any(s.samples > 0 for s in manifest.shards):
        raise ValueError(f"shard set {store.uri} holds no samples (its manifest lists no non-empty shard)")
    return ShardSet(store, manifest)


def shard_problems(shards: ShardSet) -> list[str]:
    """Shards the manifest lists that are missing or whose size differs from the manifest's (one listing call)."""
    try:
        sizes = {o.key: o.size for o in shards.store.list(shards.manifest.name)}
    except StorageError as e:
        return [f"{shards.uri} cannot be listed: {e}"]
    problems = []
    for shard in shards.manifest.shards:
        if shard.name not in sizes:
            problems.append(f"shard {shards.store.url(shard.name)} listed in the manifest is missing")
        elif sizes[shard.name] != shard.bytes:
            problems.append(f"shard {shards.store.url(shard.name)} has {sizes[shard.name]} bytes, the manifest says "
                            f"{shard.bytes}")
    return problems


def first_image_size(shards: ShardSet) -> tuple[int, int] | None:
    """(width, height) of the first sample of the first non-empty shard, from its ``.json`` member (reads the
    start of one tar only); None when it cannot be told."""
    shard = next((s for s in shards.manifest.shards if s.samples > 0), None)
    if shard is None:
        return None
    try:
        stream = shards.store.open_read(shard.name)
        with contextlib.closing(stream), tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    return int(meta["width"]), int(meta["height"])
    except (OSError, StorageError, tarfile.TarError, ValueError, KeyError, TypeError):
        return None
    return None
