"""Teacher export: safetensors that timm loads as its own model (no internet), and load_backbone from every kind of
stored weights (export folder/file, local and S3, training checkpoint, checkpoint folder, reference checkpoint,
registered schemes)."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch

from dino_model.checkpoint import save_checkpoint
from dino_model.config import DinoConfig, load_config
from dino_model.export import (
    BACKBONE_LOADERS,
    CONFIG_NAME,
    WEIGHTS_NAME,
    export_backbone,
    infer_arch,
    load_backbone,
    register_backbone_loader,
    timm_model_name,
)
from dino_model.models import build_backbone
from dino_model.storage import ObjectNotFound, open_store


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomised(backbone: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so a silently skipped key could not go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return backbone.eval()


@pytest.mark.parametrize("arch, patch, timm_name", [("vit_tiny", 16, "vit_tiny_patch16_224"),
                                                     ("vit_small", 8, "vit_small_patch8_224")])
def test_export_loads_in_timm(tmp_path, arch, patch, timm_name):
    torch.manual_seed(0)
    ours = randomised(build_backbone(arch, patch_size=patch))
    out = export_backbone(ours, str(tmp_path), arch=arch, patch_size=patch, step=7, epoch=1,
                          training_config=DinoConfig().to_dict())
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["timm_name"] == timm_name and cfg["arch"] == arch and cfg["patch_size"] == patch
    assert cfg["step"] == 7 and cfg["training_config"]["model"]["arch"] == "vit_small"
    assert out["weights"].endswith(WEIGHTS_NAME)

    theirs = timm.create_model(timm_name, pretrained=True, num_classes=0,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / WEIGHTS_NAME))).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), atol=1e-5)


def test_resnet50_export_loads_in_timm(tmp_path):
    torch.manual_seed(0)
    ours = randomised(build_backbone("resnet50"))
    export_backbone(ours, str(tmp_path), arch="resnet50", patch_size=16)
    theirs = timm.create_model("resnet50", pretrained=True, num_classes=0,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / WEIGHTS_NAME))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), atol=1e-5)
    assert torch.allclose(load_backbone(str(tmp_path))(x), ours(x), atol=1e-6)


def test_timm_names():
    assert timm_model_name("vit_base", 16) == "vit_base_patch16_224"
    assert timm_model_name("vit_tiny", 8) is None  # timm has no vit_tiny_patch8_224
    assert timm_model_name("vit_small", 16, img_size=128) is None


def test_load_backbone_from_export_local_and_s3(tmp_path, s3_bucket):
    torch.manual_seed(1)
    ours = randomised(build_backbone("vit_tiny", patch_size=16))
    x = torch.randn(2, 3, 96, 96)  # a non-224 size exercises the reference interpolation
    expected = ours(x)
    export_backbone(ours, str(tmp_path / "exp"), arch="vit_tiny", patch_size=16)
    export_backbone(ours, f"{s3_bucket}/exp", arch="vit_tiny", patch_size=16)
    for uri in (str(tmp_path / "exp"), str(tmp_path / "exp" / WEIGHTS_NAME), f"file://{tmp_path}/exp",
                f"{s3_bucket}/exp", f"{s3_bucket}/exp/{WEIGHTS_NAME}"):
        loaded = load_backbone(uri)
        assert not loaded.training
        with torch.no_grad():
            assert torch.allclose(loaded(x), expected, atol=1e-6), uri


def test_load_backbone_from_training_checkpoint(tmp_path):
    from dino_model.meta_arch import DINO

    torch.manual_seed(2)
    model = DINO.from_config(load_config(overrides=[
        "model.arch=vit_tiny", "model.drop_path_rate=0.0", "model.out_dim=32", "crops.n_local=0",
        "model.head_hidden_dim=16", "model.head_bottleneck_dim=8"]))
    randomised(model.teacher)
    cfg = DinoConfig().to_dict()
    cfg["model"].update(arch="vit_tiny", out_dim=32)
    from dino_model.checkpoint import CHECKPOINT_FORMAT

    save_checkpoint(str(tmp_path), {"format": CHECKPOINT_FORMAT, "step": 3, "teacher": model.teacher.state_dict(),
                                    "student": model.student.state_dict(), "config": cfg})
    x = torch.randn(1, 3, 32, 32)
    expected = model.teacher.backbone.eval()(x)
    for uri in (str(tmp_path), str(tmp_path / "checkpoint-000000003.pt")):
        with torch.no_grad():
            assert torch.allclose(load_backbone(uri)(x), expected, atol=1e-6)


def test_load_backbone_from_reference_checkpoints(tmp_path):
    torch.manual_seed(3)
    teacher = randomised(build_backbone("vit_tiny", patch_size=16))
    student = randomised(build_backbone("vit_tiny", patch_size=16), seed=1)
    full = {
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
        "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()},
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
        "dino_loss": {"center": torch.zeros(1, 8)},
    }
    torch.save(full, tmp_path / "checkpoint.pth")
    torch.save(teacher.state_dict(), tmp_path / "dino_deittiny16_pretrain.pth")  # released bare-backbone files
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        expected = teacher(x)
        assert torch.allclose(load_backbone(str(tmp_path / "checkpoint.pth"))(x), expected, atol=1e-6)
        assert torch.allclose(load_backbone(str(tmp_path / "dino_deittiny16_pretrain.pth"))(x), expected, atol=1e-6)


def test_infer_arch_and_errors(tmp_path):
    assert infer_arch(build_backbone("vit_small", patch_size=8).state_dict()) == ("vit_small", 8)
    assert infer_arch(build_backbone("resnet50").state_dict())[0] == "resnet50"
    with pytest.raises(ObjectNotFound, match="neither an export"):
        load_backbone(str(tmp_path))
    with pytest.raises(ValueError, match="no backbone loader for scheme 'nope'"):
        load_backbone("nope://x")


def test_registered_scheme_is_used(tmp_path):
    torch.manual_seed(4)
    ours = randomised(build_backbone("vit_tiny", patch_size=16))
    export_backbone(ours, str(tmp_path), arch="vit_tiny", patch_size=16)
    seen = []

    def from_alias(uri: str) -> torch.nn.Module:
        # A real resolver: an alias name -> an export folder (the MLflow issue maps models:/ URIs the same way).
        seen.append(uri)
        return load_backbone(str(tmp_path))

    register_backbone_loader("alias", from_alias)
    try:
        loaded = load_backbone("alias://best")
        assert seen == ["alias://best"]
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(loaded(x), ours(x), atol=1e-6)
    finally:
        BACKBONE_LOADERS.pop("alias", None)
    assert open_store(str(tmp_path)).exists(CONFIG_NAME)
