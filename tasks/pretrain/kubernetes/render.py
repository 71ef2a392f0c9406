"""Fill the multi-node training Job template beside this file (``multinode-job.yaml``): what ``dino-pretrain``
submits with ``launcher="kubernetes"`` (:mod:`tasks.pretrain.kubernetes.job`), also as a command for a manual
launch.

    # multi-node training: Service + ConfigMap + Indexed Job running torchrun (c10d rendezvous on pod 0)
    python -m tasks.pretrain.kubernetes.render --name dino-vits16-run1 --image registry.example/dino:0.1 \\
        --nnodes 4 --gpus-per-node 8 --config resolved-config.json \\
        --env MLFLOW_TRACKING_URI=http://mlflow.dino:5000 --env MLFLOW_RUN_ID=<run id> \\
        [train.epochs=100 ...] | kubectl apply -f -

From Python::

    from tasks.pretrain.kubernetes.render import render_multinode_job, to_yaml
    manifests = render_multinode_job(MultiNodeJob(name=..., image=..., nnodes=4, gpus_per_node=8, config=cfg,
                                                   env={"MLFLOW_TRACKING_URI": ..., "MLFLOW_RUN_ID": run_id}))
    subprocess.run(["kubectl", "apply", "-f", "-"], input=to_yaml(manifests), text=True, check=True)

The trainer command is the single-node launcher's own (:func:`tasks.pretrain.trainer_process.torchrun_command`),
so one node and many nodes start ``dino_model.train`` the same way. Templates use ``{{ name }}`` placeholders: a
string that is exactly one placeholder takes the value with its type (an int stays an int, a list stays a list); a
placeholder inside a longer string is replaced by the value's text. A missing value is an error naming the placeholder
(:func:`fill`, which ``infra/k8s/work_pool.py`` also uses to preview the work pool's job).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.pretrain.trainer_process import LaunchSpec, torchrun_command

HERE = Path(__file__).resolve().parent
MULTINODE_TEMPLATE = HERE / "multinode-job.yaml"
#: Where the ConfigMap with the resolved training config is mounted in every pod.
CONFIG_PATH = "/etc/dino/config.json"

_PLACEHOLDER = re.compile(r"{{\s*([\w.\-]+)\s*}}")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: Environment names that carry secrets: they belong in the Kubernetes Secret, never in a rendered manifest.
_SECRET_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY|PRIVATE)", re.IGNORECASE)


class RenderError(ValueError):
    """A value is missing or invalid; the message names it."""


def fill(template: Any, values: dict[str, Any]) -> Any:
    """``template`` with every ``{{ name }}`` replaced from ``values`` (see the module docstring)."""
    if isinstance(template, dict):
        return {fill(k, values): fill(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(v, values) for v in template]
    if not isinstance(template, str):
        return template
    whole = _PLACEHOLDER.fullmatch(template.strip())
    if whole:
        return copy.deepcopy(_lookup(values, whole.group(1)))
    return _PLACEHOLDER.sub(lambda m: str(_lookup(values, m.group(1))), template)


def _lookup(values: dict[str, Any], name: str) -> Any:
    if name not in values:
        raise RenderError(f"no value for template placeholder {{{{ {name} }}}}")
    return values[name]


def placeholders(template: Any) -> set[str]:
    """Every placeholder name used in ``template``."""
    if isinstance(template, dict):
        return set().union(*(placeholders(k) | placeholders(v) for k, v in template.items())) if template else set()
    if isinstance(template, list):
        return set().union(*(placeholders(v) for v in template)) if template else set()
    return set(_PLACEHOLDER.findall(template)) if isinstance(template, str) else set()


# ------------------------------------------------------------------------------------------------------------------
# multi-node training job
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class MultiNodeJob:
    """One multi-node training: what :func:`render_multinode_job` needs."""

    name: str
    """Job, Service and ConfigMap name (DNS label, at most 50 characters so pod names ``<name>-<index>`` fit)."""
    image: str
    """Trainer image (``infra/docker/Dockerfile``), the same on every node."""
    nnodes: int
    """Pods, one per node."""
    gpus_per_node: int
    """GPUs per pod = torchrun ``--nproc_per_node``. 0 runs one CPU (gloo) process per pod."""
    config: dict[str, Any]
    """The resolved training config (what ``dino-pretrain``'s train task writes), mounted at ``/etc/dino``."""
    env: dict[str, str] = field(default_factory=dict)
    """Non-secret environment for the trainer: ``MLFLOW_TRACKING_URI``, ``MLFLOW_RUN_ID``, ``AWS_ENDPOINT_URL``..."""
    overrides: list[str] = field(default_factory=list)
    """``section.field=value`` overrides appended to the trainer's command line."""
    namespace: str = "dino"
    """Kubernetes namespace."""
    secret_name: str = "dino-s3"
    """Secret with the S3 credentials, loaded with ``envFrom``."""
    rdzv_port: int = 29500
    """c10d rendezvous port on pod 0."""
    rdzv_id: str | None = None
    """Rendezvous id shared by the pods (default: the job name)."""
    cpu: str = "16"
    """CPU request per pod."""
    memory: str = "128Gi"
    """Memory request and limit per pod."""
    shm_size: str = "32Gi"
    """``/dev/shm`` size (DataLoader workers pass batches through shared memory)."""
    node_selector: dict[str, str] = field(default_factory=dict)
    """e.g. ``{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}``."""

    def validate(self) -> None:
        if not (_DNS_LABEL.match(self.name or "") and len(self.name) <= 50):
            raise RenderError(f"name must be a DNS label (lowercase letters, digits, '-') of at most 50 characters, "
                              f"got {self.name!r}")
        if not _DNS_LABEL.match(self.namespace or ""):
            raise RenderError(f"namespace must be a DNS label, got {self.namespace!r}")
        if not self.image or any(c.isspace() for c in self.image):
            raise RenderError(f"image must be an image reference, got {self.image!r}")
        if not isinstance(self.nnodes, int) or self.nnodes < 1:
            raise RenderError(f"nnodes must be a positive integer, got {self.nnodes!r}")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise RenderError(f"gpus_per_node must be an integer >= 0, got {self.gpus_per_node!r}")
        if not 1 <= self.rdzv_port <= 65535:
            raise RenderError(f"rdzv_port must be a TCP port, got {self.rdzv_port!r}")
        if not isinstance(self.config, dict) or not self.config:
            raise RenderError("config must be the resolved training config (a non-empty dict)")
        for key in self.env:
            if _SECRET_ENV.search(key):
                raise RenderError(f"env {key} looks like a credential: put it in the Secret {self.secret_name!r} "
                                  "(loaded with envFrom), not in the manifest")

    @property
    def rdzv_endpoint(self) -> str:
        # Pod 0 of the Indexed Job, through the headless Service: stable before any pod is ready.
        return f"{self.name}-0.{self.name}:{self.rdzv_port}"

    def command(self) -> list[str]:
        spec = LaunchSpec(nproc_per_node=max(self.gpus_per_node, 1), nnodes=self.nnodes,
                          rdzv_endpoint=self.rdzv_endpoint, rdzv_id=self.rdzv_id or self.name)
        if self.nnodes == 1:  # one pod: torchrun's standalone mode needs no rendezvous service
            spec.rdzv_endpoint = ""
        # The container's own python, not the renderer's interpreter path.
        return ["python", *torchrun_command(spec, CONFIG_PATH, list(self.overrides))[1:]]


def render_multinode_job(job: MultiNodeJob, template: str | Path = MULTINODE_TEMPLATE) -> list[dict[str, Any]]:
    """The Service, ConfigMap and Indexed Job of one multi-node training, as Kubernetes manifests (dicts)."""
    job.validate()
    docs = [d for d in yaml.safe_load_all(Path(template).read_text()) if d]
    env = [{"name": k, "value": str(v)} for k, v in sorted(job.env.items())]
    env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
    values = {
        "job_name": job.name,
        "namespace": job.namespace,
        "image": job.image,
        "nnodes": job.nnodes,
        "gpus_per_node": job.gpus_per_node,
        "rdzv_port": job.rdzv_port,
        "command": job.command(),
        "env": env,
        "secret_name": job.secret_name,
        "config_json": json.dumps(job.config, indent=1, sort_keys=True),
        "cpu": job.cpu,
        "memory": job.memory,
        "shm_size": job.shm_size,
        "node_selector": dict(job.node_selector),
    }
    unused = set(values) - placeholders(docs)
    if unused:
        raise RenderError(f"template {template} does not use {sorted(unused)}: renderer and template disagree")
    return [fill(d, values) for d in docs]


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(manifests, sort_keys=False, width=120)


def key_value_pairs(items: list[str], what: str) -> dict[str, Any]:
    """``["A=1", "B=x"]`` -> ``{"A": "1", "B": "x"}``; an item without ``=`` is a :class:`RenderError` naming
    ``what``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RenderError(f"{what} must be KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.pretrain.kubernetes.render", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--config", required=True, help="resolved training config (JSON file)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE (non-secret), repeatable")
    p.add_argument("--namespace", default="dino")
    p.add_argument("--secret-name", default="dino-s3")
    p.add_argument("--rdzv-port", type=int, default=29500)
    p.add_argument("overrides", nargs="*", help="section.field=value overrides for the trainer")
    args = p.parse_args(argv)
    try:
        job = MultiNodeJob(name=args.name, image=args.image, nnodes=args.nnodes, gpus_per_node=args.gpus_per_node,
                           config=json.loads(Path(args.config).read_text()), env=key_value_pairs(args.env, "--env"),
                           overrides=args.overrides, namespace=args.namespace, secret_name=args.secret_name,
                           rdzv_port=args.rdzv_port)
        sys.stdout.write(to_yaml(render_multinode_job(job)))
        return 0
    except RenderError as e:
        print(f"render: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
