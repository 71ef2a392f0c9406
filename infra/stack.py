"""The local stack, without Docker: SeaweedFS (S3), MLflow, a Prefect server and a Prefect process worker on
127.0.0.1, each started by PID and recorded in a stack folder.

    python -m infra.stack up          # start what is not running yet (idempotent); prints the variables to export
    python -m infra.stack status      # PID, URL and health of each service
    python -m infra.stack env         # the export lines again (no secrets: it points to the credentials file)
    python -m infra.stack down        # stop the worker (its flow runs first: trainers checkpoint), Prefect, MLflow,
                                      # SeaweedFS (fine when nothing runs)
    python -m infra.stack prefect-setup [--api URL]  # on any Prefect server (default $PREFECT_API_URL): the work pool
                                      # and the zombie-run automation, each created when missing
    python -m infra.stack compose-env infra/docker/.env   # random credentials for the docker-compose stack

    infra/stack-up.sh / infra/stack-down.sh / make stack-up / make stack-down   # the same, as shell wrappers

Options (flag, or environment variable read when the flag is absent):

    --dir           DINO_STACK_DIR           stack folder (default ``.stack`` in the current directory)
    --host          DINO_STACK_HOST          bind address (default 127.0.0.1; anything else is exposed to the network)
    --prefect-port  DINO_STACK_PREFECT_PORT  default 4200
    --mlflow-port   DINO_STACK_MLFLOW_PORT   default 5000
    --s3-port       DINO_STACK_S3_PORT       default 8333
    --pool          DINO_STACK_POOL          process work pool the worker polls (default ``dino-process``)
    --no-worker                              start the servers only

What lands in the stack folder: ``credentials.env`` (mode 0600: the S3 access key and secret, generated once and
reused, so data stays readable across restarts), ``state.json`` (ports, PIDs, URLs), ``env.sh`` (the non-secret
exports), one sub-folder per service with its data and ``*.log``. SeaweedFS requires the credentials for every
request; MLflow proxies artifacts to ``s3://dino/mlflow`` so MLflow clients need no S3 credentials; the worker gets
them in its environment and passes them to the flow runs it starts (never through ``prefect.yaml``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shlex
import socket
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from infra.services import (
    HOST,
    SeaweedFS,
    ensure_automations,
    ensure_work_pool,
    start_mlflow,
    start_prefect_server,
    start_prefect_worker,
    start_seaweedfs,
    stop_pid,
)

#: The bucket the stack creates: MLflow artifacts under ``mlflow/``; shards and checkpoints wherever you like.
BUCKET = "dino"
#: Start order; ``down`` stops in reverse.
SERVICES = ("seaweedfs", "mlflow", "prefect", "worker")
#: A word in each service's command line: a recorded PID whose process lacks it was reused by something else.
_MARKERS = {"seaweedfs": "weed", "mlflow": "mlflow", "prefect": "prefect", "worker": "worker"}


class StackError(RuntimeError):
    """The stack cannot be started as asked (port taken, a service failed its health check, ...)."""


@dataclass
class StackConfig:
    """Where the stack lives and which ports it binds."""

    dir: Path = Path(".stack")
    """Stack folder: credentials, state, data and logs of every service."""
    host: str = HOST
    """Bind address of every server. 127.0.0.1 keeps the stack private to this machine."""
    prefect_port: int = 4200
    """Prefect server (API and UI)."""
    mlflow_port: int = 5000
    """MLflow tracking server (API and UI)."""
    s3_port: int = 8333
    """SeaweedFS S3 endpoint."""
    pool: str = "dino-process"
    """Process work pool created on the Prefect server and polled by the worker (the pool ``prefect.yaml`` names)."""
    worker: bool = True
    """Start a process worker too."""

    def validate(self) -> None:
        for name in ("prefect_port", "mlflow_port", "s3_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise StackError(f"{name} must be a TCP port (1-65535), got {port!r}")
        ports = [self.prefect_port, self.mlflow_port, self.s3_port]
        if len(set(ports)) != len(ports):
            raise StackError(f"prefect_port, mlflow_port and s3_port must differ, got {ports}")
        if not self.pool or any(c.isspace() for c in self.pool):
            raise StackError(f"pool must be a non-empty name without spaces, got {self.pool!r}")

    @property
    def client_host(self) -> str:
        return HOST if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def urls(self) -> dict[str, str]:
        h = self.client_host
        return {
            "seaweedfs": f"http://{h}:{self.s3_port}",
            "mlflow": f"http://{h}:{self.mlflow_port}",
            "prefect": f"http://{h}:{self.prefect_port}/api",
        }


# ------------------------------------------------------------------------------------------------------------------
# state, credentials, health
# ------------------------------------------------------------------------------------------------------------------


def _state_path(cfg: StackConfig) -> Path:
    return cfg.dir / "state.json"


def load_state(cfg: StackConfig) -> dict:
    path = _state_path(cfg)
    return json.loads(path.read_text()) if path.exists() else {"services": {}}


def _save_state(cfg: StackConfig, state: dict) -> None:
    tmp = _state_path(cfg).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(_state_path(cfg))


def credentials_path(cfg: StackConfig) -> Path:
    return cfg.dir / "credentials.env"


def load_or_create_credentials(cfg: StackConfig) -> dict[str, str]:
    """The stack's S3 credentials, generated on first use into a 0600 file and reused afterwards."""
    path = credentials_path(cfg)
    if path.exists():
        creds = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and
                     not line.startswith("#"))
        if creds.get("AWS_ACCESS_KEY_ID") and creds.get("AWS_SECRET_ACCESS_KEY"):
            path.chmod(0o600)
            return creds
        raise StackError(f"{path} lacks AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; delete it to generate new ones")
    creds = {"AWS_ACCESS_KEY_ID": "dino" + secrets.token_hex(6), "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)}
    cfg.dir.mkdir(parents=True, exist_ok=True)
    # Create with 0600 from the start: the secret never sits in a world-readable file, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# S3 credentials of the local stack's SeaweedFS (generated; keep this file private)\n")
        f.writelines(f"{k}={v}\n" for k, v in creds.items())
    return creds


def write_compose_env(path: str | Path) -> Path:
    """Random credentials for ``infra/docker/docker-compose.yml`` in a new 0600 file (never overwrites one)."""
    path = Path(path)
    values = {"S3_ACCESS_KEY": "dino" + secrets.token_hex(6), "S3_SECRET_KEY": secrets.token_hex(20),
              "POSTGRES_PASSWORD": secrets.token_urlsafe(24)}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise StackError(f"{path} exists; delete it first to generate new credentials") from None
    with os.fdopen(fd, "w") as f:
        f.write("# docker compose credentials (generated by `python -m infra.stack compose-env`; keep private)\n")
        f.writelines(f"{k}={v}\n" for k, v in values.items())
    return path


def redact(secret: str) -> str:
    """``dino1a2b…`` — enough to recognise a key, never enough to use it."""
    return secret[:4] + "…" if len(secret) > 8 else "…"


def _alive(pid: int | None, marker: str) -> bool:
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and marker in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _answers(url: str, timeout: float = 3.0) -> str | None:
    """None when ``url`` answers 2xx/3xx, else why not (for the health report)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except OSError as e:
        return f"not reachable ({getattr(e, 'reason', e)})"


def _problem(name: str, url: str) -> str | None:
    """None when the service answers its health check, else what is wrong."""
    if name == "seaweedfs":
        # An anonymous request must be refused: that both proves S3 answers and that it requires credentials.
        problem = _answers(url)
        if problem is None:
            return "S3 answers anonymous requests: credentials are not enforced"
        return None if problem in ("HTTP 401", "HTTP 403") else problem
    return _answers(url + "/health")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        # Servers set SO_REUSEADDR, so a port with connections in TIME_WAIT is free for them: probe the same way.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _require_port(cfg: StackConfig, name: str, port: int, flag: str) -> None:
    if not _port_free(cfg.host, port):
        env = "DINO_STACK_" + flag.removeprefix("--").replace("-", "_").upper()
        raise StackError(f"cannot start {name}: port {port} on {cfg.host} is already in use by another process; "
                         f"choose another with {flag} or {env}")


# ------------------------------------------------------------------------------------------------------------------
# up / down / status
# ------------------------------------------------------------------------------------------------------------------


def health(cfg: StackConfig) -> dict[str, dict]:
    """Each recorded service: PID, URL, whether the process lives and its health endpoint answers."""
    report = {}
    for name, rec in load_state(cfg).get("services", {}).items():
        alive = _alive(rec.get("pid"), _MARKERS[name])
        problem = None if not alive else _problem(name, rec["url"])
        report[name] = {**rec, "running": alive, "healthy": alive and problem is None,
                        "problem": "process not running" if not alive else problem}
    return report


def up(cfg: StackConfig, out=None) -> dict[str, dict]:
    """Start every service that is not already running and healthy; return the state of all of them.

    SeaweedFS, MLflow and the Prefect server start side by side (each waits for its own health check; MLflow only
    touches S3 when artifacts arrive), then the worker, which needs all three. A service that fails to start is
    reported with its log; the ones that did start stay recorded so ``down`` stops them.
    """
    out = out or sys.stdout
    cfg.validate()
    cfg.dir = cfg.dir.resolve()
    cfg.dir.mkdir(parents=True, exist_ok=True)
    with _locked(cfg):
        creds = load_or_create_credentials(cfg)
        state = load_state(cfg)
        services = state.setdefault("services", {})
        state["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
        current = health(cfg)
        wanted = [s for s in SERVICES if s != "worker" or cfg.worker]
        to_start = []
        for name in wanted:
            status = current.get(name)
            if status and status["healthy"]:
                print(f"{name:9s} already running (pid {status['pid']}) at {status['url']}", file=out)
                continue
            if status and status["running"]:
                # Alive but not answering: a half-started or wedged copy. Replace it rather than add a second one.
                print(f"{name:9s} pid {status['pid']} does not answer ({status['problem']}); restarting it", file=out)
                stop_pid(status["pid"])
            services.pop(name, None)
            to_start.append(name)
        # Every port checked before anything starts: a taken port fails the command, not half the stack.
        ports = {"seaweedfs": (cfg.s3_port, "--s3-port"), "mlflow": (cfg.mlflow_port, "--mlflow-port"),
                 "prefect": (cfg.prefect_port, "--prefect-port")}
        for name in to_start:
            if name in ports:
                _require_port(cfg, name, *ports[name])
        errors: dict[str, BaseException] = {}
        for phase in (("seaweedfs", "mlflow", "prefect"), ("worker",)):
            if phase == ("worker",) and "prefect" not in errors:
                try:
                    prepare_prefect(cfg.urls["prefect"], cfg.dir / "prefect-client", cfg.pool, out)
                except Exception as e:  # noqa: BLE001 - reported with the others
                    errors["prefect"] = e
                    print(f"prefect   FAILED to prepare: {e}", file=out, flush=True)
            names = [n for n in phase if n in to_start]
            if not names or errors:
                continue
            with ThreadPoolExecutor(len(names)) as pool:
                for name in names:
                    print(f"{name:9s} starting ...", file=out, flush=True)
                futures = {pool.submit(_start, cfg, name, creds, services): name for name in names}
                for future in as_completed(futures):
                    name = futures[future]
                    try:
                        server = future.result()
                    except BaseException as e:  # noqa: BLE001 - reported below, after the others finished
                        errors[name] = e
                        print(f"{name:9s} FAILED to start: {e}", file=out, flush=True)
                        continue
                    services[name] = {"pid": server.pid, "url": server.url, "log": str(server.log)}
                    _save_state(cfg, state)
                    print(f"{name:9s} up (pid {server.pid}) at {server.url}", file=out, flush=True)
        _save_state(cfg, state)
        _write_env_file(cfg)
        if errors:
            raise StackError("could not start " + ", ".join(sorted(errors)) + " (details above); the services that "
                             "started are still running: `python -m infra.stack down` stops them")
        return health(cfg)


def prepare_prefect(api_url: str, home: str | Path, pool: str, out=None) -> None:
    """What the pipeline needs on a Prefect server, created when missing (idempotent): the process work pool
    ``prefect deploy`` refuses to do without, and the automations of ``infra/prefect-automations.yaml`` (flow runs
    whose heartbeats stop are marked Crashed, which frees their concurrency slot)."""
    out = out or sys.stdout
    if ensure_work_pool(pool, api_url, home):
        print(f"prefect   work pool {pool!r} created", file=out, flush=True)
    for name in ensure_automations(api_url, home):
        print(f"prefect   automation {name!r} created", file=out, flush=True)


@contextlib.contextmanager
def _locked(cfg: StackConfig):
    """One ``up``/``down`` at a time per stack folder: two concurrent ``up`` would otherwise start two copies."""
    with open(cfg.dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start(cfg: StackConfig, name: str, creds: dict[str, str], services: dict):
    urls = cfg.urls
    if name == "seaweedfs":
        server = start_seaweedfs(cfg.dir / "seaweedfs", creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"],
                                 s3_port=cfg.s3_port, timeout=120)
        _ensure_bucket(server)
        return server
    if name == "mlflow":
        s3 = _s3_env(cfg, creds)
        # The artifact proxy is the only MLflow component that holds S3 credentials.
        return start_mlflow(cfg.dir / "mlflow", port=cfg.mlflow_port, artifacts_destination=f"s3://{BUCKET}/mlflow",
                            env=s3, timeout=180, host=cfg.host)
    if name == "prefect":
        return start_prefect_server(cfg.dir / "prefect", port=cfg.prefect_port, host=cfg.host, timeout=240)
    if name == "worker":
        for dep in ("prefect", "mlflow", "seaweedfs"):
            if dep not in services:
                raise StackError(f"cannot start the worker: {dep} is not running (start the whole stack with `up`)")
        env = {"MLFLOW_TRACKING_URI": urls["mlflow"], **_s3_env(cfg, creds)}
        return start_prefect_worker(cfg.pool, urls["prefect"], cfg.dir / "prefect-client", cfg.dir / "worker" /
                                    "worker.log", env=env, name=f"dino-local-{socket.gethostname()}")
    raise StackError(f"unknown service {name!r}")


def _s3_env(cfg: StackConfig, creds: dict[str, str]) -> dict[str, str]:
    url = cfg.urls["seaweedfs"]
    return {**creds, "AWS_ENDPOINT_URL": url, "MLFLOW_S3_ENDPOINT_URL": url, "AWS_DEFAULT_REGION": "us-east-1"}


def _ensure_bucket(server: SeaweedFS) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=server.url, aws_access_key_id=server.access_key,
                          aws_secret_access_key=server.secret_key, region_name="us-east-1")
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if BUCKET not in existing:
        client.create_bucket(Bucket=BUCKET)


def down(cfg: StackConfig, out=None) -> list[str]:
    """Stop every recorded service, worker first; return the names stopped. Nothing running is fine."""
    out = out or sys.stdout
    cfg.dir = cfg.dir.resolve()
    if not _state_path(cfg).exists():
        print("stack is not running", file=out)
        return []
    with _locked(cfg):
        state = load_state(cfg)
        services = state.get("services", {})
        stopped = []
        for name in reversed(SERVICES):
            rec = services.get(name)
            if not rec:
                continue
            if _alive(rec.get("pid"), _MARKERS[name]):
                if name == "worker":
                    # Before anything they use goes away: its flow runs stop their trainers (a checkpoint in S3),
                    # record how they ended (MLflow, Prefect) and exit.
                    stop_flow_runs(rec["pid"], out)
                stop_pid(rec["pid"], grace=30.0 if name == "worker" else 15.0)
                stopped.append(name)
                print(f"{name:9s} stopped (pid {rec['pid']})", file=out)
            services.pop(name)
            _save_state(cfg, state)
        if not stopped:
            print("stack is not running", file=out)
        return stopped


def stop_flow_runs(worker_pid: int, out=None, grace: float = 180.0) -> None:
    """SIGTERM each flow-run process the worker started (its children; each in its own process group, so the
    worker's own SIGTERM does not reach them) and wait until every process under the worker has exited: a training
    finishes its step and writes its checkpoint, the flow run reports its end. What is left after ``grace`` seconds
    (the trainer's shutdown timeout and then some) is killed."""
    out = out or sys.stdout
    try:
        worker = psutil.Process(worker_pid)
        flow_runs = worker.children()
    except psutil.Error:
        return
    if not flow_runs:
        return
    print(f"worker    stopping {len(flow_runs)} flow run(s): trainers checkpoint first ...", file=out, flush=True)
    everything = worker.children(recursive=True)
    for proc in flow_runs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(everything, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if alive:
        print(f"worker    killed {len(alive)} process(es) still running after {grace:.0f} s", file=out, flush=True)


# ------------------------------------------------------------------------------------------------------------------
# what a user exports
# ------------------------------------------------------------------------------------------------------------------


def env_lines(cfg: StackConfig) -> list[str]:
    """``export`` lines for a shell that uses the stack; the S3 secret stays in the credentials file."""
    urls = cfg.urls
    creds = cfg.dir.resolve() / "credentials.env"
    exports = {
        "PREFECT_API_URL": urls["prefect"],
        "MLFLOW_TRACKING_URI": urls["mlflow"],
        "AWS_ENDPOINT_URL": urls["seaweedfs"],
        "MLFLOW_S3_ENDPOINT_URL": urls["seaweedfs"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    lines = [f"export {k}={shlex.quote(v)}" for k, v in exports.items()]
    lines.append(f"set -a; . {shlex.quote(str(creds))}; set +a   # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    return lines


def _write_env_file(cfg: StackConfig) -> None:
    (cfg.dir / "env.sh").write_text("# source this file to use the local stack\n" + "\n".join(env_lines(cfg)) + "\n")


def _print_report(cfg: StackConfig, report: dict, out=None) -> None:
    out = out or sys.stdout
    if not report:
        print("stack is not running", file=out)
        return
    for name in SERVICES:
        if name in report:
            r = report[name]
            verdict = "healthy" if r["healthy"] else f"DOWN: {r['problem']} (log: {r['log']})"
            print(f"{name:9s} pid {r['pid']:>7}  {r['url']:32s} {verdict}", file=out)


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise StackError(f"{name} must be an integer port, got {value!r}") from None


def parse_args(argv: list[str] | None = None) -> tuple[str, StackConfig]:
    p = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down", "status", "env", "compose-env", "prefect-setup"])
    p.add_argument("path", nargs="?", help="compose-env: the file to create (e.g. infra/docker/.env)")
    p.add_argument("--dir", default=os.environ.get("DINO_STACK_DIR", ".stack"), help="stack folder (default .stack)")
    p.add_argument("--host", default=os.environ.get("DINO_STACK_HOST", HOST), help="bind address (default 127.0.0.1)")
    p.add_argument("--prefect-port", type=int, default=None, help="Prefect server port (default 4200)")
    p.add_argument("--mlflow-port", type=int, default=None, help="MLflow server port (default 5000)")
    p.add_argument("--s3-port", type=int, default=None, help="SeaweedFS S3 port (default 8333)")
    p.add_argument("--pool", default=os.environ.get("DINO_STACK_POOL", "dino-process"), help="process work pool")
    p.add_argument("--no-worker", action="store_true", help="start the servers without a worker")
    p.add_argument("--api", default=os.environ.get("PREFECT_API_URL", ""),
                   help="prefect-setup: the Prefect API URL (default $PREFECT_API_URL)")
    args = p.parse_args(argv)
    if (args.action == "compose-env") != (args.path is not None):
        p.error("a path is given with compose-env, and only with it")
    state_cfg = load_state(StackConfig(dir=Path(args.dir))).get("config", {})

    def port(flag_value, env_name, key, default):
        # flag > environment > the ports the running stack was started with > default
        if flag_value is not None:
            return flag_value
        if os.environ.get(env_name):
            return _env_int(env_name, default)
        return int(state_cfg.get(key, default))

    cfg = StackConfig(
        dir=Path(args.dir),
        host=args.host,
        prefect_port=port(args.prefect_port, "DINO_STACK_PREFECT_PORT", "prefect_port", 4200),
        mlflow_port=port(args.mlflow_port, "DINO_STACK_MLFLOW_PORT", "mlflow_port", 5000),
        s3_port=port(args.s3_port, "DINO_STACK_S3_PORT", "s3_port", 8333),
        pool=args.pool,
        worker=not args.no_worker,
    )
    if args.action == "prefect-setup":
        if not args.api:
            p.error("prefect-setup needs the Prefect API URL: --api http://HOST:4200/api or PREFECT_API_URL")
        return f"prefect-setup:{args.api}", cfg
    return (args.action if args.action != "compose-env" else f"compose-env:{args.path}"), cfg


def main(argv: list[str] | None = None) -> int:
    try:
        action, cfg = parse_args(argv)
        if action == "up":
            started = time.monotonic()
            report = up(cfg)
            _print_report(cfg, report)
            if not all(r["healthy"] for r in report.values()):
                print("some services are not healthy; see their logs above", file=sys.stderr)
                return 1
            print(f"\nstack up in {time.monotonic() - started:.0f} s. To use it from a shell:\n", flush=True)
            print("\n".join(env_lines(cfg)))
            creds = load_or_create_credentials(cfg)
            print(f"\n(or: . {cfg.dir / 'env.sh'})   Prefect UI: {cfg.urls['prefect'][:-4]}   "
                  f"MLflow UI: {cfg.urls['mlflow']}\nS3 access key {redact(creds['AWS_ACCESS_KEY_ID'])} and its secret "
                  f"are in {credentials_path(cfg)} (mode 0600)")
        elif action == "down":
            down(cfg)
        elif action == "status":
            report = health(cfg)
            _print_report(cfg, report)
            return 0 if report and all(r["healthy"] for r in report.values()) else 3
        elif action == "env":
            print("\n".join(env_lines(cfg)))
        elif action.startswith("prefect-setup:"):
            api = action.split(":", 1)[1]
            home = Path(os.environ.get("PREFECT_HOME") or cfg.dir / "prefect-client")
            try:
                prepare_prefect(api, home, cfg.pool)
            except RuntimeError as e:  # the prefect CLI's own message
                raise StackError(f"could not prepare the Prefect server at {api}: {e}") from None
            print(f"work pool {cfg.pool!r} and the automations of infra/prefect-automations.yaml are on {api}")
        elif action.startswith("compose-env:"):
            path = write_compose_env(action.split(":", 1)[1])
            print(f"wrote S3_ACCESS_KEY, S3_SECRET_KEY and POSTGRES_PASSWORD to {path} (mode 0600)")
        return 0
    except StackError as e:
        print(f"stack: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
