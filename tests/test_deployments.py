"""The operator path end to end on 127.0.0.1: the local stack (SeaweedFS with credentials, MLflow with artifacts in
S3, a Prefect server with its own PREFECT_HOME, a process worker) started by ``infra.stack``, then — as
``docs/operator-guide.md`` says — ``prefect --no-prompt deploy --all`` from the repository root and ``prefect
deployment run ...`` with tiny parameters; the worker runs them in subprocesses that get MLflow and S3 from the
worker's environment (nothing secret in ``prefect.yaml``).

One stack serves the module; each test makes what it needs (its own model names, images, registered versions) and
none reads what another left, so they run in any order: a training is cancelled with ``prefect flow-run cancel``
and resumed by a new flow run on the same checkpoint URI (one MLflow run, every step once, the version's records);
``dino-pipeline/default`` runs with its defaults (the one-button path: shards, training, version and evaluation on
S3 and MLflow); an evaluation gets a partial ``settings`` dict (only those fields change); the worker and a
flow-run process are SIGKILLed and the stack restarted: the zombie run is marked Crashed and the next training
starts.

Every wait is on a condition with a generous bound; the times are printed (``-s``), never asserted. Each test's
pytest timeout is the sum of its own bounds (:func:`_budget`), for the test function alone (``func_only``): the
stack's start and ``prefect deploy --all`` (module fixture, bounded by their own timeouts) count in no test."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from dino_model.mlflow_logger import epochs_text
from infra.services import free_port, prefect_env, run_prefect
from infra.stack import StackConfig, down, load_or_create_credentials, load_state, up
from tests.datasets import write_colour_set
from tests.test_pretrain_flow import TINY

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
#: 16 images, batch 4: 4 steps per epoch; 500 epochs = 2000 steps, far more than any test waits for.
LONG_TRAINING = TINY + ["train.epochs=500", "data.batch_size_per_gpu=4", "checkpoint.every_n_steps=1000"]
#: Bound of one ``prefect`` or ``dino`` command a test runs (``prefect deployment run``, ``flow-run cancel``, ...).
COMMAND_S = 180
#: Bound of one ``up`` or ``down`` of the stack inside a test (the servers' own start waits: at most 240 s).
STACK_S = 360


def _budget(waits: list[float], commands: int = 0, restarts: int = 0) -> float:
    """A test's pytest timeout: the bounds of its waits, ``commands`` commands, ``restarts`` ups or downs of the
    stack, and two minutes for everything else it does (MLflow and S3 reads)."""
    return sum(waits) + commands * COMMAND_S + restarts * STACK_S + 120


@dataclass
class Stack:
    cfg: StackConfig
    api: str
    client_home: Path
    pids: list[int]

    def deployment_run(self, name: str, params: dict) -> str:
        out = run_prefect(["deployment", "run", name, "--params", json.dumps(params)], self.api,
                          self.client_home, timeout=COMMAND_S).stdout
        return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

    def deployment_run_api(self, name: str, params: dict) -> str:
        """A flow run of deployment ``name`` created through Prefect's Python API (``run_deployment``), which,
        unlike ``prefect deployment run``, sends parameter names the deployment's schema does not list (the flat
        names the groups replaced) on to the server."""
        code = ("import json, sys\nfrom prefect.deployments import run_deployment\n"
                "run = run_deployment(sys.argv[1], parameters=json.loads(sys.argv[2]), timeout=0)\nprint(run.id)")
        out = subprocess.run([sys.executable, "-c", code, name, json.dumps(params)], env=prefect_env(
            self.api, self.client_home), capture_output=True, text=True, timeout=COMMAND_S, check=True).stdout
        return out.strip().splitlines()[-1]

    def worker_log(self) -> str:
        return (self.cfg.dir / "worker" / "worker.log").read_text(errors="replace")

    def s3(self):
        import boto3

        creds = load_or_create_credentials(self.cfg)
        return boto3.client("s3", endpoint_url=self.cfg.urls["seaweedfs"], region_name="us-east-1",
                            aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])

    def mlflow(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.cfg.urls["mlflow"])


@pytest.fixture(scope="module")
def tiny_image_shards(tmp_path_factory):
    """16 random 40-px images in 2 classes, as 2 shards on local disk (the worker runs on this machine)."""
    from dino_model.data.shard_writer import ShardOptions, write_dataset
    from dino_model.data.sources import SourceSpec, scan_source

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"img{i}.jpg", quality=90)
    dest = tmp_path_factory.mktemp("shards")
    write_dataset(scan_source(SourceSpec(str(root))), str(dest), ShardOptions(name="tiny", shard_size=8))
    return str(dest)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The local stack with every deployment of prefect.yaml, deployed as the operator guide says."""
    tmp = tmp_path_factory.mktemp("stack")
    cfg = StackConfig(dir=tmp / "stack", prefect_port=free_port(), mlflow_port=free_port(), s3_port=free_port())
    try:
        report = up(cfg)
        assert set(report) == {"seaweedfs", "mlflow", "prefect", "worker"}
        assert all(r["healthy"] for r in report.values()), report
        pids = [r["pid"] for r in report.values()]
        # Idempotent: a second `up` finds everything healthy and starts no second copy.
        assert [r["pid"] for r in up(cfg).values()] == pids
        client_home = tmp / "prefect-client"
        run_prefect(["deploy", "--all"], cfg.urls["prefect"], client_home, cwd=ROOT, timeout=400)
        yield Stack(cfg, cfg.urls["prefect"], client_home, pids)
    finally:
        down(cfg)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> list | dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _wait_for(condition, timeout: float, what: str, every: float = 1.0):
    """Poll ``condition()`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (OSError, urllib.error.URLError):  # a server restarting
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _state(api: str, flow_run_id: str) -> dict:
    return _get(f"{api}/flow_runs/{flow_run_id}")["state"]


def _wait_for_flow_run(api: str, flow_run_id: str, timeout: float) -> dict:
    _wait_for(lambda: _state(api, flow_run_id)["type"] in TERMINAL, timeout, f"flow run {flow_run_id} to end", 2)
    return _get(f"{api}/flow_runs/{flow_run_id}")


def _flow_run_logs(api: str, flow_run_id: str, min_level: int = 0) -> list[dict]:
    return _post(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]},
                                                 "level": {"ge_": min_level}}, "limit": 200})


def _explain(stack: Stack, flow_run_id: str) -> str:
    logs = "\n".join(entry["message"] for entry in _flow_run_logs(stack.api, flow_run_id))[-6000:]
    return f"{logs}\n--- worker log ---\n{stack.worker_log()[-4000:]}"


def _training_processes(flow_run_id: str) -> list[psutil.Process]:
    """torchrun and trainer processes of a flow run, wherever they are in the process tree (an orphan is reparented):
    they carry the flow run's id in the environment they inherited."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "dino_model.train" in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE \
                    and p.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


@pytest.mark.slow
@pytest.mark.timeout(_budget([480, 300, 480], commands=3), func_only=True)
def test_cancel_a_training_then_resume_it_in_the_same_mlflow_run(stack, tiny_image_shards):
    api = stack.api
    # -- deployed as the guide says (the stack created the work pool and the zombie-run automation) -----------------
    nightly = _get(f"{api}/deployments/name/dino-reevaluate/nightly")
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 3 * * *" and schedule["active"]
    assert schedule["schedule"]["timezone"] == "UTC"
    assert nightly["parameters"]["settings"]["train_data"] and nightly["work_pool_name"] == stack.cfg.pool
    pretrain = _get(f"{api}/deployments/name/dino-pretrain/default")
    assert pretrain["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    assert pretrain["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert not any(k in json.dumps(pretrain) for k in load_or_create_credentials(stack.cfg).values())
    automations = _post(f"{api}/automations/filter", {})
    assert [a["name"] for a in automations] == ["dino-crash-zombie-flow-runs"]
    with pytest.raises(urllib.error.HTTPError) as refused:  # the stack's S3 refuses anonymous requests
        urllib.request.urlopen(stack.cfg.urls["seaweedfs"] + "/dino/", timeout=10)
    assert refused.value.code == 403

    # -- a long training, cancelled mid-run ---------------------------------------------------------------------------
    model = f"dino-deployed-{secrets.token_hex(3)}"
    experiment = f"deployed-{model}"
    checkpoints = f"s3://dino/checkpoints/{model}"  # written by the flow run with the worker's credentials
    # Partial groups: the deployment's launch group keeps its other fields (launcher, nproc_per_node, nnodes).
    params = {"data": tiny_image_shards, "checkpoint_uri": checkpoints, "overrides": LONG_TRAINING,
              "tracking": {"registered_model": model, "experiment": experiment}, "launch": {"retries": 0}}
    first = stack.deployment_run("dino-pretrain/default", params)
    client = stack.mlflow()

    def training_run():
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return runs[0] if runs and len(_steps(client, runs[0].info.run_id)) >= 3 else None

    run = _wait_for(training_run, 480, "three logged training steps", every=2)
    run_prefect(["flow-run", "cancel", first], api, stack.client_home, timeout=COMMAND_S)
    cancelled_at = time.monotonic()
    ended = _wait_for_flow_run(api, first, timeout=300)
    print(f"\ncancel -> {ended['state']['type']} after {time.monotonic() - cancelled_at:.1f} s")
    assert ended["state"]["type"] == "CANCELLED", _explain(stack, first)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == "cancelled"
    stopped_at = int(run.data.tags["steps_done"])
    ckpt_keys = [o["Key"] for o in stack.s3().list_objects_v2(
        Bucket="dino", Prefix=f"checkpoints/{model}/").get("Contents", [])]
    assert f"checkpoints/{model}/checkpoint-{stopped_at:09d}.pt" in ckpt_keys  # the trainer checkpointed
    assert run.data.tags["checkpoint"] == f"{checkpoints}/checkpoint-{stopped_at:09d}.pt"
    assert _training_processes(first) == []
    infos = " ".join(e["message"] for e in _flow_run_logs(api, first))
    assert "training cancelled at step" in infos, _explain(stack, first)
    errors = [e["message"] for e in _flow_run_logs(api, first, min_level=40)]
    assert not [m for m in errors if "SIGTERM" in m or "Crash" in m], errors
    assert "exceeding memory limits" not in stack.worker_log()

    # -- a new flow run on the same URI continues the same MLflow run, and stops at max_steps -----------------------
    last_step = stopped_at + 3
    second = stack.deployment_run("dino-pretrain/default",
                                  {**params, "overrides": LONG_TRAINING + [f"train.max_steps={last_step}"]})
    ended = _wait_for_flow_run(api, second, timeout=480)
    assert ended["state"]["type"] == "COMPLETED", _explain(stack, second)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id) == list(range(1, last_step + 1))  # every step once, in one run
    outcome = {"steps_done": str(last_step), "steps_total": "2000", "epochs_done": epochs_text(last_step / 4),
               "stop_reason": "max_steps"}
    assert {k: run.data.tags.get(k) for k in outcome} == outcome
    (version,) = client.search_model_versions(f"name='{model}'")
    assert version.run_id == run.info.run_id
    assert client.get_model_version_by_alias(model, "candidate").version == "1"
    assert {k: version.tags.get(k) for k in outcome} == outcome
    assert version.tags["epochs"] == epochs_text(last_step / 4) != "500"  # what was trained, not configured
    # Checkpoints stay at checkpoint_uri; the version's artifacts are the export; MLflow holds no checkpoint copy.
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "checkpoints" not in artifacts and "loss_curve.png" in artifacts
    mlflow_keys = [o["Key"] for o in stack.s3().list_objects_v2(Bucket="dino", Prefix="mlflow/")["Contents"]]
    assert mlflow_keys and not [k for k in mlflow_keys if k.endswith(".pt")]
    ckpt_keys = [o["Key"] for o in stack.s3().list_objects_v2(Bucket="dino", Prefix=f"checkpoints/{model}/")["Contents"]]
    assert f"checkpoints/{model}/checkpoint-{last_step:09d}.pt" in ckpt_keys
    assert any("/export/" in k for k in ckpt_keys)


def _register_random_backbone(stack: Stack, tmp_path: Path, name: str) -> str:
    """A randomly initialised ViT-Tiny/16 registered as ``name`` version 1 (alias candidate) in the stack's MLflow by
    ``dino register``, as a user does (artifacts through the MLflow server, which proxies them to S3)."""
    from dino_model.export import export_backbone
    from dino_model.models import build_backbone

    export = tmp_path / "export"
    export_backbone(build_backbone("vit_tiny", patch_size=16), str(export), arch="vit_tiny", patch_size=16)
    done = subprocess.run([str(Path(sys.executable).with_name("dino")), "register", str(export), "--name", name],
                          cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": stack.cfg.urls["mlflow"]},
                          capture_output=True, text=True, timeout=COMMAND_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert stack.mlflow().get_model_version_by_alias(name, "candidate").version == "1"
    return name


@pytest.mark.slow
@pytest.mark.timeout(_budget([480], commands=2), func_only=True)
def test_a_partial_evaluation_settings_parameter_keeps_the_deployments_other_settings(stack, tiny_image_shards,
                                                                                      tmp_path):
    client = stack.mlflow()
    model = _register_random_backbone(stack, tmp_path, f"dino-partial-{secrets.token_hex(3)}")
    # The deployment's settings name s3://dino/shards/imagenette-*; this run swaps in the tiny shards and a crop
    # that fits 40-px images. Everything else (features_root, experiment, champion policy) stays the deployment's.
    settings = {"train_data": tiny_image_shards, "val_data": tiny_image_shards, "evaluations": ["knn"],
                "knn_ks": [5, 20], "resize_size": 40, "crop_size": 32, "batch_size": 8}
    flow_run_id = stack.deployment_run("dino-evaluate/default",
                                       {"model": f"models:/{model}@candidate", "settings": settings})
    ended = _wait_for_flow_run(stack.api, flow_run_id, timeout=480)
    assert ended["state"]["type"] == "COMPLETED", _explain(stack, flow_run_id)
    (run,) = client.search_runs([client.get_experiment_by_name("dino-evaluate").experiment_id],
                                f"tags.model_name = '{model}'")
    assert run.data.params["crop_size"] == "32" and run.data.params["champion_policy"] == "if_better"
    assert run.data.params["features_root"] == "s3://dino/features"
    assert run.data.params["train_data"] == run.data.params["val_data"] == tiny_image_shards
    assert "knn20_top1" in run.data.metrics and "linear_approx_best_top1" not in run.data.metrics
    (score,) = [v for k, v in client.get_model_version(model, "1").tags.items() if k.endswith(".knn20_top1")]
    assert score == f"{run.data.metrics['knn20_top1']:.2f}"
    keys = stack.s3().list_objects_v2(Bucket="dino", Prefix="features/").get("Contents", [])
    assert any(k["Key"].endswith(".parquet") for k in keys)


@pytest.mark.slow
@pytest.mark.timeout(_budget([900], commands=1), func_only=True)
def test_the_pipeline_deployment_runs_the_whole_pipeline_with_its_defaults(stack, tmp_path):
    """``dino-pipeline/default`` given only its sources, workspace and a tiny training: the shard sets, checkpoints
    and features under the S3 workspace, one training, the new version, and its evaluation with the defaults (the
    workspace's sets, k-NN and the fast probe)."""
    client = stack.mlflow()
    model = f"dino-pipeline-{secrets.token_hex(3)}"
    workspace = f"s3://dino/runs/{model}"
    write_colour_set(tmp_path / "train", tmp_path / "unused-train", range(4), 8, 0, "train")
    write_colour_set(tmp_path / "val", tmp_path / "unused-val", range(4), 3, 1, "val")
    params = {"train_source": str(tmp_path / "train"), "val_source": str(tmp_path / "val"), "workspace": workspace,
              "overrides": TINY + ["train.epochs=1"], "shard_size": 8, "experiment": model,
              "registered_model": model}
    flow_run_id = stack.deployment_run("dino-pipeline/default", params)
    ended = _wait_for_flow_run(stack.api, flow_run_id, timeout=900)
    assert ended["state"]["type"] == "COMPLETED", _explain(stack, flow_run_id)
    deployment = _get(f"{stack.api}/deployments/name/dino-pipeline/default")
    assert ended["deployment_id"] == deployment["id"] and "evaluation" not in deployment["parameters"]

    keys = [o["Key"] for o in stack.s3().list_objects_v2(Bucket="dino", Prefix=f"runs/{model}/")["Contents"]]
    for part in ("shards/train/manifest.json", "shards/val/manifest.json", "checkpoints/checkpoint-000000008.pt"):
        assert f"runs/{model}/{part}" in keys, keys
    assert any(k.startswith(f"runs/{model}/features/") and k.endswith(".parquet") for k in keys), keys
    (training,) = client.search_runs([client.get_experiment_by_name(model).experiment_id])
    assert training.info.status == "FINISHED" and training.data.tags["steps_done"] == "8"  # 32 images, batch 4
    version = client.get_model_version_by_alias(model, "champion")
    assert version.version == "1" and version.run_id == training.info.run_id
    (evaluation,) = client.search_runs([client.get_experiment_by_name("dino-evaluate").experiment_id],
                                       f"tags.model_name = '{model}'")
    params = evaluation.data.params
    assert (params["train_data"], params["val_data"], params["features_root"]) == (
        f"{workspace}/shards/train", f"{workspace}/shards/val", f"{workspace}/features")
    # four distinctly coloured classes: any backbone's 20 nearest neighbours are of the image's class
    assert evaluation.data.metrics["knn20_top1"] == pytest.approx(100.0)
    assert "linear_approx_best_top1" in evaluation.data.metrics
    assert [v for k, v in version.tags.items() if k.endswith(".knn20_top1")] == ["100.00"]


@pytest.mark.slow
@pytest.mark.timeout(_budget([480, 300, 120, 300, 600, 600, 300], commands=2, restarts=6), func_only=True)
def test_a_zombie_training_is_reaped_after_a_restart_and_stack_down_stops_a_training_cleanly(stack,
                                                                                              tiny_image_shards):
    api = stack.api
    model = f"dino-zombie-{secrets.token_hex(3)}"
    # The flat parameter names the groups replaced: still accepted (with a deprecation warning), over the
    # deployment's groups; the crash hook and the next run's open-mlflow-run find the experiment by them. (`prefect
    # deployment run` itself refuses names the deployment's schema lacks; a deployment made before the groups lists
    # them, this one does not: the API sends them as an old deployment's stored parameters would reach the flow.)
    params = {"data": tiny_image_shards, "checkpoint_uri": f"s3://dino/checkpoints/{model}",
              "overrides": LONG_TRAINING, "registered_model": model, "experiment": model, "train_retries": 0}
    client = stack.mlflow()

    def checkpoints(uri_name: str) -> list[str]:
        listing = stack.s3().list_objects_v2(Bucket="dino", Prefix=f"checkpoints/{uri_name}/").get("Contents", [])
        return [o["Key"] for o in listing if o["Key"].endswith(".pt")]

    # -- kill -9 the worker and a training flow-run process: the trainer stops by itself, with a checkpoint -------
    zombie = stack.deployment_run_api("dino-pretrain/default", params)
    worker_pid = load_state(stack.cfg)["services"]["worker"]["pid"]
    trainers = _wait_for(lambda: len(_training_processes(zombie)) >= 2 and _training_processes(zombie), 480,
                         "the zombie's torchrun and trainer", every=2)
    (torchrun,) = [p for p in trainers if "torch.distributed.run" in " ".join(p.cmdline())]
    flow_process = torchrun.parent()

    def zombie_steps() -> list[int]:
        exp = client.get_experiment_by_name(model)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return runs and _steps(client, runs[0].info.run_id)

    _wait_for(lambda: len(zombie_steps()) >= 2, 300, "the zombie's first training steps", every=2)
    # The flat names worked, and the run's log says how to spell them now.
    _wait_for(lambda: any("'train_retries' is deprecated: use launch.retries" in e["message"]
                          for e in _flow_run_logs(api, zombie, min_level=30)), 120, "the deprecation warning")
    os.kill(worker_pid, signal.SIGKILL)
    os.kill(flow_process.pid, signal.SIGKILL)
    killed = time.monotonic()
    _wait_for(lambda: not _training_processes(zombie), 300, "the orphaned trainer to stop")
    print(f"\ntrainer gone {time.monotonic() - killed:.1f} s after its flow-run process was SIGKILLed")
    assert checkpoints(model), "the trainer did not checkpoint on its parent-death signal"

    # -- a new worker; the next training waits for the zombie's slot; restart the whole stack (the server forgets
    #    the zombie's concurrency lease; the run still says Running) -----------------------------------------------
    up(stack.cfg)
    following = stack.deployment_run_api("dino-pretrain/default",
                                          {**params, "checkpoint_uri": f"s3://dino/checkpoints/{model}-next"})
    assert down(stack.cfg) == ["worker", "prefect", "mlflow", "seaweedfs"]
    assert down(stack.cfg) == []  # down when down is fine
    up(stack.cfg)
    restarted = time.monotonic()
    _wait_for(lambda: _state(api, zombie)["type"] == "CRASHED", 600, "the zombie to be marked Crashed", every=2)
    reaped = time.monotonic() - restarted
    _wait_for(lambda: _training_processes(following), 600, "the next training to start", every=2)
    started = time.monotonic() - restarted
    print(f"zombie Crashed {reaped:.0f} s after the stack was back ({reaped + restarted - killed:.0f} s after the "
          f"kill); the next training started after {started:.0f} s ({started + restarted - killed:.0f} s)")
    # The zombie ran no hook; the next training of its experiment ended its MLflow run, as the trainer recorded it.
    runs = client.search_runs([client.get_experiment_by_name(model).experiment_id])
    (abandoned,) = [r for r in runs if r.data.tags["prefect.flow_run_id"] == zombie]
    assert abandoned.info.status == "KILLED" and abandoned.data.tags["stop_reason"] == "cancelled"

    # -- `make stack-down` while it trains: the flow run stops its trainer (checkpoint) and reports, then the rest -
    _wait_for(lambda: any(r.info.run_id != abandoned.info.run_id and _steps(client, r.info.run_id) for r in
                          client.search_runs([client.get_experiment_by_name(model).experiment_id])),
              300, "the next training's first step")
    worker_pid = load_state(stack.cfg)["services"]["worker"]["pid"]
    pids = [r["pid"] for r in load_state(stack.cfg)["services"].values()]
    assert down(stack.cfg) == ["worker", "prefect", "mlflow", "seaweedfs"]
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert _training_processes(following) == []
    up(stack.cfg)
    assert _state(api, following)["type"] == "CRASHED"  # reported before the server stopped
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name(model).experiment_id])
              if r.data.tags["prefect.flow_run_id"] == following]
    # the flow-run process got SIGTERM from the worker's shutdown, no cancellation: the stop says so (issue 22)
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == "signal:SIGTERM"
    assert run.data.tags["checkpoint"].endswith(f"checkpoint-{int(run.data.tags['steps_done']):09d}.pt")
    assert checkpoints(f"{model}-next")


def test_the_zombie_automation_is_prefects_recipe_sized_to_the_deployments_heartbeat():
    import yaml
    from prefect.events.schemas.automations import AutomationCore, Posture

    from infra.services import AUTOMATIONS_FILE

    (automation,) = [AutomationCore.model_validate(a)
                     for a in yaml.safe_load(AUTOMATIONS_FILE.read_text())["automations"]]
    trigger = automation.trigger
    assert trigger.posture == Posture.Proactive and trigger.after == {"prefect.flow-run.heartbeat"}
    assert {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")} < trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}
    (action,) = automation.actions
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"
    pools = yaml.safe_load((ROOT / "prefect.yaml").read_text())["definitions"]["work_pools"]
    heartbeat = int(pools["process_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
    # Three heartbeats may go missing (a busy machine) before a live run would be taken for a zombie.
    assert heartbeat >= 30 and trigger.within.total_seconds() >= 3 * heartbeat


def test_prefect_setup_needs_the_server(monkeypatch, capsys):
    from infra.stack import parse_args

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(SystemExit):
        parse_args(["prefect-setup"])
    assert "PREFECT_API_URL" in capsys.readouterr().err
    assert parse_args(["prefect-setup", "--api", "http://127.0.0.1:4200/api"])[0] == \
        "prefect-setup:http://127.0.0.1:4200/api"
