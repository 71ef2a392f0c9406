"""Batched feature extraction from a frozen backbone to a Parquet dataset, and reading it back.

Layout under ``out_uri`` (a local folder, ``file://`` or ``s3://bucket/prefix``, written through
:mod:`dino_model.storage`, each file atomically)::

    <out_uri>/<split>/part-00000.parquet
    <out_uri>/<split>/part-00001.parquet  ...
    <out_uri>/<split>/part-r0000-00000.parquet  ...   (rank 0 of a multi-process extraction)
    <out_uri>/<split>/part-r0001-00000.parquet  ...   (rank 1; see dino_model.eval.extract)

Schema: ``key`` string, ``label`` int64 (-1 = unlabelled), ``split`` string, ``features``
``fixed_size_list<float32>[D]`` (``<float16>`` for a half-precision store: ``FeatureRecipe(feature_dtype="float16")``). Every file carries the same key-value metadata under ``dino_model.features``
(JSON): the caller's ``metadata`` (model name/version/URI...), the preprocessing description, the feature kind,
the inference precision, the dimension and the split. Re-extracting a split replaces its files (stale parts of a
previous, longer extraction are deleted once the new ones are written). A multi-process extraction
(``torchrun -m dino_model.eval.extract``) writes one series of parts per rank (``rank=`` of
:func:`extract_features`), each rank over a contiguous range of the samples; :func:`read_features` reads the
parts in (rank, part) order, so the rows come back in the same order whatever the number of processes. It reads
the parts' footers first and copies each part into one array allocated for all of them, so its peak memory is the
result plus one part (float32 by default, or as stored with ``dtype=None``).

Features are the [CLS] token after the final norm (``backbone(x)``, the k-NN protocol) by default, or the
linear-probe features: the [CLS] tokens of the last ``n_last_blocks`` blocks (each through the final norm)
concatenated, plus optionally the average of the last block's patch tokens (:func:`backbone_features`).
Inference runs in fp32 like the reference; ``precision="bf16"`` runs under bfloat16 autocast (stored values are
float32 either way). A bf16 extraction first checks itself on its first batch (``fast_path_check``, default
``fallback``: :mod:`dino_model.fast_path.extract_canary`, bf16 against fp32 features, cosine similarity per sample)
and, if the check fails, runs in fp32 instead; the metadata's ``precision`` is what ran and ``fast_path`` holds the
verdict and its figures (``strict``: :class:`dino_model.fast_path.FastPathError` instead of the fallback).

    >>> res = extract_features(backbone, batches, "s3://bucket/feats/run1", "train", {"model_version": "3"})
    >>> keys, labels, feats, meta = read_features("s3://bucket/feats/run1", split="train")
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from dino_model.fast_path import OFF, REFERENCE, VERIFIED, FALLBACK, Verdict, settle
from dino_model.fast_path.extract_canary import compare_feature_precisions
from dino_model.fast_path.verdict import exception_reason
from dino_model.storage import ObjectStore, open_store

from .transforms import EvalTransform, ImageBatch, as_image_list, normalize

#: Key of the JSON metadata in each Parquet file's schema metadata.
METADATA_KEY = b"dino_model.features"
FORMAT_VERSION = 1
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
#: ``part-NNNNN.parquet`` (one process) or ``part-rRRRR-NNNNN.parquet`` (rank RRRR of a multi-process extraction).
_PART_RE = re.compile(r"^part-(?:r(\d{4,})-)?(\d{5,})\.parquet$")
PRECISIONS = ("fp32", "bf16")
#: Types the features can be stored as (``FeatureRecipe.feature_dtype``).
FEATURE_DTYPES = ("float32", "float16")
#: Parquet value types of the ``features`` column and the numpy types they are read as.
_STORED_TYPES = {pa.float32(): np.dtype(np.float32), pa.float16(): np.dtype(np.float16)}
#: Rows decoded at a time, and bytes per ranged GET, when a part is read.
_READ_ROWS = 16_384
_READ_BLOCK = 16 << 20


def feature_kind(n_last_blocks: int = 1, avgpool: bool = False) -> str:
    """A stable name for the feature kind: ``cls``, ``cls_last4``, ``cls+avgpool``, ``cls_last4+avgpool``."""
    if n_last_blocks < 1:
        raise ValueError(f"n_last_blocks must be >= 1, got {n_last_blocks}")
    name = "cls" if n_last_blocks == 1 else f"cls_last{n_last_blocks}"
    return name + ("+avgpool" if avgpool else "")


def backbone_features(backbone: torch.nn.Module, x: torch.Tensor, n_last_blocks: int = 1, avgpool: bool = False):
    """Features of a normalised image batch ``x``: ``[B, D * (n_last_blocks + avgpool)]``.

    ``n_last_blocks=1, avgpool=False`` is ``backbone(x)`` (the [CLS] token after the final norm; works for
    ResNets too). Otherwise the ViT's ``get_intermediate_layers``: the [CLS] tokens of the last n blocks (each
    through the final norm), in block order, followed — if ``avgpool`` — by the mean of the last block's patch
    tokens. (The reference interleaves [CLS] and avgpool for n = 1 and crashes for n > 1; for a linear classifier
    trained from scratch the order of the dimensions makes no difference.)"""
    if n_last_blocks == 1 and not avgpool:
        return backbone(x)
    if not hasattr(backbone, "get_intermediate_layers"):
        raise ValueError(f"{type(backbone).__name__} has no get_intermediate_layers: only n_last_blocks=1 works")
    outs = backbone.get_intermediate_layers(x, n_last_blocks)
    feats = [o[:, 0] for o in outs]
    if avgpool:
        feats.append(outs[-1][:, 1:].mean(dim=1))
    return torch.cat(feats, dim=-1)


def part_name(index: int, rank: int | None = None) -> str:
    """File name of part ``index``: ``part-00003.parquet``, or ``part-r0001-00003.parquet`` for ``rank`` 1."""
    return f"part-{index:05d}.parquet" if rank is None else f"part-r{rank:04d}-{index:05d}.parquet"


def _part_order(name: str) -> tuple[int, int]:
    m = _PART_RE.match(name)
    assert m is not None
    return (int(m.group(1)) if m.group(1) is not None else -1, int(m.group(2)))


def precision_context(device: torch.device, precision: str):
    """The context inference runs under: nothing for ``fp32``, bfloat16 autocast on ``device`` for ``bf16``; any
    other precision is a :class:`ValueError` (raised here, before any work)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without parameters)."""
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def prepare_batch(images: ImageBatch, transform: EvalTransform | None) -> torch.Tensor:
    """Images in the eval convention (uint8 / float [0, 1]) -> normalised float batch."""
    if transform is not None:
        return transform(images)
    return normalize(torch.stack(as_image_list(images)))


@dataclass
class FeatureWriteResult:
    """What :func:`extract_features` wrote."""

    #: URI of the dataset root (holds one folder per split).
    uri: str
    split: str
    num_rows: int
    dim: int
    #: URIs of the part files written for this split.
    files: list[str] = field(default_factory=list)
    #: The metadata stored in every file.
    metadata: dict[str, Any] = field(default_factory=dict)
    #: File names (relative to ``<uri>/<split>/``) of the parts written, in order.
    names: list[str] = field(default_factory=list)


def stored_features(feats: np.ndarray, feature_dtype: str) -> np.ndarray:
    """``feats`` (float32) as the store keeps them: unchanged for ``float32``, rounded to ``float16`` (half the
    bytes; a :class:`ValueError` if a value is beyond float16's range, +-65504)."""
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
    if feature_dtype == "float32":
        return feats
    with np.errstate(over="ignore"):
        half = feats.astype(np.float16)
    if not np.isfinite(half).all():
        raise ValueError(f"features out of float16's range (largest |value| {np.nanmax(np.abs(feats)):.6g}, "
                         "float16 holds up to 65504, and no NaN): store them as float32")
    return half


def _table(keys: list[str], labels: np.ndarray, split: str, feats: np.ndarray, meta: bytes) -> pa.Table:
    dim = feats.shape[1]
    value_type = pa.float16() if feats.dtype == np.float16 else pa.float32()
    vec = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1), type=value_type), dim)
    schema = pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("features", pa.list_(value_type, dim), nullable=False),
        ],
        metadata={METADATA_KEY: meta},
    )
    return pa.Table.from_arrays(
        [pa.array(keys, pa.string()), pa.array(labels, pa.int64()), pa.array([split] * len(keys), pa.string()), vec],
        schema=schema,
    )


def _write_part(store: ObjectStore, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.put_bytes(key, buf.getvalue())


def _batch_features(backbone, images, transform, device, autocast, n_last_blocks, avgpool) -> np.ndarray:
    x = prepare_batch(images, transform).to(device)
    with autocast:
        f = backbone_features(backbone, x, n_last_blocks, avgpool)
    return f.float().cpu().numpy()


def check_precision(backbone: torch.nn.Module, x: torch.Tensor, precision: str, mode: str = "fallback",
                    n_last_blocks: int = 1, avgpool: bool = False,
                    decide: Callable[[Callable[[], Verdict]], Verdict] | None = None) -> tuple[Verdict, str]:
    """The extraction's fast-path check on one normalised batch ``x`` already on the backbone's device: (verdict,
    the precision to extract in). ``fp32`` is the reference (nothing to check); ``bf16`` is compared with fp32 unless
    ``mode`` is ``off``. ``decide(check)``: how the verdict is reached — in a multi-process extraction rank 0's
    check, broadcast (:func:`dino_model.fast_path.on_rank0`); by default the check itself. A failed check gives
    ``fp32`` (``mode="strict"``: :class:`dino_model.fast_path.FastPathError`)."""
    import time

    def check() -> Verdict:
        if precision == "fp32":
            return Verdict("extract", REFERENCE, "fp32")
        if mode == "off":
            return Verdict("extract", OFF, "bf16 autocast")
        started = time.perf_counter()

        def features_of(batch: torch.Tensor, p: str) -> torch.Tensor:
            with precision_context(batch.device, p):
                return backbone_features(backbone, batch, n_last_blocks, avgpool)

        try:
            failure, figures = compare_feature_precisions(features_of, x)
        except Exception as error:  # noqa: BLE001 - a bf16 path that raises has failed its check
            failure, figures = exception_reason("the bf16 extraction", error), {}
        return Verdict("extract", FALLBACK if failure else VERIFIED, "fp32" if failure else "bf16 autocast", failure,
                       figures, time.perf_counter() - started)

    verdict = settle(decide(check) if decide is not None else check(), mode)
    return verdict, "fp32" if verdict.fell_back else precision


def _batch_labels(keys, images, labels) -> tuple[list[str], np.ndarray]:
    keys = [str(k) for k in keys]
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
    n_img = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    if not (len(keys) == n_img == len(labels)):
        raise ValueError(f"batch has {len(keys)} keys, {n_img} images and {len(labels)} labels")
    return keys, labels


@torch.inference_mode()
def compute_features(
    backbone: torch.nn.Module,
    batches: Iterable[tuple[Sequence[str], ImageBatch, Any]],
    *,
    transform: EvalTransform | None = EvalTransform(),
    n_last_blocks: int = 1,
    avgpool: bool = False,
    precision: str = "fp32",
    device: str | torch.device | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The same features as :func:`extract_features`, kept in memory: ``(keys, labels int64 [N], features
    float32 [N, D])``. For bounded subsets (e.g. the fp32 side of the bf16 parity check)."""
    device = torch.device(device) if device is not None else module_device(backbone)
    autocast = precision_context(device, precision)
    backbone.eval()
    keys: list[str] = []
    labels: list[np.ndarray] = []
    feats: list[np.ndarray] = []
    for batch_keys, images, batch_labels in batches:
        batch_keys, batch_labels = _batch_labels(batch_keys, images, batch_labels)
        keys.extend(batch_keys)
        labels.append(batch_labels)
        feats.append(_batch_features(backbone, images, transform, device, autocast, n_last_blocks, avgpool))
    if not keys:
        raise ValueError("no samples to compute features of")
    return keys, np.concatenate(labels), np.concatenate(feats)


@dataclass(frozen=True)
class FeatureRecipe:
    """Which features an extraction computes and how: the preprocessing (``transform``; ``None`` only
    normalises), the [CLS] tokens of the last ``n_last_blocks`` blocks plus, with ``avgpool``, the averaged patch
    tokens (:func:`backbone_features`), the inference ``precision`` and what a failed bf16 check on the first batch
    does (``fast_path_check``, :func:`check_precision`), and the stored type (``feature_dtype``)."""

    transform: EvalTransform | None = EvalTransform()
    n_last_blocks: int = 1
    avgpool: bool = False
    precision: str = "fp32"
    fast_path_check: str = "fallback"
    feature_dtype: str = "float32"
    """How the store keeps them: ``float32``, or ``float16`` (:func:`stored_features`: half the bytes on disk and,
    read with ``dtype=None``, in memory; a value beyond float16's range is refused)."""

    @property
    def kind(self) -> str:
        """:func:`feature_kind` of these features (``cls``, ``cls_last4+avgpool`` ...)."""
        return feature_kind(self.n_last_blocks, self.avgpool)

    def describe_preprocessing(self) -> str:
        return self.transform.describe() if self.transform is not None else "normalize=imagenet (no resize/crop)"


class _PartWriter:
    """Buffers feature rows and writes them as ``part-*.parquet`` files of ``rows_per_file`` rows under
    ``<store>/<split>/`` (``part-r<rank>-*`` for a rank of a multi-process extraction)."""

    def __init__(self, split_store: ObjectStore, split: str, meta: dict[str, Any], rows_per_file: int,
                 rank: int | None):
        self.split_store, self.split, self.meta = split_store, split, meta
        self.rows_per_file, self.rank = rows_per_file, rank
        self.keys: list[str] = []
        self.labels: list[np.ndarray] = []
        self.feats: list[np.ndarray] = []
        self.written: list[str] = []
        self.n_rows = 0
        self.dim = -1

    def add(self, keys: list[str], labels: np.ndarray, feats: np.ndarray) -> None:
        if self.dim < 0:
            self.dim = feats.shape[1]
        self.keys.extend(keys)
        self.labels.append(labels)
        self.feats.append(feats)
        self.n_rows += len(keys)
        self.flush(final=False)

    def flush(self, final: bool) -> None:
        while self.keys and (final or len(self.keys) >= self.rows_per_file):
            feats = np.concatenate(self.feats)
            labels = np.concatenate(self.labels)
            take = min(self.rows_per_file, len(self.keys))
            meta_bytes = json.dumps({**self.meta, "dim": self.dim}, sort_keys=True).encode()
            name = part_name(len(self.written), self.rank)
            _write_part(self.split_store, name,
                        _table(self.keys[:take], labels[:take], self.split,
                               stored_features(feats[:take], self.meta["feature_dtype"]), meta_bytes))
            self.written.append(name)
            self.keys = self.keys[take:]
            self.labels = [labels[take:]]
            self.feats = [feats[take:]]


def _extraction_metadata(metadata: dict[str, Any] | None, split: str, recipe: FeatureRecipe) -> dict[str, Any]:
    """What every part file records: the caller's ``metadata`` (JSON-serialisable, else :class:`ValueError`), the
    format version, the split, the feature kind, the preprocessing, the requested precision and the stored type."""
    kind = recipe.kind  # validates n_last_blocks before any work
    stored_features(np.zeros((0, 1), np.float32), recipe.feature_dtype)  # validates feature_dtype before any work
    user_meta = dict(metadata or {})
    try:
        json.dumps(user_meta)
    except TypeError as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from e
    return {**user_meta, "format_version": FORMAT_VERSION, "split": split, "feature_kind": kind,
            "preprocessing": recipe.describe_preprocessing(), "precision": recipe.precision,
            "feature_dtype": recipe.feature_dtype}


@torch.inference_mode()
def extract_features(
    backbone: torch.nn.Module,
    batches: Iterable[tuple[Sequence[str], ImageBatch, Any]],
    out_uri: str,
    split: str,
    metadata: dict[str, Any] | None = None,
    *,
    recipe: FeatureRecipe = FeatureRecipe(),
    device: str | torch.device | None = None,
    rows_per_file: int = 100_000,
    progress: bool = True,
    total: int | None = None,
    rank: int | None = None,
    decide: Callable[[Callable[[], Verdict]], Verdict] | None = None,
) -> FeatureWriteResult:
    """Run ``backbone`` (put in eval mode) over ``batches`` and write ``<out_uri>/<split>/part-*.parquet``.

    ``batches`` yields ``(keys, images, labels)``: sample keys (unique strings), images in the eval convention
    (uint8 or float [0, 1], ``[B, 3, H, W]`` or a list of ``[3, H, W]``) and integer labels (-1 = none).
    ``recipe`` (:class:`FeatureRecipe`) says which features: the preprocessing (default: resize 256 bicubic +
    centre crop 224), the blocks, the precision and its fast-path check. ``metadata`` (JSON-serialisable; e.g.
    model name, version, URI) is stored in every file with the preprocessing, feature kind and precision.
    ``total`` (number of images) sizes the progress bar. ``rank`` (multi-process extraction): name the parts
    ``part-r<rank>-*.parquet`` and leave every other file alone (the stale parts are then deleted by rank 0 with
    :func:`delete_stale_parts` once all ranks are done). ``decide``: how the bf16 check on the first batch reaches
    its verdict (:func:`check_precision`); the metadata's ``precision`` is what ran, ``fast_path`` the verdict.
    Raises :class:`ValueError` for a bad split name, mismatched key/image/label counts, duplicate keys, or an
    empty input (nothing is written then).
    """
    if not _SPLIT_RE.match(split or ""):
        raise ValueError(f"split must match {_SPLIT_RE.pattern} (it names a folder), got {split!r}")
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    meta = _extraction_metadata(metadata, split, recipe)
    device = torch.device(device) if device is not None else module_device(backbone)
    autocast = precision_context(device, recipe.precision)  # validates precision before any work
    store = open_store(out_uri)
    writer = _PartWriter(store.child(split), split, meta, rows_per_file, rank)
    backbone.eval()
    seen: set[str] = set()
    checked = False
    bar = tqdm(total=total, disable=not progress, unit="img", desc=f"features[{split}]")
    try:
        for keys, images, labels in batches:
            keys, labels = _batch_labels(keys, images, labels)
            for k in keys:
                if k in seen:
                    raise ValueError(f"duplicate sample key {k!r} in split {split!r}")
                seen.add(k)
            if not checked:  # the first batch decides the precision of the whole extraction
                checked = True
                verdict, used = check_precision(backbone, prepare_batch(images, recipe.transform).to(device),
                                                recipe.precision, recipe.fast_path_check, recipe.n_last_blocks,
                                                recipe.avgpool, decide)
                autocast = precision_context(device, used)
                meta.update(precision=used, fast_path=verdict.as_record())
            writer.add(keys, labels, _batch_features(backbone, images, recipe.transform, device, autocast,
                                                     recipe.n_last_blocks, recipe.avgpool))
            bar.update(len(keys))
        if writer.n_rows == 0:
            raise ValueError(f"no samples to extract for split {split!r}: the evaluation set is empty")
        writer.flush(final=True)
    finally:
        bar.close()
    if rank is None:
        delete_stale_parts(out_uri, split, writer.written)
    meta["dim"] = writer.dim
    return FeatureWriteResult(
        uri=store.uri, split=split, num_rows=writer.n_rows, dim=writer.dim,
        files=[writer.split_store.url(n) for n in writer.written], metadata=meta, names=list(writer.written),
    )


def delete_stale_parts(uri: str, split: str, keep: Iterable[str]) -> list[str]:
    """Delete the part files of ``<uri>/<split>/`` not named in ``keep`` (those of an earlier, longer or
    differently-ranked extraction that the new one did not overwrite); returns the names deleted."""
    split_store = open_store(uri).child(split)
    keep = set(keep)
    deleted = []
    for obj in list(split_store.list("part-")):
        if _PART_RE.match(obj.key) and obj.key not in keep:
            split_store.delete(obj.key)
            deleted.append(obj.key)
    return deleted


def list_feature_files(uri: str, split: str | None = None) -> list[tuple[str, str]]:
    """``(split, key)`` of every part file under ``uri`` (optionally one split), in split then (rank, part)
    order — the order the rows were produced in, whatever the number of processes."""
    store = open_store(uri)
    out = []
    for obj in store.list(f"{split}/" if split else ""):
        parts = obj.key.split("/")
        if len(parts) == 2 and _PART_RE.match(parts[1]):
            out.append((parts[0], obj.key))
    return sorted(out, key=lambda item: (item[0], _part_order(item[1].split("/")[1])))


def _stored_type(schema: pa.Schema, where: str) -> tuple[int, np.dtype]:
    """(dimension, numpy dtype) of the ``features`` column of a part's schema."""
    vec = schema.field("features").type
    if not pa.types.is_fixed_size_list(vec) or vec.value_type not in _STORED_TYPES:
        raise ValueError(f"{where}: features must be fixed_size_list<float32|float16>, got {vec}")
    return vec.list_size, _STORED_TYPES[vec.value_type]


def _footer(store: ObjectStore, key: str) -> pq.FileMetaData:
    """A part's Parquet footer, without reading its data: the file itself for a local store, ranged GETs of its
    tail for S3, the whole object otherwise."""
    if hasattr(store, "local_path"):
        return pq.read_metadata(store.local_path(key))
    if hasattr(store, "open_ranged"):
        with store.open_ranged(key) as f:
            return pq.read_metadata(f)
    return pq.read_metadata(pa.BufferReader(store.get_bytes(key)))


@dataclass
class FeaturePart:
    """One part file of a feature dataset, as its footer describes it."""

    split: str
    key: str
    rows: int
    dim: int
    #: numpy type of the stored features (float32, or float16 for a half-precision store).
    stored: np.dtype
    meta: dict[str, Any]


def list_feature_parts(uri: str, split: str | None = None) -> list[FeaturePart]:
    """The parts of a dataset written by :func:`extract_features`, in reading order, from their footers only
    (row counts, dimension, stored type, metadata). Raises :class:`FileNotFoundError` when there is none and
    :class:`ValueError` when they disagree on the dimension or feature kind."""
    if split is not None and not _SPLIT_RE.match(split):
        raise ValueError(f"split must match {_SPLIT_RE.pattern}, got {split!r}")
    store = open_store(uri)
    files = list_feature_files(uri, split)
    if not files:
        where = f"{store.uri}/{split}" if split else store.uri
        raise FileNotFoundError(f"no feature files (part-*.parquet) under {where}")
    parts: list[FeaturePart] = []
    for split_name, key in files:
        footer = _footer(store, key)
        schema = footer.schema.to_arrow_schema()
        raw = (schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise ValueError(f"{store.url(key)} has no {METADATA_KEY.decode()} metadata: not a feature file")
        m = json.loads(raw)
        dim, stored = _stored_type(schema, store.url(key))
        first = parts[0].meta if parts else m
        if (m.get("dim"), m.get("feature_kind")) != (first.get("dim"), first.get("feature_kind")) or (
                parts and dim != parts[0].dim):
            raise ValueError(
                f"{store.url(key)} holds {m.get('feature_kind')} features of dim {m.get('dim')}, "
                f"other files {first.get('feature_kind')} of dim {first.get('dim')}"
            )
        parts.append(FeaturePart(split_name, key, footer.num_rows, dim, stored, m))
    return parts


@contextlib.contextmanager
def _part_source(store: ObjectStore, key: str):
    """A part as Parquet reads it: the file itself for a local store, ranged GETs of ``_READ_BLOCK`` bytes for S3
    (never the whole object in memory), the whole object otherwise."""
    if hasattr(store, "local_path"):
        yield store.local_path(key)
    elif hasattr(store, "open_ranged"):
        with store.open_ranged(key, block_size=_READ_BLOCK) as f:
            yield f
    else:
        yield pa.BufferReader(store.get_bytes(key))


def _read_part_into(store: ObjectStore, part: FeaturePart, keys: list[str], labels: np.ndarray,
                    feats: np.ndarray) -> None:
    """Read one part and copy its rows into ``labels`` and ``feats`` (slices of the caller's arrays, cast to their
    type); its keys are appended to ``keys``. The part is decoded ``_READ_ROWS`` rows at a time from a buffered
    stream: besides the caller's arrays, a few MB (a whole decoded part, with its list levels, is ~4x its features)."""
    row = 0
    with _part_source(store, part.key) as source:
        reader = pq.ParquetFile(source, buffer_size=1 << 20, pre_buffer=False)
        for batch in reader.iter_batches(batch_size=_READ_ROWS, columns=["key", "label", "features"]):
            n = batch.num_rows
            if row + n > part.rows:
                break
            keys.extend(batch.column(0).to_pylist())
            labels[row : row + n] = batch.column(1).to_numpy()
            values = batch.column(2).flatten().to_numpy(zero_copy_only=False)  # a view when there are no nulls
            feats[row : row + n] = values.reshape(n, part.dim)
            row += n
    if row != part.rows:
        raise ValueError(f"{store.url(part.key)} changed while it was read ({part.rows} rows, then {row} or more)")


def read_features(
    uri: str, split: str | None = None, dtype: Any = np.float32, progress: bool = False
) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a dataset written by :func:`extract_features`: ``(keys, labels int64 [N], features [N, D],
    metadata)``. ``split=None`` reads every split (in split-name order; ``metadata["splits"]`` lists them).

    The features come back as ``dtype`` (float32 by default, whatever the store holds), or as stored with
    ``dtype=None`` (float16 for a half-precision store: half the memory). The part footers are read first, so the
    result is allocated once and each part is copied into it as it is decoded: the peak is the result plus a few
    MB of decoding buffers (and, on S3, 16 MB ranged reads).
    ``progress`` shows a bar over the rows. Raises :class:`FileNotFoundError` when nothing is there and
    :class:`ValueError` when files disagree on the dimension or feature kind."""
    parts = list_feature_parts(uri, split)
    if dtype is None:
        dtype = np.float16 if all(p.stored == np.float16 for p in parts) else np.float32
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating-point type or None, got {dtype}")
    store = open_store(uri)
    total = sum(p.rows for p in parts)
    keys: list[str] = []
    labels = np.empty(total, dtype=np.int64)
    feats = np.empty((total, parts[0].dim), dtype=dtype)
    start = 0
    with tqdm(total=total, disable=not progress, unit="row", desc=f"read[{split or 'all'}]") as bar:
        for part in parts:
            end = start + part.rows
            _read_part_into(store, part, keys, labels[start:end], feats[start:end])
            start = end
            bar.update(part.rows)
    splits = list(dict.fromkeys(p.split for p in parts))
    meta = dict(parts[0].meta)
    meta["splits"] = splits
    if split is None and len(splits) > 1:
        meta.pop("split", None)
    return keys, labels, feats, meta
