"""The evaluations themselves, as tasks that return metrics (no side effect but the attention overlays and DAVIS
predictions they are asked to write): weighted k-NN and its bf16 parity check, the fast and the full linear probe,
attention-map Jaccard, DAVIS label propagation.

Every score is returned in percent (:mod:`dino_model.eval.score_names`: the library's attention and DAVIS
fractions are multiplied by 100 here), and top-5 accuracies only for sets of at least 10 classes (below that they
say nothing: with 5 classes top-5 is 100 %)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from dino_model.eval.score_names import TOP5_MIN_CLASSES, as_percent

from .common import run_logger
from .features import load_model
from .settings import EvaluationSettings, resolve_device


def _read_pair(features_uri: str, expected: dict[str, int] | None):
    """Train and val features, checking the row counts against the shard sets and the labels against the rows.
    Each split is read into one array as stored (a float16 store stays float16: the k-NN and the probe convert one
    block or batch at a time)."""
    import time

    from dino_model.eval.features import read_features

    out = {}
    for split in ("train", "val"):
        started = time.perf_counter()
        keys, labels, feats, meta = read_features(features_uri, split, dtype=None)
        run_logger().info("read %s features %s (%s, %.2f GB) in %.1f s", split, feats.shape, feats.dtype,
                          feats.nbytes / 1e9, time.perf_counter() - started)
        if not (len(keys) == len(labels) == feats.shape[0]):
            raise ValueError(f"{features_uri}/{split}: {len(keys)} keys, {len(labels)} labels, {feats.shape[0]} "
                             "feature rows")
        if expected is not None and feats.shape[0] != expected[split]:
            raise ValueError(f"{features_uri}/{split} holds {feats.shape[0]} feature rows but the {split} shard set "
                             f"has {expected[split]} samples: re-extract the features")
        out[split] = (labels, feats, meta)
    if out["train"][2].get("feature_kind") != out["val"][2].get("feature_kind"):
        raise ValueError(f"{features_uri}: train and val hold different feature kinds")
    return out


@task(name="knn", cache_policy=NO_CACHE)
def knn_scores(features_uri: str, ks: list[int], temperature: float = 0.07, num_classes: int | None = None,
               device: str = "auto", expected: dict[str, int] | None = None) -> dict[str, float]:
    """Weighted k-NN (paper: T = 0.07) of val against train features read from Parquet: ``knn<k>_top1/top5``."""
    from dino_model.eval.knn import knn_classify

    d = _read_pair(features_uri, expected)
    res = knn_classify(d["train"][1], d["train"][0], d["val"][1], d["val"][0], ks=ks, T=temperature,
                       num_classes=num_classes, device=resolve_device(device))
    top5 = reports_top5(num_classes, d["train"][0])
    metrics = {}
    for k, r in res.items():
        metrics[f"knn{k}_top1"] = r["top1"]
        if top5:
            metrics[f"knn{k}_top5"] = r["top5"]
    run_logger().info("k-NN: %s", ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
    return metrics


def reports_top5(num_classes: int | None, train_labels=None) -> bool:
    """Whether top-5 accuracy is reported: at least :data:`TOP5_MIN_CLASSES` classes (counted from the training
    labels when ``num_classes`` is not given)."""
    if num_classes is None and train_labels is not None:
        import numpy as np

        num_classes = int(np.max(train_labels)) + 1 if len(train_labels) else 0
    return (num_classes or 0) >= TOP5_MIN_CLASSES


def bf16_parity_metrics(bf16: dict[int, dict[str, float]], fp32: dict[int, dict[str, float]],
                        tolerance: float) -> tuple[dict[str, float], list[str]]:
    """``knn<k>_top1_bf16_minus_fp32`` (points) for each k, and a warning for each k whose |difference| exceeds
    ``tolerance``."""
    metrics, warnings = {}, []
    for k in sorted(bf16):
        diff = bf16[k]["top1"] - fp32[k]["top1"]
        metrics[f"knn{k}_top1_bf16_minus_fp32"] = diff
        if abs(diff) > tolerance:
            warnings.append(f"bf16 k-NN parity: knn{k}_top1 differs by {diff:+.2f} points from fp32 "
                            f"({bf16[k]['top1']:.2f} vs {fp32[k]['top1']:.2f}), beyond the tolerance of "
                            f"{tolerance} points: the bf16 scores are not comparable with fp32 ones")
    return metrics, warnings


@task(name="knn-bf16-parity", cache_policy=NO_CACHE)
def knn_bf16_parity(model_uri: str, features_uri: str, label_map: list[int], num_classes: int,
                    settings: EvaluationSettings) -> dict[str, float]:
    """The parity check of a bf16 extraction: the weighted k-NN on the same subset (the first
    ``bf16_parity_train_samples`` training and ``bf16_parity_val_samples`` val samples, manifest order) with the
    stored bf16 features and with fp32 features computed here, in memory; returns
    ``knn<k>_top1_bf16_minus_fp32`` (points) and logs a warning when one exceeds ``bf16_parity_tolerance``."""
    import numpy as np

    from dino_model.eval.features import compute_features, read_features
    from dino_model.eval.knn import knn_classify
    from dino_model.eval.shard_source import EvalShardSet
    from dino_model.eval.transforms import EvalTransform

    logger = run_logger()
    device = resolve_device(settings.device)
    backbone = load_model(model_uri, device)
    transform = EvalTransform(settings.resize_size, settings.crop_size)
    subsets = {}
    for split, data, limit, lmap in (("train", settings.train_data, settings.bf16_parity_train_samples, None),
                                     ("val", settings.val_data, settings.bf16_parity_val_samples, label_map)):
        shards = EvalShardSet(data)
        n = min(limit or shards.num_samples, shards.num_samples)
        keys, labels, fp32 = compute_features(
            backbone, shards.batches(settings.batch_size, np.asarray(lmap) if lmap is not None else None,
                                     sample_range=(0, n)),
            transform=transform, precision="fp32", device=device)
        stored_keys, stored_labels, stored, meta = read_features(features_uri, split)
        if meta.get("precision") != "bf16":
            raise ValueError(f"{features_uri}/{split} holds {meta.get('precision')} features, not bf16")
        row = {k: i for i, k in enumerate(stored_keys)}
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{features_uri}/{split} lacks {len(missing)} sample(s) of {data}, e.g. {missing[0]!r}: "
                             "re-extract the features")
        idx = np.array([row[k] for k in keys])
        if not np.array_equal(stored_labels[idx], labels):
            raise ValueError(f"{features_uri}/{split}: stored labels differ from the shard set's")
        subsets[split] = (labels, fp32, stored[idx])
    (train_labels, train_fp32, train_bf16), (val_labels, val_fp32, val_bf16) = subsets["train"], subsets["val"]
    # a class of the val subset that the training subset happens to lack cannot be voted for in either precision
    keep = np.isin(val_labels, train_labels)
    val_labels, val_fp32, val_bf16 = val_labels[keep], val_fp32[keep], val_bf16[keep]
    common = dict(ks=settings.knn_ks, T=settings.knn_temperature, num_classes=num_classes, device=device)
    bf16 = knn_classify(train_bf16, train_labels, val_bf16, val_labels, **common)
    fp32 = knn_classify(train_fp32, train_labels, val_fp32, val_labels, **common)
    metrics, warnings = bf16_parity_metrics(bf16, fp32, settings.bf16_parity_tolerance)
    logger.info("bf16 k-NN parity on %d train x %d val samples: %s", len(train_labels), len(val_labels),
                ", ".join(f"{k}={v:+.2f}" for k, v in metrics.items()))
    for w in warnings:
        logger.warning(w)
    return metrics


@task(name="linear-probe-fast", cache_policy=NO_CACHE)
def linear_probe_fast(features_uri: str, epochs: int = 100, batch_size: int = 256, base_lr: float = 0.001,
                      num_classes: int | None = None, device: str = "auto",
                      expected: dict[str, int] | None = None) -> dict[str, float]:
    """The APPROXIMATE linear probe on cached centre-crop features (no augmentation): ``linear_approx_*``."""
    from dino_model.eval.linear_probe import linear_probe_on_features

    d = _read_pair(features_uri, expected)
    res = linear_probe_on_features(d["train"][1], d["train"][0], d["val"][1], d["val"][0], epochs=epochs,
                                   batch_size=batch_size, base_lr=base_lr, num_classes=num_classes,
                                   device=resolve_device(device))
    assert res.approximate
    metrics = {"linear_approx_best_top1": res.best_top1, "linear_approx_final_top1": res.final_top1}
    if reports_top5(num_classes, d["train"][0]):
        metrics["linear_approx_final_top5"] = res.final_top5
    run_logger().info("linear probe on cached features (approximate): %s", metrics)
    return metrics


@task(name="linear-probe", cache_policy=NO_CACHE)
def linear_probe_full(model_uri: str, train_data: str, val_data: str, label_map: list[int], num_classes: int,
                      settings: EvaluationSettings) -> dict[str, float]:
    """The paper's linear probe: random-resized crop + flip through the frozen backbone every epoch (shard order
    permuted per epoch), validated each epoch: ``linear_best_top1``, ``linear_final_top1``, ``linear_final_top5``."""
    import numpy as np

    from dino_model.eval.linear_probe import LinearProbeConfig, linear_probe
    from dino_model.eval.shard_source import EvalShardSet
    from dino_model.eval.transforms import EvalTransform

    logger = run_logger()
    device = resolve_device(settings.device)
    train, val = EvalShardSet(train_data), EvalShardSet(val_data)
    vmap = np.asarray(label_map)
    backbone = load_model(model_uri, device)

    def train_batches(epoch: int):
        order = np.random.default_rng([0, epoch]).permutation(train.num_shards)
        return ((images, labels) for _, images, labels in train.batches(settings.linear_batch_size, shard_order=order))

    def val_batches(epoch: int):
        return ((images, labels) for _, images, labels in val.batches(settings.batch_size, label_map=vmap))

    cfg = LinearProbeConfig(
        epochs=settings.linear_epochs, base_lr=settings.linear_base_lr, batch_size=settings.linear_batch_size,
        n_last_blocks=settings.linear_n_last_blocks, avgpool=settings.linear_avgpool, crop_size=settings.crop_size,
        val_transform=EvalTransform(settings.resize_size, settings.crop_size), num_classes=num_classes,
        precision=settings.precision,
    )
    res = linear_probe(backbone, train_batches, val_batches, cfg, device=device,
                       on_epoch_end=lambda row: logger.info("linear probe epoch %d: %s", row["epoch"], row))
    metrics = {"linear_best_top1": res.best_top1, "linear_final_top1": res.final_top1}
    if reports_top5(num_classes):
        metrics["linear_final_top5"] = res.final_top5
    return metrics


@task(name="attention-maps", cache_policy=NO_CACHE)
def attention_scores(model_uri: str, settings: EvaluationSettings, run_id: str | None = None) -> dict[str, float]:
    """Jaccard of the last block's attention masks (60 % mass per head) against DAVIS foreground masks, in percent:
    ``attn_jaccard_best_head/mean_heads/union_heads``. Side effect: each sequence's first scored frame, every head
    drawn with its index and Jaccard, is logged to the evaluation run as ``attention/<sequence>.png``."""
    from dino_model.eval.attention_maps import davis_attention_scores
    from dino_model.eval.report import attention_png

    device = resolve_device(settings.device)
    backbone = load_model(model_uri, device)
    res = davis_attention_scores(backbone, settings.davis_root, settings.davis_sequences,
                                 frame_step=settings.attention_frame_step, max_frames=settings.attention_max_frames,
                                 size=settings.attention_size, threshold=settings.attention_threshold,
                                 render=run_id is not None, device=device, renderer=attention_png)
    if run_id is not None and res.overlays:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        with tempfile.TemporaryDirectory() as tmp:
            for seq, png in res.overlays.items():
                Path(tmp, f"{seq}.png").write_bytes(png)
            client.log_artifacts(run_id, tmp, artifact_path="attention")
    metrics = as_percent(res.as_dict())
    run_logger().info("attention maps on %d frames: %s", len(res.frames),
                      ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
    return metrics


@task(name="davis-label-propagation", cache_policy=NO_CACHE)
def davis_scores(model_uri: str, settings: EvaluationSettings) -> dict[str, float]:
    """DAVIS-2017 semi-supervised label propagation and the official J&F: ``davis_*`` metrics, in percent. Side effect: the
    predicted indexed PNGs under ``settings.davis_predictions_uri`` when set."""
    from dino_model.eval.davis_propagation import PropagationConfig, evaluate_davis

    device = resolve_device(settings.device)
    backbone = load_model(model_uri, device)
    cfg = PropagationConfig(short_side=settings.davis_short_side, multiple=settings.davis_multiple)
    res = evaluate_davis(backbone, settings.davis_root, settings.davis_sequences, settings.davis_predictions_uri,
                         cfg, max_frames=settings.davis_max_frames, device=device, progress=False)
    metrics = as_percent(res.scores.as_dict())
    run_logger().info("DAVIS J&F %.2f %% (J %.2f, F %.2f) on %s", metrics["davis_jf_mean"], metrics["davis_j_mean"],
                      metrics["davis_f_mean"], res.sequences)
    return metrics
