"""How ``dino-pretrain`` starts its trainer: one launcher per module, behind one small interface.

A launcher is made for one flow run from the flow's resolved settings (:func:`open_launcher`). It gives the
processes and rendezvous the trainer runs with (:attr:`Launcher.spec`, checked by the flow's first task with the
rest of the request), lists what stops it on this worker (:meth:`Launcher.problems`, run by the ``preflight`` task)
and runs the training as a Prefect task of the flow, retried ``launch.retries`` times (:meth:`Launcher.train`),
returning the trainer's ``end`` record (``status`` ``cancelled`` when the flow run is being cancelled and the
trainer has checkpointed). The MLflow run, the registration and the summary are the flow's, whatever the launcher.

==============  =======================================================================================
``local``       :mod:`tasks.pretrain.local`: ``torchrun`` on this worker (each of ``nnodes`` machines runs
                this flow's torchrun with the same ``rdzv_endpoint``)
``kubernetes``  :mod:`tasks.pretrain.kubernetes.launcher`: an Indexed Job of ``nnodes`` pods, followed with
                kubectl
``slurm``       :mod:`tasks.pretrain.slurm.launcher`: a batch job of ``nnodes`` nodes (sbatch, srun + torchrun
                per node), followed with scontrol, requeued at its time limit until the training is done
==============  =======================================================================================

A new launcher is one module with such a class (its task uses :func:`tasks.pretrain.progress_artifact.
progress_reporter` for the progress artifact and the trainer's milestones), one settings group in
:mod:`tasks.validation.pretrain_settings` and the flow's parameter for it, and one line in :data:`LAUNCHERS`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

from .trainer_process import LaunchSpec

if TYPE_CHECKING:
    from dino_model.config import DinoConfig
    from tasks.validation.pretrain_settings import PretrainSettings


class Launcher(Protocol):
    """What the flow needs of a launcher."""

    spec: LaunchSpec
    """Processes per node, nodes and rendezvous of the training (checked with the request)."""

    def problems(self, cfg: DinoConfig, tracking_uri: str) -> list[str]:
        """What stops this launch on this worker, each naming its setting (no side effect)."""

    def train(self, config: dict[str, Any], run_id: str) -> dict[str, Any]:
        """Train with the resolved ``config``, rank 0 logging into MLflow run ``run_id``, as a Prefect task of the
        calling flow run; the trainer's ``end`` record."""


#: ``launch.launcher`` -> ``module:class`` of its launcher (imported when chosen: Kubernetes needs no import
#: for a local training).
LAUNCHERS = {
    "local": "tasks.pretrain.local:LocalLauncher",
    "kubernetes": "tasks.pretrain.kubernetes.launcher:KubernetesLauncher",
    "slurm": "tasks.pretrain.slurm.launcher:SlurmLauncher",
}


def open_launcher(settings: PretrainSettings, flow_run_id: str) -> Launcher:
    """The launcher ``settings.launch.launcher`` names, for the flow run ``flow_run_id`` (its rendezvous id)."""
    module, _, name = LAUNCHERS[settings.launch.launcher].partition(":")
    return getattr(importlib.import_module(module), name)(settings, flow_run_id)
