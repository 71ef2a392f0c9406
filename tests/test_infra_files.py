"""What cannot run on this machine is still checked: ``prefect.yaml`` (deployments, parameters against the flows'
signatures, schedule, pull step), the docker-compose stack and the Dockerfile (services, steps, no literal secrets),
the Kubernetes templates (parse, render GPU requests, the torchrun command and env), and the local stack's
configuration, credentials file and error messages (its servers run in ``tests/test_deployments.py``)."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import socket
import stat
from pathlib import Path

import pytest
import yaml

from infra.k8s.work_pool import load_work_pool_template, render_work_pool_job
from infra.stack import StackConfig, StackError, down, env_lines, load_or_create_credentials, up, write_compose_env
from tasks.pretrain.kubernetes.render import (
    CONFIG_PATH,
    MultiNodeJob,
    RenderError,
    fill,
    placeholders,
    render_multinode_job,
    to_yaml,
)
from tasks.pretrain.trainer_process import LaunchSpec, torchrun_command
from tasks.validation.extraction_settings import EXTRACT_GROUPS
from tasks.validation.pretrain_settings import PRETRAIN_GROUPS
from tasks.validation.shard_settings import SHARD_GROUPS

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "prefect.yaml"
COMPOSE = ROOT / "infra" / "docker" / "docker-compose.yml"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
POOL = "dino-process"
#: The flows whose optional settings are groups, and their groups' classes.
GROUPED_FLOWS = {
    "flows/shard.py:dino_shard": SHARD_GROUPS,
    "flows/pretrain.py:dino_pretrain": PRETRAIN_GROUPS,
    "flows/extract.py:dino_extract": EXTRACT_GROUPS,
}

#: Words that mark a credential in a key or an env-var name.
SECRET_WORDS = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY)", re.IGNORECASE)


def _prefect_config() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _flow_signature(entrypoint: str) -> tuple[str, dict[str, bool]]:
    """(flow name, {parameter: has a default}) of ``path.py:function``, read from the source (no import)."""
    path, func = entrypoint.split(":")
    tree = ast.parse((ROOT / path).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            name = None
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", None) in ("flow", "grouped_flow"):
                    name = next(k.value.value for k in dec.keywords if k.arg == "name")
            args = node.args.args
            n_defaults = len(node.args.defaults)
            params = {a.arg: i >= len(args) - n_defaults for i, a in enumerate(args)}
            return name, params
    raise AssertionError(f"{entrypoint}: no function {func}")


# ------------------------------------------------------------------------------------------------------------------
# prefect.yaml
# ------------------------------------------------------------------------------------------------------------------


def test_prefect_yaml_deploys_every_flow_to_the_process_pool():
    cfg = _prefect_config()
    deployments = {}
    for d in cfg["deployments"]:
        flow_name, params = _flow_signature(d["entrypoint"])
        deployments[f"{flow_name}/{d['name']}"] = (d, params)
        assert d["work_pool"]["name"] == POOL, d["name"]
        assert d.get("description"), f"{flow_name}/{d['name']} has no description"
        # Every parameter given exists in the flow's signature (a typo would fail only at run time otherwise).
        unknown = set(d.get("parameters") or {}) - set(params)
        assert not unknown, f"{flow_name}/{d['name']}: parameters {unknown} are not in the flow's signature"
    assert {"dino-shard/default", "dino-pretrain/default", "dino-extract/default", "dino-evaluate/default",
            "dino-reevaluate/nightly"} <= set(deployments)
    pretrain, params = deployments["dino-pretrain/default"]
    assert {"data", "checkpoint_uri", "overrides", "launch", "tracking"} <= set(pretrain["parameters"])
    assert {"nproc_per_node", "nnodes"} <= set(pretrain["parameters"]["launch"])
    assert "registered_model" in pretrain["parameters"]["tracking"]
    assert pretrain["work_pool"]["work_queue_name"] == "training"
    # Every group of settings validates (extra="forbid": a misspelt field fails here, not in a run).
    for entrypoint, groups in GROUPED_FLOWS.items():
        for deployment in [d for d in _prefect_config()["deployments"] if d["entrypoint"] == entrypoint]:
            for name, value in deployment["parameters"].items():
                if name in groups:
                    groups[name].model_validate(value)
    # dino-pretrain/slurm (issue 25): a training submitted to Slurm from a login node, on its own work queue
    slurm, _ = deployments["dino-pretrain/slurm"]
    assert slurm["parameters"]["launch"]["launcher"] == "slurm" and slurm["work_pool"]["work_queue_name"] == "slurm"
    assert {"partition", "time_limit", "signal_lead_s", "setup"} <= set(slurm["parameters"]["slurm"])


def test_reevaluation_is_scheduled_with_cron_and_its_own_parameters():
    from prefect.client.schemas.schedules import CronSchedule

    (nightly,) = [d for d in _prefect_config()["deployments"] if d["entrypoint"].endswith(":dino_reevaluate")]
    (schedule,) = nightly["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))  # Prefect's own validation
    assert cron.cron == "0 3 * * *" and schedule["active"] is True
    assert schedule["timezone"] == cron.timezone == "UTC"  # explicit: the UI shows the time with its zone
    settings = nightly["parameters"]["settings"]
    assert settings["train_data"] and settings["val_data"] and nightly["parameters"]["registered_model"]
    from tasks.evaluation import EvaluationSettings

    EvaluationSettings(**settings)  # extra="forbid": a misspelt field fails here, not at 03:00


def test_pull_step_runs_the_flows_from_the_checkout_or_dino_project_dir(tmp_path, monkeypatch):
    """Run the real build step function as `prefect deploy` does and template the pull step with its output (keyed
    by the step id): the directory is the checkout `prefect deploy` runs in (any clone, anywhere), or
    DINO_PROJECT_DIR when set (the image's)."""
    from prefect.deployments.steps.utility import run_shell_script
    from prefect.utilities.templating import apply_values

    cfg = _prefect_config()
    (build,) = cfg["build"]
    (pull,) = cfg["pull"]
    assert list(build) == ["prefect.deployments.steps.run_shell_script"]
    assert list(pull) == ["prefect.deployments.steps.set_working_directory"]
    inputs = dict(build["prefect.deployments.steps.run_shell_script"])
    step_id = inputs.pop("id")

    def pulled_directory() -> str:
        outputs = {step_id: asyncio.run(run_shell_script(**inputs))}
        return apply_values(cfg["pull"], outputs)[0]["prefect.deployments.steps.set_working_directory"]["directory"]

    clone = tmp_path / "fresh-clone"
    clone.mkdir()
    monkeypatch.chdir(clone)
    monkeypatch.delenv("DINO_PROJECT_DIR", raising=False)
    assert pulled_directory() == str(clone)
    monkeypatch.setenv("DINO_PROJECT_DIR", "/opt/dino")
    assert pulled_directory() == "/opt/dino"


def test_prefect_yaml_holds_no_credentials():
    text = PREFECT_YAML.read_text()
    cfg = yaml.safe_load(text)

    def walk(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                assert not SECRET_WORDS.search(str(k)), f"credential-like key {path}/{k} in prefect.yaml"
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(cfg)
    assert not re.search(r"AKIA[0-9A-Z]{12,}", text)  # an AWS access key id


# ------------------------------------------------------------------------------------------------------------------
# docker
# ------------------------------------------------------------------------------------------------------------------


def test_compose_has_the_services_and_no_literal_secrets():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "s3", "mlflow", "prefect-server", "worker"} <= set(services)
    assert "seaweedfs" in services["s3"]["image"]
    assert "prefecthq/prefect" in services["prefect-server"]["image"]
    # Both servers use Postgres, MLflow's artifacts go to the S3 store, job execution off.
    assert "postgresql+asyncpg://" in " ".join(services["prefect-server"]["command"])
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "postgresql://" in mlflow_cmd and "--artifacts-destination s3://" in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    worker_cmd = services["worker"]["command"]
    assert worker_cmd[:3] == ["prefect", "worker", "start"] and worker_cmd[worker_cmd.index("--pool") + 1] == POOL
    assert services["worker"]["environment"]["DINO_PROJECT_DIR"] == "/opt/dino"
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
        env = svc.get("environment") or {}
        for key, value in env.items():
            if SECRET_WORDS.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", str(value)), f"{name}.{key} is not a ${{VAR:?}}"
    build = services["worker"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert (COMPOSE.parent / "postgres-init.sql").exists()
    assert ".env" not in compose.get("env_file", "")


def test_compose_env_file_is_private_and_never_overwritten(tmp_path):
    path = write_compose_env(tmp_path / ".env")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in path.read_text().splitlines() if not line.startswith("#"))
    assert set(values) == {"S3_ACCESS_KEY", "S3_SECRET_KEY", "POSTGRES_PASSWORD"}
    assert all(len(v) >= 16 for v in values.values())
    with pytest.raises(StackError, match="exists"):
        write_compose_env(path)
    # The compose file reads exactly these variables.
    assert set(values) <= set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE.read_text()))


def test_dockerfile_installs_the_project_and_runs_a_worker():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    for folder in ("dino_model", "tasks", "flows", "infra"):
        assert re.search(rf"^COPY {folder} \./{folder}$", text, re.M), folder
    assert "COPY prefect.yaml" in text
    assert re.search(r"pip install --no-deps \.", text) and "DINO_PROJECT_DIR=/opt/dino" in text
    # Numeric: Kubernetes' runAsNonRoot can verify a UID, not a name (tests/test_trainer_image.py runs the image).
    assert re.search(r"^USER 1000:1000$", text, re.M), "the image must not run as root"
    assert "--uid 1000" in text
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[:3] == ["prefect", "worker", "start"] and cmd[cmd.index("--pool") + 1] == POOL
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("**") if "**" in ignore else 0] == "**" and "!dino_model/**" in ignore
    assert "infra/docker/.env" in ignore


# ------------------------------------------------------------------------------------------------------------------
# kubernetes
# ------------------------------------------------------------------------------------------------------------------


def test_work_pool_template_requests_gpus_and_renders_like_prefect():
    from prefect.utilities.templating import apply_values

    template = load_work_pool_template()
    props = template["variables"]["properties"]
    assert placeholders(template["job_configuration"]) <= set(props), "a placeholder has no variable"
    assert props["gpus"]["type"] == "integer"
    values = {"image": "registry.example/dino:0.1", "gpus": 4, "env": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}}
    job = render_work_pool_job(values)
    container = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/dino:0.1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert container["env"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert container["envFrom"][0]["secretRef"]["name"] == "dino-s3"
    # Prefect's own templating gives the same manifest from the same values (defaults filled in).
    defaults = {k: v.get("default") for k, v in props.items()}
    assert apply_values(template["job_configuration"], {**defaults, **values}, remove_notset=False) == job
    with pytest.raises(RenderError, match="unknown work-pool variable"):
        render_work_pool_job({"gpu": 2})
    with pytest.raises(RenderError, match="gpus"):
        render_work_pool_job({"gpus": -1})


def test_kubernetes_deployments_use_the_pool_variables_and_flow_parameters():
    cfg = yaml.safe_load((ROOT / "infra" / "k8s" / "prefect-k8s.yaml").read_text())
    assert cfg["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/dino"}}]
    for d in cfg["deployments"]:
        _, params = _flow_signature(d["entrypoint"])
        assert set(d["parameters"]) <= set(params), d["name"]
        job = render_work_pool_job(d["work_pool"]["job_variables"])  # unknown job variables fail here
        limits = job["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == d["work_pool"]["job_variables"]["gpus"]
        launch = d["parameters"].get("launch", {})
        if "nproc_per_node" in launch:  # one training process per GPU of the pod
            assert launch["nproc_per_node"] == d["work_pool"]["job_variables"]["gpus"]
        for name, value in d["parameters"].items():
            if name in GROUPED_FLOWS.get(d["entrypoint"], {}):
                GROUPED_FLOWS[d["entrypoint"]][name].model_validate(value)
        assert not any(SECRET_WORDS.search(k) for k in d["work_pool"]["job_variables"].get("env", {}))


def _job(**kw) -> MultiNodeJob:
    base = dict(name="dino-run1", image="registry.example/dino:0.1", nnodes=3, gpus_per_node=8,
                config={"model": {"arch": "vit_small"}, "train": {"epochs": 100}},
                env={"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_RUN_ID": "abc123"},
                overrides=["train.epochs=3"])
    return MultiNodeJob(**{**base, **kw})


def test_multinode_job_renders_torchrun_with_c10d_rendezvous_on_pod_zero():
    service, config_map, job = render_multinode_job(_job())
    assert [service["kind"], config_map["kind"], job["kind"]] == ["Service", "ConfigMap", "Job"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["port"] == 29500
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 3
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "dino-run1"
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    # The same trainer command as a single-node launch, with the container's python and the mounted config.
    expected = torchrun_command(LaunchSpec(nproc_per_node=8, nnodes=3, rdzv_endpoint="dino-run1-0.dino-run1:29500",
                                           rdzv_id="dino-run1"), CONFIG_PATH, ["train.epochs=3"])
    assert container["command"] == ["python", *expected[1:]]
    assert "--rdzv-backend=c10d" in container["command"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_RUN_ID"] == "abc123" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert container["envFrom"] == [{"secretRef": {"name": "dino-s3", "optional": True}}]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert str(Path(mount["mountPath"]) / "config.json") == CONFIG_PATH
    assert json.loads(config_map["data"]["config.json"]) == _job().config
    assert yaml.safe_load_all(to_yaml([service, config_map, job]))  # serialisable for kubectl


def test_multinode_job_refuses_bad_values_and_credentials_in_env():
    with pytest.raises(RenderError, match="looks like a credential"):
        render_multinode_job(_job(env={"AWS_SECRET_ACCESS_KEY": "x"}))
    with pytest.raises(RenderError, match="name must be a DNS label"):
        render_multinode_job(_job(name="Dino_Run"))
    with pytest.raises(RenderError, match="nnodes"):
        render_multinode_job(_job(nnodes=0))
    with pytest.raises(RenderError, match="gpus_per_node"):
        render_multinode_job(_job(gpus_per_node=-1))
    # One node: torchrun's standalone mode, no rendezvous endpoint.
    (_, _, job) = render_multinode_job(_job(nnodes=1, gpus_per_node=0))
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--standalone" in command and "--nproc_per_node=1" in command
    assert not any(a.startswith("--rdzv-endpoint") for a in command)


def test_fill_keeps_types_and_names_missing_placeholders():
    assert fill({"a": "{{ n }}", "b": "x-{{ n }}", "c": ["{{ l }}"]}, {"n": 3, "l": [1]}) == {
        "a": 3, "b": "x-3", "c": [[1]]}
    with pytest.raises(RenderError, match="missing_one"):
        fill("{{ missing_one }}", {})


# ------------------------------------------------------------------------------------------------------------------
# local stack: configuration, credentials, errors (the servers themselves run in test_deployments.py)
# ------------------------------------------------------------------------------------------------------------------


def test_stack_config_validation_names_the_field():
    with pytest.raises(StackError, match="s3_port"):
        StackConfig(s3_port=0).validate()
    with pytest.raises(StackError, match="must differ"):
        StackConfig(prefect_port=5000, mlflow_port=5000).validate()
    with pytest.raises(StackError, match="pool"):
        StackConfig(pool="two words").validate()


def test_stack_credentials_are_private_reused_and_never_printed(tmp_path):
    cfg = StackConfig(dir=tmp_path / "stack")
    creds = load_or_create_credentials(cfg)
    path = cfg.dir / "credentials.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_credentials(cfg) == creds  # reused: data written before a restart stays readable
    text = "\n".join(env_lines(cfg))
    assert creds["AWS_SECRET_ACCESS_KEY"] not in text and creds["AWS_ACCESS_KEY_ID"] not in text
    assert f". {path}" in text and "export PREFECT_API_URL=http://127.0.0.1:4200/api" in text


def test_stack_refuses_a_taken_port_before_starting_anything(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = StackConfig(dir=tmp_path / "stack", s3_port=port, prefect_port=port + 1 if port < 65535 else port - 1)
        with pytest.raises(StackError, match=rf"port {port} on 127.0.0.1 is already in use.*--s3-port"):
            up(cfg)
    state = json.loads((cfg.dir / "state.json").read_text()) if (cfg.dir / "state.json").exists() else {}
    assert not state.get("services"), "nothing may start when a port is taken"
    assert down(StackConfig(dir=tmp_path / "stack")) == []  # down when down is fine
    assert down(StackConfig(dir=tmp_path / "never-created")) == []
    assert "stack is not running" in capsys.readouterr().out


def test_stack_scripts_wrap_the_cli():
    for name, action in (("stack-up.sh", "up"), ("stack-down.sh", "down")):
        path = ROOT / "infra" / name
        assert os.access(path, os.X_OK), f"{path} is not executable"
        assert f"-m infra.stack {action}" in path.read_text()


def test_installed_entry_points_import_without_the_checkout_on_the_path(tmp_path):
    """`dino demo` / `dino pretrain` run as the installed command, from any folder: every package the flows
    import (the Kubernetes launcher's template included) must be part of the installed project."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import flows.cli, flows.pipeline, flows.pretrain, flows.evaluate, flows.extract, flows.shard, "
            "infra.stack, tasks.pretrain.kubernetes.render as r; assert r.HERE.joinpath('multinode-job.yaml').is_file()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
