"""The teacher backbone as an MLflow model, and ``load_backbone("models:/...")``.

MLflow 3's pytorch flavour exports with ``torch.export`` by default, which freezes the input shape: a 224-px
export would reject 96-px crops and DAVIS frames. So the model is logged as a **pyfunc** whose artifacts are this
project's export (``backbone.safetensors`` + ``config.json``) and whose code is this package. Loading rebuilds
the real backbone, which takes any input size and exposes attention maps and intermediate layers:

    >>> backbone = load_backbone("models:/dino-vit-small@champion")      # dino_model.export.load_backbone
    >>> mlflow.pyfunc.load_model("models:/dino-vit-small/3").predict(batch_nchw_float32)   # -> [B, D] features
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .export import CONFIG_NAME, WEIGHTS_NAME, load_backbone, register_backbone_loader

#: Name of the export folder inside the logged model's artifacts.
EXPORT_ARTIFACT = "export"


def _pyfunc_base():
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


class BackboneModel(_pyfunc_base()):
    """pyfunc wrapper: ``predict`` maps a float32 NCHW batch (ImageNet-normalised, any size that is a multiple of
    the patch) to the teacher's [CLS] features."""

    def load_context(self, context):
        self.backbone = load_backbone(context.artifacts[EXPORT_ARTIFACT])

    # The hints are MLflow's contract, not decoration: ``np.ndarray`` tells it the input is a tensor that it must
    # neither convert nor infer a schema from (the logged signature says [-1, 3, -1, -1] float32); without them
    # MLflow warns "Add type hints to the `predict` method" whenever this class is defined.
    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        if isinstance(model_input, dict):  # a named tensor input arrives as {name: array}
            model_input = next(iter(model_input.values()))
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.backbone(x).numpy()


def log_backbone_model(export_dir: str, name: str, embed_dim: int, example_size: int = 64, metadata=None):
    """Log the export in ``export_dir`` (a local folder) as a pyfunc model in the active run; returns MLflow's
    ``ModelInfo``. The input example is a batch of 2 so the signature's batch axis is variable."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), name="images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embed_dim), name="features")]),
    )
    example = np.random.default_rng(0).standard_normal((2, 3, example_size, example_size)).astype(np.float32)
    package_dir = str(Path(__file__).resolve().parent)
    with tempfile.TemporaryDirectory() as tmp:
        # pyfunc stores an artifact under its folder's base name: give it the fixed name the loader expects.
        staged = os.path.join(tmp, EXPORT_ARTIFACT)
        shutil.copytree(export_dir, staged)
        return _log(name, staged, package_dir, signature, example, metadata)


def _log(name, staged, package_dir, signature, example, metadata):
    import mlflow
    import torch
    import torchvision

    return mlflow.pyfunc.log_model(
        name=name,
        # Models from code: MLflow runs this file to build the model, so nothing is pickled.
        python_model=str(Path(__file__).with_name("mlflow_pyfunc_entry.py")),
        artifacts={EXPORT_ARTIFACT: staged},
        code_paths=[package_dir],
        signature=signature,
        input_example=example,
        # Explicit requirements: MLflow's inference of them imports and runs the model (slow) and guesses.
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}",
            f"timm=={_version('timm')}",
            f"safetensors=={_version('safetensors')}",
            f"boto3=={_version('boto3')}",
            f"numpy=={np.__version__}",
        ],
        metadata=metadata,
    )


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _load_registered(uri: str):
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` -> the backbone (downloads the export only)."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/artifacts/{EXPORT_ARTIFACT}",
                                                        dst_path=tmp)
        except Exception as e:  # noqa: BLE001 - say which model, and why, in one line
            raise ValueError(f"cannot load {uri} from the MLflow registry: {type(e).__name__}: {e}") from e
        if not (os.path.exists(os.path.join(local, WEIGHTS_NAME)) and os.path.exists(os.path.join(local, CONFIG_NAME))):
            raise ValueError(f"{uri} is not a dino_model backbone (no {EXPORT_ARTIFACT}/{WEIGHTS_NAME} artifact)")
        return load_backbone(local)


register_backbone_loader("models", _load_registered)
