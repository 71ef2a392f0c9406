"""``launch.launcher="local"`` of ``dino-pretrain``: ``torchrun -m dino_model.train`` on this worker, followed by
:func:`tasks.pretrain.trainer_process.run_trainer` (the ``train`` task). With ``launch.nnodes > 1`` every machine runs
this flow with the same ``launch.rdzv_endpoint``.

    prefect deployment run dino-pretrain/default --param launch='{"nproc_per_node": 8}'
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dino_model.config import DinoConfig
from tasks.validation import retry_unless_user_error
from tasks.validation.pretrain_settings import PretrainSettings

from .progress_artifact import progress_reporter
from .stopping import TrainerStop
from .trainer_process import LaunchSpec, run_trainer, torchrun_command, trainer_config


class LocalLauncher:
    """torchrun on this worker (:mod:`tasks.pretrain.launchers`)."""

    def __init__(self, settings: PretrainSettings, flow_run_id: str):
        launch = settings.launch
        self.spec = LaunchSpec(nproc_per_node=launch.nproc_per_node, nnodes=launch.nnodes,
                               rdzv_endpoint=launch.rdzv_endpoint, rdzv_id=flow_run_id)
        self.retries = launch.retries

    def problems(self, cfg: DinoConfig, tracking_uri: str) -> list[str]:
        return _check_devices(cfg, self.spec)

    def train(self, config: dict[str, Any], run_id: str) -> dict[str, Any]:
        return train.with_options(retries=self.retries)(config, run_id, self.spec)


def local_accelerator(config: dict[str, Any]) -> str | None:
    """``'NVIDIA H100 80GB HBM3'`` when the trainer runs on this machine's CUDA GPUs, else None."""
    import torch

    if config.get("train", {}).get("device") == "cpu" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


@task(name="train", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error)
def train(config: dict[str, Any], run_id: str, launch: LaunchSpec) -> dict[str, Any]:
    """Run ``torchrun -m dino_model.train`` on this worker until it finishes. A retry resumes from the latest
    checkpoint (the trainer does that by itself) and logs into the same MLflow run, skipping steps it already has.
    Returns the trainer's ``end`` record.

    Stopped (the trainer then checkpoints, see :func:`tasks.pretrain.trainer_process.run_trainer`): when the flow run is
    being cancelled, the record has ``status`` ``cancelled`` (a normal outcome, logged as a warning; the flow then
    ends Cancelled); any other stop (the worker or the machine shutting down, Ctrl-C) takes its course as the
    signal it is (the flow run crashes). Neither is retried.
    """
    import mlflow

    logger = get_run_logger()
    config = trainer_config(config, run_id)
    env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_RUN_ID": run_id, **launch.extra_env}
    progress_id, on_progress = progress_reporter(logger, run_id, local_accelerator(config))
    stop = TrainerStop(logger, run_id)

    with tempfile.TemporaryDirectory() as tmp:
        config_path = os.path.join(tmp, "config.json")
        Path(config_path).write_text(json.dumps(config))
        cmd = torchrun_command(launch, config_path)
        logger.info("launching: %s", " ".join(cmd))
        return stop.follow(lambda: run_trainer(cmd, env, on_line=logger.info, on_progress=on_progress, on_stop=stop),
                           progress_id)


def _check_devices(cfg: DinoConfig, launch: LaunchSpec) -> list[str]:
    import torch

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        return ["device: train.device is 'cuda' but this worker has no CUDA GPU"]
    if torch.cuda.is_available() and cfg.train.device != "cpu" and launch.nproc_per_node > torch.cuda.device_count():
        return [f"device: nproc_per_node={launch.nproc_per_node} but this worker has {torch.cuda.device_count()} GPUs"]
    return []
