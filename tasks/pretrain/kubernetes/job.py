"""Submit a multi-node training to Kubernetes and follow it with ``kubectl`` (no Prefect here: the task wraps it).

``dino-pretrain`` with ``launcher="kubernetes"`` renders ``multinode-job.yaml`` beside this file (headless Service,
ConfigMap with the resolved config, Indexed Job with one pod per node running torchrun with a c10d rendezvous on
pod 0) and then runs exactly these commands (``NS`` = ``kubernetes.namespace``, ``JOB`` =
``<kubernetes.job_prefix>-<flow run>``)::

    kubectl -n NS delete job JOB --ignore-not-found=true --wait=true     # a previous attempt's Job (retries)
    kubectl -n NS apply -f -                                             # the rendered manifests on stdin
    kubectl -n NS get job JOB -o json                                    # polled until Complete or Failed
    kubectl -n NS get pods -l dino.job=JOB -o json                       # finds pod 0 (rank 0) and failures
    kubectl -n NS logs -f --timestamps=true POD -c trainer               # rank 0's output, progress lines
    kubectl -n NS delete job JOB --ignore-not-found=true --wait=false    # on cancellation (SIGTERM / SIGINT)

kubectl uses its own configuration (``KUBECONFIG`` or ``~/.kube/config``, an in-cluster service account): this
module never sees a credential. Every command is built by a pure function below, so tests check the command lines
as data. A failed Job fails with the trainer's own error (its ``error`` progress record or last traceback line),
else the failing pod's status (exit code, ``OOMKilled``, ``ImagePullBackOff`` ...), else the Job's condition.
"""

from __future__ import annotations

import collections
import json
import re
import shlex
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import Any, Callable

from dino_model.metrics import parse_progress_line

from ..trainer_process import LaunchSpec, TrainerFailed, collapsed_error, health_stop, last_error, trainer_config
from .render import MultiNodeJob, render_multinode_job, to_yaml

#: The annotation (and, from Kubernetes 1.28, label) an Indexed Job puts on each pod: its completion index.
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
#: The trainer container's name in ``multinode-job.yaml``.
CONTAINER = "trainer"
RDZV_PORT = 29500
_NOT_DNS = re.compile(r"[^a-z0-9-]+")


class KubectlError(RuntimeError):
    """kubectl is missing or one of its commands failed; the message names the command."""


@dataclass
class KubernetesJobSpec:
    """Where and how ``dino-pretrain`` submits its training Job (its ``kubernetes`` settings, resolved for one flow
    run: :meth:`tasks.pretrain.kubernetes.launcher.KubernetesLauncher`)."""

    image: str
    """Trainer image (``infra/docker/Dockerfile``), pulled by every node."""
    job_name: str
    """Job, Service and ConfigMap name; also the rendezvous id (see :func:`job_name`)."""
    namespace: str = "dino"
    """Kubernetes namespace (it must exist, with the Secret)."""
    gpus_per_node: int = 1
    """``nvidia.com/gpu`` requested per pod = training processes per pod; 0 runs one CPU (gloo) process per pod."""
    secret_name: str = "dino-s3"
    """Existing Secret loaded into the pods with ``envFrom`` (S3 credentials and ``AWS_ENDPOINT_URL``); referenced
    by name only."""

    @property
    def rdzv_endpoint(self) -> str:
        # The same address render.MultiNodeJob gives pod 0 through the headless Service.
        return f"{self.job_name}-0.{self.job_name}:{RDZV_PORT}"

    def problems(self, launch: LaunchSpec) -> list[str]:
        """What is wrong with these settings for ``launch`` (the flow's pre-flight lists them)."""
        out = []
        if not self.image or any(c.isspace() for c in self.image):
            out.append(f"kubernetes: kubernetes.image must be the trainer image reference, got {self.image!r}")
        if self.gpus_per_node < 0:
            out.append(f"kubernetes: kubernetes.gpus_per_node must be >= 0, got {self.gpus_per_node}")
        elif max(self.gpus_per_node, 1) != launch.nproc_per_node:
            out.append(f"kubernetes: launch.nproc_per_node={launch.nproc_per_node} but each pod runs "
                       f"{max(self.gpus_per_node, 1)} process(es) (kubernetes.gpus_per_node={self.gpus_per_node}): "
                       "one training process per GPU")
        return out


def preflight_problems(settings: KubernetesJobSpec, launch: LaunchSpec, data: str, checkpoint_uri: str,
                       tracking_uri: str) -> list[str]:
    """What stops a Kubernetes launch before anything is submitted: bad settings, no kubectl, and addresses the
    pods cannot reach (they share no disk with this worker: data and checkpoints in S3, MLflow over HTTP)."""
    out = settings.problems(launch)
    if shutil.which("kubectl") is None:
        out.append("kubernetes: kubectl not found on PATH (needed for "
                   f"`{shlex.join(apply_command(settings.namespace))}`)")
    for what, uri in (("data", data), ("checkpoint.uri", checkpoint_uri)):
        if not uri.startswith("s3://"):
            out.append(f"kubernetes: {what} must be an s3:// URI the pods can read, got {uri!r}")
    if not tracking_uri.startswith(("http://", "https://")):
        out.append(f"kubernetes: MLFLOW_TRACKING_URI must be an http(s) MLflow server the pods can reach, "
                   f"got {tracking_uri!r}")
    return out


def job_name(prefix: str, flow_run_id: str) -> str:
    """``<prefix>-<first 8 characters of the flow run id>`` as a DNS label of at most 50 characters: stable across
    retries of one flow run (a retry replaces its own Job), distinct between flow runs."""
    suffix = _NOT_DNS.sub("", flow_run_id.lower())[:8] or "run"
    stem = _NOT_DNS.sub("-", prefix.lower()).strip("-")[: 50 - len(suffix) - 1].strip("-") or "dino"
    return f"{stem}-{suffix}"


def multinode_job(config: dict[str, Any], run_id: str, tracking_uri: str, launch: LaunchSpec,
                  settings: KubernetesJobSpec) -> MultiNodeJob:
    """The Job of one training: the trainer config (resolved config, rank 0 logging into MLflow run ``run_id``)
    in the ConfigMap, the run id and tracking URI in the pods' environment."""
    env = {**launch.extra_env, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_RUN_ID": run_id}
    return MultiNodeJob(name=settings.job_name, image=settings.image, nnodes=launch.nnodes,
                        gpus_per_node=settings.gpus_per_node, config=trainer_config(config, run_id), env=env,
                        namespace=settings.namespace, secret_name=settings.secret_name, rdzv_port=RDZV_PORT,
                        rdzv_id=settings.job_name)


def render_manifests(job: MultiNodeJob) -> str:
    """The YAML ``kubectl apply -f -`` reads."""
    return to_yaml(render_multinode_job(job))


# ------------------------------------------------------------------------------------------------------------------
# kubectl command lines (data)
# ------------------------------------------------------------------------------------------------------------------


def apply_command(namespace: str) -> list[str]:
    return ["kubectl", "-n", namespace, "apply", "-f", "-"]


def get_job_command(namespace: str, name: str) -> list[str]:
    return ["kubectl", "-n", namespace, "get", "job", name, "-o", "json"]


def get_pods_command(namespace: str, name: str) -> list[str]:
    return ["kubectl", "-n", namespace, "get", "pods", "-l", f"dino.job={name}", "-o", "json"]


def logs_command(namespace: str, pod: str, since_time: str | None = None, follow: bool = True) -> list[str]:
    cmd = ["kubectl", "-n", namespace, "logs", *(["-f"] if follow else []), "--timestamps=true", pod, "-c", CONTAINER]
    return cmd + ([f"--since-time={since_time}"] if since_time else [])


def delete_job_command(namespace: str, name: str, wait: bool = True) -> list[str]:
    # Background propagation would leave the old pods holding the hostnames <job>-<i> the new ones need.
    return ["kubectl", "-n", namespace, "delete", "job", name, "--ignore-not-found=true",
            "--cascade=foreground", f"--wait={str(wait).lower()}"]


# ------------------------------------------------------------------------------------------------------------------
# reading kubectl's JSON
# ------------------------------------------------------------------------------------------------------------------


def job_state(job: dict[str, Any]) -> str:
    """``complete``, ``failed`` or ``running`` from a Job's status conditions."""
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return "complete"
        if cond.get("type") in ("Failed", "FailureTarget"):
            return "failed"
    return "running"


def job_failure(job: dict[str, Any]) -> str:
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("type") in ("Failed", "FailureTarget") and cond.get("status") == "True":
            return f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}".rstrip(": ")
    return ""


def pod_index(pod: dict[str, Any]) -> str | None:
    meta = pod.get("metadata", {})
    return (meta.get("labels") or {}).get(INDEX_KEY) or (meta.get("annotations") or {}).get(INDEX_KEY)


def rank0_pod(pods: dict[str, Any]) -> dict[str, Any] | None:
    """Pod 0 of the Indexed Job (it runs torchrun's rank 0, the one that logs), the newest if several."""
    zero = [p for p in pods.get("items") or [] if pod_index(p) == "0"]
    return max(zero, key=lambda p: p["metadata"].get("creationTimestamp", "")) if zero else None


def pod_has_logs(pod: dict[str, Any]) -> bool:
    return pod.get("status", {}).get("phase") in ("Running", "Succeeded", "Failed")


def pod_failure(pod: dict[str, Any]) -> str:
    """Why a pod failed or cannot run, from its status ('' when nothing is wrong yet)."""
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status", {})
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        state = cs.get("state") or {}
        term = state.get("terminated")
        if term and term.get("exitCode", 0) != 0:
            detail = f": {term['message'].strip()}" if term.get("message") else ""
            return (f"pod {name} container {cs.get('name')} exited with code {term.get('exitCode')} "
                    f"({term.get('reason', 'Error')}){detail}")
        wait = state.get("waiting")
        if wait and wait.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            return f"pod {name} container {cs.get('name')} cannot start: {wait['reason']}: {wait.get('message', '')}"
    if status.get("phase") == "Failed" or status.get("reason"):
        return f"pod {name} {status.get('phase', '')} {status.get('reason', '')}: {status.get('message', '')}".strip()
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return f"pod {name} is not scheduled: {cond.get('reason', '')}: {cond.get('message', '')}"
    return ""


def split_timestamp(line: str) -> tuple[str, str]:
    """``kubectl logs --timestamps`` prefixes each line with an RFC 3339 time and a space."""
    ts, sep, text = line.partition(" ")
    return (ts, text) if sep and re.match(r"^\d{4}-\d\d-\d\dT", ts) else ("", line)


def timestamp_key(ts: str) -> tuple[str, str]:
    """Sortable form of an RFC 3339 time whose fraction may have fewer than 9 digits (Kubernetes trims zeros)."""
    head, _, frac = ts.rstrip("Z").partition(".")
    return head, frac.ljust(9, "0")


# ------------------------------------------------------------------------------------------------------------------
# running kubectl
# ------------------------------------------------------------------------------------------------------------------


def require_kubectl(cmd: list[str]) -> str:
    """kubectl's path, or :class:`KubectlError` naming ``cmd``, the command that needs it."""
    path = shutil.which("kubectl")
    if path is None:
        raise KubectlError(f"kubectl not found on PATH, needed for `{shlex.join(cmd)}` (launcher='kubernetes'): "
                           "install kubectl on this worker, configured for the cluster (KUBECONFIG or in-cluster)")
    return path


def kubectl(cmd: list[str], stdin: str | None = None, timeout: float = 120.0) -> str:
    """Run one kubectl command; its stdout, or :class:`KubectlError` naming the command and kubectl's message."""
    require_kubectl(cmd)
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise KubectlError(f"`{shlex.join(cmd)}` did not answer within {timeout:.0f} s") from e
    if done.returncode != 0:
        raise KubectlError(f"`{shlex.join(cmd)}` failed (exit code {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


class _LogFollower:
    """``kubectl logs -f`` of one pod in a thread: lines to ``on_line``, progress records to ``on_progress``.
    Reconnects continue after the last timestamp seen, so a dropped stream loses and repeats nothing."""

    def __init__(self, namespace: str, on_line: Callable[[str], None], on_progress: Callable[[dict], None],
                 tail_lines: int):
        self.namespace, self.on_line, self.on_progress = namespace, on_line, on_progress
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.pod: str | None = None
        self.last_ts = ""
        self.end_record: dict | None = None
        self.error_record: dict | None = None
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def streaming(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, pod: str, follow: bool = True) -> None:
        self.pod = pod
        cmd = logs_command(self.namespace, pod, self.last_ts or None, follow=follow)
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, args=(self._proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            ts, line = split_timestamp(raw.rstrip("\n"))
            with self._lock:
                if ts and self.last_ts and timestamp_key(ts) <= timestamp_key(self.last_ts):
                    continue  # already seen before a reconnect
                self.last_ts = ts or self.last_ts
            record = parse_progress_line(line)
            if record is None:
                self.tail.append(line)
                self.on_line(line)
                continue
            if record.get("event") == "end":
                self.end_record = record
            elif record.get("event") == "error":
                self.error_record = record
            self.on_progress(record)
        proc.wait()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
        self.join(10)


def run_kubernetes_job(
    job: MultiNodeJob,
    on_line: Callable[[str], None],
    on_progress: Callable[[dict], None],
    poll_s: float = 5.0,
    tail_lines: int = 40,
) -> dict | None:
    """Submit ``job`` and follow it until it completes (rank 0's last ``end`` record is returned) or fails
    (:class:`TrainerFailed` with the reason). SIGTERM / SIGINT delete the Job, then take their usual course."""
    ns, name = job.namespace, job.name
    require_kubectl(apply_command(ns))
    manifests = render_manifests(job)
    # A retry of the same flow run reuses the name; a Job's pod template is immutable, so replace it.
    kubectl(delete_job_command(ns, name), timeout=300)
    kubectl(apply_command(ns), stdin=manifests)
    on_line(f"submitted Job {ns}/{name}: {job.nnodes} pod(s) x {max(job.gpus_per_node, 1)} process(es), "
            f"rendezvous {job.rdzv_endpoint if job.nnodes > 1 else 'standalone'}")

    follower = _LogFollower(ns, on_line, on_progress, tail_lines)
    received: list[int] = []
    wake = threading.Event()

    def on_signal(signum, _frame):
        received.append(signum)
        wake.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    waiting_reason = ""
    try:
        while True:
            state = job_state(json.loads(kubectl(get_job_command(ns, name))))
            pods = json.loads(kubectl(get_pods_command(ns, name)))
            pod = rank0_pod(pods)
            if pod is not None and pod_has_logs(pod) and not follower.streaming and state == "running":
                follower.start(pod["metadata"]["name"])  # first time, or reconnect after a dropped stream
            reason = pod_failure(pod) if pod is not None else ""
            if reason and reason != waiting_reason:
                on_line(f"Job {ns}/{name}: {reason}")
            waiting_reason = reason
            if state != "running":
                break
            wake.wait(poll_s)
            if received:
                raise _Cancelled(received[0])
        follower.join(60)
        if pod is not None and pod_has_logs(pod) and not follower.streaming:
            follower.start(pod["metadata"]["name"], follow=False)  # whatever a dropped stream missed at the end
            follower.join(60)
    except BaseException as e:
        follower.stop()
        try:
            kubectl(delete_job_command(ns, name, wait=False))
            on_line(f"deleted Job {ns}/{name}")
        except KubectlError as delete_error:
            on_line(f"could not delete Job {ns}/{name}: {delete_error}")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        previous = {}
        if isinstance(e, _Cancelled):
            signal.raise_signal(e.signum)  # the signal's usual course (Prefect's handler, or termination)
            raise TrainerFailed(f"Job {ns}/{name} cancelled by signal {e.signum} and deleted") from None
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if state == "failed" and health_stop(follower.end_record):
        raise collapsed_error(follower.end_record, follower.tail)
    if state == "failed":
        failures = [r for r in (pod_failure(p) for p in _rank0_first(pods, pod)) if r]
        reason = ((follower.error_record or {}).get("message") or last_error(follower.tail)
                  or (failures[0] if failures else "") or job_failure(json.loads(kubectl(get_job_command(ns, name))))
                  or "the Job failed")
        detail = "\n".join(f" - {f}" for f in failures)
        raise TrainerFailed(f"Kubernetes Job {ns}/{name} failed: {reason}\n{detail}\n--- last trainer output "
                            f"(pod {follower.pod}) ---\n" + "\n".join(follower.tail))
    return follower.end_record


class _Cancelled(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _rank0_first(pods: dict[str, Any], pod: dict[str, Any] | None) -> list[dict[str, Any]]:
    others = [p for p in pods.get("items") or [] if p is not pod]
    return ([pod] if pod is not None else []) + others

