"""The operator path end to end on 127.0.0.1: the local stack (SeaweedFS with credentials, MLflow with artifacts in
S3, a Prefect server with its own PREFECT_HOME, a process worker) started by ``infra.stack``, then — as
``docs/operator-guide.md`` says — ``prefect --no-prompt deploy --all`` from the repository root and ``prefect
deployment run dino-pretrain/default --params ...`` with a tiny training; the worker runs it in a subprocess that
gets MLflow and S3 from the worker's environment (nothing secret in ``prefect.yaml``), and the MLflow registry
gains a version. The stack is stopped by PID at the end (worker first)."""

from __future__ import annotations

import json
import re
import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from infra.services import free_port, run_prefect
from infra.stack import StackConfig, down, load_or_create_credentials, up
from tests.test_pretrain_flow import TINY

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture
def tiny_image_shards(tmp_path):
    """16 random 40-px images in 2 classes, as 2 shards on local disk (the worker runs on this machine)."""
    from dino_model.data.shard_writer import ShardOptions, write_dataset
    from dino_model.data.sources import SourceSpec, scan_source

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"img{i}.jpg", quality=90)
    dest = tmp_path / "shards"
    write_dataset(scan_source(SourceSpec(str(root))), str(dest), ShardOptions(name="tiny", shard_size=8))
    return str(dest)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _post(url: str, body: dict) -> list | dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _wait_for_flow_run(api: str, flow_run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _get(f"{api}/flow_runs/{flow_run_id}")
        if run["state"]["type"] in TERMINAL:
            return run
        time.sleep(2)
    return _get(f"{api}/flow_runs/{flow_run_id}")


def _flow_run_logs(api: str, flow_run_id: str) -> str:
    logs = _post(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    return "\n".join(entry["message"] for entry in logs)[-6000:]


@pytest.mark.slow
def test_stack_deploy_all_and_run_pretrain_through_a_worker(tmp_path, tiny_image_shards):
    cfg = StackConfig(dir=tmp_path / "stack", prefect_port=free_port(), mlflow_port=free_port(), s3_port=free_port())
    pids: list[int] = []
    try:
        report = up(cfg)
        assert set(report) == {"seaweedfs", "mlflow", "prefect", "worker"}
        assert all(r["healthy"] for r in report.values()), report
        pids = [r["pid"] for r in report.values()]
        # Idempotent: a second `up` finds everything healthy and starts no second copy.
        assert [r["pid"] for r in up(cfg).values()] == pids

        urls = cfg.urls
        api = urls["prefect"]
        # The stack's S3 refuses anonymous requests.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urls["seaweedfs"] + "/dino/", timeout=10)
        assert refused.value.code == 403

        # -- deploy, exactly as the operator guide says (the stack created the work pool) -----------------------
        client_home = tmp_path / "prefect-client"
        run_prefect(["deploy", "--all"], api, client_home, cwd=ROOT, timeout=400)
        nightly = _get(f"{api}/deployments/name/dino-reevaluate/nightly")
        (schedule,) = nightly["schedules"]
        assert schedule["schedule"]["cron"] == "0 3 * * *" and schedule["active"]
        assert schedule["schedule"]["timezone"] == "UTC"
        assert nightly["parameters"]["settings"]["train_data"] and nightly["work_pool_name"] == cfg.pool
        pretrain = _get(f"{api}/deployments/name/dino-pretrain/default")
        assert pretrain["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        assert not any(k in json.dumps(pretrain) for k in load_or_create_credentials(cfg).values())

        # -- run it with tiny parameters; the stack's worker picks it up ----------------------------------------
        model = f"dino-deployed-{secrets.token_hex(3)}"
        checkpoints = f"s3://dino/checkpoints/{model}"  # written by the flow run with the worker's credentials
        params = {
            "data": tiny_image_shards,
            "checkpoint_uri": checkpoints,
            "overrides": TINY + ["train.epochs=1", "data.batch_size_per_gpu=8", "checkpoint.every_n_steps=100"],
            "registered_model": model,
            "experiment": "deployed",
            "train_retries": 0,
        }
        out = run_prefect(["deployment", "run", "dino-pretrain/default", "--params", json.dumps(params)], api,
                          client_home).stdout
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
        run = _wait_for_flow_run(api, flow_run_id, timeout=480)
        assert run["state"]["type"] == "COMPLETED", (
            f"flow run ended {run['state']['type']}: {run['state'].get('message')}\n"
            f"{_flow_run_logs(api, flow_run_id)}\n--- worker log ---\n"
            f"{(cfg.dir / 'worker' / 'worker.log').read_text(errors='replace')[-4000:]}")

        # -- the registry gained a version; artifacts and checkpoints live in the stack's S3 ---------------------
        from mlflow.tracking import MlflowClient

        client = MlflowClient(urls["mlflow"])
        versions = client.search_model_versions(f"name='{model}'")
        assert [v.version for v in versions] == ["1"]
        assert client.get_model_version_by_alias(model, "candidate").version == "1"
        import boto3

        creds = load_or_create_credentials(cfg)
        s3 = boto3.client("s3", endpoint_url=urls["seaweedfs"], region_name="us-east-1",
                          aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="dino", Prefix=f"checkpoints/{model}/")["Contents"]]
        assert any(k.endswith(".pt") for k in keys) and any("export/" in k for k in keys)
        assert s3.list_objects_v2(Bucket="dino", Prefix="mlflow/").get("KeyCount", 0) > 0
    finally:
        stopped = down(cfg)
    assert stopped == ["worker", "prefect", "mlflow", "seaweedfs"]
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert down(cfg) == []  # down when down is fine
