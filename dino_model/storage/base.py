"""The object-store interface: "a place that holds objects", addressed by URI.

Two implementations live beside this file: :mod:`.local` (plain paths and ``file://``) and :mod:`.s3`
(``s3://bucket/prefix`` through boto3). Everything in the project that reads or writes shards, manifests,
checkpoints or features goes through this interface, so local disk and object storage behave the same.

Keys are ``/``-separated paths relative to the store's root URI. Writes are atomic: an object becomes visible
only once it is complete (a temp file renamed into place locally; a single or multipart upload that is completed
at the end on S3), so readers never see half an object and a killed writer leaves nothing behind.
"""

from __future__ import annotations

import abc
import contextlib
import posixpath
from dataclasses import dataclass
from typing import BinaryIO, Iterator


class StorageError(RuntimeError):
    """A storage operation failed in a way the caller should report (unreachable, denied, missing bucket...)."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key relative to the store root and its size in bytes."""

    key: str
    size: int


def clean_key(key: str) -> str:
    """Normalise a key and refuse anything that would escape the store's root (``..``, absolute paths)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key must be a non-empty string, got {key!r}")
    if key.startswith("/") or "\\" in key:
        raise ValueError(f"object key must be relative and '/'-separated, got {key!r}")
    norm = posixpath.normpath(key)
    if norm == "." or norm.startswith("../") or norm == ".." or "/../" in f"/{norm}/":
        raise ValueError(f"object key escapes the store root: {key!r}")
    return norm


class ObjectStore(abc.ABC):
    """A root URI under which objects are put, streamed, listed and deleted."""

    #: The store's root URI, e.g. ``file:///data/shards`` or ``s3://bucket/imagenet/train``. Never holds secrets.
    uri: str

    # -- writing -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def open_write(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A context manager yielding a writable binary file. The object appears atomically when the block
        exits without an exception; on an exception nothing is written (any partial upload is aborted)."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` atomically."""
        with self.open_write(key) as f:
            f.write(data)

    # -- reading -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A streaming, readable binary file for ``key``; raises :class:`ObjectNotFound` if it is absent."""

    def get_bytes(self, key: str) -> bytes:
        """The whole object as bytes."""
        with contextlib.closing(self.open_read(key)) as f:
            return f.read()

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order (paginated under the hood)."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size of ``key`` in bytes; raises :class:`ObjectNotFound` if it is absent."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; deleting an absent object is not an error."""

    # -- addressing ----------------------------------------------------------------------------------------
    def url(self, key: str) -> str:
        """The full URI of ``key`` (what WebDataset or another process can open)."""
        return f"{self.uri.rstrip('/')}/{clean_key(key)}"

    def child(self, prefix: str) -> "ObjectStore":
        """A store rooted at ``prefix`` under this one."""
        from . import open_store

        return open_store(self.url(prefix))

    def check_writable(self) -> None:
        """Write, read back and delete a probe object; raise :class:`StorageError` with a clear message if any
        step fails. Used by pre-flight checks so a run fails before doing any real work."""
        probe = ".write-probe"
        try:
            self.put_bytes(probe, b"ok")
            if self.get_bytes(probe) != b"ok":
                raise StorageError(f"{self.uri}: wrote a probe object but read back different bytes")
            self.delete(probe)
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with the URI and the cause, never credentials
            raise StorageError(f"destination {self.uri} is not writable: {type(e).__name__}: {e}") from e

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
