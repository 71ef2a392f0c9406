"""Synthetic features of ImageNet's size for ``benchmarks/eval_scale.py``, written through the project's own
writer (:func:`dino_model.eval.features.extract_features`, 100k-row Parquet parts) so that reading them back is
exactly what the evaluation tasks do.

The features are class-structured, so the k-NN and the linear probe have something to find: row ``r`` of class
``c = r mod classes`` is ``separation * centre[c] + noise`` (standard normal centres and noise, float32), the
centres shared by every split, the noise drawn per split and part from the seed. A "backbone" that replays these
arrays stands in for the ViT: extract_features calls it once per batch, in order.

    .venv/bin/python benchmarks/eval_scale_data.py /tmp/eval-scale/n1281167_d384 --train 1281167 --val 10000
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch

IMAGENET_TRAIN = 1_281_167
IMAGENET_VAL = 50_000
SEPARATION = 0.3
BATCH = 10_000


class _Replay(torch.nn.Module):
    """A 'backbone' whose output for each batch is the next queued feature array (the input is ignored)."""

    def __init__(self):
        super().__init__()
        self.queue: collections.deque[torch.Tensor] = collections.deque()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.queue.popleft()
        assert feats.shape[0] == x.shape[0]
        return feats


def synthetic_rows(start: int, n: int, dim: int, classes: int, seed: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``start .. start + n`` of a split: (labels int64, features float32 [n, dim])."""
    centres = np.random.default_rng([seed, 0]).standard_normal((classes, dim), dtype=np.float32)
    labels = np.arange(start, start + n, dtype=np.int64) % classes
    rng = np.random.default_rng([seed, 1 if split == "train" else 2, start])
    feats = rng.standard_normal((n, dim), dtype=np.float32)
    feats += SEPARATION * centres[labels]
    return labels, feats


def write_split(out: str, split: str, rows: int, dim: int, classes: int, seed: int,
                feature_dtype: str = "float32") -> None:
    """Write ``rows`` synthetic rows of ``split`` under ``out`` in 100k-row parts (progress bar on stderr)."""
    from dino_model.eval.features import FeatureRecipe, extract_features

    replay = _Replay()

    def batches():
        for start in range(0, rows, BATCH):
            n = min(BATCH, rows - start)
            labels, feats = synthetic_rows(start, n, dim, classes, seed, split)
            replay.queue.append(torch.from_numpy(feats))
            keys = [f"{split}-{i:08d}" for i in range(start, start + n)]
            yield keys, torch.zeros((n, 3, 1, 1), dtype=torch.uint8), labels

    extract_features(replay, batches(), out, split, {"synthetic": True, "seed": seed},
                     recipe=FeatureRecipe(transform=None, feature_dtype=feature_dtype), rows_per_file=100_000,
                     total=rows)


def ensure_dataset(out: Path, train: int, val: int, dim: int, classes: int = 1000, seed: int = 0,
                   dtype: str = "float32") -> Path:
    """Write the dataset unless ``out`` already holds one with the same parameters (``params.json``)."""
    params = {"train": train, "val": val, "dim": dim, "classes": classes, "seed": seed, "dtype": dtype}
    marker = out / "params.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return out
    options = {} if dtype == "float32" else {"feature_dtype": dtype}
    for split, rows in (("train", train), ("val", val)):
        write_split(str(out), split, rows, dim, classes, seed, **options)
    marker.write_text(json.dumps(params))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="dataset folder (train/ and val/ parts go under it)")
    parser.add_argument("--train", type=int, default=IMAGENET_TRAIN, help="training rows (default: ImageNet's)")
    parser.add_argument("--val", type=int, default=IMAGENET_VAL, help="validation rows (default: ImageNet's)")
    parser.add_argument("--dim", type=int, default=384, help="feature dimension (384: ViT-S k-NN features)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored feature type")
    args = parser.parse_args()
    ensure_dataset(args.out, args.train, args.val, args.dim, args.classes, dtype=args.dtype)


if __name__ == "__main__":
    main()
