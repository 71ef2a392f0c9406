"""S3 object store (AWS or any S3-compatible server such as SeaweedFS) through boto3.

Endpoint and credentials come from the standard AWS sources — ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles — and are never stored on the
object, printed or put in error messages. Writes are spooled to a local temp file and uploaded when the ``with``
block ends (a single PUT, or a multipart upload completed at the end for large objects), so an object is
visible only when complete; an exception aborts the upload.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
from typing import BinaryIO, Iterator

from .base import ObjectInfo, ObjectNotFound, ObjectStore, StorageError, clean_key

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}

_local = threading.local()


def endpoint_url() -> str | None:
    """The custom S3 endpoint from the environment, if any (SeaweedFS, MinIO, ...)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client():
    """A boto3 S3 client for this process and thread (clients are not fork-safe, so one is made per PID)."""
    # The cache key changes when the environment's credentials do (kept only as a hash, never in clear).
    creds = hash(tuple(os.environ.get(v) for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")))
    key = (os.getpid(), endpoint_url(), creds)
    cached = getattr(_local, "clients", {})
    if key not in cached:
        import boto3
        from botocore.config import Config

        endpoint = endpoint_url()
        config = Config(
            retries={"max_attempts": 8, "mode": "adaptive"},  # transient errors and throttling are retried
            s3={"addressing_style": "path"} if endpoint else {},  # custom endpoints rarely do virtual hosts
            connect_timeout=10,
            read_timeout=120,
        )
        session = boto3.session.Session()
        cached[key] = session.client("s3", endpoint_url=endpoint, config=config)
        _local.clients = cached
    return cached[key]


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r} (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def translate_error(exc: Exception, what: str) -> Exception:
    """Turn a botocore exception into a :class:`StorageError` with a message that names the object (and never
    the credentials)."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code in _NOT_FOUND:
            return ObjectNotFound(f"{what} does not exist")
        if code == "NoSuchBucket":
            return StorageError(f"{what}: the bucket does not exist")
        if code in _DENIED:
            return StorageError(f"{what}: access denied ({code}); check the AWS credentials in the environment")
        return StorageError(f"{what}: S3 error {code}")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{what}: cannot reach the S3 endpoint {endpoint_url() or '(AWS default)'}")
    if isinstance(exc, BotoCoreError):
        return StorageError(f"{what}: {type(exc).__name__}")
    return exc


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix``."""

    def __init__(self, uri: str):
        self.bucket, self.prefix = split_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def _key(self, key: str) -> str:
        key = clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def client(self):
        return s3_client()

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[BinaryIO]:
        from boto3.s3.transfer import TransferConfig

        full = self._key(key)
        with tempfile.SpooledTemporaryFile(max_size=32 << 20) as buf:
            yield buf  # an exception here skips the upload: nothing becomes visible
            buf.seek(0)
            try:
                # upload_fileobj switches to multipart above the threshold and completes it only at the end
                # (or aborts it on failure), so the object is never visible half-written.
                self.client.upload_fileobj(
                    buf, self.bucket, full, Config=TransferConfig(multipart_threshold=64 << 20, use_threads=False)
                )
            except Exception as e:  # noqa: BLE001
                raise translate_error(e, self.url(key)) from e

    def open_read(self, key: str) -> BinaryIO:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except Exception as e:  # noqa: BLE001
            raise translate_error(e, self.url(key)) from e

    def open_ranged(self, key: str, block_size: int = 64 << 10) -> io.BufferedReader:
        """A seekable reader of one object that fetches only what is read, ``block_size`` bytes per GET with a
        ``Range`` header. For formats with an index, such as a zip's central directory: reading a checkpoint's
        config this way fetches a few hundred kB of an object of hundreds of MB. ``reader.raw.fetched`` counts the
        bytes fetched."""
        return io.BufferedReader(RangedObject(self, key, self.size(key)), buffer_size=block_size)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of ``key`` from offset ``start`` (fewer at the object's end) in one GET."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                          Range=f"bytes={start}-{start + length - 1}")["Body"]
            with contextlib.closing(body):
                return body.read()
        except Exception as e:  # noqa: BLE001
            raise translate_error(e, self.url(key)) from e

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][len(root) :], int(obj["Size"]))
        except Exception as e:  # noqa: BLE001
            raise translate_error(e, f"s3://{self.bucket}/{root}{prefix}") from e

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except Exception as e:  # noqa: BLE001
            raise translate_error(e, self.url(key)) from e

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:  # noqa: BLE001
            err = translate_error(e, self.url(key))
            if not isinstance(err, ObjectNotFound):
                raise err from e

    def incomplete_uploads(self, prefix: str = "") -> list[tuple[str, str]]:
        """(key, upload id) of every multipart upload under ``prefix`` that was started and neither completed nor
        aborted: what a writer killed during an upload leaves (its parts stay stored, and billed, until an
        abort)."""
        root = f"{self.prefix}/" if self.prefix else ""
        found = []
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=self.bucket, Prefix=root + prefix):
                found += [(u["Key"][len(root):], u["UploadId"]) for u in page.get("Uploads", [])]
        except Exception as e:  # noqa: BLE001
            raise translate_error(e, f"s3://{self.bucket}/{root}{prefix}") from e
        return found

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort one incomplete multipart upload of ``key``, freeing its parts."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id)
        except Exception as e:  # noqa: BLE001
            raise translate_error(e, self.url(key)) from e

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (used by the demo stack and tests; production buckets are
        usually made by the operator)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception:  # noqa: BLE001
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except Exception as e:  # noqa: BLE001
                raise translate_error(e, f"s3://{self.bucket}") from e


class RangedObject(io.RawIOBase):
    """The raw, seekable side of :meth:`S3Store.open_ranged`: each ``readinto`` is one ranged GET from the current
    position (wrap it in an ``io.BufferedReader`` so small reads are batched)."""

    def __init__(self, store: S3Store, key: str, size: int):
        super().__init__()
        self.store, self.key, self.size = store, key, size
        self.position = 0
        #: bytes fetched from the server so far
        self.fetched = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset} in {self.store.url(self.key)}")
        self.position = base + offset
        return self.position

    def readinto(self, buffer) -> int:
        length = min(len(buffer), self.size - self.position)
        if length <= 0:
            return 0
        data = self.store.read_range(self.key, self.position, length)
        if not data:
            raise StorageError(f"{self.store.url(self.key)}: the server returned no bytes at offset "
                               f"{self.position} of {self.size} (was the object replaced while being read?)")
        n = len(data)
        memoryview(buffer)[:n] = data
        self.position += n
        self.fetched += n
        return n
