"""CPU multi-crop speed: the project's worker pipeline against the reference's PIL ``DataAugmentationDINO``, side by
side in one run, one thread each, on the same real-resolution ImageNet JPEGs.

    .venv/bin/python benchmarks/cpu_augment.py                       # ../shared/data/imagenet-sample, 5 rounds
    .venv/bin/python benchmarks/cpu_augment.py --images DIR --rounds 9 --alternate image --profile project

Both pipelines start from the encoded bytes (already in memory) and end with the 2 x 224 + 8 x 96 normalised float
tensors of one image, so JPEG decoding is part of each:

* ``project``: :func:`dino_model.data.reader.decode_image` + :class:`dino_model.data.augment.MultiCropAugmentation`
  with the generator the loader gives each sample — exactly what a data-loader worker runs per image.
* ``reference``: the DINO paper's augmentation composed here from torchvision's PIL transforms the way the official
  repository's ``DataAugmentationDINO`` composes them: PIL decode + ``convert("RGB")`` (torchvision's ImageFolder
  loader), then per crop RandomResizedCrop (bicubic; scale (0.4, 1) global, (0.05, 0.4) local), RandomHorizontalFlip
  0.5, RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8), RandomGrayscale 0.2, PIL Gaussian blur (radius uniform in
  [0.1, 2]) with p 1.0 / 0.1 / 0.5, solarisation p 0.2 on the second global crop, ToTensor + ImageNet Normalize.

The two take turns on the same machine in one run, so a load change on a shared machine hits both: by default a
whole pass over the images each (``--alternate pass``: project, reference, project, ...; each pipeline runs in its
steady state, as in a data-loader worker), or image by image (``--alternate image``: finer against load changes,
but each pipeline then starts every image with caches the other one filled). A round gives every image to both (a
new epoch for the project's generator, fresh Python ``random`` / torch draws for the reference). The table reports
images/s over all rounds and per round (median, best), and the ratio project / reference over all rounds with the
smallest and largest per-round ratio (their spread shows how noisy the machine was). ``torch.set_num_threads(1)``;
PIL is single-threaded. ``--profile project|reference`` runs cProfile over one extra pass of that pipeline and
prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dino_model.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation, MultiCropConfig  # noqa: E402
from dino_model.data.reader import decode_image  # noqa: E402
from dino_model.data.rng import sample_generator  # noqa: E402


class PILGaussianBlur:
    """Gaussian blur with probability ``p`` and a radius uniform in [lo, hi], by PIL's ``ImageFilter.GaussianBlur``
    (the reference blurs PIL images this way, drawing with Python's ``random``)."""

    def __init__(self, p: float, lo: float = 0.1, hi: float = 2.0):
        self.p, self.lo, self.hi = p, lo, hi

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))


class ReferenceDINOAugmentation:
    """The reference multi-crop recipe (see the module docstring) on a PIL image: list of 2 + n_local tensors."""

    def __init__(self, global_size: int = 224, local_size: int = 96, n_local: int = 8):
        flip_and_jitter = T.Compose([
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = T.InterpolationMode.BICUBIC
        self.global1 = T.Compose([T.RandomResizedCrop(global_size, scale=(0.4, 1.0), interpolation=bicubic),
                                  flip_and_jitter, PILGaussianBlur(1.0), normalize])
        self.global2 = T.Compose([T.RandomResizedCrop(global_size, scale=(0.4, 1.0), interpolation=bicubic),
                                  flip_and_jitter, PILGaussianBlur(0.1), T.RandomSolarize(128, p=0.2), normalize])
        self.local = T.Compose([T.RandomResizedCrop(local_size, scale=(0.05, 0.4), interpolation=bicubic),
                                flip_and_jitter, PILGaussianBlur(0.5), normalize])
        self.n_local = n_local

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.n_local)]


def reference_one(data: bytes, aug: ReferenceDINOAugmentation) -> list[torch.Tensor]:
    with Image.open(io.BytesIO(data)) as im:
        return aug(im.convert("RGB"))


def project_one(key: str, data: bytes, aug: MultiCropAugmentation, epoch: int) -> list[torch.Tensor]:
    return aug(decode_image(data), sample_generator(0, epoch, key))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import PIL
    import torchvision

    return (f"{cpu}, {os.cpu_count()} CPUs, load average {load:.2f}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample",
                    help="folder searched recursively for *.JPEG / *.jpg (default: ../shared/data/imagenet-sample)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per pipeline, alternating (default 5)")
    ap.add_argument("--alternate", choices=["pass", "image"], default="pass",
                    help="take turns after a whole pass over the images (default) or after every image")
    ap.add_argument("--profile", choices=["project", "reference"], help="cProfile one extra pass of this pipeline")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    if not files:
        ap.error(f"no JPEGs under {args.images}")
    encoded = [(f.stem, f.read_bytes()) for f in files]
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    project = MultiCropAugmentation(MultiCropConfig())
    reference = ReferenceDINOAugmentation()
    sizes = {Image.open(io.BytesIO(d)).size for _, d in encoded}
    print(f"machine: {machine()}")
    print(f"images: {len(encoded)} JPEGs from {args.images} ({len(sizes)} distinct sizes), 2x224 + 8x96 crops, "
          f"1 thread, {args.rounds} rounds, turns after every {args.alternate} (warm-up first)")
    for key, data in encoded[:4]:  # warm-up: imports, allocator, kernel dispatch caches
        project_one(key, data, project, epoch=-1)
        reference_one(data, reference)
    groups = [encoded] if args.alternate == "pass" else [[item] for item in encoded]
    rounds: list[dict[str, float]] = []  # seconds per pipeline, per round
    for r in range(args.rounds):
        spent = {"project": 0.0, "reference": 0.0}
        for group in groups:
            t0 = time.perf_counter()
            for key, data in group:
                project_one(key, data, project, epoch=r)
            t1 = time.perf_counter()
            for _, data in group:
                reference_one(data, reference)
            spent["project"] += t1 - t0
            spent["reference"] += time.perf_counter() - t1
        rounds.append(spent)
    n = len(encoded)
    overall = {k: n * len(rounds) / sum(r[k] for r in rounds) for k in ("project", "reference")}
    per_round = {k: [n / r[k] for r in rounds] for k in ("project", "reference")}
    ratios = [r["reference"] / r["project"] for r in rounds]
    print()
    print("| pipeline | images/s (all rounds) | images/s (median round) | images/s (best round) | ms/image |")
    print("|---|---|---|---|---|")
    for name, label in (("project", "project CPU worker (decode_image + MultiCropAugmentation)"),
                        ("reference", "reference (PIL DataAugmentationDINO recipe)")):
        print(f"| {label} | {overall[name]:.2f} | {statistics.median(per_round[name]):.2f} | "
              f"{max(per_round[name]):.2f} | {1000 / overall[name]:.1f} |")
    print(f"\nratio project / reference: {overall['project'] / overall['reference']:.2f}x over all rounds "
          f"(per round {min(ratios):.2f}x - {max(ratios):.2f}x)")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for key, data in encoded:
            if args.profile == "project":
                project_one(key, data, project, epoch=args.rounds)
            else:
                reference_one(data, reference)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
