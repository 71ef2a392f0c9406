"""The shard set's manifest: the contract between the shard writer and every reader.

``manifest.json`` sits beside the shards at the destination URI. It records, per shard, the sample count, byte
size and sha256 (so a re-run can skip finished shards and a reader can check what it reads); the class-index
mapping; the inputs and options that produced the set; totals; and every rejected input with its reason.

``inputs`` holds absolute paths or URIs only (``root``, ``labels``, ``meta``, ``classes``, ``classes_from``), so
the manifest still says what was read when it is opened from another folder or machine, plus:

* ``class_map``: where the class-index mapping came from — ``{"source", "path", "classes", "sha256"}``, with
  ``source`` one of :data:`CLASS_MAP_SOURCES` and ``sha256`` = :func:`class_map_sha256` of ``classes`` (the
  sha256 of a text file listing the class ids one per line, so ``sha256sum classes.txt`` can be compared);
  ``None`` for unlabelled data. Two shard sets index their classes alike exactly when these hashes match.
* ``warnings``: what the writer warned about (e.g. a class map derived from a partial label file).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..storage import ObjectStore, open_store

MANIFEST_NAME = "manifest.json"
FORMAT = "dino-shards/1"
#: Where a shard set's class map can come from: an explicit ``classes`` file, another shard set's manifest
#: (``classes_from``), the ILSVRC devkit's ``meta.mat``, the ``LOC_synset_mapping.txt`` beside the val labels,
#: the class folders (ImageFolder) or per-class archives (ILSVRC train tar), or — the one that can silently differ
#: from train's — the classes present in the val label file itself.
CLASS_MAP_SOURCES = ("classes-file", "shard-set", "devkit-meta", "synset-mapping", "folders", "class-archives",
                     "labels")


def class_map_sha256(classes: list[str]) -> str:
    """The class map's identity: sha256 of the class ids, one per line in index order (each line ends in
    ``\n``)."""
    return hashlib.sha256("".join(f"{c}\n" for c in classes).encode()).hexdigest()


@dataclass
class ShardEntry:
    """One written shard."""

    name: str  #: object key of the tar relative to the destination, e.g. ``train-000003.tar``
    samples: int  #: number of samples (images) in the tar
    bytes: int  #: size of the tar in bytes
    sha256: str  #: hex digest of the tar's bytes
    reencoded: int = 0  #: how many of its samples were re-encoded to JPEG
    #: digest of the shard's planned inputs and of the options that shape its bytes; a re-run skips the shard
    #: when this and the object's sha256 still match
    plan: str = ""


@dataclass
class Reject:
    """One input that was skipped, and why."""

    path: str
    reason: str


@dataclass
class Manifest:
    """Everything a reader or a re-run needs to know about a shard set."""

    name: str  #: shard name prefix
    shards: list[ShardEntry] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  #: class index -> class id (e.g. WNID); empty if unlabelled
    class_names: dict[str, str] = field(default_factory=dict)  #: class id -> human name, when known
    totals: dict[str, int] = field(default_factory=dict)  #: found, accepted, rejected, reencoded, samples, bytes
    rejects: list[Reject] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)  #: source kind, root, label file...
    options: dict[str, Any] = field(default_factory=dict)  #: shard size, seed, JPEG quality, ...
    format: str = FORMAT
    created: str = ""  #: ISO-8601 UTC time of the run that wrote it

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def classes_sha256(self) -> str | None:
        """:func:`class_map_sha256` of ``classes`` (None when unlabelled)."""
        return class_map_sha256(self.classes) if self.classes else None

    @property
    def warnings(self) -> list[str]:
        return list(self.inputs.get("warnings") or [])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("format") != FORMAT:
            raise ValueError(f"unsupported manifest format {d.get('format')!r} (expected {FORMAT!r})")
        d = dict(d)
        d["shards"] = [ShardEntry(**s) for s in d.get("shards", [])]
        d["rejects"] = [Reject(**r) for r in d.get("rejects", [])]
        return cls(**d)

    def digest(self) -> str:
        """A stable hash of the data (shard checksums + class mapping): the dataset's identity for tracking."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.name}:{s.samples}:{s.sha256}\n".encode())
        h.update(json.dumps(self.classes).encode())
        return h.hexdigest()


def load_manifest(uri_or_store: str | ObjectStore) -> Manifest:
    """Read ``manifest.json`` from a shard set's URI (local path, ``file://`` or ``s3://``)."""
    store = open_store(uri_or_store) if isinstance(uri_or_store, str) else uri_or_store
    raw = store.get_bytes(MANIFEST_NAME)
    try:
        return Manifest.from_dict(json.loads(raw))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{store.url(MANIFEST_NAME)} is not a valid shard manifest: {e}") from e


def save_manifest(store: ObjectStore, manifest: Manifest) -> None:
    """Write ``manifest.json`` atomically."""
    store.put_bytes(MANIFEST_NAME, manifest.to_json().encode())
