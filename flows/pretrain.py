"""The ``dino-pretrain`` flow: pre-flight checks, torchrun training tracked in MLflow, model registration with its
model card (the version's description: data set, architecture, steps, wall time, hardware; scores once evaluated).

Run it

* in-process (no Prefect server needed): ``dino pretrain SHARDS CHECKPOINTS --preset small --set train.epochs=5``
* as a deployment: ``prefect deployment run dino-pretrain/<deployment> --param data=s3://... --param ...``

MLflow comes from ``MLFLOW_TRACKING_URI`` (default: a local ``sqlite:///mlflow.db`` store is *not* assumed — set
the variable, or the CLI sets an embedded one). The flow only composes tasks from :mod:`tasks.pretrain`.
"""

from __future__ import annotations

import signal
from typing import Any, Literal

from prefect import flow
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from dino_model.config import DinoConfig
from tasks.kubernetes_job import KubernetesSettings, job_name
from tasks.kubernetes_launch import train_on_kubernetes
from tasks.model_card import update_model_card
from tasks.pretrain import (
    end_mlflow_run,
    end_mlflow_run_on_cancellation,
    end_mlflow_run_on_crash,
    log_loss_curve,
    open_mlflow_run,
    outcome_tags,
    preflight,
    pretrain_summary,
    register_backbone,
    resolve_training_config,
    train,
)
from tasks.trainer_process import LaunchSpec


# Cancelled or crashed, the flow run still ends its MLflow run (KILLED / FAILED, with a stop_reason tag); the
# trainer has checkpointed by then, so a new flow run with the same checkpoint URI continues the same MLflow run.
@flow(name="dino-pretrain", log_prints=True, on_cancellation=[end_mlflow_run_on_cancellation],
      on_crashed=[end_mlflow_run_on_crash])
def dino_pretrain(
    data: str,
    checkpoint_uri: str,
    preset: str = "reference",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    rdzv_endpoint: str = "",
    experiment: str = "dino-pretrain",
    registered_model: str = "dino-backbone",
    run_name: str | None = None,
    resume: Literal["auto", "never", "require"] = "auto",
    train_retries: int = 2,
    launcher: Literal["local", "kubernetes"] = "local",
    k8s_image: str = "",
    k8s_namespace: str = "dino",
    k8s_gpus_per_node: int | None = None,
    k8s_secret: str = "dino-s3",
    k8s_job_prefix: str = "dino-pretrain",
) -> dict[str, Any]:
    """Pretrain a DINO backbone and register its teacher in MLflow with alias ``candidate``.

    Args:
        data: Shard-set URI written by ``dino-shard`` (local path or ``s3://``), or an ImageFolder directory.
        checkpoint_uri: Folder or ``s3://`` prefix for checkpoints and the final export; a retry or a new flow run
            with the same URI resumes from its latest checkpoint, in the MLflow run that checkpoint was logged
            into (unless that run is FINISHED).
        preset: Training preset(s): ``reference``, ``boost``, ``multicrop10``, ``small``, ``resnet50``
            (comma-separated to chain, e.g. ``boost,small``).
        config_file: Optional YAML/JSON training config on the worker, applied after the preset.
        overrides: ``section.field=value`` overrides applied last, e.g. ``["train.epochs=10", "optim.lr=1e-3"]``.
        nproc_per_node: Training processes on this worker (one per GPU; gloo processes on CPU).
        nnodes: Machines in the job. ``launcher="local"``: each runs this flow's torchrun with ``rdzv_endpoint``;
            ``launcher="kubernetes"``: the pods of the submitted Job.
        rdzv_endpoint: ``HOST:PORT`` of the c10d rendezvous when ``nnodes > 1`` (``launcher="local"`` only).
        experiment: MLflow experiment name.
        registered_model: MLflow registered-model name that receives a new version.
        run_name: MLflow run name (default: generated).
        resume: ``auto`` resumes when checkpoints exist; ``never`` refuses a URI that holds checkpoints;
            ``require`` refuses one that holds none. Task retries always resume.
        train_retries: How many times a failed trainer is relaunched (resuming) before the flow fails.
        launcher: ``local`` runs torchrun on this worker; ``kubernetes`` submits an Indexed Job of ``nnodes`` pods
            (torchrun with a c10d rendezvous on pod 0) with kubectl and follows it
            (``tasks/kubernetes/multinode-job.yaml``).
        k8s_image: Trainer image for ``launcher="kubernetes"`` (``infra/docker/Dockerfile``); required there.
        k8s_namespace: Namespace of the Job (must exist).
        k8s_gpus_per_node: GPUs requested per pod (default ``nproc_per_node``; 0 = CPU pods, one gloo process).
        k8s_secret: Name of an existing Secret loaded into the pods (S3 credentials, ``AWS_ENDPOINT_URL``).
        k8s_job_prefix: Job name prefix; the name is ``<prefix>-<flow run id[:8]>``.
    """
    run_id_prefect = str(flow_run.get_id() or "local")
    kubernetes = None
    if launcher == "kubernetes":
        kubernetes = KubernetesSettings(
            image=k8s_image, job_name=job_name(k8s_job_prefix, run_id_prefect), namespace=k8s_namespace,
            gpus_per_node=nproc_per_node if k8s_gpus_per_node is None else k8s_gpus_per_node, secret_name=k8s_secret)
        rdzv_endpoint = kubernetes.rdzv_endpoint
    launch = LaunchSpec(nproc_per_node=nproc_per_node, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                        rdzv_id=run_id_prefect)
    # First task: every side-effect-free check (the ones `dino pretrain` runs before Prefect starts).
    config = resolve_training_config(data, checkpoint_uri, preset, config_file, overrides, launch, resume)
    facts = preflight(config, launch, resume, kubernetes)
    tags = {"dataset_hash": str(facts.get("dataset_hash", "imagefolder")), "data": data,
            "architecture": f"{config['model']['arch']}/{config['model']['patch_size']}"}
    if facts.get("samples") is not None:
        tags["dataset_samples"] = str(facts["samples"])
    run_id = open_mlflow_run(experiment, config, run_id_prefect, run_name, tags)
    try:
        if kubernetes is None:
            end = train.with_options(retries=train_retries)(config, run_id, launch)
        else:
            end = train_on_kubernetes.with_options(retries=train_retries)(config, run_id, launch, kubernetes)
    except Exception:
        # A failure; a stop (cancellation, shutdown) is a BaseException that the flow's hooks record instead.
        end_mlflow_run(run_id, "FAILED", {"stop_reason": "failed"})
        raise
    if end.get("status") == "cancelled":
        # The trainer has checkpointed; the cancellation takes Prefect's own course from here: the flow run ends
        # Cancelled and its on_cancellation hook ends the MLflow run KILLED.
        raise TerminationSignal(signal.SIGTERM)
    outcome = outcome_tags(end)
    log_loss_curve(run_id)
    export_uri = DinoConfig.from_dict(config).export_uri
    # "epochs" is what was trained, not what was configured: a run stopped by max_steps did fewer.
    version_tags = {**tags, **outcome, "epochs": outcome.get("epochs_done", "?"), "mlflow_run_id": run_id,
                    "checkpoint_uri": config["checkpoint"]["uri"]}
    version = register_backbone(run_id, export_uri, registered_model, version_tags)
    end_mlflow_run(run_id, "FINISHED", outcome)
    update_model_card(registered_model, version)
    pretrain_summary(run_id, registered_model, version, end, facts, export_uri)
    return {"run_id": run_id, "registered_model": registered_model, "version": version, "export_uri": export_uri,
            "final_step": end.get("step"), **{k: v for k, v in facts.items() if k != "existing_checkpoints"}}
