"""Parameter groups, optimisers (LARS by hand), per-parameter vs global clipping, last-layer freezing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from dino_model.models import DINOHead, MultiCropWrapper, build_backbone
from dino_model.optim import (
    LARS,
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_global,
    clip_gradients_per_param,
    param_groups,
)


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return MultiCropWrapper(build_backbone("vit_tiny", patch_size=8, img_size=32),
                            DINOHead(192, out_dim=64, hidden_dim=32, bottleneck_dim=16))


def test_param_groups_regularize_pos_embed_and_cls_token(student):
    regularized, not_regularized = param_groups(student)
    names = {id(p): n for n, p in student.named_parameters()}
    reg = {names[id(p)] for p in regularized["params"]}
    noreg = {names[id(p)] for p in not_regularized["params"]}
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.patch_embed.proj.weight",
            "backbone.blocks.0.attn.qkv.weight", "head.mlp.0.weight", "head.last_layer.weight_v"} <= reg
    assert {"backbone.patch_embed.proj.bias", "backbone.blocks.0.norm1.weight", "backbone.blocks.0.norm1.bias",
            "backbone.norm.weight", "head.mlp.0.bias"} <= noreg
    assert all(names[id(p)].endswith(".bias") or p.ndim == 1 for p in not_regularized["params"])
    assert all(p.ndim > 1 for p in regularized["params"])
    # the frozen gain is in neither group; everything trainable is in exactly one
    assert "head.last_layer.weight_g" not in reg | noreg
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert reg | noreg == trainable and not reg & noreg
    assert not_regularized["weight_decay"] == 0.0
    assert regularized["apply_weight_decay"] and not not_regularized["apply_weight_decay"]


def test_build_optimizer_names(student):
    groups = param_groups(student)
    assert isinstance(build_optimizer("adamw", groups), torch.optim.AdamW)
    assert isinstance(build_optimizer("sgd", groups), torch.optim.SGD)
    assert isinstance(build_optimizer("lars", groups), LARS)
    opt = build_optimizer("adamw", groups)
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["lr"] == 0.0
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("adam", groups)


def test_lars_step_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))   # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([0.5, 0.5])
    opt = LARS([{"params": [w, b]}], lr=0.1, weight_decay=0.5, momentum=0.9, eta=0.001)
    opt.step()
    dp = torch.tensor([[1.5, 3.0]])                  # grad + 0.5 * w
    dp = dp * (0.001 * 5.0 / math.sqrt(1.5 ** 2 + 9))  # layer-wise trust ratio
    assert torch.allclose(w, torch.tensor([[3.0, 4.0]]) - 0.1 * dp)
    assert torch.allclose(b, torch.tensor([0.95, -1.05]))  # 1-D: no decay, no adaptation
    w.grad = torch.zeros(1, 2)  # second step: momentum carries the first update
    b.grad = torch.zeros(2)
    before = b.detach().clone()
    opt.step()
    assert torch.allclose(b, before - 0.1 * 0.9 * torch.tensor([0.5, 0.5]))


def _two_param_model() -> nn.Module:
    model = nn.Module()
    model.a = nn.Parameter(torch.zeros(2))
    model.b = nn.Parameter(torch.zeros(1, 2))
    model.c = nn.Parameter(torch.zeros(3))  # no gradient
    model.a.grad = torch.tensor([3.0, 4.0])   # norm 5
    model.b.grad = torch.tensor([[0.6, 0.8]])  # norm 1
    return model


def test_clip_per_param_clips_each_gradient_separately():
    model = _two_param_model()
    norms = clip_gradients_per_param(model, 2.0)
    assert torch.allclose(norms, torch.tensor([5.0, 1.0]))
    assert torch.allclose(model.a.grad, torch.tensor([3.0, 4.0]) * 2.0 / (5.0 + 1e-6))
    assert torch.equal(model.b.grad, torch.tensor([[0.6, 0.8]]))  # below the threshold: unchanged
    assert model.c.grad is None


def test_clip_global_uses_one_coefficient():
    model = _two_param_model()
    total = clip_gradients_global(model, 2.0)
    assert total.item() == pytest.approx(math.sqrt(26.0))
    coef = 2.0 / (math.sqrt(26.0) + 1e-6)
    assert torch.allclose(model.a.grad, torch.tensor([3.0, 4.0]) * coef)
    assert torch.allclose(model.b.grad, torch.tensor([[0.6, 0.8]]) * coef)


def test_cancel_last_layer_gradients_sets_none(student):
    x = [torch.randn(2, 3, 32, 32)]
    student.zero_grad(set_to_none=True)
    student(x).sum().backward()
    assert student.head.last_layer.weight_v.grad is not None
    cancel_last_layer_gradients(student, epoch=1, freeze_last_layer=1)  # after the frozen epochs: kept
    assert student.head.last_layer.weight_v.grad is not None
    cancel_last_layer_gradients(student, epoch=0, freeze_last_layer=1)
    assert student.head.last_layer.weight_v.grad is None
    assert student.head.mlp[0].weight.grad is not None
    student.zero_grad(set_to_none=True)


def test_a_frozen_last_layer_is_left_untouched_by_the_optimiser_step(student):
    """Why the last layer's gradient is set to None, not zero: AdamW still applies its decoupled weight decay (and
    moves its moments) for a zero gradient. This project's groups (the last layer is regularised) and optimiser,
    a real backward pass, the freezing: the frozen layer stays exactly as it was, while the rest trains (and the
    layer itself does once its frozen epochs are over)."""
    model = copy.deepcopy(student)
    optimizer = build_optimizer("adamw", param_groups(model))
    for group in optimizer.param_groups:
        group["lr"] = 0.1
        if group["apply_weight_decay"]:
            group["weight_decay"] = 0.04
    last_layer, hidden = model.head.last_layer.weight_v, model.head.mlp[0].weight

    def step(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        before = last_layer.detach().clone(), hidden.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        model([torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(epoch))]).sum().backward()
        cancel_last_layer_gradients(model, epoch=epoch, freeze_last_layer=1)
        optimizer.step()
        return before

    last_before, hidden_before = step(epoch=0)
    assert torch.equal(last_layer, last_before)  # a zero gradient would have decayed it by lr x wd
    assert not torch.equal(hidden, hidden_before)
    assert optimizer.state.get(last_layer, {}) == {}  # no moments either: the step skipped it
    last_before, _ = step(epoch=1)
    assert not torch.equal(last_layer, last_before)
