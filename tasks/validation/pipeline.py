"""A ``dino-pipeline`` request (shard -> pretrain -> evaluate) checked as a whole, without a side effect, before
the first stage starts: both image sources and where their shards go, the training config and launch, the model
name, and the DAVIS folder when attention maps / label propagation are asked for. (The shard sets it will write do
not exist yet: their manifests are checked by each stage's own first task.)

The request is one object (:class:`PipelineRequest`), built once by the flow or the ``dino`` command and passed on;
where everything goes under the workspace is :func:`workspace_layout`'s alone, and so are the evaluation's defaults
(:meth:`PipelineRequest.evaluation_settings`: the workspace's shard sets and features, checked here with the
rest, so settings that cannot evaluate fail the first task, not the last stage after the training)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from pydantic import ValidationError

from dino_model.data.shard_writer import ShardOptions, validate_request
from dino_model.data.sources import SourceSpec
from dino_model.storage import open_store
from tasks.pretrain.trainer_process import LaunchSpec

from .errors import PreflightError, UserInputError, problems_message
from .evaluation_inputs import evaluation_inputs
from .evaluation_settings import VIDEO, EvaluationSettings
from .models import check_model_name
from .shard_settings import ShardRequest
from .task_runners import check_parallelism, check_task_runner
from .training import RESUME_POLICIES, PretrainRequest, load_training_config


@dataclass(frozen=True)
class WorkspaceLayout:
    """Where ``dino-pipeline`` puts the two shard sets, the checkpoints and the features under a workspace."""

    train_shards: str
    val_shards: str
    checkpoints: str
    features: str


def workspace_layout(workspace: str) -> WorkspaceLayout:
    """``<workspace>/shards/train``, ``<workspace>/shards/val``, ``<workspace>/checkpoints``,
    ``<workspace>/features``."""
    root = workspace.rstrip("/")
    return WorkspaceLayout(f"{root}/shards/train", f"{root}/shards/val", f"{root}/checkpoints", f"{root}/features")


@dataclass(frozen=True)
class PipelineRequest:
    """What ``dino-pipeline`` is asked to do (its parameters, see :func:`flows.pipeline.dino_pipeline`)."""

    train_source: str
    val_source: str
    workspace: str
    preset: str = "reference"
    overrides: tuple[str, ...] = ()
    shard_size: int = 1000
    nproc_per_node: int = 1
    experiment: str = "dino-pretrain"
    registered_model: str = "dino-backbone"
    evaluation: EvaluationSettings | dict[str, Any] | None = None
    """The evaluation settings the user chose: all of them (:class:`EvaluationSettings`), some of them (a dict,
    e.g. ``{"crop_size": 64}``: the others are the workspace's and the class's defaults) or none."""
    resume: str = "auto"
    task_runner: str = "threads"
    parallelism: int = 4
    layout: WorkspaceLayout = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "layout", workspace_layout(self.workspace))

    def flow_parameters(self) -> dict:
        """The request as ``dino_pipeline``'s keyword arguments."""
        params = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {**params, "overrides": list(self.overrides)}

    def shard_requests(self) -> dict[str, ShardRequest]:
        """The two shard stages: train, then val with train's class indices (the evaluation aligns them by class
        id anyway; this keeps them equal)."""
        layout = self.layout
        return {
            "train": ShardRequest(SourceSpec(self.train_source), layout.train_shards,
                                  ShardOptions(name="train", shard_size=self.shard_size)),
            "val": ShardRequest(SourceSpec(self.val_source, classes_from=layout.train_shards), layout.val_shards,
                                ShardOptions(name="val", shard_size=self.shard_size)),
        }

    def pretrain_request(self) -> PretrainRequest:
        return PretrainRequest(self.layout.train_shards, self.layout.checkpoints, self.preset, None, self.overrides,
                               self.resume)

    def evaluation_settings(self) -> EvaluationSettings:
        """The evaluation stage's settings: the fields :attr:`evaluation` sets (an :class:`EvaluationSettings`'
        explicit fields, a dict's keys) over the workspace's shard sets (``train_data``, ``val_data``) and features
        (``features_root``), then the class's defaults (k-NN and the fast linear probe). The extraction runs on
        the pipeline's ``task_runner`` and ``parallelism`` unless the settings choose a runner of their own (other
        than ``threads``) or torchrun processes (``nproc_per_node`` > 1). Raises :class:`UserInputError` naming
        the field (``evaluation.<field>: ...``) when the result cannot evaluate."""
        given = self.evaluation
        if isinstance(given, EvaluationSettings):
            explicit = given.model_dump(include=given.model_fields_set)
        else:
            explicit = dict(given or {})
        layout = self.layout
        defaults = {"train_data": layout.train_shards, "val_data": layout.val_shards, "features_root": layout.features}
        try:
            settings = EvaluationSettings.model_validate({**defaults, **explicit})
        except ValidationError as e:
            raise UserInputError(_evaluation_problem(e)) from None
        if settings.task_runner == "threads" and settings.nproc_per_node == 1:
            settings = settings.model_copy(update={"task_runner": self.task_runner, "parallelism": self.parallelism})
        return settings


def check_pipeline_request(request: PipelineRequest) -> None:
    """Raises :class:`PreflightError` listing every problem of the request (each naming its parameter). Each shard
    stage's source is checked here, once: the stages do not check it again."""
    problems: list[str] = []
    for check, value in ((check_task_runner, request.task_runner), (check_parallelism, request.parallelism)):
        try:
            check(value)
        except UserInputError as e:
            problems.append(str(e))
    try:
        open_store(request.workspace)
    except ValueError as e:
        problems.append(f"workspace: {e}")
    problems += _source_problems(request)
    try:
        load_training_config(request.pretrain_request())
    except PreflightError as e:
        problems.append(str(e))
    try:
        LaunchSpec(nproc_per_node=request.nproc_per_node).validate()
    except ValueError as e:
        problems.append(f"launch: {e}")
    if request.resume not in RESUME_POLICIES:
        problems.append(f"resume must be one of {', '.join(RESUME_POLICIES)}, got {request.resume!r}")
    try:
        check_model_name(request.registered_model)
    except UserInputError as e:
        problems.append(f"registered_model: {e}")
    try:
        evaluation = request.evaluation_settings()
    except UserInputError as e:
        problems.append(str(e))
    else:
        video = [e for e in evaluation.selected() if e in VIDEO]
        if video:  # the classification sets are the shards this pipeline writes: checked once written
            problems += evaluation_inputs(evaluation.model_copy(update={"evaluations": video})).problems
    if problems:
        raise PreflightError(problems_message("the pipeline's input is unusable", problems))


def _source_problems(request: PipelineRequest) -> list[str]:
    """Each image source, as its shard stage will read it (the val stage's class indices come from the train
    shards, which do not exist yet: the val source is checked without them)."""
    try:
        stages = request.shard_requests()
    except ValueError as e:  # the shard options (shard_size) of both stages
        return [f"{split}_source: {e}" for split in ("train", "val")]
    problems = []
    for split, stage in stages.items():
        spec = SourceSpec(stage.spec.root)  # without classes_from: the train shards are written first
        try:
            validate_request(spec, stage.destination, stage.options)
        except (ValueError, OSError) as e:
            problems.append(f"{split}_source: {e}")
    return problems


def _evaluation_problem(error: ValidationError) -> str:
    """A pydantic error of the evaluation settings as ``evaluation.<field>: message`` (``evaluation: message`` for
    one about the settings as a whole), ``; ``-separated."""
    return "; ".join(f"evaluation{''.join(f'.{part}' for part in err['loc'])}: "
                     f"{err['msg'].removeprefix('Value error, ')}" for err in error.errors())
