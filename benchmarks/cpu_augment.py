"""CPU multi-crop speed: the project's worker pipeline against the reference's PIL ``DataAugmentationDINO``, side by
side in one run, one thread each, on the same real-resolution ImageNet JPEGs.

    .venv/bin/python benchmarks/cpu_augment.py                       # ../shared/data/imagenet-sample, 5 rounds
    .venv/bin/python benchmarks/cpu_augment.py --images DIR --rounds 9 --alternate image --stages --profile project

Both pipelines start from the encoded bytes (already in memory) and end with the 2 x 224 + 8 x 96 normalised float
tensors of one image, so JPEG decoding is part of each:

* ``project``: :func:`dino_model.data.reader.decode_image` + :class:`dino_model.data.augment.MultiCropAugmentation`
  with the generator the loader gives each sample — exactly what a data-loader worker runs per image.
* ``reference``: the DINO paper's augmentation composed here from torchvision's PIL transforms the way the official
  repository's ``DataAugmentationDINO`` composes them: PIL decode + ``convert("RGB")`` (torchvision's ImageFolder
  loader), then per crop RandomResizedCrop (bicubic; scale (0.4, 1) global, (0.05, 0.4) local), RandomHorizontalFlip
  0.5, RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8), RandomGrayscale 0.2, PIL Gaussian blur (radius uniform in
  [0.1, 2]) with p 1.0 / 0.1 / 0.5, solarisation p 0.2 on the second global crop, ToTensor + ImageNet Normalize.

The two take turns on the same machine in one run: by default a whole pass over the images each (``--alternate
pass``: project, reference, project, ...; each pipeline runs in its steady state, as in a data-loader worker), or
image by image (``--alternate image``: each pipeline then starts every image with caches the other one filled). A
round gives every image to both (a new epoch for the project's generator, fresh Python ``random`` / torch draws for
the reference). Each is timed by this thread's CPU time (``time.thread_time``: images/s per core, what a
data-loader worker delivers, and robust to other processes on a shared machine) and by wall time; the table gives
images/s over all rounds and the ratio project / reference, with the smallest and largest per-round ratio (their
spread shows how noisy the machine was). ``torch.set_num_threads(1)``; PIL is single-threaded.

``--stages`` times one extra project pass by stage (decode, draws + resized crops, post-crop chain); ``--profile
project|reference`` runs cProfile over one extra pass of that pipeline and prints the top functions.
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

from dino_model.data.augment import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    augment_resized,
)
from dino_model.config import CropsConfig  # noqa: E402
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


def print_stages(encoded: list[tuple[str, bytes]], aug: MultiCropAugmentation, epoch: int) -> None:
    """ms per image of the project's three stages: JPEG decode, the parameter draws + the 10 uint8 resized crops, and
    the post-crop chain (flip, jitter, greyscale, blur, solarise, normalise)."""
    spent = {"decode": 0.0, "draws + resized crops": 0.0, "post-crop chain": 0.0}
    for key, data in encoded:
        t0 = time.perf_counter()
        img = decode_image(data)
        t1 = time.perf_counter()
        params = aug.sample_params(sample_generator(0, epoch, key), img.shape[-2], img.shape[-1])
        crops = [aug.resized_crop(img, p) for p in params]
        t2 = time.perf_counter()
        for crop, p in zip(crops, params):
            augment_resized(crop[None], [p], aug.cfg)
        t3 = time.perf_counter()
        spent["decode"] += t1 - t0
        spent["draws + resized crops"] += t2 - t1
        spent["post-crop chain"] += t3 - t2
    print("\nproject stages, ms/image: " + ", ".join(f"{k} {1000 * v / len(encoded):.1f}" for k, v in spent.items()))


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


PIPELINES = ("project", "reference")
CLOCKS = ("cpu", "wall")
LABELS = {"project": "project CPU worker (decode_image + MultiCropAugmentation)",
          "reference": "reference (PIL DataAugmentationDINO recipe)"}


def print_table(rounds: list[dict[tuple[str, str], float]], n: int) -> None:
    """images/s per pipeline by CPU time and by wall time, and the project / reference ratios."""
    def rate(name: str, clock: str) -> float:
        return n * len(rounds) / sum(r[name, clock] for r in rounds)

    print()
    print("| pipeline | images/s per core (CPU time) | ms/image (CPU) | images/s (wall) | images/s (wall, best round) |")
    print("|---|---|---|---|---|")
    for name in PIPELINES:
        best = max(n / r[name, "wall"] for r in rounds)
        print(f"| {LABELS[name]} | {rate(name, 'cpu'):.2f} | {1000 / rate(name, 'cpu'):.1f} | "
              f"{rate(name, 'wall'):.2f} | {best:.2f} |")
    for clock in CLOCKS:
        ratios = [r["reference", clock] / r["project", clock] for r in rounds]
        print(f"ratio project / reference ({clock} time): {rate('project', clock) / rate('reference', clock):.2f}x "
              f"over all rounds (per round {min(ratios):.2f}x - {max(ratios):.2f}x)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "imagenet-sample",
                    help="folder searched recursively for *.JPEG / *.jpg (default: ../shared/data/imagenet-sample)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per pipeline, alternating (default 5)")
    ap.add_argument("--alternate", choices=["pass", "image"], default="pass",
                    help="take turns after a whole pass over the images (default) or after every image")
    ap.add_argument("--profile", choices=["project", "reference"], help="cProfile one extra pass of this pipeline")
    ap.add_argument("--stages", action="store_true",
                    help="after the table, one extra project pass timed by stage: decode, resized crops, the rest")
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
    project = MultiCropAugmentation(CropsConfig())
    reference = ReferenceDINOAugmentation()
    sizes = {Image.open(io.BytesIO(d)).size for _, d in encoded}
    print(f"machine: {machine()}")
    print(f"images: {len(encoded)} JPEGs from {args.images} ({len(sizes)} distinct sizes), 2x224 + 8x96 crops, "
          f"1 thread, {args.rounds} rounds, turns after every {args.alternate} (warm-up first)")
    for key, data in encoded[:4]:  # warm-up: imports, allocator, kernel dispatch caches
        project_one(key, data, project, epoch=-1)
        reference_one(data, reference)
    groups = [encoded] if args.alternate == "pass" else [[item] for item in encoded]
    # seconds per (pipeline, clock), per round: "cpu" = this thread's CPU time, "wall" = elapsed time
    rounds: list[dict[tuple[str, str], float]] = []
    for r in range(args.rounds):
        spent = {(k, c): 0.0 for k in PIPELINES for c in CLOCKS}
        for group in groups:
            for name in PIPELINES:
                c0, w0 = time.thread_time(), time.perf_counter()
                for key, data in group:
                    if name == "project":
                        project_one(key, data, project, epoch=r)
                    else:
                        reference_one(data, reference)
                spent[name, "cpu"] += time.thread_time() - c0
                spent[name, "wall"] += time.perf_counter() - w0
        rounds.append(spent)
    print_table(rounds, len(encoded))
    if args.stages:
        print_stages(encoded, project, epoch=args.rounds)
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
