"""tasks/validation: the side-effect-free checks shared by the dino command (before Prefect starts) and the flows'
first tasks. They must stay light (no Prefect, torch, MLflow or boto3 imported) and name what to fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.validation import (
    PreflightError,
    PretrainRequest,
    UserInputError,
    backbone_path_kind,
    check_pretrain_request,
    is_user_error,
    parse_model_uri,
)

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_checks_imports_nothing_heavy():
    code = ("import sys, tasks.validation, tasks.validation.pipeline\n"
            "print(sorted(m for m in ('prefect', 'torch', 'mlflow', 'boto3', 'webdataset') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_backbone_paths_and_model_uris(tmp_path):
    (tmp_path / "export").mkdir()
    for name in ("config.json", "backbone.safetensors"):
        (tmp_path / "export" / name).write_bytes(b"{}")
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "checkpoint-000000010.pt").write_bytes(b"")
    (tmp_path / "ref.pth").write_bytes(b"")
    assert backbone_path_kind(str(tmp_path / "export")) == "export"
    assert backbone_path_kind(str(tmp_path / "export" / "backbone.safetensors")) == "safetensors"
    assert backbone_path_kind(str(tmp_path / "ckpts")) == "checkpoints"
    assert backbone_path_kind(str(tmp_path / "ref.pth")) == "checkpoint"
    assert backbone_path_kind("s3://bucket/export") == "remote"
    with pytest.raises(UserInputError, match="neither a .safetensors nor a checkpoint"):
        backbone_path_kind(str(tmp_path / "export" / "config.json"))
    with pytest.raises(UserInputError, match="without config.json"):
        backbone_path_kind(str(tmp_path))
    assert parse_model_uri("models:/dino/3") == ("dino", "3", None)
    assert parse_model_uri("models:/dino@champion") == ("dino", None, "champion")
    with pytest.raises(UserInputError, match="dino register ./export --name NAME"):
        parse_model_uri("./export")


def test_pretrain_request_lists_every_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError) as info:
        check_pretrain_request(PretrainRequest(str(tmp_path / "empty"), "ftp://host/ckpt", resume="sometimes"))
    message = str(info.value)
    assert message.startswith("pre-flight failed:\n - ")
    assert "resume must be one of auto, never, require, got 'sometimes'" in message
    assert "checkpoint: unsupported storage URI scheme 'ftp'" in message
    assert "holds neither manifest.json" in message
    assert is_user_error(info.value) and not is_user_error(RuntimeError("a bug"))
