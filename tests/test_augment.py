"""Multi-crop augmentation: config validation, parameter ranges and probabilities, determinism, shapes, parity of
each operation with PIL / torchvision on a real ImageNet image, and batched == per-image application.

Tolerances (pixel values on the 0–255 scale unless stated):
* parameter probabilities: |observed - p| <= 5 binomial standard deviations (seeded, so deterministic; a
  correct sampler fails this with probability < 1e-6 for any seed);
* crop box / jitter factors / draw order: exactly torchvision's for the same seed;
* resized crop vs PIL: mean < 0.3, 99th percentile <= 1, max 8 (PIL clamps and rounds to uint8 between its
  horizontal and vertical passes, which shows at sharp edges where bicubic overshoots);
* brightness / contrast / saturation vs PIL ImageEnhance: max 1.5, mean < 0.6 (PIL's blend *truncates* to uint8,
  about 0.5 below the exact value on average; we stay in float);
* greyscale vs PIL ``convert("L")``: max 0.5 (PIL rounds);
* hue vs torchvision's float ``adjust_hue``: max 1e-3; vs PIL (8-bit HSV): mean < 0.5, max 12;
* blur vs torchvision ``gaussian_blur`` (same kernel): max 1e-3; vs PIL's box-blur approximation: mean < 1, max 24;
* solarise vs PIL ``ImageOps.solarize``: max 1e-3;
* whole chain (crop, flip, jitter, greyscale, normalise) vs torchvision's PIL transforms with the same seed:
  mean < 2 (up to three truncating PIL blends in a row), 99.9th percentile < 8.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as F1
from torchvision.transforms.v2 import functional as TF

from dino_model.config import CropsConfig
from dino_model.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LUMA_WEIGHTS,
    CropParams,
    MultiCropAugmentation,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augment_resized,
    gaussian_blur,
    normalize,
    sample_resized_crop,
    solarize,
    to_grayscale,
)
from dino_model.data.rng import derive_seed, sample_generator

SMALL = dict(global_size=32, local_size=16)


@pytest.fixture(scope="module")
def real_image(shared_data: Path) -> tuple[Image.Image, torch.Tensor]:
    path = shared_data / "imagenet-sample" / "n01440764" / "n01440764_tench.JPEG"
    pil = Image.open(path).convert("RGB")
    return pil, TF.pil_to_tensor(pil)


def seeded(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def to255(x: torch.Tensor) -> torch.Tensor:
    return x.double() * 255


def from_pil(im: Image.Image) -> torch.Tensor:
    return TF.pil_to_tensor(im).double()


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.double() - b.double()).abs()
    return d.max().item(), d.mean().item()


# -- config ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("global_size", 0),
        ("local_size", 1.5),
        ("n_local", -1),
        ("global_scale", (0.5, 0.4)),
        ("local_scale", (0.0, 0.4)),
        ("flip_p", 1.2),
        ("blur_p_local", -0.1),
        ("hue", 0.6),
        ("brightness", -0.1),
        ("blur_sigma", (2.0, 0.1)),
        ("std", (0.2, 0.2, 0.0)),
        ("mean", (0.5, 0.5)),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"crops.{field}"):
        CropsConfig(**{field: value})


def test_config_defaults_are_the_papers():
    c = CropsConfig()
    assert (c.global_size, c.local_size, c.n_local, c.ncrops) == (224, 96, 8, 10)
    assert c.global_scale == (0.4, 1.0) and c.local_scale == (0.05, 0.4)
    assert (c.brightness, c.contrast, c.saturation, c.hue, c.jitter_p) == (0.4, 0.4, 0.2, 0.1, 0.8)
    assert (c.blur_p_global1, c.blur_p_global2, c.blur_p_local, c.solarize_p_global2) == (1.0, 0.1, 0.5, 0.2)


# -- shapes, determinism -----------------------------------------------------------------------------------------


def test_output_shapes_and_dtype():
    aug = MultiCropAugmentation(CropsConfig(n_local=3, **SMALL))
    img = torch.randint(0, 256, (3, 40, 57), dtype=torch.uint8, generator=seeded(0))
    crops = aug(img, sample_generator(0, 0, "k"))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in crops)
    # normalised values stay inside what (0..1 - mean) / std allows
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert all(c.min() >= lo - 1e-5 and c.max() <= hi + 1e-5 for c in crops)
    # a greyscale image [1, H, W] is accepted as 3 equal channels
    grey = aug(img[:1], sample_generator(0, 0, "k"))
    assert tuple(grey[0].shape) == (3, 32, 32)
    with pytest.raises(ValueError, match="uint8"):
        aug(img.float(), sample_generator(0, 0, "k"))


def test_same_seed_epoch_key_gives_identical_crops_and_others_differ():
    aug = MultiCropAugmentation(CropsConfig(n_local=2, **SMALL))
    img = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=seeded(1))
    a = aug(img, sample_generator(7, 3, "train-000001-000042"))
    b = aug(img, sample_generator(7, 3, "train-000001-000042"))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ref = aug.sample_params(sample_generator(7, 3, "train-000001-000042"), 48, 64)
    for other in [(8, 3, "train-000001-000042"), (7, 4, "train-000001-000042"), (7, 3, "train-000001-000043")]:
        assert aug.sample_params(sample_generator(*other), 48, 64) != ref
    # the stable hash does not depend on the process or Python's hash salt: a value recorded once, checked forever
    # (if it changes, every resumed run would draw different crops than the run it resumes)
    assert derive_seed(0, "augment", 0, "k") == 7421005579349689289
    assert derive_seed(1, "ab") != derive_seed(1, "a", "b") and derive_seed(1) != derive_seed("1")


# -- parameters: exact torchvision semantics, ranges, probabilities ----------------------------------------------


@pytest.mark.parametrize("hw, scale", [((375, 500), (0.4, 1.0)), ((96, 96), (0.05, 0.4)), ((12, 400), (0.9, 1.0)), ((400, 9), (0.5, 1.0))])
def test_resized_crop_params_equal_torchvision(hw, scale):
    h, w = hw
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    fallbacks = 0
    for s in range(150):
        torch.manual_seed(s)
        expected = tuple(T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]))
        got = sample_resized_crop(seeded(s), h, w, scale, (3 / 4, 4 / 3))
        assert got == expected, s
        top, left, ch, cw = got
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        fallbacks += (top, left) == ((h - ch) // 2, (w - cw) // 2)
    if h / w > 10 or w / h > 10:  # extreme aspect ratios exercise the centre-crop fallback
        assert fallbacks > 100


def test_draw_order_matches_torchvision_pipeline():
    """Crop 0's box, flip, jitter flag, jitter order and factors, and greyscale flag are exactly what torchvision's
    RandomResizedCrop / RandomHorizontalFlip / RandomApply(ColorJitter) / RandomGrayscale draw from the same seed."""
    cfg = CropsConfig(n_local=0, **SMALL)
    aug = MultiCropAugmentation(cfg)
    img = torch.zeros(3, 60, 80, dtype=torch.uint8)
    jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
    seen_jitter = 0
    for s in range(200):
        torch.manual_seed(s)
        box = T.RandomResizedCrop.get_params(img, [0.4, 1.0], [3 / 4, 4 / 3])
        flip = bool(torch.rand(1) < 0.5)
        apply = not (0.8 < torch.rand(1))
        order, b, c, sat, hue = (torch.arange(4), 1.0, 1.0, 1.0, 0.0)
        if apply:
            order, b, c, sat, hue = T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        grey = bool(torch.rand(1) < 0.2)
        p = aug.sample_params(seeded(s), 60, 80)[0]
        assert (p.top, p.left, p.height, p.width) == tuple(box)
        assert (p.flip, p.jitter, p.grayscale) == (flip, apply, grey)
        assert p.jitter_order == tuple(order.tolist())
        assert (p.brightness, p.contrast, p.saturation, p.hue) == (b, c, sat, hue)
        seen_jitter += apply
    assert 100 < seen_jitter < 200


def test_parameter_ranges_and_probabilities():
    cfg = CropsConfig(n_local=2, **SMALL)
    aug = MultiCropAugmentation(cfg)
    n_img, H, W = 2500, 90, 120
    params = [aug.sample_params(sample_generator(0, 0, f"img{i}"), H, W) for i in range(n_img)]

    def rate(crops: list[CropParams], attr: str) -> tuple[float, int]:
        return sum(getattr(p, attr) for p in crops) / len(crops), len(crops)

    def close(observed: float, n: int, p: float) -> bool:
        return abs(observed - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12

    g1 = [ps[0] for ps in params]
    g2 = [ps[1] for ps in params]
    loc = [p for ps in params for p in ps[2:]]
    everything = g1 + g2 + loc
    for attr, p in [("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2)]:
        assert close(*rate(everything, attr), p), attr
    for crops, blur_p in [(g1, 1.0), (g2, 0.1), (loc, 0.5)]:
        assert close(*rate(crops, "blur"), blur_p)
    assert close(*rate(g2, "solarize"), 0.2)
    assert rate(g1, "solarize")[0] == 0 and rate(loc, "solarize")[0] == 0

    for crops, (lo, hi), size in [(g1 + g2, cfg.global_scale, 32), (loc, cfg.local_scale, 16)]:
        assert all(p.size == size for p in crops)
        # box area / image area within the scale range (up to rounding of the sides to whole pixels)
        fr = torch.tensor([p.height * p.width / (H * W) for p in crops])
        assert fr.min() >= lo * 0.9 and fr.max() <= hi * 1.02
        # aspect ratio within [3/4, 4/3] up to rounding; log-uniform -> mean log ratio ~ 0
        lr = torch.tensor([math.log(p.width / p.height) for p in crops])
        assert lr.abs().max() <= math.log(4 / 3) + 0.05
        if size == 16:  # local boxes always fit, so no rejection biases them: mean log ratio ~ 0
            assert abs(lr.mean().item()) < 5 * (math.log(4 / 3) / math.sqrt(3)) / math.sqrt(len(crops))

    jit = [p for p in everything if p.jitter]
    for attr, lo, hi in [("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2), ("hue", -0.1, 0.1)]:
        v = torch.tensor([getattr(p, attr) for p in jit])
        assert v.min() >= lo and v.max() <= hi
        # uniform: mean at the centre, within 5 standard errors
        assert abs(v.mean().item() - (lo + hi) / 2) < 5 * ((hi - lo) / math.sqrt(12)) / math.sqrt(len(v))
    # the order is a uniform permutation: each op comes first a quarter of the time
    for op in range(4):
        assert close(sum(p.jitter_order[0] == op for p in jit) / len(jit), len(jit), 0.25)
    assert all(sorted(p.jitter_order) == [0, 1, 2, 3] for p in everything)
    unjittered = [p for p in everything if not p.jitter]
    assert all((p.brightness, p.contrast, p.saturation, p.hue) == (1.0, 1.0, 1.0, 0.0) for p in unjittered)

    sig = torch.tensor([p.sigma for p in everything if p.blur])
    assert sig.min() >= 0.1 and sig.max() <= 2.0
    assert abs(sig.mean().item() - 1.05) < 5 * (1.9 / math.sqrt(12)) / math.sqrt(len(sig))
    assert all(p.sigma == 0 for p in everything if not p.blur)


# -- each operation against PIL / torchvision on a real image ----------------------------------------------------


def test_resized_crop_matches_pil_bicubic(real_image):
    pil, img = real_image
    aug = MultiCropAugmentation(CropsConfig(n_local=1, **SMALL))
    for s in range(6):
        for p in aug.sample_params(seeded(s), img.shape[1], img.shape[2]):
            p = CropParams(**{**p.__dict__, "size": 224 if p.size == 32 else 96})
            ours = aug.resized_crop(img, p)
            ref = pil.crop((p.left, p.top, p.left + p.width, p.top + p.height)).resize((p.size, p.size), Image.BICUBIC)
            d = (ours.double() - from_pil(ref)).abs()
            assert d.mean() < 0.3 and torch.quantile(d.flatten(), 0.99) <= 1 and d.max() <= 8, (d.mean(), d.max())


@pytest.mark.parametrize("factor", [0.6, 0.85, 1.2, 1.4])
def test_brightness_contrast_saturation_match_pil(real_image, factor):
    pil, img = real_image
    x = img.float() / 255
    for ours, enhancer in [(adjust_brightness, ImageEnhance.Brightness), (adjust_contrast, ImageEnhance.Contrast),
                           (adjust_saturation, ImageEnhance.Color)]:
        mx, mean = diff(to255(ours(x, factor)), from_pil(enhancer(pil).enhance(factor)))
        assert mx <= 1.5 and mean < 0.6, (ours.__name__, mx, mean)


@pytest.mark.parametrize("shift", [-0.1, -0.03, 0.05, 0.1])
def test_hue_matches_torchvision_and_pil(real_image, shift):
    pil, img = real_image
    x = img.float() / 255
    mx, _ = diff(to255(adjust_hue(x, shift)), to255(TF.adjust_hue(x, shift)))
    assert mx <= 1e-3 * 255
    mx, mean = diff(to255(adjust_hue(x, shift)), from_pil(F1.adjust_hue(pil, shift)))
    assert mean < 0.5 and mx <= 12, (mx, mean)


def test_grayscale_solarize_match_pil(real_image):
    pil, img = real_image
    x = img.float() / 255
    mx, _ = diff(to255(to_grayscale(x)), from_pil(pil.convert("L")))
    assert mx <= 0.5
    mx, _ = diff(to255(solarize(x)), from_pil(ImageOps.solarize(pil, 128)))
    assert mx <= 1e-3
    # the threshold is inclusive at 128 (PIL inverts 128 -> 127)
    assert solarize(torch.tensor([127 / 255, 128 / 255])).mul(255).round().tolist() == [127, 127]


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.3, 2.0])
def test_blur_matches_torchvision_and_approximates_pil(real_image, sigma):
    pil, img = real_image
    x = img.float() / 255
    k = 2 * math.ceil(3 * sigma) + 1
    mx, _ = diff(to255(gaussian_blur(x, sigma)), to255(TF.gaussian_blur(x, [k, k], [sigma, sigma])))
    assert mx <= 1e-3
    mx, mean = diff(to255(gaussian_blur(x, sigma)), from_pil(pil.filter(ImageFilter.GaussianBlur(sigma))))
    assert mean < 1.0 and mx <= 24, (mx, mean)


def test_whole_chain_matches_torchvision_pil_pipeline(real_image):
    """Same seed -> the same crop through torchvision's PIL transforms (what the reference runs) and ours."""
    pil, img = real_image
    cfg = CropsConfig(global_size=96, local_size=32, n_local=0, blur_p_global1=0.0)
    aug = MultiCropAugmentation(cfg)
    reference = T.Compose([
        T.RandomResizedCrop(96, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    std = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)
    for s in range(12):
        torch.manual_seed(s)
        ref = reference(pil)
        ours = aug.apply(img, aug.sample_params(seeded(s), img.shape[1], img.shape[2])[0])
        d = ((ours - ref) * std * 255).abs()  # back on the 0-255 scale
        assert d.mean() < 2.0 and torch.quantile(d.flatten(), 0.999) < 8, (s, d.mean().item(), d.max().item())


def test_batched_application_equals_per_image():
    """augment_resized over a batch with per-sample parameters == one image at a time (the GPU path's contract)."""
    cfg = CropsConfig(n_local=6, **SMALL)
    aug = MultiCropAugmentation(cfg)
    crops, params = [], []
    for i in range(12):
        img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=seeded(100 + i))
        for p in aug.sample_params(seeded(i), 50, 70)[2:]:  # the locals: varied blur / jitter / grey
            params.append(p)
            crops.append(aug.resized_crop(img, p))
    batch = torch.stack(crops)
    together = augment_resized(batch, params, cfg)
    alone = torch.stack([augment_resized(c[None], [p], cfg)[0] for c, p in zip(crops, params)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert len({(p.blur, p.grayscale, p.jitter, p.flip) for p in params}) > 4  # the batch really mixed cases


# -- the CPU-tuned operations compute the plain formulas ---------------------------------------------------------


def plain_adjust_hue(img: torch.Tensor, shift: float) -> torch.Tensor:
    """The textbook RGB -> HSV -> RGB hue rotation with torch.where / remainder (torchvision's formulas, PIL's luma
    unchanged): what adjust_hue computes with 0/1 float masks and lerp as an exact select."""
    r, g, b = img.unbind(dim=-3)
    maxc, minc = img.max(dim=-3).values, img.min(dim=-3).values
    delta = maxc - minc
    grey = delta == 0
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    d = torch.where(grey, torch.ones_like(delta), delta)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(grey, torch.zeros_like(h), h)
    h = torch.remainder(torch.remainder(h / 6.0, 1.0) + shift, 1.0)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = torch.remainder(i, 6.0)
    v = maxc
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    sectors = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = []
    for c in range(3):
        channel = sectors[5][c]
        for k in reversed(range(5)):
            channel = torch.where(i == k, sectors[k][c], channel)
        out.append(channel)
    return torch.stack(out, dim=-3)


def test_colour_operations_equal_their_plain_formulas_bit_for_bit(real_image):
    """adjust_hue / solarize select with lerp on 0/1 float masks, the blends accumulate in place: exact rewrites of
    the plain formulas (same bits), on a real image and on values with grey pixels and max-channel ties."""
    _, img = real_image
    g = seeded(3)
    synthetic = torch.rand(3, 40, 50, generator=g)
    synthetic[:, :8] = synthetic[0, :8]  # grey: r = g = b
    synthetic[1, 8:16] = synthetic[0, 8:16]  # r = g ties
    synthetic[:, 16:24] = (synthetic[:, 16:24] * 4).round() / 4  # many exact ties, 0 and 1
    for x in (img.float() / 255, synthetic):
        for shift in (-0.1, -0.013, 0.05, 0.1):
            assert torch.equal(adjust_hue(x, shift), plain_adjust_hue(x, shift)), shift
        assert torch.equal(solarize(x, 0.5), torch.where(x >= 0.5, 1.0 - x, x))
        luma = (LUMA_WEIGHTS[0] * x[0] + LUMA_WEIGHTS[1] * x[1] + LUMA_WEIGHTS[2] * x[2])[None]
        assert torch.equal(to_grayscale(x), luma)
        for f in (0.6, 1.3):
            assert torch.equal(adjust_brightness(x, f), (x * f).clamp(0, 1))
            assert torch.equal(adjust_saturation(x, f), (f * x + (1 - f) * luma).clamp(0, 1))
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        assert torch.equal(normalize(x, IMAGENET_MEAN, IMAGENET_STD), (x - mean) / std)


def test_blur_methods_agree_per_image_and_with_a_fixed_radius():
    """taps (the CPU's per-image multiply-adds) == conv (one grouped conv2d: the GPU's) up to fp32 rounding, for a
    batch with a different sigma per image, with the radius from the sigmas or fixed wider (zero taps)."""
    x = torch.rand(6, 3, 40, 33, generator=seeded(4))
    sigma = torch.tensor([0.1, 0.4, 0.9, 1.3, 1.7, 2.0])
    taps = gaussian_blur(x, sigma, method="taps")
    torch.testing.assert_close(gaussian_blur(x, sigma, method="conv"), taps, atol=1e-6, rtol=0)
    torch.testing.assert_close(gaussian_blur(x, sigma, radius=9, method="conv"), taps, atol=1e-6, rtol=0)
    torch.testing.assert_close(gaussian_blur(x, sigma, radius=9, method="taps"), taps, atol=1e-6, rtol=0)
    for i in range(len(sigma)):  # each image's own kernel, whatever the batch
        torch.testing.assert_close(gaussian_blur(x[i], float(sigma[i])), taps[i], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="method"):
        gaussian_blur(x, sigma, method="fft")
