"""Evaluation preprocessing shared by feature extraction, k-NN, the linear probe and attention maps.

Conventions used by every function of :mod:`dino_model.eval`: images enter as RGB, channels first, either uint8 in
[0, 255] or float in [0, 1], *not* normalised — one ``[B, 3, H, W]`` tensor or a sequence of ``[3, H, W]`` tensors
of different sizes. Preprocessing (resize/crop) and ImageNet normalisation happen here, so a shard reader only has
to decode.

The default evaluation view is the reference's ``Resize(256, bicubic) + CenterCrop(224)``; small images (e.g.
imagenette-128) use ``EvalTransform(resize_size=146, crop_size=128)`` or ``resize_size=None`` to skip resizing.
The linear probe's training view is ``RandomResizedCrop(224) + RandomHorizontalFlip`` with parameters drawn from an
explicit :class:`torch.Generator`, so an epoch's augmentation is reproducible from (seed, epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dino_model.data.augment import sample_resized_crop
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms import InterpolationMode

#: ImageNet channel statistics (RGB), as every DINO evaluation script uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageBatch = torch.Tensor | Sequence[torch.Tensor]

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


def to_float01(img: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is taken to be in [0, 1] already and cast to float32."""
    if img.dtype == torch.uint8:
        return img.float().div_(255.0)
    if not torch.is_floating_point(img):
        raise TypeError(f"images must be uint8 or floating point, got {img.dtype}")
    return img.float()


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """ImageNet-normalise a ``[B, 3, H, W]`` or ``[3, H, W]`` image (uint8 or float in [0, 1])."""
    x = to_float01(x)
    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / s


def as_image_list(images: ImageBatch) -> list[torch.Tensor]:
    """Split a batch into a list of ``[3, H, W]`` tensors, checking the layout."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"image batch must be [B, 3, H, W], got shape {tuple(images.shape)}")
        return list(images.unbind(0))
    out = list(images)
    for i, im in enumerate(out):
        if not isinstance(im, torch.Tensor) or im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"image {i} of the batch must be a [3, H, W] tensor")
    return out


@dataclass(frozen=True)
class EvalTransform:
    """Resize the short side to ``resize_size`` then centre-crop ``crop_size`` (reference: 256 bicubic, 224)."""

    #: Target length of the short side before cropping; ``None`` keeps the image size.
    resize_size: int | None = 256
    #: Side of the square centre crop; ``None`` keeps the resized image whole.
    crop_size: int | None = 224
    #: Resize interpolation: "bicubic" (reference), "bilinear" or "nearest".
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.resize_size is not None and self.resize_size <= 0:
            raise ValueError(f"resize_size must be positive, got {self.resize_size}")
        if self.crop_size is not None and self.crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        if self.interpolation not in _INTERP:
            raise ValueError(f"interpolation must be one of {sorted(_INTERP)}, got {self.interpolation!r}")

    def describe(self) -> str:
        """A short description stored with extracted features."""
        return (
            f"resize={self.resize_size},{self.interpolation};center_crop={self.crop_size};"
            f"normalize=imagenet{IMAGENET_MEAN}/{IMAGENET_STD}"
        )

    def one(self, img: torch.Tensor) -> torch.Tensor:
        """One ``[3, H, W]`` uint8/float image -> normalised float ``[3, crop, crop]``."""
        return normalize(self.crop(img))

    def crop(self, img: torch.Tensor) -> torch.Tensor:
        """One ``[3, H, W]`` uint8/float image resized and centre-cropped, not normalised: float in [0, 1]."""
        x = to_float01(img)
        if self.resize_size is not None:
            # antialias like PIL, which the reference's torchvision pipeline uses on decoded images
            x = TF.resize(x, [self.resize_size], interpolation=_INTERP[self.interpolation], antialias=True)
            if self.interpolation == "bicubic":
                x = x.clamp_(0.0, 1.0)  # bicubic overshoots; PIL clamps to the uint8 range
        if self.crop_size is not None:
            x = TF.center_crop(x, [self.crop_size, self.crop_size])
        return x

    def __call__(self, images: ImageBatch) -> torch.Tensor:
        """A batch (tensor or list of different sizes) -> normalised ``[B, 3, crop, crop]`` float32."""
        imgs = [self.one(im) for im in as_image_list(images)]
        sizes = {tuple(im.shape) for im in imgs}
        if len(sizes) > 1:
            raise ValueError(f"images of different sizes after preprocessing {sorted(sizes)}: set crop_size")
        return torch.stack(imgs)


def random_resized_crop_params(
    height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (10 tries, then a centre crop clamped to ``ratio``), drawing
    from ``generator`` (the global RNG when None) — the training augmentation's own sampler. ``(top, left, h, w)``."""
    return sample_resized_crop(generator, height, width, tuple(scale), tuple(ratio))


@dataclass(frozen=True)
class TrainProbeTransform:
    """The linear probe's training view: RandomResizedCrop(size, scale 0.08-1, bilinear) + horizontal flip p 0.5,
    then ImageNet normalisation (the reference ``eval_linear.py`` pipeline)."""

    #: Output side of the random-resized crop.
    size: int = 224
    #: Area fraction range of the crop.
    scale: tuple[float, float] = (0.08, 1.0)
    #: Probability of the horizontal flip.
    flip_p: float = 0.5

    def one(self, img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = to_float01(img)
        top, left, h, w = random_resized_crop_params(x.shape[-2], x.shape[-1], self.scale, generator=generator)
        x = TF.resized_crop(x, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR, antialias=True)
        if torch.rand(1, generator=generator).item() < self.flip_p:
            x = x.flip(-1)
        return normalize(x)

    def __call__(self, images: ImageBatch, generator: torch.Generator) -> torch.Tensor:
        return torch.stack([self.one(im, generator) for im in as_image_list(images)])


def resize_to_multiple(x: torch.Tensor, short_side: int, multiple: int = 64) -> torch.Tensor:
    """The DAVIS protocol's frame resize: short side -> ``short_side``, long side scaled proportionally and floored
    to a multiple of ``multiple`` (854x480 -> 832x480), bilinear without antialiasing like ``cv2.resize``.
    ``x``: float ``[3, H, W]`` or ``[B, 3, H, W]``."""
    h, w = x.shape[-2:]
    th, tw = target_size_multiple(h, w, short_side, multiple)
    squeeze = x.dim() == 3
    y = F.interpolate(x[None] if squeeze else x, size=(th, tw), mode="bilinear", align_corners=False)
    return y[0] if squeeze else y


def target_size_multiple(h: int, w: int, short_side: int, multiple: int = 64) -> tuple[int, int]:
    """(height, width) after the DAVIS resize rule (see :func:`resize_to_multiple`)."""
    if h > w:
        tw = short_side
        th = int(((short_side * h) / w) // multiple * multiple)
    else:
        th = short_side
        tw = int(((short_side * w) / h) // multiple * multiple)
    if th <= 0 or tw <= 0:
        raise ValueError(f"short_side={short_side} is too small for a {w}x{h} frame with multiple {multiple}")
    return th, tw
