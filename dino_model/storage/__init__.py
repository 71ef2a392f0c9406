"""Object storage addressed by URI: local paths / ``file://`` and ``s3://bucket/prefix``.

    >>> store = open_store("s3://my-bucket/imagenet/train")     # or "/data/shards", "file:///data/shards"
    >>> with store.open_write("train-000000.tar") as f: ...     # atomic: visible only once complete
    >>> [o.key for o in store.list("train-")]

:func:`open_object` splits a full object URI into (store, key) — handy for checkpoints and manifests.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from .base import ObjectInfo, ObjectNotFound, ObjectStore, StorageError, clean_key
from .local import LocalStore
from .s3 import S3Store

__all__ = [
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "StorageError",
    "LocalStore",
    "S3Store",
    "clean_key",
    "open_store",
    "open_object",
]


def open_store(uri: str | os.PathLike) -> ObjectStore:
    """The store rooted at ``uri``: a local path, ``file:///abs/path`` or ``s3://bucket[/prefix]``.

    Raises :class:`ValueError` with a clear message for an unsupported scheme or a malformed URI.
    """
    uri = os.fspath(uri)
    if not uri:
        raise ValueError("storage URI is empty")
    if uri.startswith("s3://"):
        return S3Store(uri)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI must be file:///absolute/path, got {uri!r}")
        return LocalStore(unquote(parsed.path))
    scheme = urlparse(uri).scheme
    if scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise ValueError(f"unsupported storage URI scheme {scheme!r} in {uri!r}: use a local path, file:// or s3://")
    return LocalStore(uri)


def open_object(uri: str | os.PathLike) -> tuple[ObjectStore, str]:
    """Split an object URI into the store holding it and its key: ``s3://b/ckpt/last.pt`` ->
    ``(S3Store('s3://b/ckpt'), 'last.pt')``."""
    uri = os.fspath(uri).rstrip("/")
    parent, _, name = uri.rpartition("/")
    if not name or not parent or parent in ("s3:/", "file:/"):
        if uri.startswith("s3://") or uri.startswith("file://"):
            raise ValueError(f"object URI needs a key after the root: {uri!r}")
        return open_store(os.path.dirname(os.path.abspath(uri))), os.path.basename(uri)
    if parent == "s3:/" or parent.endswith(":/"):
        raise ValueError(f"object URI needs a key after the bucket: {uri!r}")
    if uri.startswith("s3://") and "/" not in uri[len("s3://") :]:
        raise ValueError(f"object URI needs a key after the bucket: {uri!r}")
    return open_store(parent), name

