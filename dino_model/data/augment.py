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
  crops with per-sample parameters — the piece a GPU path runs on the device.

Differences from the PIL pipeline of the reference (tested in ``tests/test_augment.py``): PIL rounds to uint8 after
every operation, these ops stay in float; greyscale/contrast/saturation use the ITU-R 601-2 luma weights
(0.299, 0.587, 0.114) as PIL does (torchvision's tensor ops use 0.2989); the blur is a true Gaussian with a kernel
covering ±3σ (PIL approximates it with extended box blurs); hue is shifted in float HSV (PIL in 8-bit HSV).

    >>> aug = MultiCropAugmentation(MultiCropConfig(global_size=128, local_size=64))
    >>> crops = aug(img_uint8_chw, sample_generator(seed, epoch, key))   # list of 2 + n_local float tensors
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LUMA_WEIGHTS",
    "MultiCropConfig",
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


def _check_range(name: str, lo_hi: Sequence[float], lo: float, hi: float) -> tuple[float, float]:
    if len(lo_hi) != 2:
        raise ValueError(f"MultiCropConfig.{name} must be a (min, max) pair, got {lo_hi!r}")
    a, b = float(lo_hi[0]), float(lo_hi[1])
    if not (lo <= a <= b <= hi):
        raise ValueError(f"MultiCropConfig.{name} must satisfy {lo} <= min <= max <= {hi}, got {lo_hi!r}")
    return a, b


@dataclass
class MultiCropConfig:
    """Multi-crop settings; the defaults are the DINO paper's / reference implementation's."""

    global_size: int = 224
    """Side in pixels of the 2 global crops (the teacher sees only these)."""
    local_size: int = 96
    """Side in pixels of the local crops (student only)."""
    global_scale: tuple[float, float] = (0.4, 1.0)
    """Area fraction of the source image covered by a global crop, sampled uniformly."""
    local_scale: tuple[float, float] = (0.05, 0.4)
    """Area fraction of the source image covered by a local crop, sampled uniformly."""
    n_local: int = 8
    """Number of local crops (8 default; 10 in the paper's best runs; 0 disables multi-crop)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect-ratio range (width / height) of the crop box, sampled uniformly in log space."""
    flip_p: float = 0.5
    """Probability of a horizontal flip, per crop."""
    jitter_p: float = 0.8
    """Probability of applying colour jitter, per crop."""
    brightness: float = 0.4
    """Colour-jitter brightness strength: factor uniform in [max(0, 1 - b), 1 + b]; 0 disables."""
    contrast: float = 0.4
    """Colour-jitter contrast strength: factor uniform in [max(0, 1 - c), 1 + c]; 0 disables."""
    saturation: float = 0.2
    """Colour-jitter saturation strength: factor uniform in [max(0, 1 - s), 1 + s]; 0 disables."""
    hue: float = 0.1
    """Colour-jitter hue strength: shift uniform in [-h, h] of a full turn (at most 0.5); 0 disables."""
    grayscale_p: float = 0.2
    """Probability of converting a crop to greyscale (3 equal channels), per crop."""
    blur_p_global1: float = 1.0
    """Probability of Gaussian blur on the first global crop."""
    blur_p_global2: float = 0.1
    """Probability of Gaussian blur on the second global crop."""
    blur_p_local: float = 0.5
    """Probability of Gaussian blur on each local crop."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Range of the blur's standard deviation in pixels, sampled uniformly; the kernel covers ±3σ."""
    solarize_p_global2: float = 0.2
    """Probability of solarisation on the second global crop (never on the others, as in the reference)."""
    solarize_threshold: int = 128
    """Pixels >= this value (on the 0–255 scale) are inverted, as PIL's ``ImageOps.solarize``."""
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    """Per-channel mean subtracted after augmentation (images scaled to [0, 1])."""
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    """Per-channel standard deviation divided out after subtracting the mean."""

    def __post_init__(self) -> None:
        for name in ("global_size", "local_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MultiCropConfig.{name} must be a positive integer, got {v!r}")
        if isinstance(self.n_local, bool) or not isinstance(self.n_local, int) or self.n_local < 0:
            raise ValueError(f"MultiCropConfig.n_local must be an integer >= 0, got {self.n_local!r}")
        self.global_scale = _check_range("global_scale", self.global_scale, 1e-6, 1.0)
        self.local_scale = _check_range("local_scale", self.local_scale, 1e-6, 1.0)
        self.ratio = _check_range("ratio", self.ratio, 1e-6, 1e6)
        self.blur_sigma = _check_range("blur_sigma", self.blur_sigma, 1e-6, 1e3)
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p_global1", "blur_p_global2", "blur_p_local",
                     "solarize_p_global2"):
            v = getattr(self, name)
            if not (0.0 <= float(v) <= 1.0):
                raise ValueError(f"MultiCropConfig.{name} is a probability and must be in [0, 1], got {v!r}")
        for name in ("brightness", "contrast", "saturation"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"MultiCropConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not (0.0 <= float(self.hue) <= 0.5):
            raise ValueError(f"MultiCropConfig.hue must be in [0, 0.5], got {self.hue!r}")
        if not (0 <= self.solarize_threshold <= 256):
            raise ValueError(f"MultiCropConfig.solarize_threshold must be in [0, 256], got {self.solarize_threshold!r}")
        for name in ("mean", "std"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 3:
                raise ValueError(f"MultiCropConfig.{name} needs 3 values (R, G, B), got {getattr(self, name)!r}")
            setattr(self, name, v)
        if min(self.std) <= 0:
            raise ValueError(f"MultiCropConfig.std must be positive, got {self.std!r}")

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local


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


def _factor(f: float | torch.Tensor, img: torch.Tensor) -> torch.Tensor | float:
    if not isinstance(f, torch.Tensor):
        return float(f)
    return f.to(device=img.device, dtype=img.dtype).reshape(f.shape + (1,) * (img.ndim - f.ndim))


def to_grayscale(img: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, shape [..., 1, H, W]."""
    r, g, b = img.unbind(dim=-3)
    return (LUMA_WEIGHTS[0] * r + LUMA_WEIGHTS[1] * g + LUMA_WEIGHTS[2] * b).unsqueeze(-3)


def _blend(img: torch.Tensor, other: torch.Tensor, f) -> torch.Tensor:
    f = _factor(f, img)
    return (f * img + (1.0 - f) * other).clamp_(0.0, 1.0)


def adjust_brightness(img: torch.Tensor, factor) -> torch.Tensor:
    """Blend with black (PIL ``ImageEnhance.Brightness``)."""
    return (img * _factor(factor, img)).clamp(0.0, 1.0)


def adjust_contrast(img: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the image's mean luma (PIL ``ImageEnhance.Contrast``)."""
    return _blend(img, to_grayscale(img).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(img: torch.Tensor, factor) -> torch.Tensor:
    """Blend with the greyscale image (PIL ``ImageEnhance.Color``)."""
    return _blend(img, to_grayscale(img), factor)


def _rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(dim=-3)
    maxc, _ = img.max(dim=-3)
    minc, _ = img.min(dim=-3)
    delta = maxc - minc
    grey = delta == 0  # hue and saturation are undefined: set to 0 without dividing by zero
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    d = torch.where(grey, torch.ones_like(delta), delta)
    h_r = (g - b) / d
    h_g = 2.0 + (b - r) / d
    h_b = 4.0 + (r - g) / d
    h = torch.where(maxc == r, h_r, torch.where(maxc == g, h_g, h_b))
    h = torch.where(grey, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(dim=-3)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = torch.remainder(i, 6.0)
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # sector i -> (r, g, b): 0 (v,t,p) 1 (q,v,p) 2 (p,v,t) 3 (p,q,v) 4 (t,p,v) 5 (v,p,q)
    r = torch.where(i == 0, v, torch.where(i == 1, q, torch.where(i == 2, p, torch.where(i == 3, p, torch.where(i == 4, t, v)))))
    g = torch.where(i == 0, t, torch.where(i == 1, v, torch.where(i == 2, v, torch.where(i == 3, q, p))))
    b = torch.where(i <= 1, p, torch.where(i == 2, t, torch.where(i <= 4, v, q)))
    return torch.stack((r, g, b), dim=-3)


def adjust_hue(img: torch.Tensor, shift) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns in HSV space (torchvision ``adjust_hue``)."""
    hsv = _rgb_to_hsv(img)
    h, s, v = hsv.unbind(dim=-3)
    shift = _factor(shift, h)
    h = torch.remainder(h + shift, 1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def _blur_kernels(sigma: torch.Tensor, max_radius: int) -> torch.Tensor:
    """One normalised 1-D Gaussian per sigma, each truncated at its own radius ceil(3σ) (so a batch padded to the
    largest radius gives exactly the per-image result), shape [N, 2 * max_radius + 1]."""
    x = torch.arange(-max_radius, max_radius + 1, dtype=torch.float32, device=sigma.device)
    radius = torch.ceil(3.0 * sigma).clamp(max=max_radius)
    w = torch.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
    w = w * (x[None, :].abs() <= radius[:, None])
    return w / w.sum(dim=1, keepdim=True)


def gaussian_blur(img: torch.Tensor, sigma: float | torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W] (or [C, H, W]) with a per-image ``sigma``; each image's kernel spans
    2·ceil(3σ) + 1 pixels, with reflect padding (as torchvision's ``gaussian_blur``).

    ``radius``: the half-width every kernel is padded to (zero weights beyond an image's own ceil(3σ), so the result
    does not depend on it); default ceil(3 · max σ), which reads σ on the host and checks it is positive. A device
    pipeline passes a fixed radius so that σ is never read back (no host-device sync); σ must then be positive.
    The radius is capped at the image side minus one (reflect padding cannot be wider), which only matters for
    images under ~19 px at σ = 2."""
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
    k = _blur_kernels(sig, radius).to(x.dtype).repeat_interleave(c, dim=0)  # [N*C, K]
    y = x.reshape(1, n * c, hgt, wid)
    y = nnf.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = nnf.conv2d(y, k[:, None, None, :], groups=n * c)  # horizontal
    y = nnf.conv2d(y, k[:, None, :, None], groups=n * c)  # vertical
    y = y.reshape(n, c, hgt, wid)
    return y[0] if squeeze else y


def solarize(img: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert every value >= ``threshold`` (PIL ``ImageOps.solarize``; threshold on the [0, 1] scale)."""
    return torch.where(img >= threshold, 1.0 - img, img)


def normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=img.dtype, device=img.device).reshape(3, 1, 1)
    s = torch.tensor(std, dtype=img.dtype, device=img.device).reshape(3, 1, 1)
    return (img - m) / s


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
        named = {}
        for (name, width), column in zip(cls.LAYOUT, table.split([width for _, width in cls.LAYOUT], dim=1)):
            column = column if width > 1 else column.squeeze(1)
            named[name] = column > 0.5 if name in cls.FLAGS else column
        return cls(**named)


def _all_rows(column: torch.Tensor) -> torch.Tensor:
    return column


def _on_selected_rows(x: torch.Tensor, rows: torch.Tensor, op) -> torch.Tensor:
    """``op`` on the rows of ``x`` where ``rows`` holds, gathered (none: no work; all: no gather). The row sets are
    read on the host: free on the CPU, a host-device sync per operation on a GPU."""
    if bool(rows.all()):
        return op(x, _all_rows)
    if not bool(rows.any()):
        return x
    idx = rows.nonzero().squeeze(1)
    return x.index_copy(0, idx, op(x.index_select(0, idx), lambda column: column[idx]))


def _on_all_rows(x: torch.Tensor, rows: torch.Tensor, op) -> torch.Tensor:
    """``op`` on every row of ``x``, kept where ``rows`` holds: more arithmetic, but nothing is read back on the host,
    so a GPU's queue never drains while the host waits."""
    return torch.where(rows.view(-1, 1, 1, 1), op(x, _all_rows), x)


_JITTER_OPS = ((BRIGHTNESS, adjust_brightness, "brightness"), (CONTRAST, adjust_contrast, "contrast"),
               (SATURATION, adjust_saturation, "saturation"), (HUE, adjust_hue, "hue"))


def augment_resized(
    crops: torch.Tensor, params: Sequence[CropParams], cfg: MultiCropConfig, *, sync_free: bool = False
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
    on_rows = _on_all_rows if sync_free else _on_selected_rows

    x = on_rows(x, p.flip, lambda t, rows: t.flip(-1))
    for slot in range(4):
        for op, adjust, name in _JITTER_OPS:
            factor = getattr(p, name)
            x = on_rows(x, p.jitter_order[:, slot] == op,
                        lambda t, rows, adjust=adjust, factor=factor: adjust(t, rows(factor)))
    x = on_rows(x, p.grayscale, lambda t, rows: to_grayscale(t).expand_as(t).contiguous())
    if sync_free:  # σ = 1 (any valid value) on the rows that are not blurred; their result is discarded
        sigma, radius = torch.where(p.blur, p.sigma, 1.0), int(math.ceil(3.0 * cfg.blur_sigma[1]))
    else:
        sigma, radius = p.sigma, None
    x = on_rows(x, p.blur, lambda t, rows: gaussian_blur(t, rows(sigma), radius))
    x = on_rows(x, p.solarize, lambda t, rows: solarize(t, cfg.solarize_threshold / 255.0))
    return normalize(x, cfg.mean, cfg.std)


class MultiCropAugmentation:
    """``aug(img_uint8_chw, generator) -> [global1, global2, local1, ...]`` float tensors, normalised."""

    def __init__(self, cfg: MultiCropConfig | None = None):
        self.cfg = cfg or MultiCropConfig()

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
