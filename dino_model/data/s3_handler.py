"""An ``s3://`` scheme for WebDataset, streaming through boto3 (webdataset 1.0.2 ships none).

WebDataset opens every shard URL with ``webdataset.gopen.gopen``, which looks the URL's scheme up in the
``gopen_schemes`` table. :func:`register_s3_handler` adds ``s3`` there; the handler streams the object through
the project's storage layer (``dino_model.storage.open_store(...).open_read``), so the endpoint and credentials
come from the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) exactly as for every
other object the project reads, and errors name the object, never the credentials.

Importing :mod:`dino_model.data.reader` registers it, so DataLoader workers (forked or spawned) have it too::

    import webdataset as wds
    from dino_model.data.s3_handler import register_s3_handler
    register_s3_handler()
    ds = wds.WebDataset("s3://bucket/imagenet/train/train-{000000..000127}.tar", nodesplitter=...)
"""

from __future__ import annotations

import io

from ..storage import open_object

__all__ = ["gopen_s3", "register_s3_handler", "S3_READ_BUFFER"]

#: Read-ahead buffer: tarfile asks for 10 KiB at a time, one HTTP read per call would be slow.
S3_READ_BUFFER = 1 << 20


class _RawStream(io.RawIOBase):
    """Adapts a botocore ``StreamingBody`` (or any object with ``read``/``close``) to :class:`io.RawIOBase`, so
    :class:`io.BufferedReader` can read ahead in large chunks."""

    def __init__(self, body, name: str):
        self._body = body
        self.name = name

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._body.read(len(b))
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> io.BufferedReader:
    """WebDataset ``gopen`` handler: a buffered, streaming reader of the object at ``s3://bucket/key``."""
    if mode != "rb":
        # Writing shards goes through ObjectStore.open_write (atomic multipart upload), not through gopen.
        raise ValueError(f"s3:// URLs are read-only in WebDataset here (mode {mode!r}); write with dino_model.storage")
    store, key = open_object(url)
    body = store.open_read(key)  # raises ObjectNotFound / StorageError naming the URL
    return io.BufferedReader(_RawStream(body, url), buffer_size=max(bufsize, S3_READ_BUFFER))


def register_s3_handler() -> None:
    """Add the ``s3`` scheme to WebDataset's handler table (idempotent)."""
    # (``webdataset.gopen`` the attribute is the function; the module's table is imported by name.)
    from webdataset.gopen import gopen_schemes

    gopen_schemes["s3"] = gopen_s3
