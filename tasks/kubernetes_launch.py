"""The ``train-on-kubernetes`` task of ``dino-pretrain`` (``launcher="kubernetes"``): one side effect, the training
Job submitted to the cluster (rendered from ``tasks/kubernetes/multinode-job.yaml``, followed with kubectl; see
:mod:`tasks.kubernetes_job` for the exact commands).

    prefect deployment run dino-pretrain/default --param launcher=kubernetes --param nnodes=4 \\
        --param nproc_per_node=8 --param k8s_image=registry.example/dino:0.1 --param data=s3://dino/shards/in1k \\
        --param checkpoint_uri=s3://dino/checkpoints/run7
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE

from .kubernetes_job import KubernetesSettings, multinode_job, run_kubernetes_job
from .pretrain import progress_reporter
from .trainer_process import LaunchSpec
from .validation import retry_unless_user_error


@task(name="train-on-kubernetes", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error)
def train_on_kubernetes(config: dict[str, Any], run_id: str, launch: LaunchSpec,
                        kubernetes: KubernetesSettings) -> dict[str, Any]:
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
    update_progress_artifact(progress_id, 100.0)
    return end or {}
