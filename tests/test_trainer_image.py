"""The trainer image (``infra/docker/Dockerfile``) built for real with Podman and run the way users and Kubernetes
run it, against the host's SeaweedFS and MLflow servers (``--network host``, servers on 127.0.0.1).

One build per test session (:func:`infra.image.build.build_image` on a Debian base made here with debootstrap, this
machine's pip configuration through read-only bind mounts), then:

* ``dino --help`` and the pinned torch pair as the image's non-root user, the image's labels;
* a tiny ``dino pretrain`` (Prefect flow, torchrun, MLflow run and registration) inside the container;
* the exact command and environment the Kubernetes Job template renders for a pod, as the pod's first process:
  a checkpoint in S3 and the MLflow run it trained into;
* SIGTERM to that first process, as a pod deletion sends it: a checkpoint before the template's termination grace
  runs out;
* no credentials in the image: history, config and every layer, including a stand-in credential planted in the
  build's pip configuration.

Cost on the project's 2-core machine (docs/benchmarks.md, "Trainer image"): cold (no base, no cached layers) about
15 min on a busy machine, of which base and build about 9; warm (Podman's store holds the base and the layers)
about 5 min, nearly all of it the two trainings in containers.
Needs root, ``podman``, ``runc`` and ``debootstrap`` (``.ci/run`` installs them): skipped elsewhere, a failure in CI.

    .venv/bin/python -m pytest tests/test_trainer_image.py -p no:randomly -x -q
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import secrets
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import pytest

from dino_model.checkpoint_names import latest_checkpoint, list_checkpoints
from dino_model.config import load_config
from dino_model.metrics import parse_progress_line
from infra.image.build import REPOSITORY, ROOT, build_image, project_version
from infra.image.pip_config import MOUNT_POINT, effective_pip_config, for_build
from infra.image.pod import PodContainer
from infra.image.podman import Podman
from tasks.pretrain.kubernetes.render import render_multinode_job
from tasks.pretrain.kubernetes.job import KubernetesJobSpec, job_name, multinode_job
from tasks.pretrain.trainer_process import LaunchSpec
from tests.datasets import write_colour_set
from tests.prerequisites import require_binaries, require_root
from tests.test_pretrain_flow import TINY

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(3600)]  # the first test includes a cold build

#: A stand-in credential planted in the build's pip configuration: it must reach the build and never the image.
CANARY = "dino-canary-credential-5f0c2a9e71"
#: One tag per checkout: concurrent test runs in other worktrees on this machine never move or remove this one.
IMAGE_TAG = f"{REPOSITORY}:tests-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:10]}"
CHECKOUT_LABEL = "dino.tests.checkout"
SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "API_KEY", "PRIVATE")


# ------------------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")  # before the session's servers: a missing engine starts none of them
def podman() -> Podman:
    require_binaries(["podman", "runc", "debootstrap"], "apt-get install podman runc debootstrap (.ci/run does)")
    require_root("debootstrap and rootful Podman")
    return Podman()


@pytest.fixture(scope="module")
def pip_env(tmp_path_factory) -> dict[str, str]:
    """This process's environment plus one more global pip config file (``XDG_CONFIG_DIRS``) holding the canary."""
    xdg = tmp_path_factory.mktemp("pip-canary")
    (xdg / "pip").mkdir()
    # A section `pip install` never reads: harmless to the build, yet part of the mounted configuration.
    (xdg / "pip" / "pip.conf").write_text(f"[download]\ntrusted-host = {CANARY}.invalid\n")
    return {**os.environ, "XDG_CONFIG_DIRS": f"{xdg}:{os.environ.get('XDG_CONFIG_DIRS', '/etc/xdg')}"}


@pytest.fixture(scope="module")
def trainer_image(podman, pip_env, tmp_path_factory):
    """This checkout's image, built once per session (from Podman's cache when nothing changed)."""
    _remove_images_of_deleted_checkouts(podman)
    log = tmp_path_factory.mktemp("image-build") / "build.log"
    with open(log, "w") as out:
        build = build_image(base="debian", tag=IMAGE_TAG, pip_env=pip_env, podman=podman,
                            log=lambda line: print(line, file=out, flush=True),
                            extra_labels={CHECKOUT_LABEL: str(ROOT)})
    print(build.summary())
    return build


def _remove_images_of_deleted_checkouts(podman: Podman) -> None:
    """The test images of checkouts that no longer exist (CI's clean clones), with the layers only they used: a
    dependency change would otherwise leave a 7 GB layer behind per clone."""
    listing = json.loads(podman.run("images", "--format", "json", "--filter", f"label={CHECKOUT_LABEL}").stdout or "[]")
    for image in listing:
        checkout = (image.get("Labels") or {}).get(CHECKOUT_LABEL)
        if checkout and not Path(checkout).exists():
            for name in image.get("Names") or []:
                if name.startswith(f"{REPOSITORY}:tests-"):
                    podman.run("rmi", name, check=False)


@pytest.fixture(scope="module")
def s3(seaweedfs):
    """The SeaweedFS variables (endpoint, credentials) that containers get by name, and a fresh bucket."""
    from dino_model.storage import S3Store
    from tests.conftest import wait_until_writable

    bucket = f"image-{secrets.token_hex(4)}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in seaweedfs.env().items():
            mp.setenv(key, value)
        store = S3Store(f"s3://{bucket}")
        store.ensure_bucket()
        wait_until_writable(store)
    return seaweedfs.env(), f"s3://{bucket}"


@pytest.fixture(scope="module")
def shards(s3, tmp_path_factory) -> str:
    """32 images in 4 classes as 4 shards in S3 (8 steps per epoch at batch 4 on one process)."""
    env, bucket = s3
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        return write_colour_set(tmp_path_factory.mktemp("images"), f"{bucket}/shards", range(4), per_class=8, seed=3,
                                name="tiny")


@pytest.fixture
def s3_client_env(s3, monkeypatch):
    """This process reads the checkpoints the containers wrote."""
    for key, value in s3[0].items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def _output(done: subprocess.CompletedProcess) -> str:
    return f"exit code {done.returncode}\n--- stdout ---\n{done.stdout[-6000:]}\n--- stderr ---\n{done.stderr[-6000:]}"


def _pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split("==") for d in deps if d.split("==")[0] in ("torch", "torchvision"))


# ------------------------------------------------------------------------------------------------------------------
# the image as users run it
# ------------------------------------------------------------------------------------------------------------------


def test_dino_runs_in_the_image_as_its_non_root_user(trainer_image, podman):
    image = podman.inspect_image(trainer_image.image_id)
    assert image["Config"]["User"] == "1000:1000"
    labels = image["Config"]["Labels"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert labels["org.opencontainers.image.version"] == project_version() == trainer_image.labels[
        "org.opencontainers.image.version"]
    assert labels["org.opencontainers.image.revision"] == head.stdout.strip()
    script = ("id -u; id -g; echo $HOME; "
              "python -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)'; dino --help")
    done = _run(podman.run_command(trainer_image.image_id, ["sh", "-c", script]), timeout=600)
    assert done.returncode == 0, _output(done)
    uid, gid, home, versions, *help_lines = done.stdout.splitlines()
    assert (uid, gid, home) == ("1000", "1000", "/home/dino")
    pins = _pins()
    # the CUDA build's local version label ("2.14.1+cu130") aside, the project's pins
    assert [v.split("+")[0] for v in versions.split()] == [pins["torch"], pins["torchvision"]], versions
    help_text = "\n".join(help_lines)
    for command in ("shard", "pretrain", "extract", "evaluate", "reevaluate", "pipeline", "demo", "register"):
        assert command in help_text, help_text


def test_a_tiny_dino_pretrain_in_the_container(trainer_image, podman, s3, shards, mlflow_server, s3_client_env):
    from mlflow.tracking import MlflowClient

    s3_env, bucket = s3
    checkpoints = f"{bucket}/cli-run"
    args = ["dino", "pretrain", shards, checkpoints, "--preset", "reference", "--experiment", "image-cli",
            "--registered-model", "dino-image"]
    for override in TINY + ["train.epochs=1"]:
        args += ["--set", override]
    env_values = {"MLFLOW_TRACKING_URI": mlflow_server.url, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    cmd = podman.run_command(trainer_image.image_id, args, env_values=env_values, env_names=sorted(s3_env))
    assert not any(value in " ".join(cmd) for value in (s3_env["AWS_SECRET_ACCESS_KEY"], s3_env["AWS_ACCESS_KEY_ID"]))
    done = _run(cmd, env=s3_env)
    assert done.returncode == 0, _output(done)

    client = MlflowClient(mlflow_server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("image-cli").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["stop_reason"] == "completed"
    assert run.data.tags["steps_done"] == run.data.tags["steps_total"] == "8"
    assert run.data.tags["git_commit"] == trainer_image.labels["org.opencontainers.image.revision"]  # no .git inside
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 9))
    assert [step for step, _ in list_checkpoints(checkpoints)][-1] == 8
    assert run.data.tags["checkpoint"] == latest_checkpoint(checkpoints)
    version = client.get_model_version_by_alias("dino-image", "candidate")
    assert version.run_id == run.info.run_id


# ------------------------------------------------------------------------------------------------------------------
# the image as a Kubernetes pod runs it
# ------------------------------------------------------------------------------------------------------------------


def _pod(image: str, mlflow_url: str, checkpoints: str, shards: str, overrides: list[str]):
    """The rendered pod of a one-node CPU Job of ``dino-pretrain`` (launcher=kubernetes) and its MLflow run id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_url)
    experiment = f"image-pod-{secrets.token_hex(3)}"
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    config = load_config(None, preset="reference", overrides=TINY + overrides + [
        f'data.source="{shards}"', f'checkpoint.uri="{checkpoints}"']).to_dict()
    settings = KubernetesJobSpec(image=IMAGE_TAG, job_name=job_name("dino-image", run_id), gpus_per_node=0)
    launch = LaunchSpec(nproc_per_node=1, nnodes=1)
    assert settings.problems(launch) == []
    manifests = render_multinode_job(multinode_job(config, run_id, mlflow_url, launch, settings))
    return PodContainer.from_manifests(manifests, index=0), run_id


def test_the_kubernetes_pod_command_trains_in_the_image(trainer_image, podman, s3, shards, mlflow_server,
                                                        s3_client_env, tmp_path):
    from mlflow.tracking import MlflowClient

    s3_env, bucket = s3
    checkpoints = f"{bucket}/pod-run"
    pod, run_id = _pod(IMAGE_TAG, mlflow_server.url, checkpoints, shards, ["train.epochs=2"])
    assert pod.command[:3] == ["python", "-m", "torch.distributed.run"] and "--standalone" in pod.command
    assert pod.env["MLFLOW_RUN_ID"] == run_id and pod.env["JOB_COMPLETION_INDEX"] == "0"
    # The Secret (envFrom) holds the S3 endpoint and credentials; the tag may have moved (a concurrent build on
    # this machine): the pod runs this build's image by ID.
    cmd = pod.podman_command(podman, tmp_path / "configmap", secret_env=sorted(s3_env),
                             image=trainer_image.image_id)
    done = _run(cmd, env=s3_env)
    assert done.returncode == 0, _output(done)

    assert [step for step, _ in list_checkpoints(checkpoints)][-1] == 16  # 2 epochs x 8 steps
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    assert run.data.tags["stop_reason"] == "completed" and run.data.tags["steps_done"] == "16"
    assert run.data.tags["checkpoint"] == latest_checkpoint(checkpoints)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 17))


def test_sigterm_to_the_pods_first_process_leaves_a_checkpoint(trainer_image, podman, s3, shards, mlflow_server,
                                                               s3_client_env, tmp_path):
    """A pod deletion: SIGTERM to PID 1 (torchrun), SIGKILL after terminationGracePeriodSeconds. No checkpoint
    is due before the end of a 1000-epoch run, so a checkpoint can only come from the stop."""
    from mlflow.tracking import MlflowClient

    s3_env, bucket = s3
    checkpoints = f"{bucket}/pod-stop"
    pod, run_id = _pod(IMAGE_TAG, mlflow_server.url, checkpoints, shards, [
        "train.epochs=1000", "checkpoint.every_n_steps=0", "checkpoint.every_n_epochs=1000"])
    name = f"dino-pod-{secrets.token_hex(4)}"
    cmd = pod.podman_command(podman, tmp_path / "configmap", secret_env=sorted(s3_env), name=name,
                             image=trainer_image.image_id)
    proc = subprocess.Popen(cmd, env={**os.environ, **s3_env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in proc.stdout], daemon=True).start()
    try:
        step = _wait_for_step(proc, lines, seen, timeout=900)
        first = podman.run("exec", name, "cat", "/proc/1/cmdline").stdout.split("\0")[:-1]
        assert first == pod.command  # the pod's first process is the template's command, no init in between
        podman.run("kill", "--signal", "TERM", name)
        proc.wait(timeout=pod.termination_grace_s)  # Kubernetes would SIGKILL it after this
    finally:
        if proc.poll() is None:
            podman.run("kill", "--signal", "KILL", name, check=False)
            proc.wait(60)
    _drain(lines, seen)
    records = [r for r in map(parse_progress_line, seen) if r]
    saved = [step for step, _ in list_checkpoints(checkpoints)]
    assert len(saved) == 1 and step <= saved[0] < 1000 * 8, "\n".join(seen[-40:])
    assert any(r["event"] == "checkpoint" for r in records), "\n".join(seen[-40:])
    run = MlflowClient(mlflow_server.url).get_run(run_id)
    assert run.data.tags["stop_reason"] == "cancelled"
    assert run.data.tags["checkpoint"] == latest_checkpoint(checkpoints)


def _wait_for_step(proc: subprocess.Popen, lines: queue.Queue, seen: list[str], timeout: float) -> int:
    """The first training step the trainer reports (its progress line), waiting at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=5)
        except queue.Empty:
            assert proc.poll() is None, "the pod's container exited before training:\n" + "\n".join(seen[-60:])
            continue
        seen.append(line)
        record = parse_progress_line(line)
        if record and record.get("event") == "step":
            return int(record["step"])
    raise AssertionError(f"no training step within {timeout:.0f} s:\n" + "\n".join(seen[-60:]))


def _drain(lines: queue.Queue, seen: list[str]) -> None:
    while True:
        try:
            seen.append(lines.get(timeout=2))
        except queue.Empty:
            return


# ------------------------------------------------------------------------------------------------------------------
# no credentials in the image
# ------------------------------------------------------------------------------------------------------------------


def test_the_image_holds_no_credentials(trainer_image, podman, pip_env):
    # The canary is part of the configuration the build mounted (else this test would prove nothing).
    host_config = for_build(effective_pip_config(env=pip_env))
    assert f"{CANARY}.invalid" in host_config.text()
    local_values = [v for section in effective_pip_config(env=pip_env).values() for value in section.values()
                    for v in value.split() if "/" in v]
    assert local_values, "this machine's pip configuration names no local index or file"

    image = podman.inspect_image(trainer_image.image_id)
    history = podman.run("history", "--no-trunc", "--format", "json", trainer_image.image_id).stdout
    recorded = json.dumps(image["Config"]) + history
    for value in [CANARY, *local_values]:
        assert value not in recorded, f"{value!r} is recorded in the image's config or history"
    for variable in image["Config"].get("Env") or []:
        name = variable.partition("=")[0]
        assert not any(word in name.upper() for word in SECRET_WORDS), variable
        assert not name.startswith(("AWS_", "PIP_INDEX", "PIP_EXTRA_INDEX", "PIP_CONFIG_FILE")), variable

    # Every layer as stored, files later deleted included (an upper layer's whiteout hides them, the layer keeps
    # them).
    driver = image["GraphDriver"]
    assert driver["Name"] == "overlay", driver
    layers = [*driver["Data"].get("LowerDir", "").split(":"), driver["Data"]["UpperDir"]]
    layers = [Path(p) for p in layers if p]
    found = subprocess.run(["grep", "-rlsF", "--devices=skip", "-e", CANARY, *map(str, layers)],
                           capture_output=True, text=True, timeout=1800)
    assert found.returncode == 1 and not found.stdout, f"the canary is in the image's layers:\n{found.stdout}"
    confs = subprocess.run(["find", *map(str, layers), "-name", "pip.conf"], capture_output=True, text=True,
                           timeout=1800)
    assert confs.returncode == 0 and not confs.stdout, f"pip configuration files in the image's layers:\n{confs.stdout}"
    for layer in layers:
        mount_point = layer / MOUNT_POINT.lstrip("/")
        assert not mount_point.exists() or not any(mount_point.iterdir()), f"{mount_point} is not empty"
