"""Linear probe: the reference's init, schedule and optimiser; learning a separable toy problem on cached
features and through a real (tiny) frozen ViT with augmentation; reproducibility; bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dino_model.eval.linear_probe import (
    LinearClassifier,
    LinearProbeConfig,
    cosine_lr_schedule,
    linear_probe,
    linear_probe_on_features,
)
from dino_model.eval.transforms import EvalTransform, TrainProbeTransform
from dino_model.models import build_backbone


def test_classifier_init():
    torch.manual_seed(0)
    clf = LinearClassifier(512, 100)
    assert clf.linear.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert abs(clf.linear.weight.mean().item()) < 1e-3
    assert torch.count_nonzero(clf.linear.bias) == 0


def test_cosine_schedule_matches_cosine_annealing():
    lrs = cosine_lr_schedule(0.1, 4)
    assert lrs.tolist() == pytest.approx([0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05,
                                          0.1 * (1 + math.cos(3 * math.pi / 4)) / 2])
    # same as torch's CosineAnnealingLR stepped once per epoch, eta_min 0
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 4, eta_min=0)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs.tolist() == pytest.approx(seen)


def _clusters(n_per_class, seed, dim=16, classes=3):
    g = np.random.default_rng(seed)
    centres = np.eye(classes, dim) * 3.0
    x = np.concatenate([centres[c] + 0.3 * g.normal(size=(n_per_class, dim)) for c in range(classes)])
    y = np.repeat(np.arange(classes), n_per_class)
    return x.astype(np.float32), y


def test_fast_variant_learns_separable_problem():
    xtr, ytr = _clusters(40, 0)
    xva, yva = _clusters(20, 1)
    rows = []
    res = linear_probe_on_features(xtr, ytr, xva, yva, epochs=10, batch_size=16, base_lr=4.0, seed=0,
                                   on_epoch_end=rows.append)
    assert res.approximate is True
    assert res.num_classes == 3 and res.feature_dim == 16
    assert res.final_top1 == 100.0 and res.best_top1 == 100.0 and res.final_top5 == 100.0
    assert [r["epoch"] for r in rows] == list(range(10)) and rows == res.history
    # lr scaling rule and cosine: base_lr * batch / 256, decaying per epoch
    assert res.history[0]["lr"] == pytest.approx(4.0 * 16 / 256)
    assert res.history[-1]["lr"] < res.history[0]["lr"]
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    again = linear_probe_on_features(xtr, ytr, xva, yva, epochs=10, batch_size=16, base_lr=4.0, seed=0)
    assert again.history == res.history  # deterministic
    # with the paper's tiny lr on this scale nothing much is learned in one epoch: the probe is not a constant
    slow = linear_probe_on_features(xtr, ytr, xva, yva, epochs=1, batch_size=16, seed=0)
    assert slow.history[0]["train_loss"] > res.history[-1]["train_loss"]


def test_fast_variant_bad_input():
    xtr, ytr = _clusters(5, 0)
    with pytest.raises(ValueError, match="no training sample: 7"):
        linear_probe_on_features(xtr, ytr, xtr[:2], [0, 7])
    with pytest.raises(ValueError, match="train_feats has 15 rows but train_labels has 3"):
        linear_probe_on_features(xtr, ytr[:3], xtr, ytr)
    with pytest.raises(ValueError, match="test_feats is empty"):
        linear_probe_on_features(xtr, ytr, xtr[:0], ytr[:0])


def test_train_transform_is_reproducible():
    img = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    tf = TrainProbeTransform(size=32)
    a = tf([img, img], torch.Generator().manual_seed(3))
    b = tf([img, img], torch.Generator().manual_seed(3))
    c = tf([img, img], torch.Generator().manual_seed(4))
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # each image draws its own crop


def _colour_images(n, seed):
    """Class 0: reddish images, class 1: bluish images, with noise; different sizes to exercise lists."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(n // 4):
        imgs, labels = [], []
        for i in range(4):
            cls = (b * 4 + i) % 2
            size = 40 + 4 * i
            base = torch.tensor([200.0, 60.0, 60.0]) if cls == 0 else torch.tensor([60.0, 60.0, 200.0])
            im = base.view(3, 1, 1) + 30 * torch.randn(3, size, size, generator=g)
            imgs.append(im.clamp(0, 255).to(torch.uint8))
            labels.append(cls)
        batches.append((imgs, labels))
    return batches


def test_linear_probe_through_frozen_vit_learns():
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=16)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    train = _colour_images(16, 0)
    val = _colour_images(8, 1)
    seen_epochs = []

    def train_source(epoch):
        seen_epochs.append(epoch)
        return train

    cfg = LinearProbeConfig(epochs=2, base_lr=8.0, n_last_blocks=2, avgpool=True, crop_size=32,
                            val_transform=EvalTransform(resize_size=36, crop_size=32), num_classes=2)
    res = linear_probe(backbone, train_source, val, cfg)
    assert res.feature_dim == 3 * 192 and res.num_classes == 2 and res.approximate is False
    assert len(res.history) == 2 and res.best_epoch in (0, 1)
    assert res.final_top1 == 100.0  # red vs blue is linearly separable in the random ViT's features
    assert res.best_top1 >= res.final_top1
    assert res.history[1]["train_loss"] < res.history[0]["train_loss"]
    assert res.history[0]["lr"] == pytest.approx(8.0 * 4 / 256)
    assert 0 in seen_epochs and 1 in seen_epochs
    # the backbone is frozen
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert res.classifier_state["linear.weight"].shape == (2, 3 * 192)


def test_linear_probe_bad_input():
    backbone = build_backbone("vit_tiny", patch_size=16)
    cfg = LinearProbeConfig(epochs=1, crop_size=32, n_last_blocks=1, val_transform=None)
    val = _colour_images(4, 1)
    with pytest.raises(ValueError, match="one-shot iterator"):
        linear_probe(backbone, iter(val), val, cfg)
    with pytest.raises(ValueError, match="train_batches is empty"):
        linear_probe(backbone, [], val, cfg)
    bad = [(val[0][0], [0, 1, 5, 1])]
    with pytest.raises(ValueError, match="label out of range"):
        linear_probe(backbone, bad, val, LinearProbeConfig(epochs=1, crop_size=32, num_classes=2,
                                                           val_transform=None))
    with pytest.raises(ValueError, match="n_last_blocks must be >= 1"):
        LinearProbeConfig(n_last_blocks=0)
    with pytest.raises(ValueError, match="precision"):
        LinearProbeConfig(precision="fp16")
