"""The multi-crop augmentation run batched on a device (a GPU in practice): JPEG decode, crops, colour, blur.

On a GPU node the reference's CPU augmentation (PIL, per image) is the bottleneck: ~235 images/s with 16 workers
for 2x224 + 8x96 crops of ImageNet-sized JPEGs, against ~1,900 images/s for a compiled bf16 step. So the work is
split differently:

* **CPU workers** read shard bytes and draw every sample's random parameters (:class:`CropParamSampler`: it reads
  only the JPEG header for the size, then calls the very same :meth:`MultiCropAugmentation.sample_params` with the
  very same generator ``sample_generator(seed, epoch, aug_key)`` as the CPU pipeline). Cheap (~2 ms per image).
* **The training process** (:class:`DeviceMultiCrop`) decodes the batch with
  ``torchvision.io.decode_jpeg(list, device=...)`` (nvjpeg on CUDA, libjpeg-turbo on CPU — same call), takes
  every random-resized crop with a batched resampler, and runs flips, colour jitter, greyscale, blur, solarisation
  and normalisation on whole crop groups at once through the CPU workers' own chain,
  :func:`dino_model.data.augment.augment_resized`; on CUDA with ``sync_free=True`` (every operation on every row,
  nothing read back on the host, so the CPU can queue the next batch's work while the GPU still runs the step).

The tests run this module on the CPU. What only a GPU shows — nvjpeg's output against libjpeg-turbo's, the speed of
every piece, and whether torchvision's batched GPU ``decode_jpeg`` synchronises internally — is what
``benchmarks/speed.py`` checks and measures; docs/benchmarks.md records its runs.

Random-resized crop, batched (``resize="matmul"``, the default on CUDA): antialiased bicubic resampling is
separable, so each crop is ``Wy @ image @ Wx^T`` with ``Wy`` [s, H] and ``Wx`` [s, W] holding the exact filter
weights of PyTorch's ``interpolate(mode="bicubic", antialias=True)`` (PIL's: bicubic a = -0.5, support scaled by
the downscale factor, weights normalised per output pixel, sample positions clamped to the crop box), shifted to
the crop's offset. All crops of one size become two batched matmuls over zero-padded images. Real ImageNet
sizes vary (mostly ~500x375 either way, a few up to 4000 px, some tiny), so the images are first grouped into a few
size buckets (:func:`plan_buckets`: at most 8, padding ~10 % instead of up to ~20x for one canvas padded to the
batch's largest image, and a bound on each bucket's memory), each padded only to its own largest size; the crops
go back to their samples' positions. The result is rounded to uint8 levels as the CPU path's uint8 resize does.
``resize="per_crop"`` (the default on CPU) calls the CPU path's own ``torchvision.transforms.v2.functional.
resized_crop`` per crop instead: on the CPU it equals the worker path up to the fp32 rounding of batching
``augment_resized`` (< 1e-5).

Tolerance of ``matmul`` against the CPU path (``tests/test_gpu_augment.py``): PyTorch's CPU uint8 kernel
quantises the weights to integers; the matmul keeps float weights (it does round and clamp to uint8 levels between
the horizontal and the vertical pass, as that kernel does — without it, bicubic overshoot at hard edges made
pixels differ by up to 8 levels). Measured on the imagenet-sample JPEGs: ~0.4 % of resized-crop values differ, by
1 level (rarely 2). After the rest of the chain 1 level is 1/255/std ≈ 0.017 in normalised units; the mean absolute
difference is ~7e-5 and the largest seen 0.056. Solarisation (threshold 128) and hue at near-grey pixels can turn a
1-level difference into a large one on the rare pixel right at an edge, so the test bounds the mean and the 99.9th
percentile, not the maximum. On CUDA, nvjpeg's IDCT and chroma upsampling may differ from libjpeg-turbo's by a
level or so too (not testable here; ``benchmarks/speed.py`` reports it).

    >>> sampler = CropParamSampler(CropsConfig())                     # in the workers (reader param_sampler=)
    >>> aug = DeviceMultiCrop(CropsConfig(), torch.device("cuda"))
    >>> crops = aug(batch["encoded"], batch["params"])               # [2 + n_local] tensors [B, 3, s, s]
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from ..config import CropsConfig
from .augment import CropParams, MultiCropAugmentation, augment_resized

__all__ = [
    "RESIZE_MODES",
    "image_size",
    "CropParamSampler",
    "aa_bicubic_weights",
    "ResizeBucket",
    "bucket_bytes",
    "plan_buckets",
    "DeviceMultiCrop",
]

RESIZE_MODES = ("auto", "matmul", "per_crop")

_JPEG_SOI = b"\xff\xd8"


def _as_bytes(data: bytes | torch.Tensor) -> bytes:
    return data.numpy().tobytes() if isinstance(data, torch.Tensor) else bytes(data)


def image_size(data: bytes | torch.Tensor) -> tuple[int, int]:
    """(height, width) of an encoded image from its header only (PIL opens lazily: no pixel is decoded)."""
    from PIL import Image

    with Image.open(io.BytesIO(_as_bytes(data))) as im:
        width, height = im.size
    return height, width


class CropParamSampler:
    """``sampler(encoded_bytes, generator) -> list[CropParams]``: the CPU pipeline's parameter draws for one encoded
    image, without decoding it. Picklable, so it runs in data-loader workers (``build_loader(param_sampler=...)``)."""

    def __init__(self, cfg: CropsConfig):
        self.aug = MultiCropAugmentation(cfg)

    def __call__(self, data: bytes | torch.Tensor, generator: torch.Generator) -> list[CropParams]:
        height, width = image_size(data)
        return self.aug.sample_params(generator, height, width)


def _bicubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """PIL's / PyTorch's antialiasing bicubic filter (a = -0.5; the non-antialiased kernel uses -0.75)."""
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def aa_bicubic_weights(offset: torch.Tensor, length: torch.Tensor, out_size: int, total: int) -> torch.Tensor:
    """Resampling matrices [N, out_size, total] for N crops along one axis: crop i covers source pixels
    ``offset[i] .. offset[i] + length[i] - 1`` of an axis of ``total`` pixels (zero-padded beyond the image).

    Mirrors ``_compute_indices_min_size_weights_aa`` of PyTorch's antialiased interpolation (align_corners=False):
    scale = length / out_size; centre = scale * (o + 0.5); support = 2 * max(scale, 1); taps j in
    [trunc(centre - support + 0.5) clamped to 0, trunc(centre + support + 0.5) clamped to length), weight
    bicubic((j - centre + 0.5) / max(scale, 1)), normalised to sum 1."""
    dev = offset.device
    # float32 as PyTorch's own kernel computes them for float images (positions < 2^24 are exact)
    length = length.to(torch.float32)
    scale = (length / out_size)[:, None, None]  # [N, 1, 1]
    o = torch.arange(out_size, dtype=torch.float32, device=dev)[None, :, None]
    centre = scale * (o + 0.5)  # [N, s, 1]
    support = 2.0 * scale.clamp(min=1.0)
    lo = torch.trunc(centre - support + 0.5).clamp(min=0.0)
    hi = torch.minimum(torch.trunc(centre + support + 0.5), length[:, None, None])
    j = torch.arange(total, dtype=torch.float32, device=dev)[None, None, :] - offset.to(torch.float32)[:, None, None]
    w = _bicubic((j - centre + 0.5) / scale.clamp(min=1.0)) * ((j >= lo) & (j < hi))
    return w / w.sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class ResizeBucket:
    """Images resized on one zero-padded canvas: their batch positions (in canvas order) and the canvas size."""

    indices: tuple[int, ...]
    height: int
    width: int


def bucket_bytes(n_images: int, height: int, width: int, n_crop: int, crop_size: int) -> int:
    """float32 working set of one bucket's resize on an ``height`` x ``width`` canvas: the canvas (3·H·W), the
    horizontal pass's output and einsum's contiguous copy of it for the second matmul (2 · n·3·H·s), both weight
    matrices (n·s·(H + W)) and the output (n·3·s²), per image, 4 bytes each."""
    per_image = 3 * height * width + 6 * n_crop * height * crop_size + n_crop * crop_size * (height + width) \
        + 3 * n_crop * crop_size * crop_size
    return 4 * n_images * per_image


def _check_bucket_options(**options: float) -> None:
    """The three bucket options, in the caller's own names (in order): bucket count >= 1, padding waste >= 0,
    byte bound > 0; a ValueError names the bad one."""
    (n_name, n), (w_name, w), (b_name, b) = options.items()
    if n < 1:
        raise ValueError(f"{n_name} must be >= 1, got {n}")
    if w < 0:
        raise ValueError(f"{w_name} must be >= 0, got {w}")
    if b <= 0:
        raise ValueError(f"{b_name} must be > 0, got {b}")


def plan_buckets(sizes: Sequence[tuple[int, int]], *, n_crop: int, crop_size: int, max_buckets: int = 8,
                 max_waste: float = 0.1, max_bytes: int = 2 << 30) -> list[ResizeBucket]:
    """Group a batch's images (``sizes[i]`` = (height, width)) into few buckets with little zero padding.

    Cost model: a bucket of n images padded to H x W costs n·H·W *padded pixels* (the horizontal einsum's FLOPs and
    the canvas memory are proportional to it; the vertical one to n·H), plus a fixed kernel-launch overhead (~40
    small kernels per bucket). So the plan is:

    1. Order the images landscape-or-square first, then portrait, each by (short side, long side): neighbours in
       this order have similar shapes, and 500x375 never shares a canvas with 375x500 unless that is cheaper
       (together they pad to 500x500: 33 % more pixels than either).
    2. Over the distinct sizes in that order, an exact dynamic programme finds, for k = 1, 2, ... buckets, the
       contiguous partition with the fewest padded pixels; it stops at the first k whose padded pixels are within
       ``max_waste`` (default 10 %) of the images' own pixels, or at ``max_buckets`` (default 8). O(k·G²) numpy
       work for G distinct sizes (≤ the batch), computed once per crop group on the host.
    3. A bucket whose :func:`bucket_bytes` would exceed ``max_bytes`` (default 2 GiB) is cut, in the same order,
       into consecutive pieces that fit, each padded only to its own largest size (a single image over the
       bound still gets a bucket of its own). So a batch of huge images cannot exhaust device memory, at the
       price of a few more launches for buckets that are already large.

    Numbers (50 seeded batches of 128 from the ImageNet-like size mix of ``tests/test_gpu_augment.py``; width x
    height: 60 % of 500 x 375 / 375 x 500 / 500 x 333 / 333 x 500, 35 % other sizes with a 500-pixel long side,
    3 % with a long side of 1000-2500, 2 % small; both crop groups of 2 x 224 + 8 x 96): one canvas padded to the
    batch's largest height and width holds 7-21x (mean 16x) the images' own pixels — one 2500 x 2000 image makes
    it 7.7 GB of float32 at batch 128, with ~25x the einsum FLOPs of a 500 x 375 batch. With the defaults the plan
    uses 5-8 buckets (mean 6.8) and pads by 9 % on average, 11 % at worst; 6 buckets would pad by 12 % (27 % at
    worst), 4 by 31 % (59 %). ~1-2 ms of host time per plan on a busy 2-core VM. A uniform batch is one bucket
    (the single-canvas path); at the default ``max_bytes`` a uniform batch of 128 500 x 375 images stays one
    bucket for the 8 x 96 local crops (1.5 GiB), one of 256 is cut in two.
    """
    if not sizes:
        raise ValueError("plan_buckets needs at least one image size")
    _check_bucket_options(max_buckets=max_buckets, max_waste=max_waste, max_bytes=max_bytes)
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i][0] > sizes[i][1], min(sizes[i]), max(sizes[i]), i))
    # distinct sizes in that order (equal sizes are adjacent) and how many images each has
    run_start = [j for j in range(len(order)) if j == 0 or sizes[order[j]] != sizes[order[j - 1]]]
    heights = np.array([sizes[order[j]][0] for j in run_start], dtype=np.float64)
    widths = np.array([sizes[order[j]][1] for j in run_start], dtype=np.float64)
    counts = np.diff(np.array(run_start + [len(order)], dtype=np.float64))
    g = len(run_start)
    # cost[i, j]: padded pixels of one bucket holding distinct sizes i..j (inf for j < i)
    idx = np.arange(g)
    upper = idx[None, :] >= idx[:, None]
    h_max = np.maximum.accumulate(np.where(upper, heights[None, :], 0.0), axis=1)
    w_max = np.maximum.accumulate(np.where(upper, widths[None, :], 0.0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    cost = np.where(upper, (cum[None, 1:] - cum[:-1, None]) * h_max * w_max, np.inf)
    target = (1.0 + max_waste) * float((counts * heights * widths).sum())
    best = cost[0].copy()  # best[j]: fewest padded pixels covering sizes 0..j with k buckets (k = 1 here)
    starts: list[np.ndarray] = []  # for k = 2, 3, ...: where the last bucket starts, per j
    while best[-1] > target and len(starts) + 1 < min(max_buckets, g):
        prev = np.concatenate([[np.inf], best[:-1]])  # prev[i]: sizes 0..i-1 with one bucket fewer
        total = prev[:, None] + cost  # [start i of the last bucket, end j]
        start = total.argmin(axis=0)
        best = total[start, idx]
        starts.append(start)
    segments, end = [], g - 1
    for start in reversed(starts):
        segments.append((int(start[end]), end))
        end = int(start[end]) - 1
    segments.append((0, end))
    buckets: list[ResizeBucket] = []
    for first, last in reversed(segments):
        piece: list[int] = []
        h = w = 0
        for i in order[run_start[first]: int(cum[last + 1])]:
            nh, nw = max(h, sizes[i][0]), max(w, sizes[i][1])
            if piece and bucket_bytes(len(piece) + 1, nh, nw, n_crop, crop_size) > max_bytes:
                buckets.append(ResizeBucket(tuple(piece), h, w))
                piece, nh, nw = [], sizes[i][0], sizes[i][1]
            piece.append(i)
            h, w = nh, nw
        buckets.append(ResizeBucket(tuple(piece), h, w))
    return buckets


def _resize_canvas(canvas: torch.Tensor, boxes: torch.Tensor, n_crop: int, size: int) -> torch.Tensor:
    """[B, n_crop, 3, s, s] uint8-valued float crops of a zero-padded float32 canvas [B, 3, H, W]; ``boxes`` holds
    (top, left, height, width) per crop, image-major [B * n_crop, 4]."""
    n_img, _, height, width = canvas.shape
    wy = aa_bicubic_weights(boxes[:, 0], boxes[:, 2], size, height).reshape(n_img, n_crop, size, height)
    wx = aa_bicubic_weights(boxes[:, 1], boxes[:, 3], size, width).reshape(n_img, n_crop, size, width)
    # einsum keeps these plain batched matmuls without expanding the images over the n crops:
    # [B, 3·H, W] @ [B, W, n·s] per image, then [B·n, s, H] @ [B·n, H, 3·s] per crop.
    horizontal = torch.einsum("bchw,bnsw->bnchs", canvas, wx)
    # Round + clamp between the passes as the uint8 kernel does: bicubic overshoots past 0/255 at hard edges,
    # and without the intermediate clamp such pixels would differ by several levels.
    horizontal = horizontal.round_().clamp_(0.0, 255.0)
    out = torch.einsum("bnth,bnchs->bncts", wy, horizontal)
    return out.round_().clamp_(0.0, 255.0)  # the CPU path's uint8 crop


class DeviceMultiCrop:
    """Batched multi-crop augmentation on ``device`` from encoded images and pre-drawn :class:`CropParams`.

    ``aug(encoded, params) -> [global1, global2, local1, ...]``, each a float32 [B, 3, s, s] tensor on ``device``,
    normalised: the layout of the CPU loader's ``batch["crops"]``. ``encoded`` holds uint8 1-D byte tensors (the
    reader's ``decode=False`` batches); ``params[b]`` the sample's ``2 + n_local`` :class:`CropParams`.
    ``sync_free`` (default: on CUDA) is :func:`augment_resized`'s option of the same name for everything after the
    crop.
    ``resize``: ``"matmul"`` (batched, see the module docstring), ``"per_crop"`` (the CPU path's own resize per
    crop: the worker path's result on CPU up to < 1e-5) or ``"auto"`` (matmul on CUDA, per_crop elsewhere).
    """

    def __init__(self, cfg: CropsConfig, device: torch.device | str, resize: str = "auto",
                 sync_free: bool | None = None, max_buckets: int = 8, bucket_waste: float = 0.1,
                 max_bucket_bytes: int = 2 << 30):
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {list(RESIZE_MODES)}, got {resize!r}")
        _check_bucket_options(max_buckets=max_buckets, bucket_waste=bucket_waste, max_bucket_bytes=max_bucket_bytes)
        #: matmul resize: at most this many size buckets per crop group (more only where max_bucket_bytes forces)
        self.max_buckets = int(max_buckets)
        #: matmul resize: stop adding buckets once padded pixels are within this fraction of the images' own
        self.bucket_waste = float(bucket_waste)
        #: matmul resize: float32 working-set bound of one bucket (see :func:`bucket_bytes`); larger ones are cut
        self.max_bucket_bytes = int(max_bucket_bytes)
        self.cfg = cfg
        self.device = torch.device(device)
        self.resize = resize if resize != "auto" else ("matmul" if self.device.type == "cuda" else "per_crop")
        #: augment_resized(sync_free=...) after the crop: every op on every row, no host read-back (default on CUDA)
        self.sync_free = self.device.type == "cuda" if sync_free is None else bool(sync_free)
        self._aug = MultiCropAugmentation(cfg)
        self._decode_stream: "torch.cuda.Stream | None" = None  # CUDA: see decode()

    # -- decoding ------------------------------------------------------------------------------------------------
    def decode(self, encoded: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 [3, H, W] images on the device. JPEGs go through one batched ``decode_jpeg`` call (nvjpeg on
        CUDA); anything else (PNG in an ImageFolder, CMYK JPEGs nvjpeg refuses) is decoded by the CPU reader's
        decoder and copied over.

        On CUDA the decode runs with a stream of its own current. torchvision's CUDA decoder allocates its output
        on the caller's current stream but writes it from a private stream that does not wait for the caller's
        queued kernels (pytorch/vision PR #9606: with blocks just freed on the caller's stream still being read by
        queued kernels, nvjpeg overwrote them — corrupted inputs of earlier work). On a stream used for nothing
        else, every block the allocator can hand out is a decoded image of an earlier call, and those are
        ``record_stream``-ed to the consumer below, so none is reused before the consumer has read it. The
        consumer's stream then waits for the decode on the GPU (no host sync)."""
        if self.device.type != "cuda":
            return self._decode_batch(encoded)
        consumer = torch.cuda.current_stream(self.device)
        if self._decode_stream is None:
            self._decode_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._decode_stream):
            images = self._decode_batch(encoded)
        consumer.wait_stream(self._decode_stream)
        for image in images:
            image.record_stream(consumer)
        return images

    def _decode_batch(self, encoded: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        from .reader import decode_image

        images: list[torch.Tensor | None] = [None] * len(encoded)
        jpeg_idx = [i for i, e in enumerate(encoded) if e.numel() > 2 and _as_bytes(e[:2]) == _JPEG_SOI]
        if jpeg_idx:
            try:
                decoded = decode_jpeg([encoded[i] for i in jpeg_idx], mode=ImageReadMode.RGB, device=self.device)
                for i, img in zip(jpeg_idx, decoded):
                    images[i] = img
            except RuntimeError:  # one unusual JPEG fails the whole batched call: decode them one by one
                for i in jpeg_idx:
                    images[i] = self._decode_one(encoded[i], decode_image)
        for i, img in enumerate(images):
            if img is None:
                images[i] = self._decode_one(encoded[i], decode_image)
        return images  # type: ignore[return-value]

    def _decode_one(self, data: torch.Tensor, fallback) -> torch.Tensor:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return fallback(_as_bytes(data)).pin_memory().to(self.device, non_blocking=True) \
                if self.device.type == "cuda" else fallback(_as_bytes(data))

    # -- cropping ------------------------------------------------------------------------------------------------
    def resized_crops(self, images: Sequence[torch.Tensor], params: Sequence[Sequence[CropParams]],
                      crop_indices: Sequence[int]) -> torch.Tensor:
        """The resized crops ``crop_indices`` (all of one output size) of every image, crop-major:
        [len(crop_indices) * B, 3, s, s], float with uint8 values 0–255."""
        size = params[0][crop_indices[0]].size
        flat = [params[b][k] for k in crop_indices for b in range(len(images))]
        if any(p.size != size for p in flat):
            raise ValueError(f"crops {list(crop_indices)} must share one output size")
        if self.resize == "per_crop":
            out = [self._aug.resized_crop(images[b], params[b][k]) for k in crop_indices for b in range(len(images))]
            return torch.stack(out).float()
        return self._matmul_crops(images, params, crop_indices, size)

    def _matmul_crops(self, images, params, crop_indices, size: int) -> torch.Tensor:
        """Bucketed matmul resize (see :func:`plan_buckets`): each bucket's images are zero-padded to the bucket's
        own largest height and width, resized by :func:`_resize_canvas`, and written back into the crop-major
        [n_crop * B, 3, s, s] layout at their original sample positions. Only host metadata (image shapes, crop
        boxes) decides the buckets, and the two small host tables go over in pinned non-blocking copies: no
        host-device sync."""
        n_img, n_crop = len(images), len(crop_indices)
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        buckets = plan_buckets(sizes, n_crop=n_crop, crop_size=size, max_buckets=self.max_buckets,
                               max_waste=self.bucket_waste, max_bytes=self.max_bucket_bytes)
        order = [i for bucket in buckets for i in bucket.indices]  # canvas order: bucket after bucket
        boxes = self._to_device(torch.tensor(
            [[params[b][k].top, params[b][k].left, params[b][k].height, params[b][k].width]
             for b in order for k in crop_indices], dtype=torch.float32))  # [B * n, 4], canvas order
        if len(buckets) == 1 and order == list(range(n_img)):  # uniform batch: one canvas, sample order kept
            out = _resize_canvas(self._canvas(images, buckets[0]), boxes, n_crop, size)
            return out.transpose(0, 1).reshape(n_crop * n_img, 3, size, size)
        positions = self._to_device(torch.tensor(order, dtype=torch.int64))
        out = torch.empty(n_crop, n_img, 3, size, size, dtype=torch.float32, device=self.device)
        start = 0
        for bucket in buckets:
            end = start + len(bucket.indices)
            resized = _resize_canvas(self._canvas(images, bucket), boxes[start * n_crop: end * n_crop], n_crop, size)
            out.index_copy_(1, positions[start:end], resized.transpose(0, 1))  # back to the samples' positions
            start = end
        return out.reshape(n_crop * n_img, 3, size, size)

    def _to_device(self, table: torch.Tensor) -> torch.Tensor:
        """A small host table on the device: pinned + non_blocking on CUDA, so the host does not wait."""
        if self.device.type == "cuda":
            table = table.pin_memory()
        return table.to(self.device, non_blocking=True)

    def _canvas(self, images, bucket: "ResizeBucket") -> torch.Tensor:
        """float32 [n, 3, H, W]: the bucket's images zero-padded to its (H, W). Images of one size are contiguous in
        a bucket (plan order), so each run of equal sizes is one stack + one copy rather than one copy per image."""
        members = [images[i] for i in bucket.indices]
        runs: list[tuple[int, int]] = []  # [start, end) of equal-size runs
        for j, im in enumerate(members):
            if runs and members[runs[-1][0]].shape == im.shape:
                runs[-1] = (runs[-1][0], j + 1)
            else:
                runs.append((j, j + 1))
        if len(runs) == 1 and tuple(members[0].shape[-2:]) == (bucket.height, bucket.width):
            return torch.stack(members).float()
        canvas = torch.zeros(len(members), 3, bucket.height, bucket.width, dtype=torch.float32, device=self.device)
        for a, b in runs:
            h, w = members[a].shape[-2:]
            canvas[a:b, :, :h, :w] = torch.stack(members[a:b]) if b - a > 1 else members[a]
        return canvas

    # -- the whole pipeline --------------------------------------------------------------------------------------
    def crops_from_images(self, images: Sequence[torch.Tensor],
                          params: Sequence[Sequence[CropParams]]) -> list[torch.Tensor]:
        """Crops of already-decoded uint8 [3, H, W] device images (see the class docstring for the layout)."""
        n_img = len(images)
        if n_img == 0 or len(params) != n_img:
            raise ValueError(f"need one params list per image, got {len(params)} for {n_img} images")
        n_crops = self.cfg.ncrops
        if any(len(p) != n_crops for p in params):
            raise ValueError(f"every sample needs {n_crops} CropParams (2 global + {self.cfg.n_local} local)")
        groups = [list(range(2))] + ([list(range(2, n_crops))] if n_crops > 2 else [])
        out: list[torch.Tensor] = []
        for group in groups:
            resized = self.resized_crops(images, params, group)
            flat = [params[b][k] for k in group for b in range(n_img)]
            augmented = augment_resized(resized / 255.0, flat, self.cfg, sync_free=self.sync_free)
            out.extend(augmented.split(n_img))
        return out

    def __call__(self, encoded: Sequence[torch.Tensor], params: Sequence[Sequence[CropParams]]) -> list[torch.Tensor]:
        return self.crops_from_images(self.decode(encoded), params)
