"""Deterministic random generators derived from names, so randomness can be *recomputed* instead of checkpointed.

Shuffle buffers live in data-loader worker processes and their state cannot be saved, so exact resume works the
other way round: every random choice the data path makes is a pure function of a few integers and strings —

* the shard order of an epoch:          ``derive_seed(seed, "shards", epoch)``
* a reader's shuffle buffer:            ``derive_seed(seed, "buffer", epoch, rank, worker)``
* one sample's augmentation parameters: :func:`sample_generator` ``(seed, epoch, key)``

The parts are hashed with BLAKE2b (stable across processes, machines and Python versions — unlike ``hash()``,
which is salted per process for strings).
"""

from __future__ import annotations

import hashlib
import random

import torch

__all__ = ["derive_seed", "python_random", "sample_generator"]


def _encode(part: object) -> bytes:
    # Type tag + length prefix: ("a", "bc") and ("ab", "c"), or 1 and "1", never hash alike.
    if isinstance(part, bool) or not isinstance(part, (int, str, bytes)):
        raise TypeError(f"seed parts must be int, str or bytes, got {type(part).__name__}: {part!r}")
    if isinstance(part, int):
        raw, tag = str(part).encode(), b"i"
    elif isinstance(part, str):
        raw, tag = part.encode("utf-8"), b"s"
    else:
        raw, tag = part, b"b"
    return tag + len(raw).to_bytes(8, "little") + raw


def derive_seed(*parts: int | str | bytes) -> int:
    """A 63-bit seed that depends on every part (order included); identical in every process and run."""
    h = hashlib.blake2b(digest_size=8, person=b"dino-rng")
    for p in parts:
        h.update(_encode(p))
    return int.from_bytes(h.digest(), "little") >> 1  # 63 bits: valid for torch, numpy and random alike


def python_random(*parts: int | str | bytes) -> random.Random:
    """A :class:`random.Random` seeded from ``parts`` (Mersenne Twister: the same stream on every platform)."""
    return random.Random(derive_seed(*parts))


def sample_generator(seed: int, epoch: int, key: str) -> torch.Generator:
    """The CPU generator that draws one sample's augmentation parameters in one epoch.

    Depends only on (seed, epoch, key) — not on the rank, the worker, the batch or the position in the shuffle —
    so a resumed run, or a run with another number of workers, draws the same crops for the same image.
    """
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, "augment", epoch, key))
    return g
