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

    >>> aug = MultiCropAugmentation(CropsConfig(global_size=128, local_size=64))
    >>> crops = aug(img_uint8_chw, sample_generator(seed, epoch, key))   # list of 2 + n_local float tensors
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

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


def gaussian_blur(img: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W] (or [C, H, W]) with a per-image ``sigma``; kernel size
    2·ceil(3σ) + 1, reflect padding (as torchvision's ``gaussian_blur``). The radius is capped at the image side
    minus one (reflect padding cannot be wider), which only matters for images under ~19 px at σ = 2."""
    squeeze = img.ndim == 3
    x = img[None] if squeeze else img
    n, c, hgt, wid = x.shape
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n).contiguous()
    if bool((sig <= 0).any()):
        raise ValueError(f"blur sigma must be positive, got {sig.tolist()}")
    radius = min(int(math.ceil(3.0 * float(sig.max()))), hgt - 1, wid - 1)
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


_JITTER_OPS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation, HUE: adjust_hue}


def augment_resized(
    crops: torch.Tensor, params: Sequence[CropParams], cfg: CropsConfig
) -> torch.Tensor:
    """Everything after the resized crop, batched: flip, colour jitter (per-image order), greyscale, blur,
    solarise, normalise. ``crops`` is [N, 3, s, s] (uint8 0–255 or float 0–1) with ``params[i]`` for crop i;
    returns float32 [N, 3, s, s], normalised. Works on any device."""
    if crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[0] != len(params):
        raise ValueError(f"augment_resized needs [N, 3, H, W] crops and N params, got {tuple(crops.shape)} / {len(params)}")
    x = crops.float() / 255.0 if not crops.is_floating_point() else crops.float()
    dev = x.device

    def mask(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.bool, device=dev)

    def where_rows(m: torch.Tensor, fn) -> None:
        # Apply fn only to the rows selected by m (no work at all when none is selected).
        nonlocal x
        if bool(m.all()):
            x = fn(x, None)
        elif bool(m.any()):
            idx = m.nonzero().squeeze(1)
            x = x.index_copy(0, idx, fn(x.index_select(0, idx), idx))

    where_rows(mask([p.flip for p in params]), lambda t, idx: t.flip(-1))

    factors = {
        BRIGHTNESS: torch.tensor([p.brightness for p in params], device=dev),
        CONTRAST: torch.tensor([p.contrast for p in params], device=dev),
        SATURATION: torch.tensor([p.saturation for p in params], device=dev),
        HUE: torch.tensor([p.hue for p in params], device=dev),
    }
    jitter = [p.jitter for p in params]
    for slot in range(4):
        for op, fn in _JITTER_OPS.items():
            sel = mask([j and p.jitter_order[slot] == op for j, p in zip(jitter, params)])
            where_rows(sel, lambda t, idx, fn=fn, op=op: fn(t, factors[op] if idx is None else factors[op][idx]))

    where_rows(mask([p.grayscale for p in params]), lambda t, idx: to_grayscale(t).expand_as(t).contiguous())
    sig = torch.tensor([p.sigma for p in params], device=dev)
    where_rows(mask([p.blur for p in params]), lambda t, idx: gaussian_blur(t, sig if idx is None else sig[idx]))
    where_rows(mask([p.solarize for p in params]), lambda t, idx: solarize(t, cfg.solarize_threshold / 255.0))
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
