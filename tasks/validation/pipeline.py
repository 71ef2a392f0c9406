"""A ``dino-pipeline`` request (shard -> pretrain -> evaluate) checked as a whole, without a side effect, before
the first stage starts: both image sources and where their shards go, the training config and launch, the model
name, and the DAVIS folder when attention maps / label propagation are asked for. (The shard sets it will write do
not exist yet: their manifests are checked by each stage's own first task.)"""

from __future__ import annotations

from dino_model.data.shard_writer import ShardOptions, validate_request
from dino_model.data.sources import SourceSpec
from dino_model.storage import open_store
from tasks.trainer_process import LaunchSpec

from .errors import PreflightError, UserInputError, problems_message
from .evaluation_inputs import evaluation_inputs
from .evaluation_settings import VIDEO, EvaluationSettings
from .models import check_model_name
from .task_runners import check_parallelism, check_task_runner
from .training import RESUME_POLICIES, resolve_training_config


def pipeline_paths(workspace: str) -> dict[str, str]:
    """Where ``dino-pipeline`` puts the two shard sets, the checkpoints and the features under ``workspace``."""
    root = workspace.rstrip("/")
    return {"train": f"{root}/shards/train", "val": f"{root}/shards/val", "checkpoints": f"{root}/checkpoints",
            "features": f"{root}/features"}


def check_pipeline_request(
    train_source: str,
    val_source: str,
    workspace: str,
    preset: str = "reference",
    overrides: list[str] | None = None,
    shard_size: int = 1000,
    nproc_per_node: int = 1,
    registered_model: str = "dino-backbone",
    evaluation: EvaluationSettings | None = None,
    resume: str = "auto",
    task_runner: str = "threads",
    parallelism: int = 4,
) -> None:
    """Raises :class:`PreflightError` listing every problem of the request (each naming its parameter)."""
    problems: list[str] = []
    for check, value in ((check_task_runner, task_runner), (check_parallelism, parallelism)):
        try:
            check(value)
        except UserInputError as e:
            problems.append(str(e))
    try:
        open_store(workspace)
    except ValueError as e:
        problems.append(f"workspace: {e}")
    paths = pipeline_paths(workspace)
    for split, source in (("train", train_source), ("val", val_source)):
        try:
            validate_request(SourceSpec(source), paths[split], ShardOptions(name=split, shard_size=shard_size))
        except (ValueError, OSError) as e:
            problems.append(f"{split}_source: {e}")
    try:
        resolve_training_config(paths["train"], paths["checkpoints"], preset, None, overrides)
    except PreflightError as e:
        problems.append(str(e))
    try:
        LaunchSpec(nproc_per_node=nproc_per_node).validate()
    except ValueError as e:
        problems.append(f"launch: {e}")
    if resume not in RESUME_POLICIES:
        problems.append(f"resume must be one of {', '.join(RESUME_POLICIES)}, got {resume!r}")
    try:
        check_model_name(registered_model)
    except UserInputError as e:
        problems.append(f"registered_model: {e}")
    if evaluation is not None:
        video = [e for e in evaluation.selected() if e in VIDEO]
        if video:  # the classification sets are the shards this pipeline writes: checked once written
            problems += evaluation_inputs(evaluation.model_copy(update={"evaluations": video})).problems
    if problems:
        raise PreflightError(problems_message("the pipeline's input is unusable", problems))
