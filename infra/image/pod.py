"""One pod of a rendered Kubernetes Job (``tasks/pretrain/kubernetes/multinode-job.yaml``) as a local ``podman run``: the
same image, ``command:``, environment and mounts the kubelet would give its container, without a cluster.

    manifests = render_multinode_job(job)                      # Service, ConfigMap, Job
    pod = PodContainer.from_manifests(manifests, index=0)
    cmd = pod.podman_command(Podman(), config_dir, secret_env=["AWS_ACCESS_KEY_ID", ...], name="trainer-0")
    subprocess.run(cmd, env={**os.environ, **secret_values})   # the Secret's values by name, never on the command line

What carries over, as Kubernetes does it:

* ``command:`` replaces the image's ENTRYPOINT and ``args:`` (none here) its CMD, so the container's first
  process (PID 1) is what the template starts — it receives the SIGTERM of a pod deletion itself;
* ``env:`` values, the ``envFrom`` Secret (its keys passed by name from the caller's environment), and
  ``JOB_COMPLETION_INDEX`` (an Indexed Job sets it in each pod);
* the ConfigMap volume (its ``data`` written as files into ``config_dir``, mounted read-only at the ``mountPath``)
  and the memory ``emptyDir`` on ``/dev/shm`` (``--shm-size`` = its ``sizeLimit``);
* the image's USER and WORKDIR (the template sets no ``securityContext`` or ``workingDir``).

Not emulated: resource requests and limits, GPUs, the headless Service's DNS (one pod only: ``nnodes=1`` runs
torchrun standalone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .podman import Podman


class PodSpecError(ValueError):
    """The manifests hold something this translation does not handle; the message names it."""


@dataclass
class PodContainer:
    image: str
    command: list[str]
    env: dict[str, str]
    config_files: dict[str, str] = field(default_factory=dict)
    """ConfigMap data: file name -> content."""
    config_mount: str = ""
    shm_size: str | None = None
    termination_grace_s: int = 30

    @classmethod
    def from_manifests(cls, manifests: list[dict[str, Any]], index: int = 0) -> "PodContainer":
        job = _one(manifests, "Job")
        config_map = _one(manifests, "ConfigMap")
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        if container.get("args"):
            raise PodSpecError("container args: not handled (the template sets command only)")
        env = {e["name"]: str(e["value"]) for e in container.get("env", [])}
        if job["spec"].get("completionMode") == "Indexed":
            env["JOB_COMPLETION_INDEX"] = str(index)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        out = cls(image=container["image"], command=list(container["command"]), env=env,
                  termination_grace_s=int(pod.get("terminationGracePeriodSeconds", 30)))
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                if volume["configMap"]["name"] != config_map["metadata"]["name"]:
                    raise PodSpecError(f"volume {mount['name']} names ConfigMap {volume['configMap']['name']}, "
                                       "not the one rendered with the Job")
                out.config_files, out.config_mount = dict(config_map["data"]), mount["mountPath"]
            elif volume.get("emptyDir", {}).get("medium") == "Memory" and mount["mountPath"] == "/dev/shm":
                out.shm_size = _podman_size(volume["emptyDir"].get("sizeLimit"))
            else:
                raise PodSpecError(f"volume {mount['name']}: not handled")
        return out

    def podman_command(self, podman: Podman, config_dir: Path, secret_env: Iterable[str] = (),
                       name: str | None = None, image: str | None = None) -> list[str]:
        """The ``podman run`` of this container (``image`` overrides the manifest's, e.g. a local image ID).
        ``config_dir`` receives the ConfigMap's files; ``secret_env`` are the Secret's keys, read by Podman from
        the environment the command is run with (never on the command line); the pod's ``env:`` values (no
        secrets: the renderer refuses them) are given on the command line."""
        config_dir.mkdir(parents=True, exist_ok=True)
        for file_name, content in self.config_files.items():
            (config_dir / file_name).write_text(content)
        volumes = [f"{config_dir}:{self.config_mount}:ro"] if self.config_mount else []
        extra = ["--shm-size", self.shm_size] if self.shm_size else []
        return podman.run_command(image or self.image, entrypoint=self.command, name=name,
                                  env_values=self.env, env_names=list(secret_env), volumes=volumes, extra=extra)


def _one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [m for m in manifests if m.get("kind") == kind]
    if len(found) != 1:
        raise PodSpecError(f"expected one {kind} in the manifests, found {len(found)}")
    return found[0]


def _podman_size(quantity: str | None) -> str | None:
    """A Kubernetes quantity (``32Gi``, ``512Mi``) as Podman's size (``32g``, ``512m``)."""
    if quantity is None:
        return None
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(quantity))
    if not m:
        raise PodSpecError(f"sizeLimit {quantity!r}: not a binary quantity")
    number, unit = int(m.group(1)), m.group(2)
    if unit == "Ti":
        number, unit = number * 1024, "Gi"
    return f"{number}{ {'Ki': 'k', 'Mi': 'm', 'Gi': 'g', None: 'b'}[unit]}"
