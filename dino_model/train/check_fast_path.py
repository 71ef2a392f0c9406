"""Check a training configuration's fast paths on this machine without training: is the fast path right here?

    python -m dino_model.fast_path --config run.yaml [--preset small] [section.field=value ...] [--steps 3]
    torchrun --nproc_per_node=G -m dino_model.fast_path --config run.yaml ...     # with DDP, as training runs

Sets the run up exactly as ``python -m dino_model.train`` would (checkpoints go to a temporary folder; nothing is
resumed or exported), which runs the data and step checks on rank 0's first batch; then takes ``--steps`` training
steps (default 3: the run's own compile and CUDA-graph capture, under the first-steps guard), and checks the
extraction's bf16 path with the teacher backbone on the first batch's global crops. The checks run in ``fallback``
mode whatever the config says, so every part is measured and printed: one line per part, then
``FAST_PATH {json}`` with every verdict and its figures. Exit code 0 when nothing fell back, 4 when something did,
2 for an invalid configuration, 1 for any other error. ``benchmarks/gpu_session.sh`` runs this first.

It lives in the training package because it sets a run up as training does; ``dino_model.fast_path`` (which the
training loop imports) runs it as a new program, never importing the loop (:mod:`dino_model.fast_path.__main__`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile

import torch

from dino_model import distributed as dist_utils
from dino_model.checkpoint import config_source
from dino_model.config import ConfigError, load_config
from dino_model.data.device_prefetch import DevicePrefetcher
from dino_model.eval.features import check_precision
from dino_model.fast_path import on_rank0

from .loop import setup_run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dino_model.fast_path", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML or JSON training config (as for python -m dino_model.train)")
    p.add_argument("--preset", help="preset(s) applied before the file (comma-separated)")
    p.add_argument("--steps", type=int, default=3, help="training steps taken after the checks (default 3)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. data.source=/data/train")
    return p.parse_args(argv)


def run_checks(cfg, steps: int) -> dict[str, dict]:
    """The verdict records of the run's data and step checks (after ``steps`` guarded steps) and of the extraction
    check."""
    run = setup_run(cfg)
    try:
        first_crops = None
        loader = run.take_loader()
        with DevicePrefetcher(loader, run.prepare_batch, run.ctx.device, depth=0) as batches:
            for crops in batches:
                if first_crops is None:
                    first_crops = crops[0].detach().clone()
                if run.step >= min(steps, run.schedules.total_steps):
                    break
                run.take_step(crops)
        backbone = run.model.teacher_backbone().eval()
        verdict, _ = check_precision(backbone, first_crops, "bf16", "fallback",
                                     decide=lambda check: on_rank0(check, run.ctx.is_main))
        records = {part: v.as_record() for part, v in run.fast_path.items()}
        records["extract"] = verdict.as_record()
        return records
    finally:
        run.loggers.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        with tempfile.TemporaryDirectory(prefix="dino-fast-path-") as tmp:
            overrides = list(args.overrides) + [
                f"checkpoint.uri={json.dumps(os.path.join(tmp, 'checkpoints'))}", "checkpoint.resume=false",
                "checkpoint.every_n_steps=0", "export.enabled=false", "logging.loggers=[]", "logging.progress=false",
                "train.fast_path_check=fallback"]
            cfg = load_config(config_source(args.config), overrides, preset=args.preset)
            with torch.random.fork_rng():
                records = run_checks(cfg, args.steps)
    except ConfigError as e:
        logging.getLogger("dino_model.fast_path").error("invalid configuration: %s", e)
        return 2
    except Exception:  # noqa: BLE001 - reported with the traceback
        logging.getLogger("dino_model.fast_path").exception("the fast-path check failed")
        return 1
    finally:
        dist_utils.cleanup()
    if rank == 0:
        for part, r in records.items():
            print(f"fast path · {part} · {r['verdict']} · {r['path']} · {r['seconds']:.1f} s", flush=True)
            if r["figures"]:
                print("    " + ", ".join(f"{k} {v:.4g}" for k, v in r["figures"].items()), flush=True)
        print("FAST_PATH " + json.dumps(records), flush=True)
    return 4 if any(r["status"] == "fallback" for r in records.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
