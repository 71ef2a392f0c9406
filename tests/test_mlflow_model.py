"""The backbone's MLflow pyfunc (dino_model/mlflow_model.py): logged, loaded back through ``mlflow.pyfunc`` and run on
a real MLflow server, without MLflow's "add type hints to predict" warning that used to appear on every
extract/evaluate run."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

TYPE_HINT_WARNING = "Add type hints to the `predict` method"


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    return mlflow_server.url


def test_defining_the_pyfunc_class_warns_nothing():
    """The warning fires when MLflow wraps ``predict`` at class definition, i.e. on every import: a fresh
    interpreter importing the module must print no warning at all."""
    out = subprocess.run([sys.executable, "-W", "always", "-c", "import dino_model.mlflow_model"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert TYPE_HINT_WARNING not in out.stderr
    assert "Warning" not in out.stderr, out.stderr


def test_pyfunc_predict_returns_features_without_warnings(tracking, tmp_path):
    import mlflow

    from dino_model.export import export_backbone
    from dino_model.mlflow_model import log_backbone_model
    from dino_model.models import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=16).eval()
    export_backbone(backbone, str(tmp_path / "export"), arch="vit_tiny", patch_size=16)
    batch = np.random.default_rng(0).standard_normal((3, 3, 32, 48)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mlflow.start_run():
            info = log_backbone_model(str(tmp_path / "export"), name="backbone", embed_dim=192, example_size=32)
        model = mlflow.pyfunc.load_model(info.model_uri)
        features = model.predict(batch)
    assert not [w for w in caught if TYPE_HINT_WARNING in str(w.message)]
    with torch.inference_mode():
        expected = backbone(torch.from_numpy(batch)).numpy()
    assert features.shape == (3, 192) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)
