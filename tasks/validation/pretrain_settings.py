"""``dino-pretrain``'s groups of settings (:mod:`.settings_groups`): how the trainer is launched (``launch``), the
Kubernetes Job of ``launcher="kubernetes"`` (``kubernetes``), the Slurm job of ``launcher="slurm"`` (``slurm``,
:mod:`.slurm_settings`) and where MLflow records the training (``tracking``);
and the flat parameter names they replace, still accepted with a deprecation warning::

    prefect deployment run dino-pretrain/default --param launch='{"launcher": "kubernetes", "nnodes": 4}' \\
        --param kubernetes='{"image": "registry.example/dino:0.1"}'

A launcher's own settings are one group each (``kubernetes``, ``slurm``), so a new launcher adds one group here, one
parameter to the flow and one module in :mod:`tasks.pretrain`. Prefect-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from .settings_groups import Renamed, SettingsGroup
from .slurm_settings import SlurmSettings


class LaunchSettings(SettingsGroup):
    """How the trainer is started (the processes and nodes it runs on) and relaunched after a failure."""

    launcher: Literal["local", "kubernetes", "slurm"] = Field(
        "local", description="'local' runs torchrun on this worker; 'kubernetes' submits an Indexed Job of `nnodes` "
                             "pods (torchrun with a c10d rendezvous on pod 0) with kubectl and follows it "
                             "(tasks/pretrain/kubernetes/multinode-job.yaml); 'slurm' submits a batch job of "
                             "`nnodes` nodes with sbatch (srun: one torchrun per node, c10d rendezvous on the first "
                             "node; settings in the `slurm` group) and follows it with scontrol.")
    nproc_per_node: int = Field(1, description="Training processes per machine (one per GPU; gloo processes on CPU).")
    nnodes: int = Field(1, description="Machines in the job. launcher 'local': each runs this flow's torchrun with "
                                       "`rdzv_endpoint`; 'kubernetes': the pods of the submitted Job; 'slurm': the "
                                       "nodes of the batch job.")
    rdzv_endpoint: str = Field("", description="HOST:PORT of the c10d rendezvous when nnodes > 1 (launcher 'local' "
                                               "only).")
    retries: int = Field(2, ge=0, description="How many times a failed trainer is relaunched (resuming) before the "
                                              "flow fails.")


class KubernetesSettings(SettingsGroup):
    """The training Job of ``launch.launcher="kubernetes"``."""

    image: str = Field("", description="Trainer image (infra/docker/Dockerfile); required with the kubernetes "
                                       "launcher.")
    namespace: str = Field("dino", description="Namespace of the Job (must exist).")
    gpus_per_node: int | None = Field(None, description="GPUs requested per pod (default launch.nproc_per_node; 0 = "
                                                        "CPU pods, one gloo process).")
    secret: str = Field("dino-s3", description="Name of an existing Secret loaded into the pods (S3 credentials, "
                                               "AWS_ENDPOINT_URL).")
    job_prefix: str = Field("dino-pretrain", description="Job name prefix; the name is <prefix>-<flow run id[:8]>.")


class TrackingSettings(SettingsGroup):
    """Where MLflow records the training and registers its teacher."""

    experiment: str = Field("dino-pretrain", description="MLflow experiment name.")
    registered_model: str = Field("dino-backbone", description="MLflow registered-model name that receives a new "
                                                               "version (alias candidate).")
    run_name: str | None = Field(None, description="MLflow run name (default: generated).")


@dataclass(frozen=True)
class PretrainSettings:
    """``dino-pretrain``'s groups, resolved (:func:`tasks.validation.settings_groups.resolve_groups`)."""

    launch: LaunchSettings = LaunchSettings()
    kubernetes: KubernetesSettings = KubernetesSettings()
    slurm: SlurmSettings = SlurmSettings()
    tracking: TrackingSettings = TrackingSettings()


#: The groups, by parameter name.
PRETRAIN_GROUPS = {"launch": LaunchSettings, "kubernetes": KubernetesSettings, "slurm": SlurmSettings,
                   "tracking": TrackingSettings}

#: The flat parameters of ``dino-pretrain`` before the groups, and where each went.
PRETRAIN_RENAMES = {
    "launcher": Renamed("launch", "launcher"),
    "nproc_per_node": Renamed("launch", "nproc_per_node"),
    "nnodes": Renamed("launch", "nnodes"),
    "rdzv_endpoint": Renamed("launch", "rdzv_endpoint"),
    "train_retries": Renamed("launch", "retries"),
    "k8s_image": Renamed("kubernetes", "image"),
    "k8s_namespace": Renamed("kubernetes", "namespace"),
    "k8s_gpus_per_node": Renamed("kubernetes", "gpus_per_node"),
    "k8s_secret": Renamed("kubernetes", "secret"),
    "k8s_job_prefix": Renamed("kubernetes", "job_prefix"),
    "experiment": Renamed("tracking", "experiment"),
    "registered_model": Renamed("tracking", "registered_model"),
    "run_name": Renamed("tracking", "run_name"),
}
