"""What the learning curve costs a training run (``monitor.*``, :mod:`dino_model.train.knn_monitor`).

Each point is one forward pass of the teacher backbone over ``train_samples + val_samples`` centre crops plus a
k-NN; training an epoch is ``epoch_images`` images through the DINO step. Both are measured here, per image, on
this machine's device and for the same model, so their ratio holds where both run on the same device:

    cost per epoch = (train_samples + val_samples) · t_monitor / (every_epochs · epoch_images · t_step)

    .venv/bin/python benchmarks/knn_monitor_cost.py                         # ViT-S/16, 224x2+96x8 (the paper)
    .venv/bin/python benchmarks/knn_monitor_cost.py --setting vit_tiny/16/16/128x2+64x6 --epoch-images 9469

``t_step`` is :func:`dino_model.step.train_step` on synthetic crops (no data loading, which only makes the real
step slower and the fraction smaller); ``t_monitor`` is :meth:`KnnMonitor.measure` on ``--measure-images``
synthetic crops split 5:1 between memory and queries (its k-NN against a 5,000-image memory is a few ms). The
one-off decode of the subsets at start is not included. Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_model.config import load_config  # noqa: E402
from dino_model.meta_arch import DINO  # noqa: E402
from dino_model.optim import build_optimizer, param_groups  # noqa: E402
from dino_model.step import StepSettings, train_step  # noqa: E402
from dino_model.train.knn_monitor import KnnMonitor, KnnSubset  # noqa: E402
from settings import Setting  # noqa: E402  (benchmarks/settings.py)


def step_seconds_per_image(s: Setting, device: torch.device, steps: int) -> tuple[float, DINO]:
    cfg = load_config(overrides=[
        f"model.arch={s.arch}", f"model.patch_size={s.patch}", "model.out_dim=4096",
        f"crops.global_size={s.global_size}", f"crops.local_size={s.local_size}", f"crops.n_local={s.n_local}",
        "train.epochs=10", "optim.warmup_epochs=0"])
    torch.manual_seed(0)
    model = DINO.from_config(cfg).to(device)
    optimizer = build_optimizer(cfg.optim.optimizer, param_groups(model.student_module()))
    settings = StepSettings.from_config(cfg)
    crops = [torch.randn(s.batch, 3, s.global_size, s.global_size, device=device) for _ in range(2)]
    crops += [torch.randn(s.batch, 3, s.local_size, s.local_size, device=device) for _ in range(s.n_local)]

    def step() -> None:
        train_step(model, optimizer, crops, epoch=1, lr=1e-4, wd=0.04, momentum=0.996, teacher_temp=0.04,
                   settings=settings)

    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / (steps * s.batch), model


def monitor_seconds_per_image(model: DINO, s: Setting, images: int) -> float:
    queries = max(1, images // 6)
    memory = images - queries
    gen = torch.Generator().manual_seed(0)

    def subset(n: int) -> KnnSubset:
        return KnnSubset(torch.randint(0, 256, (n, 3, s.global_size, s.global_size), dtype=torch.uint8,
                                       generator=gen), torch.randint(0, 10, (n,), generator=gen))

    monitor = KnnMonitor(subset(memory), subset(queries), num_classes=10, k=20, temperature=0.07,
                         batch_size=max(1, min(128, images)))
    backbone = model.teacher_backbone()
    monitor.measure(backbone)  # warm-up
    started = time.perf_counter()
    monitor.measure(backbone)
    if next(backbone.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="vit_small/16/2/224x2+96x8", help="arch/patch/batch/Gx2+LxM")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--measure-images", type=int, default=60, help="images in the timed monitor measurement")
    p.add_argument("--train-samples", type=int, default=5000, help="monitor.train_samples to cost")
    p.add_argument("--val-samples", type=int, default=1000, help="monitor.val_samples to cost")
    p.add_argument("--epoch-images", type=int, default=1_281_167, help="images per training epoch to cost")
    p.add_argument("--every-epochs", type=int, default=1, help="monitor.every_epochs to cost")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    s = Setting.parse(args.setting)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
          f"device {device}, torch {torch.__version__}")
    t_step, model = step_seconds_per_image(s, device, args.steps)
    t_monitor = monitor_seconds_per_image(model, s, args.measure_images)
    per_point = (args.train_samples + args.val_samples) * t_monitor
    per_epoch = args.epoch_images * t_step * args.every_epochs
    print(f"{s}: training {t_step * 1000:.1f} ms/image, monitor {t_monitor * 1000:.1f} ms/image "
          f"(ratio {t_step / t_monitor:.1f})")
    print(f"monitor {args.train_samples}+{args.val_samples} every {args.every_epochs} epoch(s) of "
          f"{args.epoch_images:,} images: {per_point:.1f} s per point against {per_epoch:.0f} s of training "
          f"= {100 * per_point / per_epoch:.2f} %")


if __name__ == "__main__":
    main()
