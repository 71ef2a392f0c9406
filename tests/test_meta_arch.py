"""DINO meta-architecture: teacher init/freezing, forward_backward (gradients, centre, scaler, autocast,
non-finite loss), EMA update, determinism, and the DDP-wrapped student (1-process gloo group)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from timm.layers import DropPath
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dino_model.config import load_config
from dino_model.losses import DINOLoss
from dino_model.meta_arch import DINO
from dino_model.models import DINOHead, DinoVisionTransformer, MultiCropWrapper
from tests.reference_loss import PairwiseDINOLoss


def wrapped(backbone: nn.Module, use_bn_in_head: bool = False, norm_last_layer: bool = True,
            out_dim: int = 64) -> MultiCropWrapper:
    return MultiCropWrapper(backbone, DINOHead(48, out_dim, use_bn=use_bn_in_head, norm_last_layer=norm_last_layer,
                                               hidden_dim=32, bottleneck_dim=16))


def build(seed: int = 0, drop_path_rate: float = 0.1, use_bn_in_head: bool = False,
          norm_last_layer: bool = True) -> DINO:
    """A 2-block ViT (the training math does not depend on depth) through the plain constructor: fast tests."""
    torch.manual_seed(seed)
    student = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                    drop_path_rate=drop_path_rate)
    teacher = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    return DINO(wrapped(student, use_bn_in_head, norm_last_layer), wrapped(teacher, use_bn_in_head, norm_last_layer),
                DINOLoss(64, 4))


def make_crops(seed: int = 1, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + \
           [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(2)]


def test_from_config_vit_tiny_teacher_starts_as_frozen_copy_without_drop_path():
    torch.manual_seed(0)
    model = DINO.from_config(load_config(overrides=[
        "model.arch=vit_tiny", "model.patch_size=8", "model.drop_path_rate=0.1", "model.img_size=32",
        "model.out_dim=64", "crops.n_local=2", "model.head_hidden_dim=32", "model.head_bottleneck_dim=16"]))
    s, t = model.student.state_dict(), model.teacher.state_dict()
    assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert any(isinstance(m, DropPath) for m in model.student.modules())
    assert not any(isinstance(m, DropPath) for m in model.teacher.modules())
    assert model.teacher_backbone() is model.teacher.backbone
    assert model.dino_loss.ncrops == 4 and model.dino_loss.center.shape == (1, 64)
    head = model.student.head
    assert (head.mlp[0].out_features, head.mlp[-1].out_features, head.last_layer.out_features) == (32, 16, 64)


def test_plain_constructor_options():
    assert build(norm_last_layer=False).student.head.last_layer.weight_g.requires_grad
    small = wrapped(DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3), out_dim=32)
    with pytest.raises(ValueError, match="out_dim=64"):  # heads of K = 32, a loss of K = 64
        DINO(small, copy.deepcopy(small), DINOLoss(64, 4)).forward_backward(make_crops(), teacher_temp=0.04)
    other = wrapped(DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3))
    with pytest.raises(ValueError, match="same parameters"):
        DINO(small, other, DINOLoss(64, 4))


def test_forward_backward_gradients_loss_and_centre():
    model = build(drop_path_rate=0.0)
    crops = make_crops()
    with torch.no_grad():
        teacher_out = model.teacher(crops[:2])
        student_out = model.student(crops)
    expected_loss = PairwiseDINOLoss(64, 4)(student_out, teacher_out, 0.04)
    stats = model.forward_backward(crops, teacher_temp=0.04)
    assert stats["loss"].item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert not stats["loss"].requires_grad
    assert torch.allclose(model.dino_loss.center, 0.1 * teacher_out.mean(0, keepdim=True), atol=1e-6)
    assert stats["kl_teacher_student"].item() == pytest.approx(
        stats["loss"].item() - stats["teacher_entropy"].item(), abs=1e-5)
    assert stats["teacher_temp"].item() == pytest.approx(0.04)
    assert {"teacher_entropy", "teacher_kl_to_uniform", "teacher_kl_to_center"} <= stats.keys()
    # gradients: every trainable student parameter, no teacher parameter
    assert all(p.grad is not None for p in model.student.parameters() if p.requires_grad)
    assert model.student.head.last_layer.weight_g.grad is None  # frozen gain
    assert all(p.grad is None for p in model.teacher.parameters())


def test_wrong_number_of_crops():
    model = build()
    with pytest.raises(ValueError, match="crops"):
        model.forward_backward(make_crops()[:3], teacher_temp=0.04)


def test_update_teacher_ema_math():
    model = build()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    s = copy.deepcopy(model.student.state_dict())
    t = copy.deepcopy(model.teacher.state_dict())
    model.update_teacher(0.9)
    new_t = model.teacher.state_dict()
    for name, _ in model.teacher.named_parameters():
        assert torch.allclose(new_t[name], 0.9 * t[name] + 0.1 * s[name], atol=1e-6), name
    model.update_teacher(1.0)
    assert all(torch.equal(new_t[k], model.teacher.state_dict()[k]) for k in new_t)


def test_forward_backward_is_deterministic_on_cpu():
    results = []
    for _ in range(2):
        model = build(drop_path_rate=0.1)
        torch.manual_seed(123)
        stats = model.forward_backward(make_crops(), teacher_temp=0.05)
        grads = [p.grad.clone() for p in model.student.parameters() if p.grad is not None]
        results.append((stats["loss"], grads, model.dino_loss.center.clone()))
    (l1, g1, c1), (l2, g2, c2) = results
    assert torch.equal(l1, l2) and torch.equal(c1, c2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_grad_scaler_scales_the_backward():
    plain, scaled = build(drop_path_rate=0.0), build(drop_path_rate=0.0)
    plain.forward_backward(make_crops(), teacher_temp=0.04)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaled.forward_backward(make_crops(), teacher_temp=0.04, grad_scaler=scaler)
    a = plain.student.head.mlp[0].weight.grad
    b = scaled.student.head.mlp[0].weight.grad
    assert torch.allclose(b, 8.0 * a, rtol=1e-4, atol=1e-7)


def test_bf16_autocast_runs_and_stays_close():
    fp32 = build(drop_path_rate=0.0).forward_backward(make_crops(), teacher_temp=0.04)["loss"].item()
    bf16 = build(drop_path_rate=0.0).forward_backward(make_crops(), teacher_temp=0.04, autocast_dtype=torch.bfloat16)["loss"].item()
    assert bf16 == pytest.approx(fp32, rel=5e-2)


def test_non_finite_loss_is_returned_not_raised():
    """The step never syncs with the host to look at the loss: the training loop watches it on the device and
    stops before the next checkpoint (tests/test_train.py)."""
    model = build()
    with torch.no_grad():
        model.student.head.mlp[0].weight.fill_(float("nan"))
    stats = model.forward_backward(make_crops(), teacher_temp=0.04)
    assert not torch.isfinite(stats["loss"])


def test_sync_batchnorm_conversion_for_bn_heads():
    model = build(use_bn_in_head=True)
    model.convert_sync_batchnorm()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.student.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.teacher.modules())


def test_ddp_wrapped_student_matches_plain(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        plain, wrapped = build(drop_path_rate=0.1), build(drop_path_rate=0.1)
        wrapped.student = DDP(wrapped.student)
        for model in (plain, wrapped):
            torch.manual_seed(7)
            model.forward_backward(make_crops(), teacher_temp=0.04)
            model.update_teacher(0.5)
        assert wrapped.student_module() is wrapped.student.module
        g_plain = [p.grad for p in plain.student.parameters() if p.grad is not None]
        g_wrapped = [p.grad for p in wrapped.student_module().parameters() if p.grad is not None]
        assert len(g_plain) == len(g_wrapped)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_plain, g_wrapped))
        t_plain, t_wrapped = plain.teacher.state_dict(), wrapped.teacher.state_dict()
        assert all(torch.allclose(t_plain[k], t_wrapped[k], atol=1e-6) for k in t_plain)
        assert torch.allclose(plain.dino_loss.center, wrapped.dino_loss.center)
    finally:
        dist.destroy_process_group()
