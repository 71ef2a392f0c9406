"""MLflow "models from code" entry point of the backbone pyfunc (see :mod:`dino_model.mlflow_model`).

MLflow loads the model by running this file, so no pickled Python object is stored in the model: only this code,
the package (``code_paths``) and the safetensors export.
"""

from mlflow.models import set_model

from dino_model.mlflow_model import BackboneModel

set_model(BackboneModel())
