"""The data canary: the device data path's crops against the CPU workers' crops, on the run's first batch.

With ``data.augment_on`` resolving to ``device`` the workers only read bytes and draw each sample's parameters;
the training process decodes (nvjpeg on CUDA) and augments on its device (:class:`DeviceMultiCrop`). For the first
:data:`SAMPLES` samples of rank 0's first batch, with the parameters the workers drew, this compares

* **decode**: the device decode against the CPU reader's (``decode_image``: libjpeg-turbo), per pixel;
* **augment**: the device crops *of the CPU-decoded images* against :class:`MultiCropAugmentation` (the workers'
  own code) — so a decoder difference cannot hide or excuse an augmentation one;

all in uint8 levels (one level after normalisation is 1/255/std; the smallest std is used, the strictest). The
crops the device really makes (its own decode, then its augmentation) against the workers' are reported too
(``crops_*``), not judged: they are the sum of the two judged differences.

Tolerances, and what they come from (a broken path — a wrong crop box, a missed flip or colour operation, a
corrupted decode — differs by tens of levels over a whole crop, far beyond all of them):

* augment: the CPU tests measured the device path's batched matmul resize against the workers' uint8 kernel at
  ~0.4 % of values 1 level apart (rarely 2): mean ~0.004 levels, 99.9th percentile <= 2 levels, largest seen 3.2
  (tests/test_gpu_augment.py; on the CPU the device path resizes per crop and matches exactly). The thresholds
  leave room for the device's own float rounding (TF32 in cuDNN's blur convolution is ~0.1 level):
  mean <= :data:`AUGMENT_MEAN_LEVELS` (0.25), 99.9th percentile <= :data:`AUGMENT_Q999_LEVELS` (4, twice the
  tested bound), and no single crop's mean above :data:`AUGMENT_CROP_MEAN_LEVELS` (1).
* decode: nothing here can measure nvjpeg; torchvision's own test accepts a mean difference below 2 levels
  between nvjpeg and libjpeg-turbo (different IDCT and chroma upsampling), which is :data:`DECODE_MEAN_LEVELS`;
  the chroma upsampling can move pixels at sharp colour edges by tens of levels, so the 99.9th percentile is held
  to :data:`DECODE_Q999_LEVELS` (48), which a decode that corrupts more than 0.1 % of the image exceeds.
  ``benchmarks/gpu_session.sh`` prints these figures on a GPU first: the numbers to tighten them with.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from dino_model.config import CropsConfig
from dino_model.data.gpu_augment import DeviceMultiCrop

from .faults import injected

__all__ = [
    "SAMPLES",
    "DECODE_MEAN_LEVELS",
    "DECODE_Q999_LEVELS",
    "AUGMENT_MEAN_LEVELS",
    "AUGMENT_Q999_LEVELS",
    "AUGMENT_CROP_MEAN_LEVELS",
    "device_multicrop",
    "compare_data_paths",
]

#: Samples of the first batch compared (all crops of each).
SAMPLES = 8
DECODE_MEAN_LEVELS = 2.0
DECODE_Q999_LEVELS = 48.0
AUGMENT_MEAN_LEVELS = 0.25
AUGMENT_Q999_LEVELS = 4.0
AUGMENT_CROP_MEAN_LEVELS = 1.0

#: How far the injected ``data`` fault moves the device resize (uint8 levels).
_FAULT_LEVELS = 8.0


class _PerturbedDeviceMultiCrop(DeviceMultiCrop):
    """The ``data`` fault (:mod:`dino_model.fast_path.faults`): the resize is off by a few levels."""

    def resized_crops(self, images, params, crop_indices):
        return (super().resized_crops(images, params, crop_indices) + _FAULT_LEVELS).clamp_(0.0, 255.0)


def device_multicrop(cfg: CropsConfig, device: torch.device | str) -> DeviceMultiCrop:
    """The device data path of a run (the one the canary checks and the training loop uses)."""
    return (_PerturbedDeviceMultiCrop if injected("data") else DeviceMultiCrop)(cfg, device)


def _quantile(x: torch.Tensor, q: float) -> float:
    """The ``q`` quantile of a flat tensor of any size (``torch.quantile`` refuses more than 2^24 values)."""
    k = min(x.numel(), max(1, math.ceil(q * x.numel())))
    return float(x.float().kthvalue(k).values)


def compare_data_paths(batch: dict[str, Any], augment: DeviceMultiCrop, cfg: CropsConfig,
                       samples: int = SAMPLES) -> tuple[str, dict[str, float]]:
    """Decode and augment the first ``samples`` samples of a ``decode=False`` loader batch (``encoded`` +
    ``params``) on ``augment``'s device and on the CPU workers' path; returns ``(failure, figures)``: the failure
    in words (empty when every figure is within its tolerance) and the figures in uint8 levels."""
    from dino_model.data.augment import MultiCropAugmentation
    from dino_model.data.reader import decode_image

    encoded: Sequence[torch.Tensor] = batch["encoded"][:samples]
    params = batch["params"][:samples]
    cpu_images = [decode_image(e.numpy().tobytes()) for e in encoded]
    figures: dict[str, float] = {"samples": float(len(encoded))}
    problems: list[str] = []

    # decode: device against CPU, same bytes
    device_images = [img.cpu() for img in augment.decode(encoded)]
    for i, (d, c) in enumerate(zip(device_images, cpu_images)):
        if d.shape != c.shape:
            return (f"decode: sample {i} is {tuple(d.shape)} on the device and {tuple(c.shape)} on the CPU",
                    figures)
    decode_diff = torch.cat([(d.float() - c.float()).abs().flatten() for d, c in zip(device_images, cpu_images)])
    figures.update(decode_mean_levels=float(decode_diff.mean()), decode_q999_levels=_quantile(decode_diff, 0.999),
                   decode_max_levels=float(decode_diff.max()))

    # augment: device crops of the CPU-decoded images against the workers' code, same parameters
    level = 1.0 / 255.0 / min(cfg.std)
    device_crops = augment.crops_from_images([img.to(augment.device) for img in cpu_images], params)
    reference = MultiCropAugmentation(cfg)
    worker_crops = [reference.apply(img, p) for img, p in zip(cpu_images, params)]
    end_to_end = augment.crops_from_images([img.to(augment.device) for img in device_images], params)
    e2e = torch.cat([((c.float().cpu() - torch.stack([w[k] for w in worker_crops])).abs() / level).flatten()
                     for k, c in enumerate(end_to_end)])
    figures.update(crops_mean_levels=float(e2e.mean()), crops_q999_levels=_quantile(e2e, 0.999))
    diffs, worst_crop = [], 0.0
    for k, crop_batch in enumerate(device_crops):
        crop_batch = crop_batch.float().cpu()
        if not torch.isfinite(crop_batch).all():
            problems.append(f"augment: crop {k} holds non-finite values")
            continue
        d = (crop_batch - torch.stack([w[k] for w in worker_crops])).abs() / level
        worst_crop = max(worst_crop, float(d.flatten(1).mean(1).max()))
        diffs.append(d.flatten())
    if diffs:
        augment_diff = torch.cat(diffs)
        figures.update(augment_mean_levels=float(augment_diff.mean()),
                       augment_q999_levels=_quantile(augment_diff, 0.999),
                       augment_worst_crop_mean_levels=worst_crop, augment_max_levels=float(augment_diff.max()))
    for name, tolerance in (("decode_mean_levels", DECODE_MEAN_LEVELS), ("decode_q999_levels", DECODE_Q999_LEVELS),
                            ("augment_mean_levels", AUGMENT_MEAN_LEVELS),
                            ("augment_q999_levels", AUGMENT_Q999_LEVELS),
                            ("augment_worst_crop_mean_levels", AUGMENT_CROP_MEAN_LEVELS)):
        figures[f"{name}_tol"] = tolerance
        if name in figures and not figures[name] <= tolerance:
            problems.append(f"{name.replace('_levels', '').replace('_', ' ')} {figures[name]:.3g} levels > "
                            f"{tolerance:g}")
    failure = "device crops differ from the CPU workers' (" + "; ".join(problems) + ")" if problems else ""
    return failure, figures
