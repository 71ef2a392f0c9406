"""An ImageFolder tree (``root/<class>/**/<image>``) as a training source, without sharding it first.

:func:`dino_model.data.reader.build_loader` accepts such a folder wherever it accepts a shard set and gives the
same guarantees (epoch order from (seed, epoch), equal batches per rank, exact resume). Each image file is one
*unit* of one sample — where a shard set's unit is a tar of many — so the epoch permutation is a full shuffle of
the files and no shuffle buffer is needed. Classes are the sorted top-level folder names, indexed as torchvision's
``ImageFolder`` does; files directly under the root and hidden files or folders are ignored.

The folder may be local, ``file://`` or ``s3://`` (listed once through :mod:`dino_model.storage`). For large
datasets shards are faster: one sequential read per thousand images instead of one request per image.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Iterator

from ..storage import ObjectStore, open_store

__all__ = ["IMG_EXTENSIONS", "Unit", "ImageFolderSource"]

#: Extensions torchvision's ImageFolder accepts (compared case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Unit:
    """The smallest piece a reader opens: a shard (many samples) or an image file (one)."""

    name: str  #: object key relative to the source's root
    samples: int  #: how many samples it holds


class ImageFolderSource:
    """Image files under ``<class>/`` folders of a store; ``iter_unit`` yields ``(key, encoded_bytes, label)``."""

    kind = "imagefolder"
    #: Units are single files, already fully permuted per epoch: a shuffle buffer would add nothing.
    needs_shuffle_buffer = False

    def __init__(self, root: str | ObjectStore):
        self.store = open_store(root) if isinstance(root, str) else root
        self.uri = self.store.uri
        keys = sorted(o.key for o in self.store.list() if self._is_image_key(o.key))
        if not keys:
            raise ValueError(
                f"{self.uri} is neither a shard set (no manifest.json) nor an ImageFolder "
                f"(no images in <class>/ folders with extensions {', '.join(IMG_EXTENSIONS)})"
            )
        self.classes: list[str] = sorted({k.split("/", 1)[0] for k in keys})
        index = {c: i for i, c in enumerate(self.classes)}
        self.units: list[Unit] = [Unit(k, 1) for k in keys]
        self.labels: list[int] = [index[k.split("/", 1)[0]] for k in keys]

    @staticmethod
    def _is_image_key(key: str) -> bool:
        parts = key.split("/")
        if len(parts) < 2 or any(p.startswith(".") for p in parts):
            return False
        return posixpath.splitext(key)[1].lower() in IMG_EXTENSIONS

    @property
    def num_samples(self) -> int:
        return len(self.units)

    def iter_unit(self, index: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, bytes, int]]:
        """The samples ``[start, stop)`` of unit ``index`` (here: the file itself, or nothing)."""
        stop = 1 if stop is None else stop
        if start <= 0 < stop:
            key = self.units[index].name
            # The relative path is the sample's identity (augmentation seeds derive from it): stable across runs.
            yield key, self.store.get_bytes(key), self.labels[index]

    def describe(self) -> str:
        return f"ImageFolder {self.uri} ({len(self.units)} images, {len(self.classes)} classes)"
