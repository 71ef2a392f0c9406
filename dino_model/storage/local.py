"""Local-disk object store: plain paths and ``file://`` URIs.

Atomic writes go to a hidden temp file in the destination folder (same filesystem) and are renamed into place
with :func:`os.replace`, so a reader sees either the old object, the new one, or none — never half of one. The
temp file is created with mode ``0o666`` filtered by the process umask, as ``open(path, "wb")`` would: shards,
manifests, checkpoints and exports stay readable by the other users, containers and pods the umask allows
(``tempfile.mkstemp`` would make every object ``0600``, readable by its writer only).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterator

from .base import ObjectInfo, ObjectNotFound, ObjectStore, StorageError, clean_key

#: Prefix of in-progress temp files; listing skips them.
TEMP_PREFIX = ".tmp-"
# O_EXCL: never reuse an existing file; O_NOFOLLOW: never write through a link planted at the temp name.
_TEMP_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))


def create_temp_file(folder: Path, name: str) -> tuple[int, str]:
    """A new hidden temp file ``<TEMP_PREFIX><name>.<random>`` in ``folder``: (fd, path). Its mode is ``0o666``
    less the umask, exactly as ``open`` gives a new file (the kernel applies the umask, so no thread ever changes
    the process's umask to read it)."""
    for _ in range(100):
        path = os.path.join(folder, f"{TEMP_PREFIX}{name}.{secrets.token_hex(6)}")
        try:
            return os.open(path, _TEMP_FLAGS, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name for {name!r} in {folder}")


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
            fd, tmp = create_temp_file(path.parent, path.name)
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
