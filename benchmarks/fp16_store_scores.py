"""What the float16 feature store (``FeatureRecipe(feature_dtype="float16")``) does to the scores (issue 27):
features of an ImageFolder's ``train/`` and ``val/`` extracted by a backbone the project trained, once stored as
float32 and once as float16, then the weighted k-NN (ks 10, 20, 100, 200, [CLS] features) and the fast linear
probe (``cls_last4`` features, the paper's ViT-S protocol) on each.

    .venv/bin/python benchmarks/fp16_store_scores.py .demo/run/checkpoints ../shared/data/imagenette-128 \\
        --resize 128 --crop 112                               # the demo's ViT-Tiny on Imagenette-128
    .venv/bin/python benchmarks/fp16_store_scores.py .demo/run/checkpoints .demo/data --resize 0 --crop 64

Prints, per score, the float32 and float16 values and their difference, the share of k-NN (k = 20) predictions
that differ, and the bytes of each store on disk. Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

KS = (10, 20, 100, 200)


def image_folder_batches(root: Path, batch_size: int = 64):
    """``(keys, uint8 images [B, 3, H, W], labels)`` of an ImageFolder, classes in name order."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.is_file()]
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f, _ in chunk]
        yield [f"{f.parent.name}/{f.name}" for f, _ in chunk], images, [i for _, i in chunk]


def _store_bytes(uri: str) -> int:
    return sum(f.stat().st_size for f in Path(uri).rglob("*.parquet"))


def extract_both(backbone, data: Path, out: Path, transform, n_last_blocks: int) -> dict[str, dict]:
    """float32 and float16 stores of train and val; ``{dtype: {split: (labels, feats), "bytes": n}}``."""
    from dino_model.eval.features import FeatureRecipe, extract_features, read_features

    stores: dict[str, dict] = {}
    for dtype in ("float32", "float16"):
        uri = str(out / f"{dtype}-last{n_last_blocks}")
        for split in ("train", "val"):
            recipe = FeatureRecipe(transform=transform, n_last_blocks=n_last_blocks, feature_dtype=dtype)
            extract_features(backbone, image_folder_batches(data / split), uri, split, {}, recipe=recipe,
                             progress=False)
        stores[dtype] = {s: read_features(uri, s, dtype=None)[1:3] for s in ("train", "val")}
        stores[dtype]["bytes"] = _store_bytes(uri)
    return stores


def knn_rows(stores: dict) -> list[tuple[str, float, float]]:
    from dino_model.eval.knn import knn_classify, knn_predict

    res, preds = {}, {}
    for dtype, d in stores.items():
        (tr_l, tr_f), (va_l, va_f) = d["train"], d["val"]
        res[dtype] = knn_classify(tr_f, tr_l, va_f, va_l, ks=KS)
        preds[dtype] = knn_predict(tr_f, tr_l, va_f, k=20)
    rows = [(f"knn{k}_{t}", res["float32"][k][t], res["float16"][k][t]) for k in KS for t in ("top1", "top5")]
    changed = 100.0 * float(np.mean(preds["float32"] != preds["float16"]))
    return rows + [("k-NN 20 predictions changed (%)", 0.0, changed)]


def probe_rows(stores: dict, epochs: int) -> list[tuple[str, float, float]]:
    from dino_model.eval.linear_probe import linear_probe_on_features

    res = {}
    for dtype, d in stores.items():
        (tr_l, tr_f), (va_l, va_f) = d["train"], d["val"]
        res[dtype] = linear_probe_on_features(tr_f, tr_l, va_f, va_l, epochs=epochs)
    return [(f"linear_approx_{name}", getattr(res["float32"], attr), getattr(res["float16"], attr))
            for name, attr in (("best_top1", "best_top1"), ("final_top1", "final_top1"), ("final_top5", "final_top5"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backbone", help="a checkpoint, a folder of them, an export (dino_model.export.load_backbone)")
    parser.add_argument("data", type=Path, help="an ImageFolder root with train/ and val/")
    parser.add_argument("--resize", type=int, default=128, help="short side before the centre crop (0: none)")
    parser.add_argument("--crop", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=100, help="fast linear-probe epochs (the task's default)")
    parser.add_argument("--probe-blocks", type=int, default=4, help="n_last_blocks of the linear-probe features")
    args = parser.parse_args()

    from dino_model.eval.transforms import EvalTransform
    from dino_model.export import load_backbone

    backbone = load_backbone(args.backbone).eval()
    transform = EvalTransform(args.resize or None, args.crop)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        knn_stores = extract_both(backbone, args.data, Path(tmp), transform, 1)
        probe_stores = extract_both(backbone, args.data, Path(tmp), transform, args.probe_blocks)
        print(f"extracted in {time.perf_counter() - started:.0f} s: train {knn_stores['float32']['train'][1].shape}, "
              f"val {knn_stores['float32']['val'][1].shape}; cls_last{args.probe_blocks} "
              f"{probe_stores['float32']['train'][1].shape[1]} dims")
        rows = knn_rows(knn_stores) + probe_rows(probe_stores, args.epochs)
    for name, stores in (("cls", knn_stores), (f"cls_last{args.probe_blocks}", probe_stores)):
        rows.append((f"{name} store bytes", stores["float32"]["bytes"], stores["float16"]["bytes"]))
    print("| score | float32 store | float16 store | difference |\n|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:,.2f} | {b:,.2f} | {b - a:+,.2f} |")


if __name__ == "__main__":
    main()
