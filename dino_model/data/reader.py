"""Training reader: shards (or an ImageFolder) → batches, deterministic per (seed, epoch), DDP-safe, resumable.

    settings = LoaderSettings(batch_size=64, seed=0, rank=rank, world_size=world, num_workers=10)
    loader = build_loader("s3://bucket/imagenet/train", settings, epoch=epoch, transform=MultiCropAugmentation(cfg),
                          start_batch=cursor)
    for batch in loader:           # len(loader) == loader.batches_per_epoch - cursor on every rank
        crops, labels, keys = batch["crops"], batch["labels"], batch["keys"]

How an epoch is laid out (a pure function of seed, epoch, world_size, num_workers and the manifest's counts —
nothing depends on timing, so every rank computes the same plan without talking to the others):

1. The units (shards, or image files) are permuted with ``derive_seed(seed, "shards", epoch)`` and their samples
   concatenated into one sequence of N positions.
2. Every rank gets ``T = (N // world_size) // batch_size`` batches (equal on all ranks — DDP would hang at the
   epoch's end otherwise): rank r reads the contiguous range ``[r·T·B, (r+1)·T·B)``; the last
   ``N − world_size·T·B`` positions of the permuted sequence are dropped (``samples_dropped``; which samples
   these are changes every epoch). Each sample is read at most once per epoch.
3. Inside a rank, global batch g belongs to *virtual worker* ``g mod W`` (W = max(1, num_workers)), whose samples
   are a contiguous sub-range. Each worker batches its own samples (the DataLoader runs with
   ``batch_size=None``), and the DataLoader hands batches out round-robin over workers, so batch g is that
   worker's ``g // W``-th. A worker streams its range (a shard split between two workers is read by both, the
   second skipping the first's part) through a shuffle buffer seeded from ``(seed, epoch, rank, worker)``.
4. Resume (``start_batch = b``): DataLoader worker w plays virtual worker ``(w + b) mod W``, so the first batch
   handed out is exactly batch b; each worker drops the samples of its batches before b from its shuffled stream
   *before* decoding or augmenting them.

Augmentation randomness comes from :func:`dino_model.data.rng.sample_generator` ``(seed, epoch, key)``, so a
sample gets the same crops whichever worker, rank or resume produces it.

Resampled mode (``resampled=True``): each worker draws units with replacement (seeded per seed, epoch, rank,
worker) and stops after its share of ``epoch_length`` batches (default: the same T as a normal epoch); a sample
drawn twice gets different crops (its augmentation key carries the draw). Shard sources need at least
``world_size × W`` shards in normal mode (else workers would read the same shards); the error says so.

Streams shards from local paths, ``file://`` and ``s3://`` through WebDataset's tar iterators (``s3://`` via
:mod:`dino_model.data.s3_handler`).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..storage import ObjectStore, open_store
from .image_folder import ImageFolderSource, Unit
from .manifest import MANIFEST_NAME, load_manifest
from .rng import derive_seed, python_random, sample_generator
from .s3_handler import register_s3_handler

__all__ = [
    "ShardSource",
    "ImageFolderSource",
    "open_source",
    "EpochPlan",
    "plan_epoch",
    "epoch_length",
    "decode_image",
    "LoaderSettings",
    "ShardDataset",
    "TrainLoader",
    "build_loader",
]

register_s3_handler()  # at import, so spawned DataLoader workers (which unpickle this module) have it too
# torchvision 0.29 flags its image codecs as deprecated (in favour of torchcodec) on every call; its CPU JPEG
# decoder is still the fastest at hand (~1.7x PIL) and its nvjpeg twin is the GPU path's, so silence just that.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

Transform = Callable[[torch.Tensor, torch.Generator], list[torch.Tensor]]
#: Tar member suffixes that hold the image, in order of preference (the writer always uses ``jpg``).
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")


class ShardSource:
    """A shard set: ``manifest.json`` + ``<name>-NNNNNN.tar``; ``iter_unit`` yields ``(key, bytes, label)``."""

    kind = "shards"
    needs_shuffle_buffer = True

    def __init__(self, root: str | ObjectStore):
        self.store = open_store(root) if isinstance(root, str) else root
        self.uri = self.store.uri
        self.manifest = load_manifest(self.store)
        self.classes = list(self.manifest.classes)
        self.units = [Unit(s.name, s.samples) for s in self.manifest.shards if s.samples > 0]
        if not self.units:
            raise ValueError(f"shard set {self.uri} holds no samples (its manifest lists no non-empty shard)")

    @property
    def num_samples(self) -> int:
        return sum(u.samples for u in self.units)

    def iter_unit(self, index: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, bytes, int]]:
        """Samples ``[start, stop)`` of shard ``index``, streamed in tar order. Samples before ``start`` are read
        (a tar stream cannot seek) but not kept; reading stops at ``stop``."""
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander

        unit = self.units[index]
        stop = unit.samples if stop is None else stop
        url = self.store.url(unit.name)
        stream = gopen(url, "rb")
        try:
            samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
            position = 0
            if stop > 0:
                for sample in samples:
                    if position >= start:
                        yield self._unpack(sample, url)
                    position += 1
                    if position >= stop:
                        break  # the rest of the shard belongs to another reader (or is dropped): don't read it
            if position < stop:
                raise RuntimeError(
                    f"{url} holds {position} samples but the manifest says {unit.samples}: the shard set is "
                    "inconsistent (re-run the dino shard flow on it)"
                )
        finally:
            with contextlib.suppress(Exception):
                stream.close()

    @staticmethod
    def _unpack(sample: dict[str, Any], url: str) -> tuple[str, bytes, int]:
        key = sample["__key__"]
        data = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
        if data is None:
            raise RuntimeError(f"sample {key!r} in {url} has no image member (.jpg): members {sorted(sample)}")
        try:
            label = int(sample["cls"]) if "cls" in sample else -1
        except ValueError as e:
            raise RuntimeError(f"sample {key!r} in {url} has a non-integer .cls: {sample['cls'][:20]!r}") from e
        return key, data, label

    def describe(self) -> str:
        return f"shard set {self.uri} ({len(self.units)} shards, {self.num_samples} samples)"


def open_source(source: str | ShardSource | ImageFolderSource) -> ShardSource | ImageFolderSource:
    """A shard set when ``source`` holds ``manifest.json``, else an ImageFolder tree; a clear error if neither."""
    if isinstance(source, (ShardSource, ImageFolderSource)):
        return source
    store = open_store(source)
    if store.exists(MANIFEST_NAME):
        return ShardSource(store)
    return ImageFolderSource(store)


# ---------------------------------------------------------------------------------------------------------------
# The epoch plan: which samples each (rank, worker) reads, computed identically everywhere.


@dataclass(frozen=True)
class EpochPlan:
    """One rank's epoch: batch counts, the drop, and each virtual worker's segments ``(unit, start, stop)``."""

    batches_per_epoch: int  #: batches every rank yields in the epoch (from batch 0)
    samples_dropped: int  #: samples of the whole set not read this epoch (all ranks together)
    worker_batches: tuple[int, ...]  #: batches of each virtual worker
    worker_segments: tuple[tuple[tuple[int, int, int], ...], ...]  #: per virtual worker (empty when resampled)
    resampled: bool


def _worker_batch_counts(total: int, workers: int) -> tuple[int, ...]:
    # Global batch g belongs to virtual worker g % workers.
    return tuple(max(0, (total - v + workers - 1) // workers) for v in range(workers))


def _segments(order: Sequence[int], units: Sequence[Unit], begin: int, end: int) -> tuple[tuple[int, int, int], ...]:
    """The pieces of units (in ``order``) covering positions [begin, end) of their concatenation."""
    offsets = [0]
    for u in order:
        offsets.append(offsets[-1] + units[u].samples)
    out = []
    k = bisect.bisect_right(offsets, begin) - 1
    while begin < end:
        u = order[k]
        lo, hi = begin - offsets[k], min(end, offsets[k + 1]) - offsets[k]
        out.append((u, lo, hi))
        begin = offsets[k + 1]
        k += 1
    return tuple(out)


def plan_epoch(
    units: Sequence[Unit],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    num_workers: int,
    resampled: bool = False,
    epoch_length: int | None = None,
    min_units_per_reader: bool = True,
) -> EpochPlan:
    """Lay out one rank's epoch (see the module docstring). ``min_units_per_reader`` enforces at least one unit
    per (rank, worker) reader in normal mode."""
    workers = max(1, num_workers)
    readers = world_size * workers
    n = sum(u.samples for u in units)
    natural = (n // world_size) // batch_size
    if not resampled and min_units_per_reader and len(units) < readers:
        raise ValueError(
            f"{len(units)} shards cannot feed {world_size} ranks x {workers} workers = {readers} readers (each needs at "
            f"least one shard): write more, smaller shards (e.g. shard_size <= {max(1, n // readers)}) or use fewer "
            "data-loader workers"
        )
    if epoch_length is not None:
        if epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1 batch, got {epoch_length}")
        if not resampled and epoch_length > natural:
            raise ValueError(
                f"epoch_length={epoch_length} batches per rank exceeds what {n} samples give without repetition "
                f"({natural} batches of {batch_size} on each of {world_size} ranks); use resampled=True to repeat"
            )
    total = epoch_length if epoch_length is not None else natural
    if total < 1:
        raise ValueError(
            f"{n} samples cannot fill one batch of {batch_size} on each of {world_size} ranks: use a smaller batch_size"
        )
    counts = _worker_batch_counts(total, workers)
    if resampled:
        return EpochPlan(total, 0, counts, tuple(() for _ in counts), True)
    order = list(range(len(units)))
    python_random(seed, "shards", epoch).shuffle(order)
    begin = rank * total * batch_size
    segments = []
    for c in counts:
        segments.append(_segments(order, units, begin, begin + c * batch_size))
        begin += c * batch_size
    return EpochPlan(total, n - world_size * total * batch_size, counts, tuple(segments), False)


def epoch_length(source: str | ShardSource | ImageFolderSource, batch_size: int, world_size: int = 1,
                 num_workers: int = 0) -> int:
    """Batches per rank in one epoch without repetition (what :func:`build_loader` yields from batch 0); checks
    that the source can feed ``world_size`` × ``num_workers`` readers."""
    src = open_source(source)
    _check_sizes(batch_size=batch_size, rank=0, world_size=world_size, num_workers=num_workers)
    plan = plan_epoch(src.units, batch_size=batch_size, seed=0, epoch=0, rank=0, world_size=world_size,
                      num_workers=num_workers, min_units_per_reader=src.kind == "shards")
    return plan.batches_per_epoch


def _check_sizes(*, batch_size: int, rank: int, world_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank} world_size={world_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


# ---------------------------------------------------------------------------------------------------------------
# Decoding and the per-worker stream.


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image → uint8 [3, H, W] RGB (greyscale expanded, CMYK converted). torchvision's decoder first, PIL
    for what it cannot read."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return tv_decode(raw, mode=ImageReadMode.RGB)
    except RuntimeError:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
            return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def _shuffle(stream: Iterator, size: int, rng) -> Iterator:
    """Reservoir-style shuffle buffer: fill ``size`` items, then emit a random one for each new one; drain shuffled.
    Its choices depend only on positions, never on content or timing."""
    if size <= 1:
        yield from stream
        return
    buf: list = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        out, buf[i] = buf[i], item
        yield out
    rng.shuffle(buf)
    yield from buf


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run per-image decode/augmentation single-threaded in the main process (num_workers=0), as DataLoader
    workers do: intra-op threads gain nothing on 100-pixel tensors and, on a busy machine, their spin-waiting
    slows these small ops down by orders of magnitude. The training step gets its threads back afterwards."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class LoaderSettings:
    """How a run reads its data, the same for every epoch (:func:`build_loader` takes the epoch, the cursor and
    what each sample becomes).

    ``epoch_length``: batches per rank (required to be <= the natural length unless ``resampled``; default the
    natural length ``(N // world_size) // batch_size``). ``shuffle_buffer``: samples held per worker for shuffling
    (shard sources only). ``pin_memory``: page-locked batches for a fast copy to a GPU."""

    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    resampled: bool = False
    epoch_length: int | None = None
    shuffle_buffer: int = 1000
    pin_memory: bool = False


class ShardDataset(IterableDataset):
    """One rank's epoch as an iterable of ready batches (each DataLoader worker batches its own samples).

    Use :func:`build_loader`; this class is the piece that runs inside the workers. Batches are dicts:
    ``{"crops": [Tensor[B, 3, s, s] float] (with a transform) | "images": [uint8 [3, H, W]] (decode, no transform)
    | "encoded": [uint8 1-D bytes] (decode=False), "labels": LongTensor[B], "keys": [str]}``. ``decode=False``
    batches also hold ``"aug_keys"`` (the key each sample's augmentation generator is derived from) and, with a
    ``param_sampler``, ``"params"``: ``param_sampler(encoded, sample_generator(seed, epoch, aug_key))`` per sample.
    """

    def __init__(
        self,
        source: str | ShardSource | ImageFolderSource,
        settings: LoaderSettings,
        *,
        epoch: int,
        start_batch: int = 0,
        transform: Transform | None = None,
        decode: bool = True,
        param_sampler: Callable[[torch.Tensor, torch.Generator], Any] | None = None,
    ):
        super().__init__()
        batch_size, rank, world_size, num_workers = (settings.batch_size, settings.rank, settings.world_size,
                                                     settings.num_workers)
        _check_sizes(batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if settings.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {settings.shuffle_buffer}")
        if transform is not None and not decode:
            raise ValueError("a transform needs decoded images: pass decode=True, or transform=None for raw bytes")
        self.source = open_source(source)
        self.batch_size, self.transform, self.seed, self.epoch = batch_size, transform, int(settings.seed), int(epoch)
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.resampled, self.decode = settings.resampled, decode
        if param_sampler is not None and decode:
            raise ValueError("param_sampler is for decode=False batches (augmentation done elsewhere, e.g. on a GPU)")
        self.param_sampler = param_sampler
        self.shuffle_buffer = settings.shuffle_buffer if self.source.needs_shuffle_buffer else 0
        self.plan = plan_epoch(
            self.source.units, batch_size=batch_size, seed=self.seed, epoch=self.epoch, rank=rank,
            world_size=world_size, num_workers=num_workers, resampled=settings.resampled,
            epoch_length=settings.epoch_length, min_units_per_reader=self.source.kind == "shards",
        )
        if not 0 <= start_batch <= self.plan.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.plan.batches_per_epoch}], got {start_batch}")
        self.start_batch = start_batch

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    @property
    def samples_dropped(self) -> int:
        return self.plan.samples_dropped

    def __len__(self) -> int:
        return self.plan.batches_per_epoch - self.start_batch

    # -- inside a worker ---------------------------------------------------------------------------------------

    def _raw_stream(self, virtual: int) -> Iterator[tuple[str, str, bytes, int]]:
        """``(key, augmentation key, bytes, label)`` for one virtual worker, before shuffling."""
        if not self.resampled:
            for unit, start, stop in self.plan.worker_segments[virtual]:
                for key, data, label in self.source.iter_unit(unit, start, stop):
                    yield key, key, data, label
            return
        rng = python_random(self.seed, "resample", self.epoch, self.rank, virtual)
        draw = 0
        while True:  # the caller stops after its quota
            unit = rng.randrange(len(self.source.units))
            for key, data, label in self.source.iter_unit(unit):
                # A resampled epoch can hold a sample twice: the draw makes its crops differ.
                yield key, f"{key}#r{self.rank}w{virtual}d{draw}", data, label
            draw += 1

    def _make_batch(self, items: list[tuple[str, str, bytes, int]]) -> dict[str, Any]:
        keys = [k for k, _, _, _ in items]
        batch: dict[str, Any] = {"keys": keys, "labels": torch.tensor([lab for _, _, _, lab in items], dtype=torch.long)}
        if not self.decode:
            batch["encoded"] = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for _, _, d, _ in items]
            batch["aug_keys"] = [aug_key for _, aug_key, _, _ in items]
            if self.param_sampler is not None:  # the random draws, here in the workers; the pixels elsewhere
                batch["params"] = [self.param_sampler(enc, sample_generator(self.seed, self.epoch, aug_key))
                                   for enc, aug_key in zip(batch["encoded"], batch["aug_keys"])]
            return batch
        images = [decode_image(d) for _, _, d, _ in items]
        if self.transform is None:
            batch["images"] = images
            return batch
        per_sample = [self.transform(img, sample_generator(self.seed, self.epoch, aug_key))
                      for img, (_, aug_key, _, _) in zip(images, items)]
        batch["crops"] = [torch.stack(crops) for crops in zip(*per_sample)]
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(1, self.num_workers):
            raise RuntimeError(
                f"ShardDataset planned for num_workers={self.num_workers} but runs in {workers} worker(s): pass the "
                "same num_workers to the DataLoader (build_loader does)"
            )
        virtual = (worker + self.start_batch) % workers
        quota = self.plan.worker_batches[virtual]
        skip = max(0, (self.start_batch - virtual + workers - 1) // workers)  # its batches before start_batch
        rng = python_random(self.seed, "buffer", self.epoch, self.rank, virtual)
        produced = skip
        if produced < quota:
            stream = _shuffle(self._raw_stream(virtual), self.shuffle_buffer, rng)
            items: list = []
            for position, item in enumerate(stream):
                if position < skip * self.batch_size:
                    continue  # resumed: these samples were trained on already — no decode, no augmentation
                items.append(item)
                if len(items) == self.batch_size:
                    if info is None:  # in the training process: see _one_thread
                        with _one_thread():
                            batch = self._make_batch(items)
                    else:  # DataLoader workers already run single-threaded
                        batch = self._make_batch(items)
                    yield batch
                    items, produced = [], produced + 1
                    if produced == quota:
                        break
            stream.close()
        if produced < quota:
            raise RuntimeError(
                f"{self.source.describe()}: worker {virtual} of rank {self.rank} produced {produced} of {quota} "
                "batches — the source holds fewer samples than planned"
            )


# ---------------------------------------------------------------------------------------------------------------


class TrainLoader:
    """Iterable over one rank's batches of one epoch; ``len()`` is what remains from ``start_batch``."""

    def __init__(self, dataset: ShardDataset, loader: DataLoader | None):
        self.dataset = dataset
        self._loader = loader

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields in a whole epoch (from batch 0)."""
        return self.dataset.batches_per_epoch

    @property
    def samples_dropped(self) -> int:
        """Samples of the set not read this epoch, over all ranks (the remainder that would unbalance ranks)."""
        return self.dataset.samples_dropped

    @property
    def start_batch(self) -> int:
        return self.dataset.start_batch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = iter(self._loader) if self._loader is not None else iter(self.dataset)
        count = 0
        for batch in it:
            count += 1
            yield batch
        if count != len(self):  # a short epoch on one rank would hang the others in DDP: fail loudly instead
            raise RuntimeError(f"rank {self.dataset.rank} got {count} batches instead of {len(self)}")


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM, SIGINT and SIGHUP. A launcher (Prefect, torchrun, a
    shell's Ctrl-C, a closed terminal) signals the whole process group; the trainer finishes its step and checkpoints, then shuts its
    workers down through the DataLoader. A worker killed by the signal instead would make the next batch fetch
    (or PyTorch's SIGCHLD handler, at any moment) raise in the trainer and lose that checkpoint. Workers still
    exit if the trainer dies (PyTorch's watchdog) and on SIGKILL."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def build_loader(
    source: str,
    settings: LoaderSettings,
    *,
    epoch: int,
    transform: Transform | None,
    start_batch: int = 0,
    decode: bool = True,
    param_sampler: Callable[[torch.Tensor, torch.Generator], Any] | None = None,
) -> TrainLoader:
    """One rank's loader for one epoch of a shard set (URI with ``manifest.json``) or an ImageFolder directory,
    read as ``settings`` say (:class:`LoaderSettings`: the same every epoch of a run).

    ``start_batch``: resume cursor within the epoch. ``decode=False`` yields the encoded bytes
    (``batch["encoded"]``) for decoding elsewhere (e.g. on the GPU); ``param_sampler`` (with ``decode=False``)
    draws each sample's augmentation parameters in the workers (``batch["params"]``).
    """
    dataset = ShardDataset(source, settings, epoch=epoch, start_batch=start_batch, transform=transform,
                           decode=decode, param_sampler=param_sampler)
    num_workers, pin_memory, seed, rank = settings.num_workers, settings.pin_memory, settings.seed, settings.rank
    if num_workers == 0 and not pin_memory:
        return TrainLoader(dataset, None)
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches, one worker's each, in round-robin order
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
        worker_init_fn=_worker_ignores_stop_signals if num_workers > 0 else None,
        # Its own generator: DataLoader otherwise draws its workers' base seed from the *global* RNG, which the
        # training loop re-seeds every step and which the prefetch thread must not race on. (The samples do not
        # depend on it: every draw in the workers uses an explicit (seed, epoch, key) generator.)
        generator=torch.Generator().manual_seed(derive_seed(seed, "dataloader", rank, epoch)),
    )
    return TrainLoader(dataset, loader)
