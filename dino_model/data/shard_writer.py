"""Write a scanned dataset as WebDataset tar shards plus ``manifest.json`` (plain Python, no Prefect).

The steps, each usable on its own (the ``dino-shard`` Prefect flow runs them as tasks, one task per shard):

1. :func:`plan_shards` — sort the candidates by key, shuffle them with ``seed`` (so every shard mixes classes)
   and cut the order into shard ranges by count and/or input bytes. Each range gets a *plan digest*: a hash of
   its inputs (key, source, label, size, mtime) and of every option that changes the bytes written.
2. :func:`write_shard` — read, validate and (if needed) re-encode each image of one range and stream a tar to the
   store through ``ObjectStore.open_write`` (atomic), hashing and counting as it goes. Tar headers are fixed
   (mtime, uid/gid, names, mode), so the same inputs and options give byte-identical shards. A shard whose
   previous record (manifest entry or progress record) has the same plan digest, and whose object still has the
   recorded size and sha256, is skipped: re-runs are idempotent and a killed run resumes where it stopped.
   After each shard a small progress record ``_progress/<shard>.json`` is written, since the manifest only
   appears at the end.
3. :func:`build_manifest` / :func:`finish` — gather entries and rejects in plan order, write ``manifest.json``
   only if it changed, then remove progress records and stale shards of an earlier, larger plan.

    >>> scan = scan_source(SourceSpec("/data/imagenette-128/train"))
    >>> summary = write_dataset(scan, "s3://bucket/imagenette/train", ShardOptions(name="train"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import BinaryIO, Callable, Iterable, Sequence

from ..storage import ObjectNotFound, ObjectStore, open_store
from .images import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, UNREADABLE, ImageOptions, prepare_image
from .manifest import FORMAT, MANIFEST_NAME, Manifest, Reject, ShardEntry, save_manifest
from .sources import Scan, SourceItem, SourceSpec, check_source, require_an_image_file

#: Bumped when the bytes a shard holds for the same inputs change (member layout, json fields...): old shards are
#: then rewritten rather than skipped.
WRITER_VERSION = "1"
PROGRESS_DIR = "_progress"
#: Fixed tar header values: shards depend only on their inputs and options, never on when or by whom written.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

ProgressFn = Callable[[int], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardOptions:
    """How a dataset is cut into shards and how its images are encoded."""

    name: str = "train"  #: shard name prefix: shards are ``<name>-000000.tar``... (letters, digits, ``_``, ``-``)
    shard_size: int | None = 1000  #: at most this many samples per shard (None: no count limit)
    shard_bytes: int | None = None  #: close a shard once its inputs reach this many bytes (None: no byte limit)
    seed: int = 0  #: seed of the global shuffle that mixes classes across shards
    quality: int = DEFAULT_QUALITY  #: JPEG quality for images that must be re-encoded
    max_pixels: int = DEFAULT_MAX_PIXELS  #: larger images are rejected as decompression bombs

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME_OK.match(self.name):
            raise ValueError(f"name must be letters, digits, '_' or '-' (no dots, no slashes), got {self.name!r}")
        if self.shard_size is not None and (not isinstance(self.shard_size, int) or self.shard_size < 1):
            raise ValueError(f"shard_size must be a positive integer or None, got {self.shard_size!r}")
        if self.shard_bytes is not None and (not isinstance(self.shard_bytes, int) or self.shard_bytes < 1):
            raise ValueError(f"shard_bytes must be a positive integer or None, got {self.shard_bytes!r}")
        if self.shard_size is None and self.shard_bytes is None:
            raise ValueError("set shard_size or shard_bytes (or both)")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        ImageOptions(self.quality, self.max_pixels)  # validates quality and max_pixels with clear messages

    @property
    def image_options(self) -> ImageOptions:
        return ImageOptions(self.quality, self.max_pixels)

    def shard_name(self, index: int) -> str:
        return f"{self.name}-{index:06d}.tar"


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: its index, object name, items in write order, and plan digest."""

    index: int
    name: str
    items: tuple[SourceItem, ...]
    digest: str


@dataclass
class ShardOutcome:
    """What writing (or skipping) one shard produced."""

    entry: ShardEntry
    rejects: list[Reject] = field(default_factory=list)
    written: bool = True  #: False when an identical shard was already there


@dataclass
class ShardSummary:
    """The result of one run (the flow's return value)."""

    destination: str
    manifest: str  #: URI of manifest.json
    shards: int
    written: int  #: shards written by this run
    skipped: int  #: shards already present and verified
    found: int
    accepted: int
    rejected: int
    reencoded: int
    bytes: int
    manifest_written: bool
    #: what the scan warned about (e.g. val class indices derived from a partial label file); also in the manifest
    warnings: list[str] = field(default_factory=list)


def default_name(source: str) -> str:
    """The default shard name for a source: ``.../imagenette-128/train`` -> ``train``; ``ILSVRC2012_img_val.tar``
    -> ``ILSVRC2012_img_val``."""
    base = os.path.basename(os.path.normpath(source))
    base = base[: -len(".tar")] if base.endswith(".tar") else base
    return re.sub(r"[^A-Za-z0-9_-]+", "_", base).strip("_") or "shard"


def validate_request(spec: SourceSpec, destination: str, options: ShardOptions) -> ObjectStore:
    """The cheap whole-input checks, before anything is read in bulk or written: the destination URI parses, the
    source root and label files exist, a source folder holds at least one image file. (Options validate themselves
    on construction; writability and what the scan accepts are checked next by the caller.) Returns the
    destination store."""
    if not isinstance(options, ShardOptions):
        raise TypeError(f"options must be ShardOptions, got {type(options).__name__}")
    store = open_store(destination)  # ValueError naming the URI when malformed or unsupported
    check_source(spec)
    require_an_image_file(spec)
    return store


# --------------------------------------------------------------------------------------------------------------
# planning


def _labels(classes: Sequence[str], class_names: dict[str, str], label: int) -> tuple[str | None, str | None]:
    if label < 0:
        return None, None
    class_id = classes[label]
    return class_id, class_names.get(class_id)


def plan_shards(
    items: Sequence[SourceItem], options: ShardOptions, classes: Sequence[str] = (), class_names: dict | None = None
) -> list[ShardPlan]:
    """Shuffle ``items`` (sorted by key first, so the result does not depend on listing order) and cut them into
    shard ranges of at most ``shard_size`` samples / about ``shard_bytes`` input bytes."""
    class_names = class_names or {}
    order = sorted(items, key=lambda it: it.key)
    random.Random(options.seed).shuffle(order)
    ranges: list[list[SourceItem]] = []
    current: list[SourceItem] = []
    current_bytes = 0
    for it in order:
        full_count = options.shard_size is not None and len(current) >= options.shard_size
        full_bytes = options.shard_bytes is not None and current and current_bytes + it.size > options.shard_bytes
        if full_count or full_bytes:
            ranges.append(current)
            current, current_bytes = [], 0
        current.append(it)
        current_bytes += it.size
    if current:
        ranges.append(current)
    content = f"{WRITER_VERSION}|{options.quality}|{options.max_pixels}|{options.name}"
    plans = []
    for index, chunk in enumerate(ranges):
        h = hashlib.sha256(f"{content}|{index}\n".encode())
        for it in chunk:
            class_id, class_name = _labels(classes, class_names, it.label)
            h.update(f"{it.key}\t{it.source}\t{it.label}\t{class_id}\t{class_name}\t{it.size}\t{it.mtime}\n".encode())
        plans.append(ShardPlan(index, options.shard_name(index), tuple(chunk), h.hexdigest()))
    return plans


# --------------------------------------------------------------------------------------------------------------
# writing one shard


class _HashingWriter:
    """A write-only file that forwards to ``raw`` while computing sha256 and the byte count."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.count += len(data)
        self.raw.write(data)
        return len(data)

    def tell(self) -> int:
        return self.count

    def flush(self) -> None:
        """Nothing is buffered here; ``raw`` is flushed and closed by the store that opened it."""


_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar's record size: archives end padded to a multiple of it, as tar and tarfile do


class TarStream:
    """A minimal, fast writer of ustar members with fixed headers (mtime, mode, uid/gid, empty owner names).

    Python's ``tarfile`` spends ~100 µs building each header; with three members per image that was the writer's
    biggest cost after JPEG decoding. Names longer than ustar's 100 bytes go through ``tarfile``'s PAX headers.
    """

    def __init__(self, out, flush_bytes: int = 1 << 20):
        self.out = out
        self.written = 0
        self.flush_bytes = flush_bytes
        self._buf = bytearray()  # members are batched: one write (and one hash update) per ~1 MiB

    def _write(self, data: bytes) -> None:
        self._buf += data
        self.written += len(data)
        if len(self._buf) >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self.out.write(bytes(self._buf))
            self._buf.clear()

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("ascii")
        if len(raw) > 100:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data), TAR_MTIME, 0o644, 0, 0, "", "")
            header = info.tobuf(tarfile.PAX_FORMAT, "ascii", "surrogateescape")
        else:
            header = bytearray(_HEADER_TEMPLATE)
            header[0 : len(raw)] = raw
            header[124:136] = b"%011o\0" % len(data)
            header[148:156] = b"%06o\0 " % sum(header)
        self._write(header)
        self._write(data)
        if len(data) % _BLOCK:
            self._write(bytes(_BLOCK - len(data) % _BLOCK))

    def close(self) -> None:
        self._write(bytes(2 * _BLOCK))
        if self.written % _RECORD:
            self._write(bytes(_RECORD - self.written % _RECORD))
        self.flush()


def _header_template() -> bytes:
    h = bytearray(_BLOCK)
    h[100:108] = b"0000644\0"  # mode
    h[108:116] = b"0000000\0"  # uid
    h[116:124] = b"0000000\0"  # gid
    h[136:148] = b"%011o\0" % TAR_MTIME
    h[148:156] = b" " * 8  # checksum is computed with this field as spaces
    h[156:157] = tarfile.REGTYPE
    h[257:265] = b"ustar\x0000"
    h[329:337] = b"0000000\0"  # devmajor
    h[337:345] = b"0000000\0"  # devminor
    return bytes(h)


_HEADER_TEMPLATE = _header_template()


def sample_json(class_id, class_name, source: str, width: int, height: int, reencoded: bool, quality) -> bytes:
    """The ``<key>.json`` member (field order fixed: shards are byte-for-byte reproducible)."""
    return json.dumps(
        {
            "class_id": class_id,
            "class_name": class_name,
            "source": source,
            "width": width,
            "height": height,
            "reencoded": reencoded,
            "quality": quality,
        },
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode()


def _prepare(item: SourceItem, options: ImageOptions):
    try:
        data = item.read()
    except OSError as e:
        return None, f"{UNREADABLE}: {e.strerror or e}"
    prepared = prepare_image(data, options)
    return prepared, prepared.reject


def verify_shard(store: ObjectStore, entry: ShardEntry) -> bool:
    """Whether ``entry.name`` exists with the recorded size and sha256 (reads the object back once)."""
    try:
        if store.size(entry.name) != entry.bytes:
            return False
        h = hashlib.sha256()
        with store.open_read(entry.name) as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        return h.hexdigest() == entry.sha256
    except ObjectNotFound:
        return False


def write_shard(
    store: ObjectStore,
    plan: ShardPlan,
    options: ShardOptions,
    classes: Sequence[str] = (),
    class_names: dict[str, str] | None = None,
    previous: ShardOutcome | None = None,
    on_progress: ProgressFn | None = None,
) -> ShardOutcome:
    """Write one planned shard (or skip it if ``previous`` matches and verifies) and its progress record."""
    class_names = class_names or {}
    if previous is not None and previous.entry.plan == plan.digest and verify_shard(store, previous.entry):
        if on_progress:
            on_progress(len(plan.items))
        return ShardOutcome(previous.entry, list(previous.rejects), written=False)

    image_options = options.image_options
    rejects: list[Reject] = []
    samples = reencoded = 0
    with store.open_write(plan.name) as raw:
        out = _HashingWriter(raw)
        tar = TarStream(out)
        for item in plan.items:
            prepared, reason = _prepare(item, image_options)
            if reason:
                rejects.append(Reject(item.source, reason))
            else:
                class_id, class_name = _labels(classes, class_names, item.label)
                meta = sample_json(
                    class_id, class_name, item.source, prepared.width, prepared.height, prepared.reencoded,
                    options.quality if prepared.reencoded else None,
                )
                tar.add(f"{item.key}.jpg", prepared.data)
                tar.add(f"{item.key}.cls", str(item.label).encode())
                tar.add(f"{item.key}.json", meta)
                samples += 1
                reencoded += prepared.reencoded
            if on_progress:
                on_progress(1)
        tar.close()
    entry = ShardEntry(plan.name, samples, out.count, out.sha.hexdigest(), reencoded, plan=plan.digest)
    outcome = ShardOutcome(entry, rejects)
    store.put_bytes(progress_key(plan.name), _outcome_json(outcome))
    return outcome


def progress_key(shard_name: str) -> str:
    return f"{PROGRESS_DIR}/{shard_name}.json"


def _outcome_json(outcome: ShardOutcome) -> bytes:
    return json.dumps({"entry": asdict(outcome.entry), "rejects": [asdict(r) for r in outcome.rejects]}).encode()


# --------------------------------------------------------------------------------------------------------------
# previous state, manifest and clean-up


def load_previous(store: ObjectStore, plans: Sequence[ShardPlan]) -> tuple[dict[int, ShardOutcome], Manifest | None]:
    """What earlier runs left at the destination: per planned shard, the last recorded outcome (from the
    manifest, overridden by a newer progress record), and the previous manifest if there is a valid one."""
    from .manifest import load_manifest

    previous: dict[int, ShardOutcome] = {}
    manifest = None
    try:
        manifest = load_manifest(store)
    except (ObjectNotFound, ValueError):
        manifest = None
    by_name = {p.name: p for p in plans}
    if manifest is not None:
        for entry in manifest.shards:
            plan = by_name.get(entry.name)
            if plan is not None and entry.plan == plan.digest:
                sources = {it.source for it in plan.items}
                previous[plan.index] = ShardOutcome(
                    entry, [r for r in manifest.rejects if r.path in sources], written=False
                )
    for info in store.list(f"{PROGRESS_DIR}/"):
        shard_name = info.key[len(PROGRESS_DIR) + 1 :].removesuffix(".json")
        plan = by_name.get(shard_name)
        if plan is None:
            continue
        try:
            record = json.loads(store.get_bytes(info.key))
            entry = ShardEntry(**record["entry"])
            rejects = [Reject(**r) for r in record["rejects"]]
        except (ObjectNotFound, ValueError, TypeError, KeyError):
            continue  # a damaged record only costs a rewrite
        if entry.plan == plan.digest:
            previous[plan.index] = ShardOutcome(entry, rejects, written=False)
    return previous, manifest


def build_manifest(scan: Scan, plans: Sequence[ShardPlan], outcomes: Sequence[ShardOutcome], options: ShardOptions) -> Manifest:
    """Assemble the manifest of a finished run (outcomes in plan order)."""
    if len(outcomes) != len(plans):
        raise ValueError(f"{len(outcomes)} shard outcomes for {len(plans)} planned shards")
    rejects = sorted([*scan.rejects, *(r for o in outcomes for r in o.rejects)], key=lambda r: (r.path, r.reason))
    shards = [o.entry for o in outcomes]
    accepted = sum(s.samples for s in shards)
    totals = {
        "found": scan.found,
        "accepted": accepted,
        "rejected": len(rejects),
        "reencoded": sum(s.reencoded for s in shards),
        "samples": accepted,
        "bytes": sum(s.bytes for s in shards),
        "shards": len(shards),
    }
    if totals["found"] != totals["accepted"] + totals["rejected"]:
        raise RuntimeError(f"bookkeeping error: found {totals['found']} != accepted {accepted} + rejected {len(rejects)}")
    return Manifest(
        name=options.name,
        shards=shards,
        classes=list(scan.classes),
        class_names=dict(scan.class_names),
        totals=totals,
        rejects=rejects,
        inputs=dict(scan.inputs),
        options={**asdict(options), "writer_version": WRITER_VERSION},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def same_content(a: Manifest | None, b: Manifest | None) -> bool:
    """Equal apart from the creation time."""
    if a is None or b is None:
        return False
    return dataclasses.replace(a, created="") == dataclasses.replace(b, created="")


def finish(store: ObjectStore, manifest: Manifest, previous: Manifest | None) -> bool:
    """Write ``manifest.json`` unless the previous one already says the same; then drop progress records and
    shards of this name beyond the new plan. Returns whether the manifest was written."""
    wrote = not same_content(manifest, previous)
    if wrote:
        save_manifest(store, manifest)
    keep = {s.name for s in manifest.shards}
    pattern = re.compile(rf"^{re.escape(manifest.name)}-\d{{6}}\.tar$")
    for info in list(store.list(f"{manifest.name}-")):
        if pattern.match(info.key) and info.key not in keep:
            store.delete(info.key)
    for info in list(store.list(f"{PROGRESS_DIR}/{manifest.name}-")):
        store.delete(info.key)
    if hasattr(store, "local_path"):  # local disk keeps empty folders: drop ours once it is empty
        with contextlib.suppress(OSError):
            os.rmdir(store.local_path(PROGRESS_DIR))
    return wrote


def summarize(store: ObjectStore, manifest: Manifest, outcomes: Iterable[ShardOutcome], manifest_written: bool) -> ShardSummary:
    outcomes = list(outcomes)
    t = manifest.totals
    return ShardSummary(
        destination=store.uri,
        manifest=store.url(MANIFEST_NAME),
        shards=len(outcomes),
        written=sum(o.written for o in outcomes),
        skipped=sum(not o.written for o in outcomes),
        found=t["found"],
        accepted=t["accepted"],
        rejected=t["rejected"],
        reencoded=t["reencoded"],
        bytes=t["bytes"],
        manifest_written=manifest_written,
        warnings=manifest.warnings,
    )


def write_dataset(
    scan: Scan,
    destination: str | ObjectStore,
    options: ShardOptions,
    workers: int = 4,
    on_progress: ProgressFn | None = None,
) -> ShardSummary:
    """Plan, write (with a thread pool, no Prefect) and finish a shard set — the library path the flow mirrors;
    used by the benchmark and by tests of the writer alone."""
    store = open_store(destination) if isinstance(destination, str) else destination
    for warning in scan.warnings:
        log.warning("%s", warning)
    plans = plan_shards(scan.items, options, scan.classes, scan.class_names)
    previous, old_manifest = load_previous(store, plans)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = list(
            pool.map(
                lambda p: write_shard(store, p, options, scan.classes, scan.class_names, previous.get(p.index), on_progress),
                plans,
            )
        )
    manifest = build_manifest(scan, plans, outcomes, options)
    wrote = finish(store, manifest, old_manifest)
    return summarize(store, manifest, outcomes, wrote)


__all__ = [
    "FORMAT",
    "ShardOptions",
    "ShardPlan",
    "ShardOutcome",
    "ShardSummary",
    "plan_shards",
    "write_shard",
    "verify_shard",
    "load_previous",
    "build_manifest",
    "finish",
    "summarize",
    "write_dataset",
    "validate_request",
    "default_name",
    "sample_json",
]
