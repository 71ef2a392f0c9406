"""The ``dino-pretrain`` flow: pre-flight checks, torchrun training tracked in MLflow, model registration with its
model card (the version's description: data set, architecture, steps, wall time, hardware; scores once evaluated).

Run it

* in-process (no Prefect server needed): ``dino pretrain SHARDS CHECKPOINTS --preset small --set train.epochs=5``
* as a deployment: ``prefect deployment run dino-pretrain/<deployment> --param data=s3://... --param
  launch='{"nproc_per_node": 8}'`` (a partial group changes only its own fields of the deployment's)

MLflow comes from ``MLFLOW_TRACKING_URI`` (default: a local ``sqlite:///mlflow.db`` store is *not* assumed — set
the variable, or the CLI sets an embedded one). The flow only composes tasks from :mod:`tasks.pretrain`; the
launcher (``launch.launcher``) is one of :mod:`tasks.pretrain.launchers`.
"""

from __future__ import annotations

import signal
from typing import Any, Literal

from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from tasks.flow_parameters import grouped_flow
from tasks.model_card import update_model_card
from tasks.pretrain.launchers import open_launcher
from tasks.pretrain.mlflow_run import (
    end_mlflow_run,
    end_mlflow_run_on_cancellation,
    end_mlflow_run_on_crash,
    open_mlflow_run,
    outcome_tags,
)
from tasks.pretrain.preflight import preflight, resolve_training_config
from tasks.pretrain.results import log_loss_curve, pretrain_summary, register_backbone
from tasks.pretrain.settings import pretrain_settings
from tasks.validation.pretrain_settings import (
    PRETRAIN_RENAMES,
    KubernetesSettings,
    LaunchSettings,
    TrackingSettings,
)
from tasks.validation.training import PretrainRequest, ResolvedTraining


# Cancelled or crashed, the flow run still ends its MLflow run (KILLED / FAILED, with a stop_reason tag); the
# trainer has checkpointed by then, so a new flow run with the same checkpoint URI continues the same MLflow run.
@grouped_flow(PRETRAIN_RENAMES, name="dino-pretrain", log_prints=True,
              on_cancellation=[end_mlflow_run_on_cancellation], on_crashed=[end_mlflow_run_on_crash])
def dino_pretrain(
    data: str,
    checkpoint_uri: str,
    preset: str = "reference",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    resume: Literal["auto", "never", "require"] = "auto",
    val_data: str | None = None,
    launch: LaunchSettings | dict[str, Any] | None = None,
    kubernetes: KubernetesSettings | dict[str, Any] | None = None,
    tracking: TrackingSettings | dict[str, Any] | None = None,
    **deprecated: Any,
) -> dict[str, Any]:
    """Pretrain a DINO backbone and register its teacher in MLflow with alias ``candidate``.

    Args:
        data: Shard-set URI written by ``dino-shard`` (local path or ``s3://``), or an ImageFolder directory.
        checkpoint_uri: Folder or ``s3://`` prefix for checkpoints and the final export; a retry or a new flow run
            with the same URI resumes from its latest checkpoint, in the MLflow run that checkpoint was logged
            into (unless that run is FINISHED).
        preset: Training preset(s): ``reference``, ``boost``, ``multicrop10``, ``small``, ``small-data`` (chosen
            by the data set's size, docs/small-data.md), ``resnet50`` (comma-separated to chain, e.g.
            ``boost,small``).
        config_file: Optional YAML/JSON training config on the worker, applied after the preset.
        overrides: ``section.field=value`` overrides applied last, e.g. ``["train.epochs=10", "optim.lr=1e-3"]``.
        resume: ``auto`` resumes when checkpoints exist; ``never`` refuses a URI that holds checkpoints;
            ``require`` refuses one that holds none. Task retries always resume.
        val_data: A labelled validation shard set (same classes as ``data``, which must then be a labelled shard
            set): the teacher's k-NN on it during training, the learning curve (MLflow metric
            ``monitor.knn20_top1``, the progress artifact, the model card; docs/training-health.md).
        launch: How the trainer is started (:class:`tasks.validation.pretrain_settings.LaunchSettings`): the
            ``launcher`` (``local``: torchrun on this worker; ``kubernetes``: an Indexed Job of ``nnodes`` pods),
            ``nproc_per_node``, ``nnodes``, ``rdzv_endpoint`` and ``retries`` (relaunches of a failed trainer,
            each resuming). A partial dict changes only its own fields of the deployment's.
        kubernetes: The Job of the ``kubernetes`` launcher
            (:class:`tasks.validation.pretrain_settings.KubernetesSettings`): ``image`` (required there),
            ``namespace``, ``gpus_per_node``, ``secret``, ``job_prefix``.
        tracking: Where MLflow records it (:class:`tasks.validation.pretrain_settings.TrackingSettings`):
            ``experiment``, ``registered_model`` (receives a new version), ``run_name``.
        deprecated: The flat names these groups replaced (``nproc_per_node=``, ``k8s_image=``,
            ``experiment=`` ...): still accepted, with a warning naming the new spelling.
    """
    request = PretrainRequest(data, checkpoint_uri, preset, config_file, tuple(overrides or ()), resume, val_data)
    settings = pretrain_settings({"launch": launch, "kubernetes": kubernetes, "tracking": tracking}, deprecated)
    flow_run_id = str(flow_run.get_id() or "local")
    launcher = open_launcher(settings, flow_run_id)
    # First task: every side-effect-free check (the ones `dino pretrain` runs before Prefect starts).
    resolved = resolve_training_config(request, launcher.spec)
    facts = preflight(resolved, launcher)
    tags = _run_tags(resolved, facts, data)
    run_id = open_mlflow_run(settings.tracking.experiment, resolved.config, flow_run_id, settings.tracking.run_name,
                             tags)
    try:
        end = launcher.train(resolved.config, run_id)
    except Exception as error:
        # A failure (``collapsed:<mode>`` when the health monitor stopped it); a stop (cancellation, shutdown) is a
        # BaseException that the flow's hooks record instead.
        end_mlflow_run(run_id, "FAILED", {"stop_reason": getattr(error, "stop_reason", "failed")})
        raise
    if end.get("status") == "cancelled":
        # The trainer has checkpointed; the cancellation takes Prefect's own course from here: the flow run ends
        # Cancelled and its on_cancellation hook ends the MLflow run KILLED.
        raise TerminationSignal(signal.SIGTERM)
    outcome = outcome_tags(end)
    log_loss_curve(run_id)
    export_uri = resolved.cfg.export_uri
    registered_model = settings.tracking.registered_model
    # "epochs" is what was trained, not what was configured: a run stopped by max_steps did fewer.
    version_tags = {**tags, **outcome, "epochs": outcome.get("epochs_done", "?"), "mlflow_run_id": run_id,
                    "checkpoint_uri": resolved.cfg.checkpoint.uri}
    version = register_backbone(run_id, export_uri, registered_model, version_tags)
    end_mlflow_run(run_id, "FINISHED", outcome)
    update_model_card(registered_model, version)
    pretrain_summary(run_id, registered_model, version, end, facts, export_uri)
    return {"run_id": run_id, "registered_model": registered_model, "version": version, "export_uri": export_uri,
            "final_step": end.get("step"), **{k: v for k, v in facts.items() if k != "existing_checkpoints"}}


def _run_tags(resolved: ResolvedTraining, facts: dict[str, Any], data: str) -> dict[str, str]:
    """The tags of the MLflow run and of the version it registers: the data set (hash, samples, URI) and the
    architecture."""
    model = resolved.cfg.model
    tags = {"dataset_hash": str(facts.get("dataset_hash", "imagefolder")), "data": data,
            "architecture": f"{model.arch}/{model.patch_size}"}
    if facts.get("samples") is not None:
        tags["dataset_samples"] = str(facts["samples"])
    return tags
