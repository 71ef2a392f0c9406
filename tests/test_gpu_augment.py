"""The device multi-crop pipeline (dino_model.data.gpu_augment) against the CPU worker pipeline, on real JPEGs.

Runs on the CPU (same API as on CUDA: decode_jpeg(device=...), batched matmul resampling, augment_resized).
Tolerances: ``per_crop`` resizing is the worker path's own code, so it must match up to the fp32 rounding of batching (1e-5); ``matmul`` differs
from PyTorch's integer-weight uint8 kernel by at most 2 uint8 levels on < 1 % of resized values (see the module
docstring), which after normalisation is ~0.0175 per level; solarisation / hue edge pixels can amplify a 1-level
difference, so the whole chain is bounded by its mean and 99.9th percentile. The size buckets of the matmul
resize change only the zero padding: against one canvas padded to the largest image, at most 1 level on < 0.1 % of
values (fp32 summation order).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import read_file

from dino_model.config import CropsConfig
from dino_model.data.augment import MultiCropAugmentation
from dino_model.data.gpu_augment import (
    CropParamSampler,
    DeviceMultiCrop,
    aa_bicubic_weights,
    bucket_bytes,
    image_size,
    plan_buckets,
)
from dino_model.data.reader import LoaderSettings, build_loader, decode_image
from dino_model.data.rng import sample_generator

ONE_LEVEL = 1 / 255 / min(CropsConfig().std)  # one uint8 level in normalised units (~0.0175)


@pytest.fixture(scope="module")
def jpegs(shared_data: Path) -> list[tuple[str, torch.Tensor]]:
    files = sorted((shared_data / "imagenet-sample").glob("*/*.JPEG"))[:6]
    assert len(files) == 6
    return [(f.stem, read_file(str(f))) for f in files]


def sampled(cfg: CropsConfig, jpegs, seed=3, epoch=1):
    sampler = CropParamSampler(cfg)
    return [sampler(enc, sample_generator(seed, epoch, key)) for key, enc in jpegs]


def test_sampler_reads_header_size_and_draws_the_cpu_params(jpegs):
    cfg = CropsConfig()
    aug = MultiCropAugmentation(cfg)
    params = sampled(cfg, jpegs)
    for (key, enc), p in zip(jpegs, params):
        img = decode_image(enc.numpy().tobytes())
        assert image_size(enc) == tuple(img.shape[-2:])
        assert p == aug.sample_params(sample_generator(3, 1, key), *img.shape[-2:])
        assert [c.size for c in p] == [224, 224] + [96] * 8


def test_weights_reproduce_float_antialiased_bicubic():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 60, 80, generator=g) * 255
    for top, left, h, w, s in [(5, 7, 40, 50, 24), (0, 0, 60, 80, 16), (10, 20, 12, 9, 32), (3, 1, 57, 79, 57)]:
        ref = F.interpolate(img[..., top:top + h, left:left + w], size=(s, s), mode="bicubic", antialias=True,
                            align_corners=False)[0]
        wy = aa_bicubic_weights(torch.tensor([float(top)]), torch.tensor([float(h)]), s, 60)[0]
        wx = aa_bicubic_weights(torch.tensor([float(left)]), torch.tensor([float(w)]), s, 80)[0]
        torch.testing.assert_close(wy @ img[0] @ wx.T, ref, atol=2e-3, rtol=0)  # fp32 sums of 0-255 values


def test_per_crop_mode_equals_the_worker_pipeline(jpegs):
    cfg = CropsConfig(global_size=96, local_size=48, n_local=3)
    params = sampled(cfg, jpegs)
    dev = DeviceMultiCrop(cfg, "cpu", resize="per_crop")
    assert DeviceMultiCrop(cfg, "cpu").resize == "per_crop"  # "auto" on CPU
    crops = dev([enc for _, enc in jpegs], params)
    aug = MultiCropAugmentation(cfg)
    for b, ((_, enc), p) in enumerate(zip(jpegs, params)):
        ref = aug.apply(decode_image(enc.numpy().tobytes()), p)
        for k in range(cfg.ncrops):
            # batched augment_resized == per image up to fp32 rounding (its contract in test_augment.py)
            torch.testing.assert_close(crops[k][b], ref[k], atol=1e-5, rtol=0)


def test_matmul_mode_matches_the_worker_pipeline_within_tolerance(jpegs):
    cfg = CropsConfig()  # the paper's 224 / 96 crops from ~500x375 images
    jpegs = jpegs[:3]
    params = sampled(cfg, jpegs)
    matmul, exact = DeviceMultiCrop(cfg, "cpu", resize="matmul"), DeviceMultiCrop(cfg, "cpu", resize="per_crop")
    images = matmul.decode([enc for _, enc in jpegs])
    for group in ([0, 1], list(range(2, cfg.ncrops))):
        d = (matmul.resized_crops(images, params, group) - exact.resized_crops(images, params, group)).abs()
        assert d.max() <= 2 and (d > 0).float().mean() < 0.01, (d.max(), (d > 0).float().mean())
    fast, ref = matmul.crops_from_images(images, params), exact.crops_from_images(images, params)
    for k, (a, b) in enumerate(zip(fast, ref)):
        assert a.shape == b.shape == (len(jpegs), 3, params[0][k].size, params[0][k].size)
        d = (a - b).abs().flatten()
        assert d.mean() < 0.02 * ONE_LEVEL, (k, d.mean())
        assert torch.quantile(d[:: max(1, d.numel() // 1_000_000)], 0.999) <= 2 * ONE_LEVEL, k


def test_non_jpeg_images_fall_back_to_the_cpu_decoder(jpegs):
    cfg = CropsConfig(global_size=32, local_size=16, n_local=2)
    png = io.BytesIO()
    Image.new("RGB", (50, 40), (200, 30, 10)).save(png, format="PNG")
    encoded = [torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8), jpegs[0][1]]
    dev = DeviceMultiCrop(cfg, "cpu")
    images = dev.decode(encoded)
    assert images[0].shape == (3, 40, 50) and images[0][:, 0, 0].tolist() == [200, 30, 10]
    assert torch.equal(images[1], decode_image(jpegs[0][1].numpy().tobytes()))
    with pytest.raises(ValueError, match="CropParams"):
        dev(encoded, [[], []])


@pytest.mark.parametrize("resize", ["per_crop", "matmul"])
def test_reader_bytes_to_crops_equals_the_worker_loader(shared_data, resize):
    """Same seed/epoch/rank: the decode=False loader (params drawn in the reader) + DeviceMultiCrop gives the
    worker loader's batch — same samples in the same order, same crops (exactly, or within the matmul tolerance)."""
    cfg = CropsConfig(global_size=64, local_size=32, n_local=2)
    settings = LoaderSettings(batch_size=4, seed=5, num_workers=0, epoch_length=2)
    source = str(shared_data / "imagenet-sample")
    workers = build_loader(source, settings, epoch=2, transform=MultiCropAugmentation(cfg))
    raw = build_loader(source, settings, epoch=2, transform=None, decode=False, param_sampler=CropParamSampler(cfg))
    dev = DeviceMultiCrop(cfg, "cpu", resize=resize)
    n = 0
    for ref, batch in zip(workers, raw):
        assert batch["keys"] == ref["keys"] and batch["aug_keys"] == ref["keys"]
        assert torch.equal(batch["labels"], ref["labels"])
        crops = dev(batch["encoded"], batch["params"])
        assert len(crops) == len(ref["crops"]) == cfg.ncrops
        for a, b in zip(crops, ref["crops"]):
            if resize == "per_crop":
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            else:
                assert (a - b).abs().mean() < 0.05 * ONE_LEVEL
        n += 1
    assert n == 2


def test_param_sampler_needs_undecoded_batches(shared_data):
    with pytest.raises(ValueError, match="param_sampler"):
        build_loader(str(shared_data / "imagenet-sample"), LoaderSettings(batch_size=2, seed=0),
                     transform=None, epoch=0, decode=True, param_sampler=CropParamSampler(CropsConfig()))


def test_sync_free_augmentation_equals_augment_resized():
    """Every operation on every row, kept with torch.where == the same chain on the selected rows only."""
    from dino_model.data.augment import augment_resized

    cfg = CropsConfig(global_size=40, local_size=24, n_local=6)
    aug = MultiCropAugmentation(cfg)
    g = torch.Generator().manual_seed(0)
    params, crops = [], []
    for i in range(10):
        for p in aug.sample_params(sample_generator(1, 0, f"k{i}"), 60, 80)[2:]:
            params.append(p)
            crops.append(torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8, generator=g))
    assert len({(p.flip, p.jitter, p.grayscale, p.blur) for p in params}) > 5  # the cases really mix
    batch = torch.stack(crops)
    torch.testing.assert_close(augment_resized(batch, params, cfg, sync_free=True), augment_resized(batch, params, cfg),
                               atol=1e-5, rtol=0)


def test_device_pipeline_sync_free_option_matches(jpegs):
    cfg = CropsConfig(global_size=64, local_size=32, n_local=2)
    params = sampled(cfg, jpegs[:3])
    enc = [e for _, e in jpegs[:3]]
    a = DeviceMultiCrop(cfg, "cpu", sync_free=True)(enc, params)
    b = DeviceMultiCrop(cfg, "cpu")(enc, params)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


# -- size buckets of the matmul resize ---------------------------------------------------------------------------


def one_canvas_reference(images, params, crop_indices, size):
    """The unbucketed matmul resize: every image zero-padded to the batch's largest height and width, two einsums."""
    n_img, n = len(images), len(crop_indices)
    height, width = max(im.shape[-2] for im in images), max(im.shape[-1] for im in images)
    canvas = torch.zeros(n_img, 3, height, width)
    for b, im in enumerate(images):
        canvas[b, :, : im.shape[-2], : im.shape[-1]] = im
    boxes = torch.tensor([[params[b][k].top, params[b][k].left, params[b][k].height, params[b][k].width]
                          for b in range(n_img) for k in crop_indices], dtype=torch.float32)
    wy = aa_bicubic_weights(boxes[:, 0], boxes[:, 2], size, height).reshape(n_img, n, size, height)
    wx = aa_bicubic_weights(boxes[:, 1], boxes[:, 3], size, width).reshape(n_img, n, size, width)
    horizontal = torch.einsum("bchw,bnsw->bnchs", canvas, wx).round_().clamp_(0, 255)
    out = torch.einsum("bnth,bnchs->bncts", wy, horizontal).round_().clamp_(0, 255)
    return out.transpose(0, 1).reshape(n * n_img, 3, size, size)


MIXED_SIZES = [(48, 64), (375, 500), (500, 375), (900, 1200), (375, 500), (333, 500), (64, 48), (500, 333)]


@pytest.fixture(scope="module")
def mixed_images(shared_data: Path) -> list[torch.Tensor]:
    """Real photographs resized to an ImageNet-like spread of (height, width): tiny, both orientations, large."""
    from torchvision.transforms.v2 import functional as TF

    files = sorted((shared_data / "imagenet-sample").glob("*/*.JPEG"))[: len(MIXED_SIZES)]
    return [TF.resize(decode_image(f.read_bytes()), list(s), antialias=True) for f, s in zip(files, MIXED_SIZES)]


@pytest.mark.parametrize("options", [{}, {"max_bucket_bytes": 1}, {"max_buckets": 2}])
def test_bucketed_matmul_equals_one_canvas_in_sample_order(mixed_images, options, one_torch_thread):
    """Buckets change only the zero padding, so the crops equal the one-canvas resize (rare 1-level differences
    from fp32 summation order allowed) and come back at their own sample's position: each crop matches the CPU
    path's per-crop resize of the same image within the matmul tolerance."""
    cfg = CropsConfig(global_size=64, local_size=32, n_local=2)
    aug = MultiCropAugmentation(cfg)
    params = [aug.sample_params(sample_generator(4, 0, f"mixed{i}"), *im.shape[-2:])
              for i, im in enumerate(mixed_images)]
    sizes = [tuple(im.shape[-2:]) for im in mixed_images]
    plan = plan_buckets(sizes, n_crop=2, crop_size=64, **{k.replace("bucket_", ""): v for k, v in options.items()})
    assert 1 < len(plan) <= len(mixed_images)  # several canvases, and the samples really get reordered
    assert [i for b in plan for i in b.indices] != list(range(len(mixed_images)))
    matmul = DeviceMultiCrop(cfg, "cpu", resize="matmul", **options)
    exact = DeviceMultiCrop(cfg, "cpu", resize="per_crop")
    n_img = len(mixed_images)
    for group in ([0, 1], [2, 3]):
        size = params[0][group[0]].size
        out = matmul.resized_crops(mixed_images, params, group)
        ref = one_canvas_reference(mixed_images, params, group, size)
        assert out.shape == ref.shape == (len(group) * n_img, 3, size, size)
        d = (out - ref).abs()
        assert d.max() <= 1 and (d > 0).float().mean() < 1e-3, (d.max(), (d > 0).float().mean())
        per_crop = exact.resized_crops(mixed_images, params, group)
        for row in range(len(group) * n_img):  # crop-major: row = crop slot * B + sample
            e = (out[row] - per_crop[row]).abs()
            assert e.max() <= 2 and (e > 0).float().mean() < 0.02, (row, e.max(), (e > 0).float().mean())


def imagenet_like_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    """(height, width) of ``n`` images drawn like ImageNet's: 60 % 500x375 / 375x500 / 500x333 / 333x500
    (width x height), 35 % other sizes with a 500-pixel long side, 3 % long side 1000-2500, 2 % small."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        if u < 0.60:
            out.append([(375, 500), (500, 375), (333, 500), (500, 333)][rng.choice(4, p=[0.6, 0.2, 0.15, 0.05])])
        elif u < 0.95:
            short = int(rng.integers(200, 501))
            out.append((short, 500) if rng.random() < 0.75 else (500, short))
        elif u < 0.98:
            long = int(rng.integers(1000, 2501))
            short = int(long * rng.choice([0.75, 0.667, 0.8]))
            out.append((short, long) if rng.random() < 0.7 else (long, short))
        else:
            long = int(rng.integers(60, 250))
            out.append((int(long * rng.uniform(0.6, 1.0)), long))
    return out


def test_bucket_plan_keeps_few_buckets_and_little_padding_on_an_imagenet_like_mix():
    n_buckets, waste, one_canvas = [], [], []
    for seed in range(20):
        sizes = imagenet_like_sizes(128, seed)
        own = sum(h * w for h, w in sizes)
        one_canvas.append(128 * max(h for h, _ in sizes) * max(w for _, w in sizes) / own)
        for n_crop, crop_size in ((2, 224), (8, 96)):
            plan = plan_buckets(sizes, n_crop=n_crop, crop_size=crop_size)
            assert sorted(i for b in plan for i in b.indices) == list(range(128))  # every image exactly once
            for b in plan:  # each canvas is exactly as large as its largest member needs
                assert b.height == max(sizes[i][0] for i in b.indices)
                assert b.width == max(sizes[i][1] for i in b.indices)
            n_buckets.append(len(plan))
            waste.append(sum(len(b.indices) * b.height * b.width for b in plan) / own - 1)
    assert max(n_buckets) <= 8 and sum(n_buckets) / len(n_buckets) < 7.5, n_buckets
    assert max(waste) < 0.15 and sum(waste) / len(waste) <= 0.10, waste
    assert min(one_canvas) > 5, one_canvas  # what the single canvas would have cost


def test_bucket_plan_bounds_memory_and_keeps_a_uniform_batch_whole():
    uniform = plan_buckets([(375, 500)] * 128, n_crop=8, crop_size=96)
    assert len(uniform) == 1 and uniform[0].indices == tuple(range(128))
    assert (uniform[0].height, uniform[0].width) == (375, 500)
    sizes = imagenet_like_sizes(128, 0) + [(2000, 2500), (4000, 3000)]
    limit = 128 << 20
    plan = plan_buckets(sizes, n_crop=8, crop_size=96, max_bytes=limit)
    assert sorted(i for b in plan for i in b.indices) == list(range(len(sizes)))
    for b in plan:
        assert len(b.indices) == 1 or bucket_bytes(len(b.indices), b.height, b.width, 8, 96) <= limit
    assert bucket_bytes(1, 4000, 3000, 8, 96) > limit  # a single image over the limit still gets its bucket
    assert (len(sizes) - 1,) in [b.indices for b in plan]
    assert len(plan) > len(plan_buckets(sizes, n_crop=8, crop_size=96))  # the bound did cut buckets
    one_bucket = plan_buckets(sizes, n_crop=8, crop_size=96, max_buckets=1, max_bytes=1 << 40)
    assert len(one_bucket) == 1 and (one_bucket[0].height, one_bucket[0].width) == (4000, 3000)


@pytest.mark.parametrize("field, value", [("max_buckets", 0), ("bucket_waste", -0.1), ("max_bucket_bytes", 0)])
def test_bucket_options_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        DeviceMultiCrop(CropsConfig(), "cpu", **{field: value})
