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
  and normalisation on whole crop groups at once: :func:`augment_resized_sync_free` on CUDA (no host-device sync,
  so the CPU can queue the next batch's work while the GPU still runs the step), the CPU path's own
  :func:`dino_model.data.augment.augment_resized` elsewhere (same results, tested).

Unverified on a GPU so far (no device in the session that wrote this): nvjpeg's output against libjpeg-turbo's,
the speed of every piece, and whether torchvision's batched GPU ``decode_jpeg`` synchronises internally.
``benchmarks/speed.py`` checks the first and measures the rest.

Random-resized crop, batched (``resize="matmul"``, the default on CUDA): antialiased bicubic resampling is
separable, so each crop is ``Wy @ image @ Wx^T`` with ``Wy`` [s, H] and ``Wx`` [s, W] holding the exact filter
weights of PyTorch's ``interpolate(mode="bicubic", antialias=True)`` (PIL's: bicubic a = -0.5, support scaled by
the downscale factor, weights normalised per output pixel, sample positions clamped to the crop box), shifted to
the crop's offset. All crops of one size in a batch become two batched matmuls over the zero-padded images. The
result is rounded to uint8 levels as the CPU path's uint8 resize does. ``resize="per_crop"`` (the default on CPU)
calls the CPU path's own ``torchvision.transforms.v2.functional.resized_crop`` per crop instead: on the CPU it
equals the worker path up to the fp32 rounding of batching ``augment_resized`` (< 1e-5).

Tolerance of ``matmul`` against the CPU path (``tests/test_gpu_augment.py``): PyTorch's CPU uint8 kernel
quantises the weights to integers; the matmul keeps float weights (it does round and clamp to uint8 levels between
the horizontal and the vertical pass, as that kernel does — without it, bicubic overshoot at hard edges made
pixels differ by up to 8 levels). Measured on the imagenet-sample JPEGs: ~0.4 % of resized-crop values differ, by
1 level (rarely 2). After the rest of the chain 1 level is 1/255/std ≈ 0.017 in normalised units; the mean absolute
difference is ~7e-5 and the largest seen 0.056. Solarisation (threshold 128) and hue at near-grey pixels can turn a
1-level difference into a large one on the rare pixel right at an edge, so the test bounds the mean and the 99.9th
percentile, not the maximum. On CUDA, nvjpeg's IDCT and chroma upsampling may differ from libjpeg-turbo's by a
level or so too (not testable here; ``benchmarks/speed.py`` reports it).

    >>> sampler = CropParamSampler(MultiCropConfig())                 # in the workers (reader param_sampler=)
    >>> aug = DeviceMultiCrop(MultiCropConfig(), torch.device("cuda"))
    >>> crops = aug(batch["encoded"], batch["params"])               # [2 + n_local] tensors [B, 3, s, s]
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    CropParams,
    MultiCropAugmentation,
    MultiCropConfig,
    _blur_kernels,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augment_resized,
    normalize,
    to_grayscale,
)

__all__ = [
    "RESIZE_MODES",
    "image_size",
    "CropParamSampler",
    "aa_bicubic_weights",
    "augment_resized_sync_free",
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

    def __init__(self, cfg: MultiCropConfig):
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


def _param_table(params: Sequence[CropParams], device: torch.device) -> torch.Tensor:
    """[N, 16] float32 per-crop parameters on ``device``: one host tensor, one (pinned, non-blocking) copy."""
    rows = [[p.flip, p.jitter, *p.jitter_order, p.brightness, p.contrast, p.saturation, p.hue, p.grayscale,
             p.blur, p.sigma, p.solarize, 0.0, 0.0] for p in params]
    table = torch.tensor(rows, dtype=torch.float32)
    if device.type == "cuda":
        table = table.pin_memory()
    return table.to(device, non_blocking=True)


def augment_resized_sync_free(crops: torch.Tensor, params: Sequence[CropParams], cfg: MultiCropConfig) -> torch.Tensor:
    """:func:`augment_resized` without a host-device sync, for CUDA.

    ``augment_resized`` selects the rows each operation applies to with boolean masks it reads back on the host
    (``mask.any()``, ``nonzero``) and builds small device tensors from Python lists: each is a sync that stalls the
    CPU until the GPU has drained its queue (the previous training step included). Here every operation runs on
    every row with per-row parameters, and rows that skip it get an exact identity (factor 1 for brightness,
    contrast and saturation: ``1·x + 0·y`` is ``x`` bit for bit) or are restored with ``torch.where`` (hue, whose
    HSV round trip is not exact; flip, greyscale, blur, solarisation). The blur uses the static radius
    ceil(3·max sigma of the config) with each row's kernel truncated at its own ceil(3σ), as ``augment_resized``
    does. More arithmetic (every jitter operation in each of the 4 order slots, on every crop) for no stall: same
    result up to fp32 rounding (tested)."""
    if crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[0] != len(params):
        raise ValueError(f"needs [N, 3, H, W] crops and N params, got {tuple(crops.shape)} / {len(params)}")
    x = crops.float() / 255.0 if not crops.is_floating_point() else crops.float()
    t = _param_table(params, x.device)
    col = lambda i: t[:, i]  # noqa: E731
    as_mask = lambda i: (t[:, i] > 0.5).view(-1, 1, 1, 1)  # noqa: E731
    x = torch.where(as_mask(0), x.flip(-1), x)
    jitter = t[:, 1] > 0.5
    for slot in range(4):
        op = torch.where(jitter, t[:, 2 + slot], torch.full_like(t[:, 0], -1.0))
        for kind, column, fn in ((BRIGHTNESS, 6, adjust_brightness), (CONTRAST, 7, adjust_contrast),
                                 (SATURATION, 8, adjust_saturation)):
            x = fn(x, torch.where(op == kind, col(column), torch.ones_like(op)))
        x = torch.where((op == HUE).view(-1, 1, 1, 1), adjust_hue(x, col(9)), x)
    x = torch.where(as_mask(10), to_grayscale(x).expand_as(x), x)
    height, width = x.shape[-2:]
    radius = min(int(math.ceil(3.0 * cfg.blur_sigma[1])), height - 1, width - 1)
    if radius >= 1:
        sigma = torch.where(t[:, 11] > 0.5, col(12), torch.ones_like(col(12)))  # 1: any valid sigma, discarded
        n, c = x.shape[:2]
        k = _blur_kernels(sigma, radius).to(x.dtype).repeat_interleave(c, dim=0)
        y = F.pad(x.reshape(1, n * c, height, width), (radius,) * 4, mode="reflect")
        y = F.conv2d(y, k[:, None, None, :], groups=n * c)
        y = F.conv2d(y, k[:, None, :, None], groups=n * c).reshape(n, c, height, width)
        x = torch.where(as_mask(11), y, x)
    threshold = cfg.solarize_threshold / 255.0
    x = torch.where(as_mask(13) & (x >= threshold), 1.0 - x, x)
    return normalize(x, cfg.mean, cfg.std)


class DeviceMultiCrop:
    """Batched multi-crop augmentation on ``device`` from encoded images and pre-drawn :class:`CropParams`.

    ``aug(encoded, params) -> [global1, global2, local1, ...]``, each a float32 [B, 3, s, s] tensor on ``device``,
    normalised: the layout of the CPU loader's ``batch["crops"]``. ``encoded`` holds uint8 1-D byte tensors (the
    reader's ``decode=False`` batches); ``params[b]`` the sample's ``2 + n_local`` :class:`CropParams`.
    ``sync_free`` (default: on CUDA) uses :func:`augment_resized_sync_free` for everything after the crop.
    ``resize``: ``"matmul"`` (batched, see the module docstring), ``"per_crop"`` (the CPU path's own resize per
    crop: the worker path's result on CPU up to < 1e-5) or ``"auto"`` (matmul on CUDA, per_crop elsewhere).
    """

    def __init__(self, cfg: MultiCropConfig, device: torch.device | str, resize: str = "auto",
                 sync_free: bool | None = None):
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {list(RESIZE_MODES)}, got {resize!r}")
        self.cfg = cfg
        self.device = torch.device(device)
        self.resize = resize if resize != "auto" else ("matmul" if self.device.type == "cuda" else "per_crop")
        #: colour/blur/solarise via augment_resized_sync_free (default on CUDA) or augment_resized (elsewhere)
        self.sync_free = self.device.type == "cuda" if sync_free is None else bool(sync_free)
        self._aug = MultiCropAugmentation(cfg)

    # -- decoding ------------------------------------------------------------------------------------------------
    def decode(self, encoded: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 [3, H, W] images on the device. JPEGs go through one batched ``decode_jpeg`` call (nvjpeg on
        CUDA); anything else (PNG in an ImageFolder, CMYK JPEGs nvjpeg refuses) is decoded by the CPU reader's
        decoder and copied over."""
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
        n_img, n_crop = len(images), len(crop_indices)
        h_max = max(int(im.shape[-2]) for im in images)
        w_max = max(int(im.shape[-1]) for im in images)
        padded = torch.zeros(n_img, 3, h_max, w_max, dtype=torch.float32, device=self.device)
        for b, im in enumerate(images):
            padded[b, :, : im.shape[-2], : im.shape[-1]] = im
        # One small host tensor of boxes, copied once (pinned + non_blocking on CUDA): image-major [B * n, 4].
        boxes = torch.tensor([[params[b][k].top, params[b][k].left, params[b][k].height, params[b][k].width]
                              for b in range(n_img) for k in crop_indices], dtype=torch.float32)
        if self.device.type == "cuda":
            boxes = boxes.pin_memory()
        boxes = boxes.to(self.device, non_blocking=True)
        wy = aa_bicubic_weights(boxes[:, 0], boxes[:, 2], size, h_max).reshape(n_img, n_crop, size, h_max)
        wx = aa_bicubic_weights(boxes[:, 1], boxes[:, 3], size, w_max).reshape(n_img, n_crop, size, w_max)
        # einsum keeps these plain batched matmuls without expanding the images over the n crops:
        # [B, 3·H, W] @ [B, W, n·s] per image, then [B·n, s, H] @ [B·n, H, 3·s] per crop.
        horizontal = torch.einsum("bchw,bnsw->bnchs", padded, wx)
        # Round + clamp between the passes as the uint8 kernel does: bicubic overshoots past 0/255 at hard edges,
        # and without the intermediate clamp such pixels would differ by several levels.
        horizontal = horizontal.round_().clamp_(0.0, 255.0)
        out = torch.einsum("bnth,bnchs->bncts", wy, horizontal)
        out = out.round_().clamp_(0.0, 255.0)  # the CPU path's uint8 crop
        return out.transpose(0, 1).reshape(n_crop * n_img, 3, size, size)

    # -- the whole pipeline --------------------------------------------------------------------------------------
    def crops_from_images(self, images: Sequence[torch.Tensor],
                          params: Sequence[Sequence[CropParams]]) -> list[torch.Tensor]:
        """Crops of already-decoded uint8 [3, H, W] device images (see the class docstring for the layout)."""
        n_img = len(images)
        if n_img == 0 or len(params) != n_img:
            raise ValueError(f"need one params list per image, got {len(params)} for {n_img} images")
        n_crops = self.cfg.n_crops
        if any(len(p) != n_crops for p in params):
            raise ValueError(f"every sample needs {n_crops} CropParams (2 global + {self.cfg.n_local} local)")
        groups = [list(range(2))] + ([list(range(2, n_crops))] if n_crops > 2 else [])
        out: list[torch.Tensor] = []
        for group in groups:
            resized = self.resized_crops(images, params, group)
            flat = [params[b][k] for k in group for b in range(n_img)]
            augment = augment_resized_sync_free if self.sync_free else augment_resized
            augmented = augment(resized / 255.0, flat, self.cfg)
            out.extend(augmented.split(n_img))
        return out

    def __call__(self, encoded: Sequence[torch.Tensor], params: Sequence[Sequence[CropParams]]) -> list[torch.Tensor]:
        return self.crops_from_images(self.decode(encoded), params)
