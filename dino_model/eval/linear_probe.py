"""Linear probe on a frozen backbone — the DINO paper's protocol (reference ``eval_linear.py``).

* Features: the [CLS] tokens of the last ``n_last_blocks`` blocks, each through the final LayerNorm, concatenated
  (paper: n = 4 for ViT-S), optionally followed by the average of the last block's patch tokens (paper: n = 1 +
  avgpool for ViT-B; here avgpool works for any n) — :func:`dino_model.eval.features.backbone_features`.
* Classifier: ``nn.Linear`` initialised N(0, 0.01) with a zero bias.
* Optimisation: SGD, momentum 0.9, no weight decay, lr = ``base_lr`` (0.001) x batch / 256, cosine-annealed to 0
  over ``epochs`` (100) and updated once per epoch like the reference's ``CosineAnnealingLR``; cross-entropy.
* Each epoch the training images go through RandomResizedCrop(224) + horizontal flip and the frozen backbone
  (so the features change every epoch); validation after every epoch on resize 256 + centre crop 224; the result
  reports the best and the final top-1 (and top-5).

Image sources are pluggable: ``train_batches`` / ``val_batches`` are either re-iterable collections of
``(images, labels)`` (a list, a DataLoader) or callables ``epoch -> iterable``; images follow the
:mod:`dino_model.eval.transforms` convention (uint8, or float in [0, 1], un-normalised; ``[B, 3, H, W]`` or a list
of ``[3, H, W]`` of any sizes). Augmentation parameters come from a generator seeded with (seed, epoch), so a run
is reproducible.

:func:`linear_probe_on_features` is the fast variant on cached feature arrays (e.g. from Parquet): same
classifier and optimiser, no augmentation — an APPROXIMATION of the protocol (its results are labelled
``approximate=True``), useful for quick comparisons, not for numbers to put beside the paper's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import backbone_features, module_device, precision_context
from .transforms import EvalTransform, ImageBatch, TrainProbeTransform

BatchSource = Iterable[tuple[ImageBatch, Any]] | Callable[[int], Iterable[tuple[ImageBatch, Any]]]


class LinearClassifier(nn.Module):
    """A linear layer on flattened features, initialised N(0, 0.01) with zero bias (the reference's)."""

    def __init__(self, dim: int, num_labels: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.view(x.size(0), -1))


def cosine_lr_schedule(base_lr: float, epochs: int) -> np.ndarray:
    """Per-epoch learning rates: ``base_lr * (1 + cos(pi * e / epochs)) / 2`` for e = 0..epochs-1 (the closed form
    of ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch)."""
    e = np.arange(epochs)
    return base_lr * 0.5 * (1.0 + np.cos(np.pi * e / epochs))


@dataclass
class LinearProbeConfig:
    """Hyper-parameters of the linear probe (defaults: the paper's / reference's)."""

    #: Number of training epochs (the cosine schedule reaches 0 at the end).
    epochs: int = 100
    #: Base learning rate before the linear scaling rule lr = base_lr * batch_size / 256.
    base_lr: float = 0.001
    #: Global batch size used in the scaling rule; None = the size of the first training batch.
    batch_size: int | None = None
    #: SGD momentum.
    momentum: float = 0.9
    #: SGD weight decay (the reference uses none).
    weight_decay: float = 0.0
    #: Concatenate the [CLS] tokens of this many last blocks (4 for ViT-S, 1 for ViT-B in the paper).
    n_last_blocks: int = 4
    #: Append the average of the last block's patch tokens (True for ViT-B in the paper).
    avgpool: bool = False
    #: Side of the random-resized training crop.
    crop_size: int = 224
    #: Evaluation view for validation images; None = images are used as given (only normalised).
    val_transform: EvalTransform | None = field(default_factory=EvalTransform)
    #: Number of classes; None = the largest label of the training set (first epoch's pass) + 1.
    num_classes: int | None = None
    #: Seed of the classifier initialisation and of the augmentation (combined with the epoch number).
    seed: int = 0
    #: "fp32" (reference) or "bf16" autocast for the frozen backbone's forward.
    precision: str = "fp32"

    def __post_init__(self):
        for name in ("epochs", "n_last_blocks", "crop_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.base_lr > 0:
            raise ValueError(f"base_lr must be positive, got {self.base_lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")


@dataclass
class LinearProbeResult:
    """Accuracies in percent. ``history`` has one dict per epoch: epoch, lr, train_loss, val_top1, val_top5."""

    best_top1: float
    best_epoch: int
    final_top1: float
    final_top5: float
    history: list[dict[str, float]]
    #: The trained classifier's state_dict (of the final epoch).
    classifier_state: dict[str, torch.Tensor]
    feature_dim: int
    num_classes: int
    #: True for :func:`linear_probe_on_features` (no augmentation: an approximation of the protocol).
    approximate: bool = False


def _epoch_batches(source: BatchSource, epoch: int):
    return source(epoch) if callable(source) else source


def _check_reiterable(source: BatchSource, name: str) -> None:
    if not callable(source) and iter(source) is source:
        raise ValueError(
            f"{name} is a one-shot iterator; pass a re-iterable (list, DataLoader) or a callable epoch -> batches"
        )


def _labels(labels: Any, device) -> torch.Tensor:
    t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    return t.long().reshape(-1).to(device)


def _accuracy(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    correct = top == target[:, None]
    return int(correct[:, 0].sum()), int(correct.any(1).sum())


def _train_classifier(
    classifier: LinearClassifier,
    epochs: int,
    lr_schedule: np.ndarray,
    momentum: float,
    weight_decay: float,
    train_epoch: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    val_epoch: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    on_epoch_end: Callable[[dict[str, float]], None] | None,
) -> tuple[list[dict[str, float]], float, int]:
    opt = torch.optim.SGD(classifier.parameters(), lr=float(lr_schedule[0]), momentum=momentum,
                          weight_decay=weight_decay)
    history: list[dict[str, float]] = []
    best, best_epoch = -1.0, -1
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = float(lr_schedule[epoch])
        classifier.train()
        loss_sum, n_seen = 0.0, 0
        for feats, target in train_epoch(epoch):
            loss = F.cross_entropy(classifier(feats), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * target.shape[0]
            n_seen += target.shape[0]
        if n_seen == 0:
            raise ValueError(f"the training set yielded no batch in epoch {epoch}")
        classifier.eval()
        h1 = h5 = n_val = 0
        with torch.no_grad():
            for feats, target in val_epoch(epoch):
                a1, a5 = _accuracy(classifier(feats), target)
                h1, h5, n_val = h1 + a1, h5 + a5, n_val + target.shape[0]
        if n_val == 0:
            raise ValueError("the validation set is empty")
        row = {
            "epoch": epoch,
            "lr": float(lr_schedule[epoch]),
            "train_loss": loss_sum / n_seen,
            "val_top1": 100.0 * h1 / n_val,
            "val_top5": 100.0 * h5 / n_val,
        }
        history.append(row)
        if row["val_top1"] > best:
            best, best_epoch = row["val_top1"], epoch
        if on_epoch_end is not None:
            on_epoch_end(row)
    return history, best, best_epoch


def linear_probe(
    backbone: nn.Module,
    train_batches: BatchSource,
    val_batches: BatchSource,
    config: LinearProbeConfig | None = None,
    device: str | torch.device | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> LinearProbeResult:
    """Train and validate a linear classifier on the frozen ``backbone`` (see the module docstring).

    ``num_classes`` (config) defaults to the largest label of the first training epoch + 1 — pass it explicitly
    when a class may be absent from the training data. ``on_epoch_end(row)`` receives each epoch's history row
    (for logging). Raises :class:`ValueError` on empty sets, one-shot iterators, or labels out of range.
    """
    cfg = config or LinearProbeConfig()
    _check_reiterable(train_batches, "train_batches")
    _check_reiterable(val_batches, "val_batches")
    device = torch.device(device) if device is not None else module_device(backbone)
    backbone.eval()
    train_tf = TrainProbeTransform(size=cfg.crop_size)
    autocast = precision_context(device, cfg.precision)

    @torch.no_grad()
    def feats_of(x: torch.Tensor) -> torch.Tensor:
        with autocast:
            return backbone_features(backbone, x.to(device), cfg.n_last_blocks, cfg.avgpool).float()

    # one pass over the first training batch fixes the feature dimension, and the lr-scaling batch size
    first = next(iter(_epoch_batches(train_batches, 0)), None)
    if first is None:
        raise ValueError("train_batches is empty")
    gen0 = torch.Generator().manual_seed(cfg.seed)
    dim = feats_of(train_tf(first[0], gen0)[:1]).shape[1]
    batch_size = cfg.batch_size or _labels(first[1], "cpu").shape[0]
    num_classes = cfg.num_classes
    if num_classes is None:
        max_label = max(int(_labels(lab, "cpu").max()) for _, lab in _epoch_batches(train_batches, 0))
        num_classes = max(max_label + 1, 2)

    def checked(labels) -> torch.Tensor:
        t = _labels(labels, device)
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"label out of range [0, {num_classes}): {int(t.min())}..{int(t.max())}")
        return t

    def train_epoch(epoch: int):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        for images, labels in _epoch_batches(train_batches, epoch):
            yield feats_of(train_tf(images, gen)), checked(labels)

    def val_epoch(epoch: int):
        from .features import prepare_batch

        for images, labels in _epoch_batches(val_batches, epoch):
            yield feats_of(prepare_batch(images, cfg.val_transform)), checked(labels)

    torch.manual_seed(cfg.seed)
    return _fit(dim, num_classes, device, cfg.base_lr, batch_size, cfg.epochs, cfg.momentum, cfg.weight_decay,
                train_epoch, val_epoch, on_epoch_end, approximate=False)


def linear_probe_on_features(
    train_feats,
    train_labels,
    val_feats,
    val_labels,
    epochs: int = 100,
    batch_size: int = 256,
    base_lr: float = 0.001,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    num_classes: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> LinearProbeResult:
    """APPROXIMATE linear probe on cached features (e.g. centre-crop features read from Parquet): the paper's
    classifier, optimiser and schedule, but no augmentation (the same feature every epoch), so accuracies differ
    from the real protocol. Samples are reshuffled every epoch from (seed, epoch). Result has ``approximate=True``.

    The features are used where they are (float32 or float16, e.g. a half-precision feature store read with
    ``dtype=None``; on ``device`` if they are not there yet), each batch converted to float32 as it is taken: the
    memory is the features' own plus one batch, e.g. 7.9 GB for ImageNet's 1.28 M x 1,536 float32 features.
    """
    from .knn import validate_features

    tr_f, tr_l, va_f, va_l = validate_features(train_feats, train_labels, val_feats, val_labels)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if num_classes is None:
        num_classes = max(int(max(tr_l.max(), va_l.max())) + 1, 2)
    elif num_classes <= int(max(tr_l.max(), va_l.max())):
        raise ValueError(f"num_classes={num_classes} but a label is {int(max(tr_l.max(), va_l.max()))}")
    # the features stay as given (no float32 copy of a float16 store, no copy at all on the CPU): each batch is
    # converted to float32 as it is taken
    tr_f, tr_l = tr_f.to(device), tr_l.to(device)
    va_f, va_l = va_f.to(device), va_l.to(device)

    def train_epoch(epoch: int):
        order = torch.randperm(tr_f.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        order = order.to(device)
        for s in range(0, tr_f.shape[0], batch_size):
            idx = order[s : s + batch_size]
            yield tr_f[idx].float(), tr_l[idx]

    def val_epoch(epoch: int):
        for s in range(0, va_f.shape[0], 4096):
            yield va_f[s : s + 4096].float(), va_l[s : s + 4096]

    torch.manual_seed(seed)
    return _fit(tr_f.shape[1], num_classes, device, base_lr, batch_size, epochs, momentum, weight_decay,
                train_epoch, val_epoch, on_epoch_end, approximate=True)


def _fit(dim, num_classes, device, base_lr, batch_size, epochs, momentum, weight_decay, train_epoch, val_epoch,
         on_epoch_end, approximate: bool) -> "LinearProbeResult":
    """Train a fresh linear classifier with the paper's schedule (lr = base_lr x batch / 256, cosine to 0) and
    collect the result; shared by the full probe and the approximate one on cached features."""
    classifier = LinearClassifier(dim, num_classes).to(device)
    lrs = cosine_lr_schedule(base_lr * batch_size / 256.0, epochs)
    history, best, best_epoch = _train_classifier(
        classifier, epochs, lrs, momentum, weight_decay, train_epoch, val_epoch, on_epoch_end
    )
    return LinearProbeResult(
        best_top1=best,
        best_epoch=best_epoch,
        final_top1=history[-1]["val_top1"],
        final_top5=history[-1]["val_top5"],
        history=history,
        classifier_state={k: v.detach().cpu() for k, v in classifier.state_dict().items()},
        feature_dim=dim,
        num_classes=num_classes,
        approximate=approximate,
    )
