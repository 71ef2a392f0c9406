"""End-to-end DINO speed on one device: the data path alone, the step alone, both together, MFU, peak memory.

On a GPU node (the whole default run is sized to finish within ~8 minutes, compile included)::

    python benchmarks/speed.py                           # ViT-S/16 and ViT-B/16, 2x224+8x96 and 2x128+8x64
    python benchmarks/speed.py --setting vit_small/16/128/224x2+96x8 --steps 30
    python benchmarks/speed.py --jpeg-sizes imagenet      # data path and e2e on the ImageNet-like size mix only

On a CPU (tiny settings, checks that everything runs; the numbers mean little)::

    python benchmarks/speed.py --quick --device cpu

What each column measures (images/s counts source images, each giving 2 + n_local crops):

* ``data``: the GPU data path of ``data.augment_on=device`` on 500x375 JPEGs of quality 90 (ImageNet's typical
  size; made from ``../shared/data/imagenet-sample`` when present, else synthetic): batched ``decode_jpeg`` on the
  device + :class:`dino_model.data.gpu_augment.DeviceMultiCrop` (crop parameters drawn beforehand, as the workers
  do). ``params/core``: the parameter draw + header read that each data-loader worker does, images/s on one core.
* ``data mix``: the same on an ImageNet-like spread of sizes (``--jpeg-sizes``: ``uniform`` = only the 500x375 set,
  ``imagenet`` = only the mix, ``both``, the default = both columns). The mix is fixed (seed 0), width x height:
  every 33rd image large (3 %: long side 1000-2500, 4:3 or 3:2, 70 % landscape), every 50th small (2 %: long side
  64-250), of the rest 75 % one of 500x375 / 375x500 / 500x333 / 333x500 (weights 55 / 20 / 15 / 10) and 25 %
  another size with a 500-pixel long side (short side 200-500). Every batch of the column's first images holds
  its share of large and small ones (batch 128: 4 large, 3 small), which is what the matmul resize's size buckets
  (:func:`dino_model.data.gpu_augment.plan_buckets`) are for: one canvas padded to a batch's largest image would
  hold ~15x the images' pixels. The header prints the buckets the mix's first batch gets.
* ``step``: :func:`dino_model.step.train_step` on a model compiled with :meth:`dino_model.meta_arch.DINO.compile`
  (on CUDA; ``--compile``), fused AdamW on CUDA, bf16 autocast on GPUs (fp32 on CPU), K = 65,536 (``--out-dim``), on crops
  already on the device.
* ``e2e``: the real training input pipeline — :func:`dino_model.data.reader.build_loader` over an ImageFolder of
  those JPEGs (the 500x375 set, or the mix with ``--jpeg-sizes imagenet``) with ``--workers`` processes reading
  bytes and drawing parameters, then decode + augment on the prefetch thread's side stream (``--prefetch``
  batches ahead, as ``data.prefetch_batches`` in training) + step in the training process.
* checks (``--check``, on by default on CUDA; printed before the table): the data path against the CPU workers,
  the data path on the prefetch thread beside a busy main stream against the same batches made alone (must be
  identical: cross-stream memory reuse would show here), and the step as training runs it (compiled, bf16, fused
  AdamW on CUDA) against the same step in fp32, eager.
* ``GFLOP/img`` (model FLOPs, matmuls only, 2 per multiply-add): for a ViT with width d, depth L, patch p and
  n = (s/p)^2 + 1 tokens per crop of side s, one crop's forward is
  L·(24·n·d² + 4·n²·d) + 2·(n-1)·3p²·d (patch embedding) + 2·(d·h + (nl-2)·h² + h·b + b·K) (head: hidden h = 2048,
  bottleneck b = 256, nl = 3 layers). Per image: 3 x (student forward over all crops) [forward + backward] +
  teacher forward over the 2 global crops. ViT-S/16, 2x224 + 8x96, K = 65,536: 114 GFLOP.
* ``MFU``: the *step's* achieved FLOP/s over the device's dense bf16 peak (``--peak-tflops``, default
  from the device name: H100/H200 989, A100 312), and ``TFLOP/s`` the achieved rate itself.
* ``peak GiB``: the CUDA allocator's peak during the step (CPU: the process's peak RSS).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dino_model.config import CropsConfig, load_config  # noqa: E402
from dino_model.data.device_prefetch import DevicePrefetcher  # noqa: E402
from dino_model.data.gpu_augment import CropParamSampler, DeviceMultiCrop, plan_buckets  # noqa: E402
from dino_model.data.reader import LoaderSettings, build_loader  # noqa: E402
from dino_model.data.rng import sample_generator  # noqa: E402
from dino_model.meta_arch import DINO  # noqa: E402
from dino_model.optim import build_optimizer, param_groups  # noqa: E402
from dino_model.step import StepSettings, resolve_compile, resolve_precision, train_step  # noqa: E402
from settings import WIDTH_DEPTH, Setting  # noqa: E402  (benchmarks/settings.py)

GPU_DEFAULTS = ["vit_small/16/128/224x2+96x8", "vit_small/16/128/128x2+64x8",
                "vit_base/16/64/224x2+96x8", "vit_base/16/128/128x2+64x8"]
CPU_QUICK = ["vit_tiny/16/4/64x2+32x2"]
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def gflop_per_image(s: Setting, out_dim: int, hidden: int = 2048, bottleneck: int = 256, nlayers: int = 3) -> float:
    """Model FLOPs per source image (see the module docstring)."""
    d, depth = WIDTH_DEPTH[s.arch]

    def crop(side: int) -> float:
        n = (side // s.patch) ** 2 + 1
        blocks = depth * (24 * n * d * d + 4 * n * n * d)
        embed = 2 * (n - 1) * 3 * s.patch ** 2 * d
        head = 2 * (d * hidden + (nlayers - 2) * hidden * hidden + hidden * bottleneck + bottleneck * out_dim)
        return blocks + embed + head

    student = 2 * crop(s.global_size) + s.n_local * crop(s.local_size)
    teacher = 2 * crop(s.global_size)
    return (3 * student + teacher) / 1e9


# ------------------------------------------------------------------------------------------------------------------
# images


UNIFORM_SIZE = (500, 375)  # (width, height): ImageNet's most common size


def imagenet_mix_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(width, height) of ``n`` images, a fixed ImageNet-like mix (see the module docstring): large ones at every
    33rd position and small ones at every 50th, so any batch-size prefix holds its share of both."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(n):
        if i % 33 == 0:
            long = int(rng.integers(1000, 2501))
            short = int(round(long / rng.choice([4 / 3, 3 / 2])))
            sizes.append((long, short) if rng.random() < 0.7 else (short, long))
        elif i % 50 == 1:
            long = int(rng.integers(64, 251))
            short = int(round(long * rng.uniform(0.6, 1.0)))
            sizes.append((long, short) if rng.random() < 0.7 else (short, long))
        elif rng.random() < 0.75:
            sizes.append([(500, 375), (375, 500), (500, 333), (333, 500)][rng.choice(4, p=[0.55, 0.2, 0.15, 0.1])])
        else:
            short = int(rng.integers(200, 501))
            sizes.append((500, short) if rng.random() < 0.75 else (short, 500))
    return sizes


def make_jpegs(sizes: list[tuple[int, int]], shared: Path, quality: int = 90) -> list[bytes]:
    """One distinct JPEG per (width, height) in ``sizes``: crops/flips of the imagenet-sample images, or synthetic."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(0)
    sources = sorted((shared / "imagenet-sample").glob("*/*.JPEG")) if shared.is_dir() else []
    bases = [Image.open(p).convert("RGB") for p in sources[:40]]
    out = []
    for i, size in enumerate(sizes):
        if bases:
            im = bases[i % len(bases)]
            w, h = im.size
            cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            im = im.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
            if rng.random() < 0.5:
                im = ImageOps.mirror(im)
        else:  # smooth colour fields plus texture: JPEG sizes like natural images'
            yy, xx = np.mgrid[0: size[1], 0: size[0]]
            arr = np.stack([np.sin(xx / rng.uniform(5, 60) + c) * np.cos(yy / rng.uniform(5, 60)) for c in range(3)], -1)
            arr = ((arr + 1) * 110 + rng.normal(0, 12, arr.shape)).clip(0, 255).astype(np.uint8)
            im = Image.fromarray(arr)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def describe_mix(sizes: list[tuple[int, int]], s: Setting) -> str:
    """The matmul resize's size buckets for one batch of the mix (local crop group of setting ``s``)."""
    hw = [(h, w) for w, h in sizes]
    own = sum(h * w for h, w in hw)
    plan = plan_buckets(hw, n_crop=s.n_local, crop_size=s.local_size)
    padded = sum(len(b.indices) * b.height * b.width for b in plan)
    one = len(hw) * max(h for h, _ in hw) * max(w for _, w in hw)
    return (f"batch {len(hw)} of the mix ({len(set(hw))} distinct sizes): {len(plan)} size buckets for the "
            f"{s.n_local}x{s.local_size} crops, {100 * (padded / own - 1):.0f} % padding; one canvas "
            f"({max(w for _, w in hw)} x {max(h for h, _ in hw)}) would hold {one / own:.1f}x the images' pixels")


def write_folder(jpegs: list[bytes], root: Path) -> None:
    for i, data in enumerate(jpegs):
        d = root / f"class{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"img{i:06d}.JPEG").write_bytes(data)


# ------------------------------------------------------------------------------------------------------------------
# measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls (device synchronised around the timed calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t) / iters


def matmul_peak_tflops(device: torch.device) -> float | None:
    """A measured bf16 matmul rate (8192^3), the practical ceiling the issue quotes (~790 on an H200)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    sec = timed(lambda: a @ b, 20, 3, device)
    return 2 * 8192**3 / sec / 1e12


def data_rate(aug: DeviceMultiCrop, sampler: CropParamSampler, jpegs: list[bytes], batch: int, iters: int):
    """The device data path on the first ``batch`` JPEGs: (images/s, params/core, encoded batch, its params)."""
    enc = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs[:batch]]
    t = time.perf_counter()
    params = [sampler(e, sample_generator(0, 0, str(i))) for i, e in enumerate(enc)]
    per_core = len(enc) / (time.perf_counter() - t)
    return batch / timed(lambda: aug(enc, params), iters, 1, aug.device), per_core, enc, params


def measure(s: Setting, args, device: torch.device, jpeg_sets: dict[str, list[bytes]], folder: Path) -> dict:
    """One table row; ``jpeg_sets``: "uniform" and/or "imagenet" JPEGs, the first of them also in ``folder``."""
    cfg = load_config(overrides=[
        f"model.arch={s.arch}", f"model.patch_size={s.patch}", f"model.out_dim={args.out_dim}",
        f"crops.global_size={s.global_size}", f"crops.local_size={s.local_size}", f"crops.n_local={s.n_local}",
        f"data.batch_size_per_gpu={s.batch}", "train.epochs=10", "optim.warmup_epochs=0",
    ])
    # A fresh compile cache per setting: otherwise a second batch size / crop size turns on dynamic shapes (and
    # the compiled kernels would differ from a training run's, which sees one shape).
    torch._dynamo.reset()
    mcfg = CropsConfig(global_size=s.global_size, local_size=s.local_size, n_local=s.n_local)
    row: dict = {"setting": str(s), "batch": s.batch, "gflop": gflop_per_image(s, args.out_dim)}

    # data path alone: bytes + pre-drawn params -> crops on the device, per JPEG set
    sampler = CropParamSampler(mcfg)
    aug = DeviceMultiCrop(mcfg, device)
    step_inputs = None
    for name, jpegs in jpeg_sets.items():
        rate, per_core, enc, params = data_rate(aug, sampler, jpegs, s.batch, args.data_iters)
        row["data" if name == "uniform" else "data_mix"] = rate
        if step_inputs is None:  # the first set also feeds the step and gives params/core
            row["params_per_core"], step_inputs = per_core, (enc, params)
    enc, params = step_inputs

    # the step alone
    torch.manual_seed(0)
    model = DINO.from_config(cfg).to(device)
    optimizer = build_optimizer("adamw", param_groups(model.student_module()), fused=device.type == "cuda")
    autocast_dtype, use_scaler = resolve_precision(args.precision, device)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    settings = StepSettings.from_config(cfg, autocast_dtype)
    if resolve_compile(args.compile, device):
        model.compile(args.compile_mode)
    crops = aug(enc, params)

    def step(batch_crops=crops):
        return train_step(model, optimizer, batch_crops, epoch=1, lr=1e-4, wd=0.04, momentum=0.996,
                          teacher_temp=0.04, settings=settings, grad_scaler=scaler)["loss"]

    t = time.perf_counter()
    loss0 = step()
    sync(device)
    row["compile_s"] = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sec = timed(step, args.steps, args.warmup, device)
    row["step"] = s.batch / sec
    row["tflops"] = row["gflop"] * row["step"] / 1e3
    row["peak_gib"] = peak_memory_gib(device)
    row["loss_finite"] = bool(torch.isfinite(loss0).item())

    # end to end: real loader (workers read bytes + draw params) -> decode + augment + step here
    loader = build_loader(str(folder), LoaderSettings(batch_size=s.batch, seed=0, num_workers=args.workers,
                                                      pin_memory=device.type == "cuda", shuffle_buffer=0),
                          transform=None, decode=False, param_sampler=sampler, epoch=0)
    n_batches = min(len(loader), args.e2e_batches + 1)
    done = 0
    # as in dino_model/train: decode + augment run --prefetch batches ahead on a thread and a side CUDA stream
    with DevicePrefetcher(loader, lambda b: aug(b["encoded"], b["params"]), device, depth=args.prefetch) as batches:
        it = iter(batches)
        step(next(it))  # first batch: worker start-up, not counted
        sync(device)
        t = time.perf_counter()
        for _ in range(n_batches - 1):
            step(next(it))
            done += 1
        sync(device)
        row["e2e"] = done * s.batch / (time.perf_counter() - t) if done else float("nan")
    del it, batches, loader, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def check_data_path(jpegs: list[bytes], device: torch.device, label: str = "data path") -> str:
    """Device crops vs the CPU worker pipeline on the same JPEGs and parameters (nvjpeg + matmul resize with its
    size buckets + sync-free colour on a GPU) for the first 8 JPEGs: mean and 99.9th-percentile absolute
    difference, in uint8 levels."""
    from dino_model.data.augment import MultiCropAugmentation
    from dino_model.data.reader import decode_image

    cfg = CropsConfig()
    enc = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs[:8]]
    params = [CropParamSampler(cfg)(e, sample_generator(0, 0, f"check{i}")) for i, e in enumerate(enc)]
    fast = DeviceMultiCrop(cfg, device)(enc, params)
    aug = MultiCropAugmentation(cfg)
    ref = [aug.apply(decode_image(j), p) for j, p in zip(jpegs[:8], params)]
    level = 1 / 255 / min(cfg.std)
    d = torch.cat([(fast[k].cpu() - torch.stack([r[k] for r in ref])).abs().flatten() for k in range(cfg.ncrops)])
    q = torch.quantile(d[:: max(1, d.numel() // 1_000_000)], 0.999)
    return f"{label} vs CPU workers: mean {d.mean() / level:.3f} levels, 99.9% {q / level:.2f} levels, " \
           f"max {d.max() / level:.1f} levels"


def check_concurrent_data_path(jpegs: list[bytes], device: torch.device, batch: int = 32, n: int = 6) -> str:
    """The device data path run as training runs it — on the prefetch thread's side stream, two batches ahead,
    while the main stream is busy and frees its own temporaries — against the same batches made one at a time
    with nothing else running. Catches cross-stream memory reuse (e.g. nvjpeg writing into blocks that queued
    kernels still read, see ``DeviceMultiCrop.decode``): the crops must be identical."""
    cfg = CropsConfig()
    sampler, aug = CropParamSampler(cfg), DeviceMultiCrop(cfg, device)
    work = []
    for i in range(n):
        enc = [torch.frombuffer(bytearray(jpegs[(i * batch + j) % len(jpegs)]), dtype=torch.uint8)
               for j in range(batch)]
        work.append((enc, [sampler(e, sample_generator(0, 0, f"race{i}-{j}")) for j, e in enumerate(enc)]))
    alone = []
    for enc, params in work:
        alone.append([c.clone() for c in aug(enc, params)])
        sync(device)
    busy = torch.randn(4096, 4096, device=device)
    worst = 0.0
    with DevicePrefetcher(work, lambda w: aug(*w), device, depth=2) as batches:
        for k, crops in enumerate(batches):
            for _ in range(10):  # queue work on the main stream; its temporaries are freed while it runs
                busy = torch.tanh(busy @ busy) * 0.5
            worst = max(worst, max(float((c - r).abs().max()) for c, r in zip(crops, alone[k])))
    return f"data path on the prefetch thread beside a busy main stream vs alone: max |diff| {worst:.3g} " \
           f"({n} batches of {batch}; must be 0)"


def check_step(device: torch.device, args, steps: int = 5) -> str:
    """Loss of the step as training runs it (precision/compile as configured, fused AdamW on CUDA) vs the same step
    in fp32, eager, with for-each AdamW, from the same initial state on the same crops, over ``steps`` steps: the
    largest relative difference."""
    s = Setting.parse(args.check_setting)
    torch._dynamo.reset()
    cfg = load_config(overrides=[
        f"model.arch={s.arch}", f"model.patch_size={s.patch}", f"model.out_dim={args.out_dim}",
        f"crops.global_size={s.global_size}", f"crops.local_size={s.local_size}", f"crops.n_local={s.n_local}",
        "train.epochs=10", "optim.warmup_epochs=0", "model.drop_path_rate=0.0",
    ])
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(s.batch, 3, s.global_size, s.global_size, generator=g) for _ in range(2)]
    crops += [torch.randn(s.batch, 3, s.local_size, s.local_size, generator=g) for _ in range(s.n_local)]
    crops = [c.to(device) for c in crops]
    losses = []
    for fast in (False, True):
        torch.manual_seed(0)
        model = DINO.from_config(cfg).to(device)
        opt = build_optimizer("adamw", param_groups(model.student_module()), fused=fast and device.type == "cuda")
        dtype = resolve_precision(args.precision, device)[0] if fast else None
        st = StepSettings.from_config(cfg, dtype)
        if fast and resolve_compile(args.compile, device):
            model.compile()
        losses.append([float(train_step(model, opt, crops, epoch=1, lr=5e-4, wd=0.04, momentum=0.996,
                                        teacher_temp=0.04, settings=st)["loss"]) for _ in range(steps)])
    ref, fast = np.array(losses[0]), np.array(losses[1])
    rel = np.abs(fast - ref) / np.abs(ref)
    return (f"step vs fp32 eager ({s}, batch {s.batch}, {steps} steps): max relative loss difference "
            f"{rel.max():.2e}; reference losses {np.round(ref, 4).tolist()}, fast {np.round(fast, 4).tolist()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--setting", action="append", help="arch/patch/batch/Gx2+LxM (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny settings and few iterations (CPU smoke run)")
    p.add_argument("--out-dim", type=int, default=None, help="prototypes K (default 65536; 1024 with --quick)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (default 5; 1 quick)")
    p.add_argument("--data-iters", type=int, default=None, help="timed data-path batches (default 10; 2 quick)")
    p.add_argument("--e2e-batches", type=int, default=None, help="timed end-to-end batches (default 20; 3 quick)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="data-loader workers")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default by name)")
    p.add_argument("--check", default="auto", choices=["auto", "true", "false"],
                   help="correctness checks first (data path vs CPU workers, fast vs fp32 step); auto = on CUDA")
    p.add_argument("--check-setting", default=None, help="setting of the step check (default vit_small/16/16/"
                                                           "224x2+96x8; the quick setting with --quick)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the remaining settings once this many seconds have passed (keeps the run ~8 min)")
    p.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"), help="folder with imagenet-sample/")
    p.add_argument("--jpeg-sizes", default="both", choices=["uniform", "imagenet", "both"],
                   help="data-path JPEGs: uniform 500x375, the ImageNet-like size mix, or both (two data columns; "
                        "e2e uses the 500x375 set unless only imagenet)")
    p.add_argument("--prefetch", type=int, default=1, help="e2e: batches prepared ahead (data.prefetch_batches)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (train.compile_mode), e.g. "
                                                              "reduce-overhead for CUDA graphs")
    args = p.parse_args(argv)
    q = args.quick
    args.out_dim = args.out_dim or (1024 if q else 65536)
    args.steps = args.steps or (3 if q else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 5)
    args.data_iters = args.data_iters or (2 if q else 10)
    args.e2e_batches = args.e2e_batches or (3 if q else 20)
    args.compile = {"auto": "auto", "true": True, "false": False}[args.compile]
    if q:
        args.workers = min(args.workers, 2)
    args.check_setting = args.check_setting or (CPU_QUICK[0] if q else "vit_small/16/16/224x2+96x8")
    device = torch.device(args.device)
    settings = [Setting.parse(x) for x in (args.setting or (CPU_QUICK if q else GPU_DEFAULTS))]

    if device.type == "cuda":
        # TF32 stays at PyTorch's defaults, as in dino_model/train (the data path's fp32 resampling matmuls need fp32)
        name_of_device = torch.cuda.get_device_name(device)
    else:
        name_of_device = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name_of_device), None)
    measured_peak = matmul_peak_tflops(device)
    t0 = time.perf_counter()
    max_batch = max(s.batch for s in settings)
    n_images = max_batch * (args.e2e_batches + 2)  # the set e2e reads needs this many; a data-only set one batch
    names = ["uniform", "imagenet"] if args.jpeg_sizes == "both" else [args.jpeg_sizes]
    jpeg_sets: dict[str, list[bytes]] = {}
    for name in names:
        t = time.perf_counter()
        n = n_images if name == names[0] else max_batch
        sizes = [UNIFORM_SIZE] * n if name == "uniform" else imagenet_mix_sizes(n)
        jpeg_sets[name] = make_jpegs(sizes, Path(args.shared))
        what = "500x375" if name == "uniform" else f"ImageNet-like size mix ({len(set(sizes))} distinct sizes)"
        kib = np.mean([len(j) for j in jpeg_sets[name]]) / 1024
        print(f"# {'e2e + data' if name == names[0] else 'data'} set: {n} JPEGs {what} q90 (mean {kib:.0f} KiB) "
              f"made in {time.perf_counter() - t:.1f} s", flush=True)
        if name == "imagenet":
            print("# " + describe_mix(sizes[:max_batch], settings[0]), flush=True)
    print(f"# device: {name_of_device}; torch {torch.__version__}; workers {args.workers}; K = {args.out_dim}",
          flush=True)
    if measured_peak:
        print(f"# measured bf16 matmul peak: {measured_peak:.0f} TFLOP/s; spec dense bf16 peak used for MFU: "
              f"{peak or 'unknown'}", flush=True)
    if args.check == "true" or (args.check == "auto" and device.type == "cuda"):
        for name, jpegs in jpeg_sets.items():
            label = "data path (500x375)" if name == "uniform" else "data path (size mix, large + small included)"
            print("# check: " + check_data_path(jpegs, device, label), flush=True)
        if device.type == "cuda":
            print("# check: " + check_concurrent_data_path(jpeg_sets[names[0]], device), flush=True)
        print("# check: " + check_step(device, args), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(jpeg_sets[names[0]], Path(tmp))
        for s in settings:
            if time.perf_counter() - t0 > args.budget_s:
                skipped.append(str(s))
                continue
            rows.append(measure(s, args, device, jpeg_sets, Path(tmp)))
            r = rows[-1]
            print(f"# done {r['setting']} (compile/first step {r['compile_s']:.0f} s)", flush=True)

    print()
    print("| setting | batch | params/core | data img/s (500x375) | data img/s (size mix) | step img/s | "
          f"e2e img/s ({'500x375' if names[0] == 'uniform' else 'size mix'}) | GFLOP/img | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    def num(x: float | None) -> str:  # CPU smoke runs give rates below 1
        return "—" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"

    for r in rows:
        mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a"
        print(f"| {r['setting']} | {r['batch']} | {num(r['params_per_core'])} | {num(r.get('data'))} | "
              f"{num(r.get('data_mix'))} | "
              f"{num(r['step'])} | {num(r['e2e'])} | {r['gflop']:.1f} | {r['tflops']:.3g} | {mfu} | "
              f"{r['peak_gib']:.2f} |")
    if skipped:
        print(f"# skipped (past --budget-s {args.budget_s:.0f} s): {', '.join(skipped)}")
    print(f"\n# total {time.perf_counter() - t0:.0f} s")
    bad = [r["setting"] for r in rows if not r["loss_finite"]]
    if bad:
        print(f"# non-finite loss in: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
