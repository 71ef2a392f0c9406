"""Shared fixtures: real servers on 127.0.0.1 (SeaweedFS for S3, MLflow, a Dask scheduler with two workers), started
once per session and stopped by PID; isolated Prefect and MLflow settings; paths to the shared test data."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from infra.services import start_dask_cluster, start_mlflow, start_seaweedfs

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

# Isolate Prefect and MLflow before any test imports them: no analytics, no telemetry, a temp home.
# One home per pytest-xdist worker (they inherit the controller's environment): each has its own Prefect database.
_SESSION_HOME = Path(os.environ.setdefault("DINO_TEST_HOME", f"/tmp/dino-tests-{os.getpid()}")) / os.environ.get(
    "PYTEST_XDIST_WORKER", "main")
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
(_SESSION_HOME / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level itself
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["PREFECT_LOGGING_LEVEL"] = os.environ.get("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: on a shared 2-core machine several threads spin against each other
    (up to ~8x slower), and one thread keeps CPU maths bitwise reproducible between runs of the same test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (imagenette-128, imagenet-sample, davis-mini); CI has it beside the clone."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 with credentials required, for the whole test session."""
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweedfs, monkeypatch):
    """Point boto3 (through the standard AWS variables) at the SeaweedFS server for one test."""
    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return seaweedfs


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket on the SeaweedFS server; returns its ``s3://`` URI."""
    from dino_model.storage import S3Store

    uri = f"s3://test-{secrets.token_hex(4)}"
    store = S3Store(uri)
    store.ensure_bucket()
    wait_until_writable(store)
    return uri


def wait_until_writable(store, timeout: float = 120.0) -> None:
    """SeaweedFS allocates a new bucket's volumes on its first write; on a loaded machine that allocation can
    outlast boto3's retries (``InternalError``). Make that first write here, patiently, so tests start with a
    bucket that takes writes."""
    import time

    from dino_model.storage import StorageError

    deadline = time.monotonic() + timeout
    while True:
        try:
            store.put_bytes(".writable-probe", b"ok")
            store.delete(".writable-probe")
            return
        except StorageError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (sqlite backend, local proxied artifacts)."""
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dask_cluster(seaweedfs, tmp_path_factory):
    """``dask scheduler`` + 2 single-threaded ``dask worker`` processes on 127.0.0.1 (free ports), the workers
    with the SeaweedFS credentials in their environment; ``dask_cluster.address`` is a ``--task-runner`` value."""
    cluster = start_dask_cluster(tmp_path_factory.mktemp("dask"), workers=2, env=seaweedfs.env())
    yield cluster
    cluster.stop()
