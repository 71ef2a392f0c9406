"""MLflow "models from code" entry point of the backbone pyfunc (see :mod:`dino_model.mlflow_model`).

MLflow loads the model by running this file, so no pickled Python object is stored in the model: only this code,
the package (``code_paths``) and the safetensors export.
"""

import warnings

from mlflow.models import set_model

from dino_model.mlflow_model import BackboneModel

with warnings.catch_warnings():
    # The logged signature is the contract; MLflow's suggestion of predict() type hints does not apply.
    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
    set_model(BackboneModel())
