"""DINO multi-crop augmentation on uint8 tensors, with parameter *sampling* kept apart from *applying*.

The recipe is the reference implementation's ``DataAugmentationDINO`` (Caron et al. 2021): 2 global crops and N
local crops, each a RandomResizedCrop (bicubic), then horizontal flip p 0.5, colour jitter (0.4, 0.4, 0.2, 0.1)
p 0.8 with its four operations in a random order, greyscale p 0.2, Gaussian blur (sigma 0.1–2) p 1.0 on global 1,
0.1 on global 2 and 0.5 on the locals, solarisation p 0.2 on global 2 only, ImageNet normalisation.

Two steps, so that a batched GPU implementation can reuse the very same random draws:

* :meth:`MultiCropAugmentation.sample_params` draws every random number for one image from a
  :class:`torch.Generator` (from :func:`dino_model.data.rng.sample_generator`, i.e. a function of
  (seed, epoch, sample key)) into plain :class:`CropParams` records. The draws follow torchvision's own order
  (``RandomResizedCrop.get_params``, ``RandomHorizontalFlip``, ``RandomApply(ColorJitter)``,
  ``ColorJitter.get_params``, ``RandomGrayscale``), so with the same seed they pick the same boxes and factors.
* :meth:`MultiCropAugmentation.apply` executes them: the crop + bicubic resize on uint8 (``antialias=True``, as
  PIL does), then everything else in float32 through :func:`augment_resized`, which takes a *batch* of resized
  crops with per-sample parameters (as :class:`PostCropParams`, named per-crop tensors) — the same function the
  device path (:mod:`dino_model.data.gpu_augment`) runs on whole crop groups.

Speed against the reference PIL pipeline: ``benchmarks/cpu_augment.py`` (results in docs/benchmarks.md); why the
small float ops are written as they are is noted above them.

Differences from the PIL pipeline of the reference (tested in ``tests/test_augment.py``): PIL rounds to uint8 after
every operation, these ops stay in float; greyscale/contrast/saturation use the ITU-R 601-2 luma weights
(0.299, 0.587, 0.114) as PIL does (torchvision's tensor ops use 0.2989); the blur is a true Gaussian with a kernel
covering ±3σ (PIL approximates it with extended box blurs); hue is shifted in float HSV (PIL in 8-bit HSV).

    >>> aug = MultiCropAugmentation(CropsConfig(global_size=128, local_size=64))
    >>> crops = aug(img_uint8_chw, sample_generator(seed, epoch, key))   # list of 2 + n_local float tensors
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dino_model.config import CropsConfig

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LUMA_WEIGHTS",
    "CropParams",
    "MultiCropAugmentation",
    "sample_resized_crop",
    "PostCropParams",
    "augment_resized",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "to_grayscale",
    "BLUR_METHODS",
    "gaussian_blur",
    "solarize",
    "normalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ITU-R 601-2 luma, as PIL's ``convert("L")``.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

#: Colour-jitter operation ids, in torchvision's numbering (``ColorJitter`` applies them in ``randperm(4)`` order).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class CropParams:
    """Every random choice for one crop: plain numbers, so they can be stacked into tensors for a batched
    implementation. Unapplied operations hold identity values (factors 1, hue 0)."""

    size: int  #: output side in pixels
    top: int  #: crop box in source pixels
    left: int
    height: int
    width: int
    flip: bool
    jitter: bool  #: whether colour jitter was drawn (if not, the factors below are identities)
    jitter_order: tuple[int, int, int, int]  #: order of BRIGHTNESS, CONTRAST, SATURATION, HUE
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale: bool
    blur: bool
    sigma: float  #: blur standard deviation in output pixels (0 when not blurred)
    solarize: bool


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return torch.empty(1).uniform_(lo, hi, generator=g).item()


def _bernoulli(g: torch.Generator, p: float) -> bool:
    # torchvision draws torch.rand(1) and compares with "<"; same here so identical seeds pick identical crops.
    return bool(torch.rand(1, generator=g) < p)


def sample_resized_crop(
    g: torch.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` with torchvision ``RandomResizedCrop.get_params`` semantics and draw order: target
    area uniform in ``scale`` × image area, aspect ratio log-uniform in ``ratio``, 10 tries, then a centre crop
    clamped to the ratio range."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))  # float32 as torchvision, so the same seed gives the same boxes
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ----------------------------------------------------------------------------------------------------------------
# Operations on float images in [0, 1], shape [..., 3, H, W]. Factors are Python floats or tensors with one value
# per leading index (shape [N] for [N, 3, H, W]), so the same code runs per image on the CPU or batched on a GPU.
#
# Written for the CPU worker, where these ops on one 96-224 px crop at a time are what an image costs: no bool
# tensors (on the CPU a comparison into a bool tensor, and torch.where reading one, cost ~10x a float op; see
# _indicator and _select), and few fresh image-sized temporaries (each new buffer is memory the allocator may
# have handed back to the OS, i.e. page faults). Every rewrite keeps the arithmetic, so results are bit for bit
# those of the plain formulas (PIL/torchvision parity is tested in tests/test_augment.py).


def _factor(f: float | torch.Tensor, img: torch.Tensor) -> torch.Tensor | float:
    if not isinstance(f, torch.Tensor):
        return float(f)
    return f.to(device=img.device, dtype=img.dtype).reshape(f.shape + (1,) * (img.ndim - f.ndim))


def _indicator(compare, a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """``compare(a, b)`` (``torch.eq``, ``torch.ge``, ...) as 0.0 / 1.0 in ``a``'s dtype and shape, written straight
    into a float tensor instead of a bool one."""
    return compare(a, b, out=torch.empty_like(a))


def _select(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.where(cond, a, b)`` for a 0/1 float ``cond`` and finite ``a``, ``b``, bit for bit:
    ``lerp(b, a, 1)`` is ``a - (a - b) * 0`` = ``a`` and ``lerp(b, a, 0)`` is ``b + 0 * (a - b)`` = ``b``."""
    return torch.lerp(b, a, cond)


def to_grayscale(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, shape [..., 1, H, W]."""
    r, g, b = img.unbind(dim=-3)
    luma = LUMA_WEIGHTS[0] * r
    luma += LUMA_WEIGHTS[1] * g
    luma += LUMA_WEIGHTS[2] * b
    return luma.unsqueeze(-3)


def _blend(img: torch.Tensor, other: torch.Tensor, f) -> torch.Tensor:
    f = _factor(f, img)
    out = f * img
    out += (1.0 - f) * other
    return out.clamp_(0.0, 1.0)


def adjust_brightness(img: torch.Tensor, factor) -> torch.Tensor:
    """Blend with black (PIL ``ImageEnhance.Brightness``)."""
    return (img * _factor(factor, img)).clamp_(0.0, 1.0)


def adjust_contrast(img: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the image's mean luma (PIL ``ImageEnhance.Contrast``)."""
    return _blend(img, to_grayscale(img).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(img: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the greyscale image (PIL ``ImageEnhance.Color``)."""
    return _blend(img, to_grayscale(img), factor)


def _rgb_to_hsv(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hue in turns [0, 1), saturation, value), each [..., H, W]; hue and saturation 0 where r = g = b."""
    r, g, b = img.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    grey = _indicator(torch.eq, delta, 0.0)
    one = torch.ones_like(delta)
    s = delta / _select(grey, one, maxc)  # max = 0 only where grey: delta / 1 = 0 there, no 0 / 0
    d = _select(grey, one, delta)
    h_r = (g - b) / d
    h_g = (b - r) / d + 2.0
    h_b = (r - g) / d + 4.0
    # grey pixels need no select of their own: r = g = b = max picks h_r = 0 / 1 = 0
    h = _select(_indicator(torch.eq, maxc, r), h_r, _select(_indicator(torch.eq, maxc, g), h_g, h_b))
    h /= 6.0
    return h.sub_(torch.floor(h)), s, maxc  # h mod 1 (h > -1 here)


#: HSV sector (floor of hue · 6) -> the source of (r, g, b): value, p = v(1 - s), q = v(1 - s·f), t = v(1 - s(1 - f))
_HSV_SECTORS = ("vtp", "qvp", "pvt", "pqv", "tpv", "vpq")


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    h6 = h * 6.0
    sector = torch.floor(h6)
    f = h6.sub_(sector)
    sector -= 6.0 * torch.floor(sector / 6.0)  # h = 1 - ulp can round to sector 6: that is sector 0 (f = 0)
    parts = {
        "v": v,
        "p": (v * (1.0 - s)).clamp_(0.0, 1.0),
        "q": (v * (1.0 - s * f)).clamp_(0.0, 1.0),
        "t": (v * (1.0 - s * (1.0 - f))).clamp_(0.0, 1.0),
    }
    in_sector = [_indicator(torch.eq, sector, float(k)) for k in range(len(_HSV_SECTORS) - 1)]
    channels = []
    for c in range(3):
        out = parts[_HSV_SECTORS[-1][c]]
        for k in reversed(range(len(in_sector))):
            out = _select(in_sector[k], parts[_HSV_SECTORS[k][c]], out)
        channels.append(out)
    return torch.stack(channels, dim=-3)


def adjust_hue(img: torch.Tensor, shift) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns in HSV space (torchvision ``adjust_hue``)."""
    h, s, v = _rgb_to_hsv(img)
    h += _factor(shift, h)
    return _hsv_to_rgb(h.sub_(torch.floor(h)), s, v)  # mod 1 (|shift| <= 0.5, so h > -1)


def _blur_kernels(sigma: torch.Tensor, max_radius: int) -> torch.Tensor:
    """One normalised 1-D Gaussian per sigma, each truncated at its own radius ceil(3σ) (so a batch padded to the
    largest radius gives exactly the per-image result), shape [N, 2 * max_radius + 1]."""
    x = torch.arange(-max_radius, max_radius + 1, dtype=torch.float32, device=sigma.device)
    radius = torch.ceil(3.0 * sigma).clamp(max=max_radius)
    w = torch.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
    w = w * (x[None, :].abs() <= radius[:, None])
    return w / w.sum(dim=1, keepdim=True)


#: How :func:`gaussian_blur` convolves: ``taps`` (one multiply-add of a shifted view per kernel tap, per image:
#: 5-10x the grouped conv2d on a CPU core), ``conv`` (one grouped conv2d per direction for the whole batch: a
#: single kernel launch on a GPU) or ``auto`` (taps on the CPU, conv elsewhere). Same result (tested).
BLUR_METHODS = ("auto", "taps", "conv")


def gaussian_blur(img: torch.Tensor, sigma: float | torch.Tensor, radius: int | None = None,
                  method: str = "auto") -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W] (or [C, H, W]) with a per-image ``sigma``; each image's kernel spans
    2·ceil(3σ) + 1 pixels, with reflect padding (as torchvision's ``gaussian_blur``).

    ``radius``: the half-width every kernel is padded to (zero weights beyond an image's own ceil(3σ), so the result
    does not depend on it); default ceil(3 · max σ), which reads σ on the host and checks it is positive. A device
    pipeline passes a fixed radius so that σ is never read back (no host-device sync); σ must then be positive.
    The radius is capped at the image side minus one (reflect padding cannot be wider), which only matters for
    images under ~19 px at σ = 2. ``method``: one of :data:`BLUR_METHODS`."""
    if method not in BLUR_METHODS:
        raise ValueError(f"gaussian_blur method must be one of {list(BLUR_METHODS)}, got {method!r}")
    squeeze = img.ndim == 3
    x = img[None] if squeeze else img
    n, c, hgt, wid = x.shape
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n).contiguous()
    if radius is None:
        if bool((sig <= 0).any()):
            raise ValueError(f"blur sigma must be positive, got {sig.tolist()}")
        radius = int(math.ceil(3.0 * float(sig.max())))
    radius = min(radius, hgt - 1, wid - 1)
    if radius < 1:
        return img
    k = _blur_kernels(sig, radius).to(x.dtype)  # [N, 2 * radius + 1]
    padded = nnf.pad(x, (radius, radius, radius, radius), mode="reflect")
    if method == "taps" or (method == "auto" and x.device.type == "cpu"):
        y = torch.empty_like(x)
        for image, weights in enumerate(k.tolist()):
            _correlate_taps(_correlate_taps(padded[image], weights, dim=-1), weights, dim=-2, out=y[image])
    else:
        k = k.repeat_interleave(c, dim=0)  # [N*C, K]
        y = nnf.conv2d(padded.reshape(1, n * c, hgt + 2 * radius, wid + 2 * radius), k[:, None, None, :],
                       groups=n * c)
        y = nnf.conv2d(y, k[:, None, :, None], groups=n * c).reshape(n, c, hgt, wid)
    return y[0] if squeeze else y


def _correlate_taps(src: torch.Tensor, weights: list[float], dim: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """1-D correlation of ``src`` with ``weights`` along ``dim`` (the valid part: ``len(weights) - 1`` shorter): one
    in-place multiply-add of a shifted view per non-zero tap, in tap order — the grouped conv2d's products summed in
    its order (equal to it up to fp32 rounding, tested; bit for bit on the machine of docs/benchmarks.md)."""
    size = src.shape[dim] - len(weights) + 1
    taps = [(j, w) for j, w in enumerate(weights) if w != 0.0]
    first, w0 = taps[0]
    acc = torch.mul(src.narrow(dim, first, size), w0, out=out) if out is not None else src.narrow(dim, first, size) * w0
    for j, w in taps[1:]:
        acc.add_(src.narrow(dim, j, size), alpha=w)
    return acc


def solarize(img: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert every value >= ``threshold`` (PIL ``ImageOps.solarize``; threshold on the [0, 1] scale)."""
    return _select(_indicator(torch.ge, img, threshold), 1.0 - img, img)


def normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(img - mean) / std per channel of [..., 3, H, W]. Channel by channel with Python scalars: a mean / std tensor
    built from a list on a GPU is a blocking host-to-device copy."""
    out = torch.empty_like(img)
    for c in range(3):
        torch.sub(img[..., c, :, :], mean[c], out=out[..., c, :, :]).div_(std[c])
    return out


@dataclass(frozen=True)
class PostCropParams:
    """The parameters of everything after the resized crop for a batch of N crops, as named columns: one tensor per
    field, first dimension N, all on the crops' device. :meth:`stack` builds it from :class:`CropParams`."""

    flip: torch.Tensor  #: bool [N]
    jitter_order: torch.Tensor  #: float32 [N, 4]: operation ids (BRIGHTNESS ... HUE) in order; -1 rows: no jitter
    brightness: torch.Tensor  #: float32 [N] factor (1 without jitter)
    contrast: torch.Tensor  #: float32 [N] factor (1 without jitter)
    saturation: torch.Tensor  #: float32 [N] factor (1 without jitter)
    hue: torch.Tensor  #: float32 [N] shift in turns (0 without jitter)
    grayscale: torch.Tensor  #: bool [N]
    blur: torch.Tensor  #: bool [N]
    sigma: torch.Tensor  #: float32 [N] blur standard deviation in pixels (0 when not blurred)
    solarize: torch.Tensor  #: bool [N]

    #: the host table's layout: (field, number of columns), in order; flags are stored as 0 / 1
    LAYOUT: ClassVar[tuple[tuple[str, int], ...]] = (
        ("flip", 1), ("jitter_order", 4), ("brightness", 1), ("contrast", 1), ("saturation", 1), ("hue", 1),
        ("grayscale", 1), ("blur", 1), ("sigma", 1), ("solarize", 1),
    )
    FLAGS: ClassVar[tuple[str, ...]] = ("flip", "grayscale", "blur", "solarize")

    @classmethod
    def stack(cls, params: Sequence[CropParams], device: torch.device | str = "cpu") -> "PostCropParams":
        """One float32 host table from the records, one copy to ``device`` (pinned and non-blocking on CUDA, so the
        host never waits for the device), then split into the named columns."""
        def row(p: CropParams) -> list[float]:
            values: list[float] = []
            for name, _ in cls.LAYOUT:
                if name == "jitter_order":
                    values.extend(p.jitter_order if p.jitter else (-1,) * 4)
                else:
                    values.append(float(getattr(p, name)))
            return values

        table = torch.tensor([row(p) for p in params], dtype=torch.float32).reshape(len(params), -1)
        device = torch.device(device)
        if device.type == "cuda":
            table = table.pin_memory()
        table = table.to(device, non_blocking=True)
        columns, named, start = table.unbind(1), {}, 0
        for name, width in cls.LAYOUT:
            named[name] = columns[start] if width == 1 else table[:, start:start + width]
            start += width
        for name in cls.FLAGS:
            named[name] = named[name] > 0.5
        return cls(**named)


def _all_rows(column: torch.Tensor) -> torch.Tensor:
    return column


#: one step of the chain: (the rows it applies to, bool [N]; op(images, rows) where rows(column) restricts a
#: per-crop parameter column to the images op receives)
_Step = tuple[torch.Tensor, Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]]


def _on_selected_rows(x: torch.Tensor, steps: Sequence[_Step]) -> torch.Tensor:
    """Each step's op on the rows it applies to only, gathered (none: skipped; all: no gather). The row sets are
    read on the host, all in one go: free on the CPU; on a GPU that read and the row indices' copies wait for the
    device (what ``sync_free`` avoids)."""
    applies = torch.stack([rows for rows, _ in steps], dim=1).tolist()  # [N][steps] Python bools
    for j, (_, op) in enumerate(steps):
        selected = [i for i, row in enumerate(applies) if row[j]]
        if len(selected) == len(applies):
            x = op(x, _all_rows)
        elif selected:
            idx = torch.tensor(selected, device=x.device)
            x = x.index_copy(0, idx, op(x.index_select(0, idx), lambda column: column[idx]))
    return x


def _on_all_rows(x: torch.Tensor, steps: Sequence[_Step]) -> torch.Tensor:
    """Each step's op on every row, kept with ``torch.where`` where it applies: more arithmetic, but nothing is read
    back on the host, so a GPU's queue never drains while the host waits."""
    for rows, op in steps:
        x = torch.where(rows.view(-1, 1, 1, 1), op(x, _all_rows), x)
    return x


#: (operation id, function, PostCropParams field), indexed by the id (0..3)
_JITTER_OPS = ((BRIGHTNESS, adjust_brightness, "brightness"), (CONTRAST, adjust_contrast, "contrast"),
               (SATURATION, adjust_saturation, "saturation"), (HUE, adjust_hue, "hue"))
assert [op for op, _, _ in _JITTER_OPS] == list(range(len(_JITTER_OPS)))


def augment_resized(
    crops: torch.Tensor, params: Sequence[CropParams], cfg: CropsConfig, *, sync_free: bool = False
) -> torch.Tensor:
    """Everything after the resized crop, batched: flip, colour jitter (per-image order), greyscale, blur,
    solarise, normalise. ``crops`` is [N, 3, s, s] (uint8 0–255 or float 0–1) with ``params[i]`` for crop i;
    returns float32 [N, 3, s, s], normalised. Works on any device; the CPU workers and the device path
    (:class:`dino_model.data.gpu_augment.DeviceMultiCrop`) both run this chain.

    How each operation reaches its rows: by default only the rows that need it are computed, which reads the row
    sets on the host. ``sync_free=True`` (the device path's default on CUDA) computes every operation on every row
    and keeps the result with ``torch.where`` where it applies, and blurs with the radius of the config's largest
    σ (each row's kernel still truncated at its own ceil(3σ)): nothing is read back, so the host can queue the next
    batch while the GPU still runs the step. Both give the same result up to fp32 rounding (tested)."""
    if crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[0] != len(params):
        raise ValueError(f"augment_resized needs [N, 3, H, W] crops and N params, got {tuple(crops.shape)} / {len(params)}")
    x = crops.float() / 255.0 if not crops.is_floating_point() else crops.float()
    p = PostCropParams.stack(params, x.device)
    if sync_free:  # σ = 1 (any valid value) on the rows that are not blurred; their result is discarded
        sigma, radius = torch.where(p.blur, p.sigma, 1.0), int(math.ceil(3.0 * cfg.blur_sigma[1]))
    else:
        sigma, radius = p.sigma, None
    # [N, 4 slots, 4 ops] -> 16 columns, slot-major: whether operation id `op` runs in order slot `slot`
    op_ids = torch.arange(len(_JITTER_OPS), dtype=p.jitter_order.dtype, device=x.device)
    jitter_at = (p.jitter_order[:, :, None] == op_ids).reshape(len(params), -1).unbind(1)

    steps: list[_Step] = [(p.flip, lambda t, rows: t.flip(-1))]
    for slot in range(4):
        for op, adjust, name in _JITTER_OPS:
            factor = getattr(p, name)
            steps.append((jitter_at[slot * len(_JITTER_OPS) + op],
                          lambda t, rows, adjust=adjust, factor=factor: adjust(t, rows(factor))))
    steps += [
        (p.grayscale, lambda t, rows: to_grayscale(t).expand_as(t).contiguous()),
        (p.blur, lambda t, rows: gaussian_blur(t, rows(sigma), radius)),
        (p.solarize, lambda t, rows: solarize(t, cfg.solarize_threshold / 255.0)),
    ]
    x = _on_all_rows(x, steps) if sync_free else _on_selected_rows(x, steps)
    return normalize(x, cfg.mean, cfg.std)


class MultiCropAugmentation:
    """``aug(img_uint8_chw, generator) -> [global1, global2, local1, ...]`` float tensors, normalised."""

    def __init__(self, cfg: CropsConfig | None = None):
        self.cfg = cfg or CropsConfig()

    def _crop_kinds(self) -> list[tuple[int, tuple[float, float], float, float]]:
        """Per crop: (size, scale, blur p, solarise p)."""
        c = self.cfg
        kinds = [
            (c.global_size, c.global_scale, c.blur_p_global1, 0.0),
            (c.global_size, c.global_scale, c.blur_p_global2, c.solarize_p_global2),
        ]
        return kinds + [(c.local_size, c.local_scale, c.blur_p_local, 0.0)] * c.n_local

    def _jitter_range(self, strength: float, centre: float) -> tuple[float, float] | None:
        if strength == 0:
            return None
        return (max(0.0, centre - strength), centre + strength) if centre else (-strength, strength)

    def sample_params(self, generator: torch.Generator, height: int, width: int) -> list[CropParams]:
        """Draw every random choice for one ``height`` × ``width`` image: one :class:`CropParams` per crop, global
        crops first. Deterministic given the generator's state."""
        if height < 1 or width < 1:
            raise ValueError(f"image must be at least 1x1 pixels, got {height}x{width}")
        c, g = self.cfg, generator
        ranges = (
            self._jitter_range(c.brightness, 1.0),
            self._jitter_range(c.contrast, 1.0),
            self._jitter_range(c.saturation, 1.0),
            self._jitter_range(c.hue, 0.0),
        )
        out = []
        for size, scale, blur_p, sol_p in self._crop_kinds():
            top, left, h, w = sample_resized_crop(g, height, width, scale, c.ratio)
            flip = _bernoulli(g, c.flip_p)
            # RandomApply draws rand and skips when p < rand; ColorJitter then draws its order and factors.
            jitter = not (c.jitter_p < torch.rand(1, generator=g).item())
            order, factors = (0, 1, 2, 3), [1.0, 1.0, 1.0, 0.0]
            if jitter:
                order = tuple(int(i) for i in torch.randperm(4, generator=g).tolist())
                factors = [factors[i] if r is None else _uniform(g, *r) for i, r in enumerate(ranges)]
            grey = _bernoulli(g, c.grayscale_p)
            blur = _bernoulli(g, blur_p) if blur_p > 0 else False
            sigma = _uniform(g, *c.blur_sigma) if blur else 0.0
            sol = _bernoulli(g, sol_p) if sol_p > 0 else False
            out.append(
                CropParams(size, top, left, h, w, flip, jitter, order, factors[0], factors[1], factors[2],
                           factors[3], grey, blur, sigma, sol)
            )
        return out

    def resized_crop(self, img: torch.Tensor, p: CropParams) -> torch.Tensor:
        """The uint8 crop, bicubic-resized with antialiasing (as PIL) to ``p.size`` × ``p.size``."""
        return TF.resized_crop(
            img, p.top, p.left, p.height, p.width, [p.size, p.size],
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        )

    def apply(self, img: torch.Tensor, params: CropParams | Sequence[CropParams]):
        """Execute sampled parameters on a uint8 [3, H, W] (or [1, H, W]) image: a float32 [3, s, s] tensor for one
        :class:`CropParams`, a list of them for a sequence."""
        img = _check_image(img)
        if isinstance(params, CropParams):
            return augment_resized(self.resized_crop(img, params)[None], [params], self.cfg)[0]
        return [augment_resized(self.resized_crop(img, p)[None], [p], self.cfg)[0] for p in params]

    def __call__(self, img: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        img = _check_image(img)
        return self.apply(img, self.sample_params(generator, img.shape[-2], img.shape[-1]))


def _check_image(img: torch.Tensor) -> torch.Tensor:
    if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] not in (1, 3):
        desc = f"{img.dtype} {tuple(img.shape)}" if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"expected a uint8 [3, H, W] (or [1, H, W]) image tensor, got {desc}")
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img
