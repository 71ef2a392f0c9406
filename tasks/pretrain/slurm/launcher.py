"""``launch.launcher="slurm"`` of ``dino-pretrain``: one side effect, the training's batch job submitted to the Slurm
cluster this worker belongs to (a login or service node) and followed to its end (:mod:`.job`).

    prefect deployment run dino-pretrain/slurm --param data=/shared/shards/in1k \\
        --param checkpoint_uri=/shared/checkpoints/run7 \\
        --param launch='{"nnodes": 2, "nproc_per_node": 8}' \\
        --param slurm='{"partition": "gpu", "time_limit": "24:00:00", "setup": ["module load cuda"]}'

The MLflow run is the flow's, as with every launcher: a job requeued at its time limit (or after a preemption)
resumes in it, and each such stop is recorded on it: ``stop_reason`` (``time_limit``, ``preempted``,
``requeued``) until the training goes on, and ``stop_history`` (``time_limit@step 40 (job 812); ...``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dino_model.config import DinoConfig
from tasks.validation.pretrain_settings import PretrainSettings
from tasks.validation.slurm_settings import SlurmSettings

from ..progress_artifact import progress_reporter
from ..stopping import TrainerStop
from ..trainer_process import trainer_config
from .batch_script import SlurmJob, render_batch_script, slurm_launch_spec
from .checks import launch_problems
from .job import run_slurm_job
from .outcome import retry_slurm_failure

#: Where job folders go when ``slurm.work_dir`` is empty.
DEFAULT_WORK_DIR = "~/.cache/dino/slurm"
#: The MLflow run's record of each time the job stopped and went on.
STOP_HISTORY_TAG = "stop_history"


def job_name(prefix: str, flow_run_id: str) -> str:
    """``<prefix>-<first 8 characters of the flow run id>``: stable across the task's retries."""
    return f"{prefix or 'dino'}-{re.sub(r'[^A-Za-z0-9]', '', flow_run_id)[:8] or 'run'}"


class SlurmLauncher:
    """A Slurm batch job of ``launch.nnodes`` nodes (:mod:`tasks.pretrain.launchers`)."""

    def __init__(self, settings: PretrainSettings, flow_run_id: str):
        launch, self.slurm = settings.launch, settings.slurm
        self.spec = slurm_launch_spec(launch.nproc_per_node, launch.nnodes, self.slurm)
        self.flow_run_id = flow_run_id
        self.retries = launch.retries

    def job(self, train_device: str) -> SlurmJob:
        """The job for a training on ``train_device`` (no GPUs asked for a CPU training unless set)."""
        s: SlurmSettings = self.slurm
        gpus = s.gpus_per_node if s.gpus_per_node is not None else (
            0 if train_device == "cpu" else self.spec.nproc_per_node)
        name = job_name(s.job_prefix, self.flow_run_id)
        work_dir = Path(os.path.expanduser(s.work_dir or DEFAULT_WORK_DIR)).resolve()
        return SlurmJob(name=name, job_dir=work_dir / name, nnodes=self.spec.nnodes,
                        nproc_per_node=self.spec.nproc_per_node, gpus_per_node=gpus, settings=s,
                        python=s.python or sys.executable, shutdown_timeout_s=self.spec.shutdown_timeout_s)

    def problems(self, cfg: DinoConfig, tracking_uri: str) -> list[str]:
        return launch_problems(self.job(cfg.train.device), cfg.data.source, cfg.checkpoint.uri, tracking_uri)

    def train(self, config: dict[str, Any], run_id: str) -> dict[str, Any]:
        job = self.job(config.get("train", {}).get("device", ""))
        return train_on_slurm.with_options(retries=self.retries)(config, run_id, job, self.flow_run_id)


@task(name="train-on-slurm", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_slurm_failure)
def train_on_slurm(config: dict[str, Any], run_id: str, job: SlurmJob, flow_run_id: str) -> dict[str, Any]:
    """Submit the training's batch job (the resolved ``config``, rank 0 logging into MLflow run ``run_id``), stream
    rank 0's log into the flow-run logs and the progress artifact, record each requeue on the MLflow run, and
    return the trainer's ``end`` record. A failed job fails the task with what happened and what to do (a retry
    submits a new job that resumes from the latest checkpoint; a health stop or someone else's scancel is not
    retried). Cancelling the flow run stops the job with a checkpoint first (``status`` ``cancelled``)."""
    import mlflow

    logger = get_run_logger()
    config = trainer_config(config, run_id)
    job.env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_RUN_ID": run_id}
    script = render_batch_script(job, flow_run_id, run_id)
    progress_id, on_progress = progress_reporter(logger, run_id)
    stop = TrainerStop(logger, run_id)

    def on_requeue(reason: str, step: int | None, job_id: str) -> None:
        record_stop(run_id, reason, step, job_id)
        logger.warning("training stopped (%s) at step %s in Slurm job %s: it goes on from its checkpoint, in the "
                       "same MLflow run", reason, step if step is not None else "?", job_id)

    logger.info("launching on Slurm: %d node(s) x %d process(es), job folder %s", job.nnodes, job.nproc_per_node,
                job.job_dir)
    return stop.follow(lambda: run_slurm_job(job, config, script, on_line=logger.info, on_progress=on_progress,
                                             on_requeue=on_requeue, on_stop=stop), progress_id)


def record_stop(run_id: str, reason: str, step: int | None, job_id: str) -> None:
    """The stop on the MLflow run: ``stop_reason`` = ``reason`` (until the training ends) and one more entry of
    ``stop_history``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    history = client.get_run(run_id).data.tags.get(STOP_HISTORY_TAG, "")
    entry = f"{reason}@step {step if step is not None else '?'} (job {job_id})"
    history = f"{history}; {entry}" if history else entry
    if len(history) > 4000:  # MLflow's tag limit: the oldest entries go
        history = "... " + history[-3990:].split("; ", 1)[-1]
    client.set_tag(run_id, STOP_HISTORY_TAG, history)
    client.set_tag(run_id, "stop_reason", reason)
