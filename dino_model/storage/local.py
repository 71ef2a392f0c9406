"""Local-disk object store: plain paths and ``file://`` URIs.

Atomic writes go to a hidden temp file in the destination folder (same filesystem) and are renamed into place
with :func:`os.replace`, so a reader sees either the old object, the new one, or none — never half of one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from .base import ObjectInfo, ObjectNotFound, ObjectStore, StorageError, clean_key

#: Prefix of in-progress temp files; listing skips them.
TEMP_PREFIX = ".tmp-"


class LocalStore(ObjectStore):
    """Objects are files under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / clean_key(key)

    @contextlib.contextmanager
    def open_write(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent)
        except OSError as e:
            raise StorageError(f"cannot write under {path.parent}: {e.strerror or e}") from e
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except FileNotFoundError as e:
            raise ObjectNotFound(f"{self.url(key)} does not exist") from e
        except IsADirectoryError as e:
            raise ObjectNotFound(f"{self.url(key)} is a folder, not an object") from e

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            return
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        found.append(ObjectInfo(key, os.path.getsize(os.path.join(dirpath, name))))
        yield from sorted(found, key=lambda o: o.key)

    def size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"{self.url(key)} does not exist")
        return path.stat().st_size

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def local_path(self, key: str) -> Path:
        """The file behind ``key`` (local stores only; lets readers skip a copy)."""
        return self._path(key)
