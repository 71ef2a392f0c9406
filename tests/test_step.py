"""The training step (dino_model.step, DINO.forward_backward) against the reference formulation, compiled and
not, and the training-loop switches ``data.augment_on`` / ``train.compile`` — on the CPU with small shapes.

Tolerances: the loss is the reference's pairwise sum reordered (logsumexp - dot instead of one log_softmax per
pair), so values and gradients agree to fp32 rounding (~1e-6 relative; tests/test_dino_loss.py). Over several
optimiser steps such differences are amplified by AdamW's normalisation of tiny gradients, so multi-step tracking
is checked on the loss (1e-4 relative).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_model.checkpoint import latest_checkpoint, read_checkpoint
from dino_model.config import load_config
from dino_model.losses import DINOLoss
from dino_model.meta_arch import DINO
from dino_model.models import DINOHead, DinoVisionTransformer, MultiCropWrapper
from dino_model.optim import build_optimizer, param_groups
from dino_model.step import StepSettings, resolve_compile, train_step
from dino_model.train import train
from tests.reference_loss import PairwiseDINOLoss
from tests.test_train import tiny_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_resolve_compile():
    assert resolve_compile("auto", torch.device("cuda")) and not resolve_compile("auto", torch.device("cpu"))
    assert resolve_compile(True, torch.device("cpu")) and not resolve_compile(False, torch.device("cuda"))


def tiny_model_and_crops(fused: bool, seed: int = 0, reference_loss: bool = False):
    cfg = load_config(overrides=[
        "model.arch=vit_tiny", "model.patch_size=16", "model.out_dim=256", "model.head_hidden_dim=64",
        "model.head_bottleneck_dim=32", "model.drop_path_rate=0.0", "crops.global_size=32", "crops.local_size=16",
        "crops.n_local=2", "train.epochs=3", "optim.warmup_epochs=0",
    ])
    torch.manual_seed(seed)
    model = DINO.from_config(cfg)
    if reference_loss:
        model.dino_loss = PairwiseDINOLoss.replacing(model.dino_loss)
    opt = build_optimizer("adamw", param_groups(model.student_module()), fused=fused)
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    return cfg, model, opt, crops


def run_steps(model, opt, crops, n=4, start=0) -> list[float]:
    """Steps ``start`` .. ``start + n - 1`` of a short run (the last layer frozen in the first, the teacher
    temperature different in each)."""
    settings = StepSettings(clip_grad=3.0, clip_mode="per_param", freeze_last_layer=1, autocast_dtype=None)
    losses = []
    for step in range(start, start + n):
        stats = train_step(model, opt, crops, epoch=min(step, 2), lr=1e-3, wd=0.04, momentum=0.99,
                           teacher_temp=0.04 + 0.01 * step, settings=settings)
        losses.append(float(stats["loss"]))
    return losses


def test_step_tracks_the_pairwise_reference_over_steps():
    """The step (lean loss + fused AdamW, as on CUDA without compile) vs the reference's pairwise loss + for-each
    AdamW."""
    _, ref_model, ref_opt, crops = tiny_model_and_crops(fused=False, reference_loss=True)
    ref = run_steps(ref_model, ref_opt, crops)
    _, model, opt, _ = tiny_model_and_crops(fused=True)
    assert opt.defaults["fused"]
    fast = run_steps(model, opt, crops)
    np.testing.assert_allclose(fast, ref, rtol=1e-4)
    assert ref[-1] != ref[0]  # the steps really trained
    torch.testing.assert_close(model.dino_loss.center, ref_model.dino_loss.center, rtol=1e-4, atol=1e-6)


def one_block_model_and_crops(seed: int = 0, reference_loss: bool = False):
    """A 1-block ViT (width 48) with a small head: the whole step compiles cold in seconds."""
    torch.manual_seed(seed)
    student, teacher = (
        MultiCropWrapper(DinoVisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=1, num_heads=3),
                         DINOHead(48, 64, hidden_dim=32, bottleneck_dim=16))
        for _ in range(2))
    model = DINO(student, teacher, PairwiseDINOLoss(64, 4) if reference_loss else DINOLoss(64, 4))
    opt = build_optimizer("adamw", param_groups(model.student_module()))
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    return model, opt, crops


def test_step_compiles_without_graph_breaks():
    """DINO.compile on the whole step: fullgraph=True makes any graph break (a .item(), a data-dependent branch)
    an error; aot_eager traces forward and backward as inductor does, without generating code; three teacher
    temperatures need no recompile. The compiled step tracks the reference."""
    torch._dynamo.reset()
    ref_model, ref_opt, crops = one_block_model_and_crops(reference_loss=True)
    ref = run_steps(ref_model, ref_opt, crops, n=3)
    model, opt, _ = one_block_model_and_crops()
    model.compile(backend="aot_eager", fullgraph=True)
    fast = run_steps(model, opt, crops, n=1)  # compiles: the teacher's frame, then the student's (with grad)
    with torch._dynamo.config.patch(error_on_recompile=True):
        fast += run_steps(model, opt, crops, n=2, start=1)
    assert not any("_orig_mod" in k for k in model.student_module().state_dict())  # compiled in place: same keys
    np.testing.assert_allclose(fast, ref, rtol=1e-4)


def test_inductor_compiled_loss_matches_eager():
    """The real compiler (inductor: C++ code generation on the CPU) on the graph DINO.compile adds to the
    backbone's — the loss with the teacher statistics: values, gradients and statistics as eager, at two teacher
    temperatures without a recompile. One small graph: it compiles cold in ~20 s here, so the test does not depend
    on the machine's speed; full-size compiles are the benchmark's check (benchmarks/speed.py --check)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    crit = DINOLoss(300, 4)
    crit.center.copy_(torch.randn(1, 300, generator=g))
    compiled = torch.compile(crit.loss_and_stats)
    teacher = torch.randn(10, 300, generator=g) * 3
    student = torch.randn(20, 300, generator=g) * 3
    with torch._dynamo.config.patch(error_on_recompile=True):
        for temp in (0.04, 0.07):
            s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
            ref, ref_stats = crit.loss_and_stats(s1, teacher, torch.tensor(temp))
            loss, stats = compiled(s2, teacher, torch.tensor(temp))
            ref.backward()
            loss.backward()
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-4, atol=1e-7)
            for k in ref_stats:
                torch.testing.assert_close(torch.as_tensor(stats[k]), torch.as_tensor(ref_stats[k]),
                                           rtol=1e-5, atol=1e-6)


# -- the training loop's switches -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    """32 JPEGs (40x52, q90) in 4 class folders."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(32):
        img = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
        img[:, : 10 + i] = (i * 7) % 256
        (root / f"c{i % 4}").mkdir(exist_ok=True)
        Image.fromarray(img).save(root / f"c{i % 4}" / f"{i:03d}.jpg", quality=90)
    return root


def tiny_cfg(source: Path, ckpt: Path, **extra):
    """test_train's tiny run, checkpointing every 3 steps and without the export."""
    return tiny_config(source, ckpt, **{"checkpoint.every_n_steps": 3, "export.enabled": False, **extra})


def final_state(ckpt: Path) -> dict:
    return read_checkpoint(latest_checkpoint(str(ckpt)))


def test_device_augmentation_trains_like_worker_augmentation(jpeg_folder, tmp_path):
    """augment_on=device on the CPU: the same samples and (to 1e-5) the same crops as the workers, so the same
    training trajectory up to fp32 rounding."""
    workers = train(tiny_cfg(jpeg_folder, tmp_path / "w", **{"data.augment_on": "workers", "train.max_steps": 3}))
    device = train(tiny_cfg(jpeg_folder, tmp_path / "d", **{"data.augment_on": "device", "train.max_steps": 3}))
    assert workers.step == device.step == 3
    assert device.metrics["loss"] == pytest.approx(workers.metrics["loss"], rel=1e-4)
    a, b = final_state(tmp_path / "w"), final_state(tmp_path / "d")
    for k in a["teacher"]:
        torch.testing.assert_close(b["teacher"][k], a["teacher"][k], rtol=1e-3, atol=1e-5)


def test_resume_is_exact_with_device_augmentation(jpeg_folder, tmp_path):
    full = train(tiny_cfg(jpeg_folder, tmp_path / "full", **{"data.augment_on": "device"}))
    part = train(tiny_cfg(jpeg_folder, tmp_path / "part", **{"data.augment_on": "device", "train.max_steps": 3}))
    assert part.step == 3
    resumed = train(tiny_cfg(jpeg_folder, tmp_path / "part", **{"data.augment_on": "device"}))
    assert resumed.step == full.step == 8
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "part")
    for part_name in ("student", "teacher", "dino_loss"):
        for k in a[part_name]:
            assert torch.equal(a[part_name][k], b[part_name][k]), f"{part_name}.{k} differs after resume"


def test_config_switches_validate():
    from dino_model.config import ConfigError

    with pytest.raises(ConfigError, match="data.augment_on"):
        load_config(overrides=["data.augment_on=gpu"])
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(overrides=["train.compile=sometimes"])
    assert load_config(overrides=["train.compile=true"]).train.compile is True
    assert load_config().train.compile == "auto" and load_config().data.augment_on == "auto"
