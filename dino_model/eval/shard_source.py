"""Sequential reading of a shard set for evaluation: every sample exactly once, in manifest order, no remainder
dropped — unlike the training reader (:func:`dino_model.data.reader.build_loader`), which shuffles and drops the
samples that do not fill a batch on every rank.

    >>> shards = EvalShardSet("s3://bucket/imagenette/val")          # or a local folder
    >>> label_map = shards.label_map_to(EvalShardSet("s3://bucket/imagenette/train").classes)
    >>> for keys, images, labels in shards.batches(64, label_map=label_map):
    ...     ...                                  # images: list of uint8 [3, H, W] (sizes may differ)

Shards are streamed through WebDataset's tar iterators (``s3://`` through :mod:`dino_model.data.s3_handler`),
decoded with :func:`dino_model.data.reader.decode_image`. A shard holding fewer samples than its manifest entry
is an error (the evaluation set would silently shrink otherwise).

Several processes (``torchrun -m dino_model.eval.extract``) split the set with :meth:`EvalShardSet.rank_range`:
contiguous, balanced sample ranges in manifest order, so every sample is read exactly once overall and the ranks'
outputs concatenated in rank order are the single-process order.

Labels are class indices into *this* shard set's ``manifest.classes``. Train and val shard sets are written
separately, so their index spaces may differ (a class absent from val shifts every later index):
:meth:`EvalShardSet.label_map_to` maps them onto the training set's classes by class id, and refuses a val class
that the training set lacks — before any image is decoded.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from dino_model.data.label_map import label_map
from dino_model.data.reader import ShardSource, decode_image


class EvalShardSet:
    """A shard set (``manifest.json`` + tars, local or ``s3://``) read in order for evaluation.

    Raises :class:`ValueError` when the set holds no sample (an empty evaluation set) and the storage layer's
    errors when the manifest cannot be read."""

    def __init__(self, uri: str):
        self._source = ShardSource(uri)  # validates the manifest and refuses an empty set
        self.uri = self._source.uri
        self.manifest = self._source.manifest

    @property
    def classes(self) -> list[str]:
        """Class index -> class id (empty for an unlabelled set)."""
        return list(self.manifest.classes)

    @property
    def num_samples(self) -> int:
        return self._source.num_samples

    @property
    def num_shards(self) -> int:
        return len(self._source.units)

    def digest(self) -> str:
        """The shard set's identity (shard checksums + class mapping), see :meth:`Manifest.digest`."""
        return self.manifest.digest()

    def label_map_to(self, train_classes: Sequence[str]) -> np.ndarray:
        """``map[i]`` = index in ``train_classes`` of this set's class ``i``. Raises :class:`ValueError` listing
        the classes of this set that ``train_classes`` lacks, or when either set is unlabelled
        (:func:`dino_model.data.label_map.label_map`)."""
        return np.array(label_map(self.classes, train_classes, self.uri), dtype=np.int64)

    def rank_range(self, rank: int, world_size: int) -> tuple[int, int]:
        """Sample range ``[start, stop)`` (manifest order) of process ``rank`` out of ``world_size``: contiguous,
        disjoint, covering the set, sizes differing by at most one (empty when there are more ranks than
        samples). Contiguous rather than strided so each rank opens only its own shards."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        n = self.num_samples
        return n * rank // world_size, n * (rank + 1) // world_size

    def samples(
        self, shard_order: Sequence[int] | None = None, sample_range: tuple[int, int] | None = None
    ) -> Iterator[tuple[str, bytes, int]]:
        """``(key, encoded image, label)`` of every sample, shard by shard (manifest order unless
        ``shard_order`` permutes the shards), or only the samples ``[start, stop)`` of the manifest order given by
        ``sample_range`` (only the shards overlapping it are opened)."""
        if sample_range is None:
            order = range(self.num_shards) if shard_order is None else shard_order
            for index in order:
                yield from self._source.iter_unit(index)
            return
        if shard_order is not None:
            raise ValueError("shard_order and sample_range cannot be combined")
        start, stop = sample_range
        if not 0 <= start <= stop:
            raise ValueError(f"sample_range must satisfy 0 <= start <= stop, got {sample_range}")
        offset = 0
        for index, unit in enumerate(self._source.units):
            lo, hi = offset, offset + unit.samples
            offset = hi
            if hi <= start:
                continue
            if lo >= stop:
                break
            yield from self._source.iter_unit(index, max(start - lo, 0), min(stop, hi) - lo)

    def fetch(self, indices: Sequence[int]) -> dict[int, tuple[str, bytes, int]]:
        """``{index: (key, encoded image, label)}`` of the samples at ``indices`` (manifest order). Each shard
        holding one of them is read once, from its first wanted sample to its last (a tar stream cannot seek), so
        a few samples scattered over a large set cost a partial read of their shards, not of the set."""
        wanted = sorted({int(i) for i in indices})
        if wanted and not 0 <= wanted[0] <= wanted[-1] < self.num_samples:
            raise IndexError(f"sample index out of range [0, {self.num_samples}) in {wanted[0]}..{wanted[-1]}")
        out: dict[int, tuple[str, bytes, int]] = {}
        offset, pos = 0, 0
        for index, unit in enumerate(self._source.units):
            lo, hi = offset, offset + unit.samples
            offset = hi
            mine = []
            while pos < len(wanted) and wanted[pos] < hi:
                mine.append(wanted[pos])
                pos += 1
            if not mine:
                continue
            start = mine[0] - lo
            for j, sample in enumerate(self._source.iter_unit(index, start, mine[-1] - lo + 1)):
                if lo + start + j in mine:
                    out[lo + start + j] = sample
            if pos == len(wanted):
                break
        return out

    def batches(
        self,
        batch_size: int,
        label_map: np.ndarray | None = None,
        shard_order: Sequence[int] | None = None,
        sample_range: tuple[int, int] | None = None,
    ) -> Iterator[tuple[list[str], list[torch.Tensor], torch.Tensor]]:
        """``(keys, images, labels)`` batches of at most ``batch_size`` (the last one may be smaller); images are
        uint8 ``[3, H, W]``; labels go through ``label_map`` when given (unlabelled samples stay -1).
        ``shard_order`` / ``sample_range`` as in :meth:`samples`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        keys: list[str] = []
        images: list[torch.Tensor] = []
        labels: list[int] = []

        def emit():
            lab = torch.tensor(labels, dtype=torch.long)
            if label_map is not None:
                known = lab >= 0
                if bool((lab[known] >= len(label_map)).any()):
                    raise ValueError(f"a label of {self.uri} is outside its manifest's {len(label_map)} classes")
                lab[known] = torch.as_tensor(label_map)[lab[known]]
            return keys, images, lab

        for key, data, label in self.samples(shard_order, sample_range):
            keys.append(key)
            images.append(decode_image(data))
            labels.append(label)
            if len(keys) == batch_size:
                yield emit()
                keys, images, labels = [], [], []
        if keys:
            yield emit()
