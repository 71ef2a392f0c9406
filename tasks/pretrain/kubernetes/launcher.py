"""``launch.launcher="kubernetes"`` of ``dino-pretrain``: one side effect, the training Job submitted to the
cluster (rendered from ``multinode-job.yaml`` beside this file, followed with kubectl; see
:mod:`tasks.pretrain.kubernetes.job` for the exact commands).

    prefect deployment run dino-pretrain/default --param data=s3://dino/shards/in1k \
        --param checkpoint_uri=s3://dino/checkpoints/run7 \
        --param launch='{"launcher": "kubernetes", "nnodes": 4, "nproc_per_node": 8}' \
        --param kubernetes='{"image": "registry.example/dino:0.1"}'
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dino_model.config import DinoConfig
from tasks.validation import retry_unless_user_error
from tasks.validation.pretrain_settings import PretrainSettings

from ..progress_artifact import finish_progress, progress_reporter
from ..trainer_process import LaunchSpec
from .job import KubernetesJobSpec, job_name, multinode_job, preflight_problems, run_kubernetes_job


class KubernetesLauncher:
    """An Indexed Job of ``launch.nnodes`` pods, torchrun in each with a c10d rendezvous on pod 0
    (:mod:`tasks.pretrain.launchers`)."""

    def __init__(self, settings: PretrainSettings, flow_run_id: str):
        k8s, launch = settings.kubernetes, settings.launch
        gpus = launch.nproc_per_node if k8s.gpus_per_node is None else k8s.gpus_per_node
        self.job = KubernetesJobSpec(image=k8s.image, job_name=job_name(k8s.job_prefix, flow_run_id),
                                     namespace=k8s.namespace, gpus_per_node=gpus, secret_name=k8s.secret)
        self.spec = LaunchSpec(nproc_per_node=launch.nproc_per_node, nnodes=launch.nnodes,
                               rdzv_endpoint=self.job.rdzv_endpoint, rdzv_id=flow_run_id)
        self.retries = launch.retries

    def problems(self, cfg: DinoConfig, tracking_uri: str) -> list[str]:
        return preflight_problems(self.job, self.spec, cfg.data.source, cfg.checkpoint.uri, tracking_uri)

    def train(self, config: dict[str, Any], run_id: str) -> dict[str, Any]:
        return train_on_kubernetes.with_options(retries=self.retries)(config, run_id, self.spec, self.job)


@task(name="train-on-kubernetes", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error)
def train_on_kubernetes(config: dict[str, Any], run_id: str, launch: LaunchSpec,
                        kubernetes: KubernetesJobSpec) -> dict[str, Any]:
    """Submit the multi-node training Job (``launch.nnodes`` pods, the resolved ``config`` in its ConfigMap, the
    MLflow run id and tracking URI in the pods' environment), stream rank 0's log into the flow-run logs and the
    progress artifact, and return the trainer's ``end`` record. A failed Job fails the task with the pod's error;
    a retry replaces the Job and the trainer resumes from the latest checkpoint."""
    import mlflow

    logger = get_run_logger()
    job = multinode_job(config, run_id, mlflow.get_tracking_uri(), launch, kubernetes)
    progress_id, on_progress = progress_reporter(logger, run_id)
    logger.info("launching on Kubernetes: %s", " ".join(job.command()))
    end = run_kubernetes_job(job, on_line=logger.info, on_progress=on_progress)
    finish_progress(progress_id)
    return end or {}
