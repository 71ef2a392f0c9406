"""What the trainer image's build and runs are given, checked without a container engine: this machine's pip
configuration rewritten for read-only mounts (real ``pip config list``), the Debian release and mirror of the local
base, and a rendered Kubernetes pod turned into a ``podman run``. The build and the runs themselves:
tests/test_trainer_image.py."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from dino_model.config import load_config
from infra.image.debian_base import DebianBase, host_release
from infra.image.pip_config import MOUNT_POINT, effective_pip_config, for_build, host_pip_mounts
from infra.image.pod import PodContainer
from infra.image.podman import Podman
from tasks.pretrain.kubernetes.render import render_multinode_job
from tasks.pretrain.kubernetes.job import KubernetesJobSpec, multinode_job
from tasks.pretrain.trainer_process import LaunchSpec

ROOT = f"{MOUNT_POINT}/root"


def _pip_env(tmp_path: Path, config: str, **variables: str) -> dict[str, str]:
    conf = tmp_path / "pip.conf"
    conf.write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": str(conf), **variables}


def test_local_indexes_and_files_are_mounted_and_the_values_rewritten(tmp_path):
    repo = tmp_path / "repo"
    (repo / "simple" / "pkg").mkdir(parents=True)
    (repo / "files").mkdir()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    env = _pip_env(tmp_path, f"""[global]
extra-index-url = file://{repo}/simple https://user:s3cret@pkgs.example.invalid/simple
constraint = {constraints}
cache-dir = {tmp_path}/cache
[install]
find-links = {wheels}
default-timeout = 10
""", PIP_DEFAULT_TIMEOUT="77")
    sections = effective_pip_config(env=env)
    # PIP_* variables win over every file section, as in pip; options about this machine's own state are dropped.
    assert sections["global"]["default-timeout"] == "77" and "default-timeout" not in sections.get("install", {})
    assert "cache-dir" not in sections["global"] and "config-file" not in sections["global"]

    config = for_build(sections)
    assert config.sections["global"]["extra-index-url"] == (
        f"file://{ROOT}{repo}/simple https://user:s3cret@pkgs.example.invalid/simple")
    assert config.sections["global"]["constraint"] == f"{ROOT}{constraints}"
    assert config.sections["install"]["find-links"] == f"{ROOT}{wheels}"
    # A file:// index brings its parent: its pages link to ../../files/...
    assert {repo: f"{ROOT}{repo}", constraints: f"{ROOT}{constraints}", wheels: f"{ROOT}{wheels}"}.items() <= {
        Path(k): v for k, v in config.mounts.items()}.items()
    assert str(repo / "simple") not in config.mounts


def test_the_merged_configuration_lives_in_a_private_folder_for_the_build_only(tmp_path):
    wheels = tmp_path / "wheels"
    (wheels / "sub").mkdir(parents=True)
    env = _pip_env(tmp_path, f"[global]\nfind-links = {wheels} {wheels}/sub\nindex-url = https://u:pw@x.invalid/s\n")
    with host_pip_mounts(env=env) as args:
        pairs = [args[i + 1] for i in range(0, len(args), 2)]
        assert all(args[i] == "-v" for i in range(0, len(args), 2)) and all(p.endswith(":ro") for p in pairs)
        folder = Path(pairs[0].split(":")[0])
        assert pairs[0] == f"{folder}:{MOUNT_POINT}:ro"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        conf = folder / "pip.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600 and "u:pw@x.invalid" in conf.read_text()
        assert f"{wheels}:{ROOT}{wheels}:ro" in pairs
        assert not any(p.startswith(f"{wheels}/sub:") for p in pairs)  # inside a mounted folder already
        assert (folder / "root" / str(wheels).lstrip("/")).is_dir()  # the mount point inside the read-only mount
    assert not folder.exists()


def test_the_debian_base_follows_this_machines_release_and_mirror(tmp_path):
    (tmp_path / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n'
                                         'VERSION_CODENAME=bookworm\n')
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example.invalid/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n")
    base = host_release(tmp_path / "os-release", apt)
    assert base == DebianBase(suite="bookworm", mirror="http://mirror.example.invalid/debian")
    assert base.tag.startswith("localhost/dino-debian-base:bookworm-") and base.tag == host_release(
        tmp_path / "os-release", apt).tag
    assert DebianBase("bookworm", base.mirror, include=("python3",)).tag != base.tag  # a new recipe, a new name


def test_a_rendered_pod_becomes_a_podman_run_with_its_command_env_and_volumes(tmp_path):
    config = load_config(None, preset="small", overrides=[
        'data.source="s3://b/shards"', 'checkpoint.uri="s3://b/ckpt"']).to_dict()
    settings = KubernetesJobSpec(image="registry.example/dino:0.1", job_name="dino-pretrain-0123abcd",
                                  gpus_per_node=0)
    manifests = render_multinode_job(multinode_job(config, "run0", "http://127.0.0.1:5000",
                                                   LaunchSpec(nproc_per_node=1, nnodes=1), settings))
    pod = PodContainer.from_manifests(manifests)
    job_container = manifests[2]["spec"]["template"]["spec"]["containers"][0]
    assert pod.command == job_container["command"] and pod.termination_grace_s == 300
    assert pod.env == {**{e["name"]: e["value"] for e in job_container["env"]}, "JOB_COMPLETION_INDEX": "0"}

    cmd = pod.podman_command(Podman(runtime="runc"), tmp_path / "cm", secret_env=["AWS_SECRET_ACCESS_KEY"],
                             name="pod-0", image="abc123")
    assert cmd[:4] == ["podman", "--runtime", "runc", "run"] and cmd[-1] == "abc123"
    assert json.loads(cmd[cmd.index("--entrypoint") + 1]) == pod.command  # replaces the image's ENTRYPOINT
    assert "MLFLOW_RUN_ID=run0" in cmd and "AWS_SECRET_ACCESS_KEY" in cmd  # the Secret's value never on the line
    assert f"{tmp_path / 'cm'}:/etc/dino:ro" in cmd and cmd[cmd.index("--shm-size") + 1] == "32g"
    assert json.loads((tmp_path / "cm" / "config.json").read_text()) == json.loads(
        manifests[1]["data"]["config.json"])
    assert {"--network", "host"} <= set(cmd) and "nofile=20000:20000" in cmd
