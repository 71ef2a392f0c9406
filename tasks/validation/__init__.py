"""Checks of what a user asks for that need no side effect, shared by the ``dino`` command and the flows.

The command runs them before Prefect is imported, so a user error exits with status 2 and one message in about a
second instead of after Prefect's start-up; the flows' first tasks run the same functions, so a deployment run
fails in its first task with the same message, and no task retries it (:func:`retry_unless_user_error`).

Rule: nothing here imports Prefect, torch, MLflow or boto3 at import time (``tests/test_validation.py`` checks it);
storage clients are created only when an ``s3://`` URI is actually read, MLflow only when ``registry.py`` looks a
model up (the command's last check).

==========================  ==================================================================================
``errors.py``               :class:`UserInputError` and its kinds; :func:`retry_unless_user_error`
``training.py``             ``dino-pretrain``: the request (:class:`PretrainRequest`) resolved once: config
                            (preset, file, overrides), launch, resume, data
``pretrain_settings.py``    ``dino-pretrain``'s groups of settings: ``launch``, ``kubernetes``, ``tracking``
``shard_settings.py``       ``dino-shard``'s groups (``shards``, ``runner``) and one shard set's request
``extraction_settings.py``  ``dino-extract``'s groups (``features``, ``runner``)
``settings_groups.py``      grouped flow parameters: merged onto a deployment's, deprecated flat names
``pipeline.py``             ``dino-pipeline``: the request (:class:`PipelineRequest`) and the workspace layout
``shard_sets.py``           a shard set's manifest and shard listing, the size of its first image
``evaluation_settings.py``  :class:`EvaluationSettings` (``dino-evaluate`` / ``dino-reevaluate``)
``evaluation_inputs.py``    shard sets and classes, the DAVIS folder, device name, URIs, black-padding warnings
``models.py``               model references: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, backbone paths
``registry.py``             the registered model / version a reference names, looked up (MLflow imported lazily)
``task_runners.py``         the ``task_runner`` choice (threads, processes, dask, ``tcp://HOST:PORT``)
==========================  ==================================================================================
"""

from .errors import (
    EvaluationInputError,
    ModelVersionNotFound,
    PreflightError,
    UserInputError,
    is_user_error,
    problems_message,
    retry_unless_user_error,
)
from .evaluation_inputs import (
    EvaluationInputs,
    check_evaluation_request,
    check_extraction_request,
    evaluation_inputs,
    extraction_inputs,
)
from .evaluation_settings import EvaluationSettings
from .models import backbone_path_kind, check_backbone_reference, check_model_name, parse_model_uri
from .training import (
    RESUME_POLICIES,
    PretrainRequest,
    ResolvedTraining,
    check_pretrain_request,
    data_problems,
    resolve_training_config,
)

__all__ = [
    "RESUME_POLICIES",
    "EvaluationInputError",
    "EvaluationInputs",
    "EvaluationSettings",
    "ModelVersionNotFound",
    "PreflightError",
    "PretrainRequest",
    "ResolvedTraining",
    "UserInputError",
    "backbone_path_kind",
    "check_backbone_reference",
    "check_evaluation_request",
    "check_extraction_request",
    "check_model_name",
    "check_pretrain_request",
    "data_problems",
    "evaluation_inputs",
    "extraction_inputs",
    "is_user_error",
    "parse_model_uri",
    "problems_message",
    "resolve_training_config",
    "retry_unless_user_error",
]
