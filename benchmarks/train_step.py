"""Training-step throughput and peak memory of the DINO step, on the device this machine has (CPU or GPU).

Measures :func:`dino_model.step.train_step` alone (forward + backward of student and teacher, clipping, optimiser
step, EMA) on synthetic crops already on the device: no data loading. Prints one table row per setting.

    python benchmarks/train_step.py                       # default settings for the device found
    python benchmarks/train_step.py --setting vit_small/16/64/224x2+96x8 --setting vit_small/16/128/128x2+64x8
    python benchmarks/train_step.py --device cpu --steps 5 --warmup 2 --out-dim 4096 \\
        --setting vit_tiny/16/8/64x2+32x4

A setting is ``arch/patch/batch/GxN+LxM``: batch per process, N global crops of G px and M local crops of L px
(N must be 2). Images/s counts images (not crops) per second; peak memory is the CUDA allocator's peak on GPU and
the process's peak resident set size on CPU (which includes the Python runtime and libraries).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_model.config import load_config  # noqa: E402
from dino_model.meta_arch import DINO  # noqa: E402
from dino_model.optim import build_optimizer, param_groups  # noqa: E402
from dino_model.step import StepSettings, resolve_precision, train_step  # noqa: E402
from settings import Setting  # noqa: E402  (benchmarks/settings.py)


GPU_DEFAULTS = ["vit_small/16/64/224x2+96x8", "vit_small/16/128/128x2+64x8", "vit_base/16/64/224x2+96x8"]
CPU_DEFAULTS = ["vit_tiny/16/8/64x2+32x4", "vit_tiny/16/32/96x2+48x6"]


def measure(s: Setting, device: torch.device, precision: str, out_dim: int, steps: int, warmup: int) -> dict:
    cfg = load_config(overrides=[
        f"model.arch={s.arch}", f"model.patch_size={s.patch}", f"model.out_dim={out_dim}",
        f"crops.global_size={s.global_size}", f"crops.local_size={s.local_size}", f"crops.n_local={s.n_local}",
        f"data.batch_size_per_gpu={s.batch}", "train.epochs=10", "optim.warmup_epochs=0",
    ])
    torch.manual_seed(0)
    model = DINO.from_config(cfg).to(device)
    optimizer = build_optimizer(cfg.optim.optimizer, param_groups(model.student_module()))
    autocast_dtype, use_scaler = resolve_precision(precision, device)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    settings = StepSettings.from_config(cfg, autocast_dtype)
    crops = [torch.randn(s.batch, 3, s.global_size, s.global_size, device=device) for _ in range(2)]
    crops += [torch.randn(s.batch, 3, s.local_size, s.local_size, device=device) for _ in range(s.n_local)]

    def step() -> torch.Tensor:
        # epoch 1: past the frozen-last-layer epoch, so the whole model is updated as in most of a run
        return train_step(model, optimizer, crops, epoch=1, lr=1e-4, wd=0.04, momentum=0.996, teacher_temp=0.04,
                          settings=settings, grad_scaler=scaler)["loss"]

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    final_loss = float(loss)  # the host sync that ends the timed region
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {
        "setting": str(s),
        "precision": str(autocast_dtype or "fp32").replace("torch.", ""),
        "step_ms": 1000 * elapsed / steps,
        "images_per_s": s.batch * steps / elapsed,
        "peak_gib": peak,
        "loss": final_loss,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", action="append", help="arch/patch/batch/GX2+LxM (repeatable)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--out-dim", type=int, default=65536, help="K, the head's output dimension")
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0 = torch's default)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = [Setting.parse(t) for t in (args.setting or (GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    print(f"device: {device.type} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"K={args.out_dim}, {args.steps} timed steps after {args.warmup} warm-up")
    header = f"{'setting':<34} {'precision':<9} {'step ms':>9} {'images/s':>9} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for s in settings:
        try:
            r = measure(s, device, args.precision, args.out_dim, args.steps, args.warmup)
        except torch.OutOfMemoryError:
            print(f"{str(s):<34} {'':<9} {'OOM':>9}")
            torch.cuda.empty_cache()
            continue
        print(f"{r['setting']:<34} {r['precision']:<9} {r['step_ms']:>9.1f} {r['images_per_s']:>9.1f} "
              f"{r['peak_gib']:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
