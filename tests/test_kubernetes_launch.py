"""``dino-pretrain`` with ``launcher="kubernetes"``: what can be checked without a cluster. The manifests rendered
for the flow's parameters (torchrun command, c10d rendezvous on pod 0, env, GPU requests, the ConfigMap = the
resolved config), the kubectl command lines (data), reading kubectl's JSON, the pre-flight checks, and the errors
of a real kubectl that is missing from PATH or cannot reach a cluster. Following a live Job needs a cluster and is
not tested here (see docs/operator-guide.md, section 6)."""

from __future__ import annotations

import json
import socket

import pytest
import yaml

from dino_model.config import load_config
from tasks.pretrain.kubernetes.render import CONFIG_PATH, render_multinode_job
from tasks.pretrain.kubernetes.job import (
    KubectlError,
    KubernetesJobSpec,
    apply_command,
    delete_job_command,
    get_job_command,
    get_pods_command,
    job_failure,
    job_name,
    job_state,
    kubectl,
    logs_command,
    multinode_job,
    pod_failure,
    pod_has_logs,
    preflight_problems,
    rank0_pod,
    render_manifests,
    run_kubernetes_job,
    split_timestamp,
    timestamp_key,
)
from tasks.pretrain.trainer_process import LaunchSpec, torchrun_command, trainer_config
from tests.prerequisites import require_binaries

FLOW_RUN_ID = "3f2b9c1e-7a4d-4e2b-9f00-123456789abc"
RUN_ID = "0123456789abcdef0123456789abcdef"
TRACKING = "http://mlflow.dino.svc:5000"


def _resolved_config() -> dict:
    # What the flow's resolve-training-config task returns for these parameters.
    return load_config(None, preset="small", overrides=[
        "train.epochs=3", "optim.warmup_epochs=1", 'data.source="s3://dino/shards/in1k"', 'checkpoint.uri="s3://dino/checkpoints/run7"',
    ]).to_dict()


def _settings(**kw) -> KubernetesJobSpec:
    base = dict(image="registry.example/dino:0.1", job_name=job_name("dino-pretrain", FLOW_RUN_ID),
                namespace="dino-train", gpus_per_node=8, secret_name="dino-s3")
    return KubernetesJobSpec(**{**base, **kw})


def test_flow_parameters_render_an_indexed_job_running_torchrun_with_c10d_on_pod_zero():
    config = _resolved_config()
    settings = _settings()
    launch = LaunchSpec(nproc_per_node=8, nnodes=4, rdzv_endpoint=settings.rdzv_endpoint, rdzv_id=FLOW_RUN_ID)
    assert settings.problems(launch) == []
    service, config_map, job = render_multinode_job(multinode_job(config, RUN_ID, TRACKING, launch, settings))
    name = "dino-pretrain-3f2b9c1e"
    assert settings.job_name == name and settings.rdzv_endpoint == f"{name}-0.{name}:29500"
    for doc in (service, config_map, job):
        assert doc["metadata"]["namespace"] == "dino-train"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
    assert job["spec"]["parallelism"] == 4 and job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == name
    assert pod["terminationGracePeriodSeconds"] == 300  # a cancelled Job's trainers have time to checkpoint
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/dino:0.1"
    expected = torchrun_command(LaunchSpec(nproc_per_node=8, nnodes=4, rdzv_endpoint=f"{name}-0.{name}:29500",
                                           rdzv_id=name), CONFIG_PATH)
    assert container["command"] == ["python", *expected[1:]]
    assert {"--nnodes=4", "--nproc_per_node=8", "--rdzv-backend=c10d", f"--rdzv-endpoint={name}-0.{name}:29500",
            f"--rdzv-id={name}", "--max-restarts=0"} <= set(container["command"])
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_RUN_ID"] == RUN_ID and env["MLFLOW_TRACKING_URI"] == TRACKING
    assert container["envFrom"] == [{"secretRef": {"name": "dino-s3", "optional": True}}]
    # The ConfigMap holds the resolved config; only the logging section differs: rank 0 logs into the flow's run.
    mounted = json.loads(config_map["data"]["config.json"])
    assert mounted == trainer_config(config, RUN_ID)
    assert {k: v for k, v in mounted.items() if k != "logging"} == {k: v for k, v in config.items() if k != "logging"}
    assert mounted["logging"]["loggers"][-1] == f"mlflow:{RUN_ID}" and mounted["logging"]["progress"] is True
    # What kubectl apply reads is the same three documents.
    assert list(yaml.safe_load_all(render_manifests(multinode_job(config, RUN_ID, TRACKING, launch, settings)))) == [
        service, config_map, job]


def test_cpu_pods_and_gpu_count_must_match_the_processes():
    config = _resolved_config()
    cpu = _settings(gpus_per_node=0)
    launch = LaunchSpec(nproc_per_node=1, nnodes=2, rdzv_endpoint=cpu.rdzv_endpoint)
    assert cpu.problems(launch) == []
    (_, _, job) = render_multinode_job(multinode_job(config, RUN_ID, TRACKING, launch, cpu))
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 0 and "--nproc_per_node=1" in container["command"]
    problems = _settings(gpus_per_node=4).problems(LaunchSpec(nproc_per_node=8, nnodes=2, rdzv_endpoint="h:1"))
    assert len(problems) == 1 and "nproc_per_node=8" in problems[0] and "kubernetes.gpus_per_node=4" in problems[0]
    assert "kubernetes.image" in _settings(image="").problems(launch)[0]


def test_job_name_is_a_stable_short_dns_label():
    assert job_name("dino-pretrain", FLOW_RUN_ID) == job_name("dino-pretrain", FLOW_RUN_ID) == "dino-pretrain-3f2b9c1e"
    assert job_name("Team_A/ViT-B 16", "ABCDEF12-0000") == "team-a-vit-b-16-abcdef12"
    long = job_name("x" * 80, FLOW_RUN_ID)
    assert len(long) <= 50 and long.endswith("-3f2b9c1e")
    assert job_name("dino", "local") == "dino-local"


def test_kubectl_command_lines():
    assert apply_command("dino") == ["kubectl", "-n", "dino", "apply", "-f", "-"]
    assert get_job_command("dino", "j") == ["kubectl", "-n", "dino", "get", "job", "j", "-o", "json"]
    assert get_pods_command("dino", "j") == ["kubectl", "-n", "dino", "get", "pods", "-l", "dino.job=j", "-o", "json"]
    assert logs_command("dino", "j-0-abcde") == ["kubectl", "-n", "dino", "logs", "-f", "--timestamps=true",
                                                 "j-0-abcde", "-c", "trainer"]
    assert logs_command("dino", "p", since_time="2026-01-01T00:00:01.5Z", follow=False) == [
        "kubectl", "-n", "dino", "logs", "--timestamps=true", "p", "-c", "trainer",
        "--since-time=2026-01-01T00:00:01.5Z"]
    assert delete_job_command("dino", "j") == ["kubectl", "-n", "dino", "delete", "job", "j",
                                               "--ignore-not-found=true", "--cascade=foreground", "--wait=true"]
    assert delete_job_command("dino", "j", wait=False)[-1] == "--wait=false"


def _pod(index: str, phase: str, created: str = "2026-01-01T00:00:00Z", **status) -> dict:
    return {"metadata": {"name": f"j-{index}-{created[-3:-1]}", "creationTimestamp": created,
                         "annotations": {"batch.kubernetes.io/job-completion-index": index}},
            "status": {"phase": phase, **status}}


def test_reading_job_and_pod_status():
    assert job_state({"status": {"active": 4}}) == "running"
    assert job_state({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}) == "complete"
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                         "message": "Job has reached the specified backoff limit"}]}}
    assert job_state(failed) == "failed"
    assert job_failure(failed) == "BackoffLimitExceeded: Job has reached the specified backoff limit"
    assert job_state({"status": {"conditions": [{"type": "Failed", "status": "False"}]}}) == "running"

    pods = {"items": [_pod("1", "Running"), _pod("0", "Pending", "2026-01-01T00:00:00Z"),
                      _pod("0", "Running", "2026-01-01T00:00:09Z")]}
    zero = rank0_pod(pods)
    assert zero["metadata"]["creationTimestamp"] == "2026-01-01T00:00:09Z" and pod_has_logs(zero)
    assert rank0_pod({"items": [_pod("1", "Running")]}) is None
    assert not pod_has_logs(_pod("0", "Pending"))

    oom = _pod("0", "Failed", containerStatuses=[{"name": "trainer", "state": {"terminated": {
        "exitCode": 137, "reason": "OOMKilled"}}}])
    assert pod_failure(oom) == "pod j-0-00 container trainer exited with code 137 (OOMKilled)"
    pull = _pod("0", "Pending", containerStatuses=[{"name": "trainer", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}])
    assert "cannot start: ImagePullBackOff: Back-off pulling image" in pod_failure(pull)
    unscheduled = _pod("0", "Pending", conditions=[{"type": "PodScheduled", "status": "False",
                                                   "reason": "Unschedulable", "message": "Insufficient nvidia.com/gpu"}])
    assert pod_failure(unscheduled) == "pod j-0-00 is not scheduled: Unschedulable: Insufficient nvidia.com/gpu"
    creating = _pod("0", "Pending", containerStatuses=[{"name": "trainer", "state": {"waiting": {
        "reason": "ContainerCreating"}}}])
    assert pod_failure(creating) == "" and pod_failure(_pod("0", "Running")) == ""


def test_log_lines_with_kubectl_timestamps():
    line = '2026-01-01T10:00:00.123456789Z DINO_PROGRESS {"event": "step"}'
    assert split_timestamp(line) == ("2026-01-01T10:00:00.123456789Z", 'DINO_PROGRESS {"event": "step"}')
    assert split_timestamp("no timestamp here") == ("", "no timestamp here")
    # Kubernetes trims trailing zeros of the fraction: .5 is later than .123456789, earlier than .6.
    assert timestamp_key("2026-01-01T10:00:00.123456789Z") < timestamp_key("2026-01-01T10:00:00.5Z")
    assert timestamp_key("2026-01-01T10:00:00.5Z") < timestamp_key("2026-01-01T10:00:00.600000001Z")


def test_preflight_lists_what_stops_a_kubernetes_launch(tmp_path, monkeypatch):
    settings = _settings(gpus_per_node=1)
    launch = LaunchSpec(nproc_per_node=1, nnodes=2, rdzv_endpoint=settings.rdzv_endpoint)
    monkeypatch.setenv("PATH", str(tmp_path))  # a worker without kubectl
    problems = preflight_problems(settings, launch, str(tmp_path / "shards"), "s3://dino/ckpt", "sqlite:///m.db")
    text = "\n".join(problems)
    assert "kubectl not found on PATH (needed for `kubectl -n dino-train apply -f -`)" in text
    assert "data must be an s3:// URI" in text and "checkpoint.uri" not in text
    assert "MLFLOW_TRACKING_URI must be an http(s) MLflow server" in text


def test_missing_kubectl_fails_before_anything_is_submitted(tmp_path, monkeypatch):
    settings = _settings(gpus_per_node=0)
    launch = LaunchSpec(nproc_per_node=1, nnodes=2, rdzv_endpoint=settings.rdzv_endpoint)
    job = multinode_job(_resolved_config(), RUN_ID, TRACKING, launch, settings)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no kubectl
    lines = []
    with pytest.raises(KubectlError, match=r"kubectl not found on PATH, needed for `kubectl -n dino-train apply -f -`"):
        run_kubernetes_job(job, on_line=lines.append, on_progress=lines.append)
    assert lines == []


def test_unreachable_cluster_error_names_the_kubectl_command(tmp_path, monkeypatch):
    """A real kubectl whose cluster does not answer (a closed port on 127.0.0.1). Without kubectl it skips, and
    fails under ``CI=true`` (``.ci/run`` installs Debian's ``kubernetes-client``)."""
    require_binaries(["kubectl"], "apt-get install kubernetes-client")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "nowhere",
        "clusters": [{"name": "nowhere", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "contexts": [{"name": "nowhere", "context": {"cluster": "nowhere", "user": "nobody"}}],
        "users": [{"name": "nobody", "user": {}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    settings = _settings(gpus_per_node=0)
    launch = LaunchSpec(nproc_per_node=1, nnodes=2, rdzv_endpoint=settings.rdzv_endpoint)
    job = multinode_job(_resolved_config(), RUN_ID, TRACKING, launch, settings)
    with pytest.raises(KubectlError, match=r"`kubectl -n dino-train apply -f -` failed \(exit code \d+\): .*refused"):
        kubectl(apply_command("dino-train"), stdin=render_manifests(job), timeout=60)
    with pytest.raises(KubectlError, match=r"`kubectl -n dino-train delete job dino-pretrain-3f2b9c1e .*` failed"):
        run_kubernetes_job(job, on_line=print, on_progress=print)


def test_flow_preflight_refuses_a_kubernetes_launch_the_pods_could_not_run(tmp_path, monkeypatch):
    """Through the flow: nothing is opened in MLflow nor submitted when the launch cannot work."""
    from flows.pretrain import dino_pretrain
    from tasks.validation import PreflightError

    (tmp_path / "images" / "class0").mkdir(parents=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(PreflightError) as info:
        dino_pretrain(data=str(tmp_path / "images"), checkpoint_uri=str(tmp_path / "ckpt"), preset="small",
                      overrides=["train.device=cpu", "train.epochs=1", "optim.warmup_epochs=1"],
                      launch={"launcher": "kubernetes", "nnodes": 2}, kubernetes={"gpus_per_node": 2})
    message = str(info.value)
    assert "kubernetes.image must be the trainer image reference" in message
    assert "nproc_per_node=1 but each pod runs 2 process(es)" in message
    assert "data must be an s3:// URI" in message and "checkpoint.uri must be an s3:// URI" in message
    assert "MLFLOW_TRACKING_URI must be an http(s) MLflow server" in message
