"""``dino pretrain`` and ``dino reevaluate`` run to success as a user runs them: the ``dino`` console script in a
fresh interpreter and a working folder of its own, ``MLFLOW_TRACKING_URI`` unset, so everything is tracked in the
command's built-in store ``./mlruns-dino`` (sqlite + local artifacts); the command's own Prefect server
(flows/cli/command_server.py) starts and stops with it. What a user reads (progress, the closing lines) is
checked, then what the command recorded is read back from that store.

``dino reevaluate`` takes every path a user can: ``--versions`` (only those), a version whose evaluation fails
(the next one is still evaluated; the command fails at the end, naming it), ``--all`` (versions that already hold
the score too) and the default ``--missing knn20_top1`` (nothing left to do). ``dino pipeline`` is in
tests/test_pipeline_flow.py, ``dino demo`` in tests/test_demo.py; the user errors of every command are in
tests/test_cli_errors.py.

    .venv/bin/python -m pytest tests/test_cli_runs.py -p no:randomly -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.datasets import write_colour_set
from tests.test_pretrain_flow import TINY, tiny_shards  # noqa: F401 - fixture

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DINO = Path(sys.executable).with_name("dino")


def dino(args: list[str], cwd: Path, timeout: float = 480) -> subprocess.CompletedProcess:
    """``dino ARGS`` in ``cwd`` with this session's environment (isolated Prefect home, no telemetry) less
    ``MLFLOW_TRACKING_URI``."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([str(DINO), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def store(cwd: Path):
    """An MLflow client on the command's built-in store in ``cwd``."""
    from mlflow.tracking import MlflowClient

    db = cwd / "mlruns-dino" / "mlflow.db"
    assert db.is_file(), f"no built-in MLflow store at {db}"
    return MlflowClient(f"sqlite:///{db}")


def overrides(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_dino_pretrain_trains_registers_and_shows_its_progress(tiny_shards, tmp_path):  # noqa: F811 - fixture
    cwd = tmp_path / "work"
    cwd.mkdir()
    done = dino(["pretrain", tiny_shards, "ckpt", *overrides(TINY + ["train.epochs=1"]),
                 "--registered-model", "cli-pretrained", "--experiment", "cli-pretrain"], cwd)
    assert done.returncode == 0, done.stdout + done.stderr
    # 32 images, batch 4: 8 steps, each shown by the progress bar (tqdm, on stderr) with the loss
    assert "dino pretrain" in done.stderr and "8/8" in done.stderr and "loss=" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    (summary,) = [line for line in lines if line.startswith("registered ")]
    run_id = summary.split("MLflow run ")[1].split(";")[0]
    assert summary == (f"registered cli-pretrained version 1 (alias 'candidate'); MLflow run {run_id}; "
                       "export ckpt/export")  # as the user named it
    db = cwd / "mlruns-dino" / "mlflow.db"
    assert f"browse the runs: mlflow ui --backend-store-uri sqlite:///{db} --host 127.0.0.1" in done.stdout

    client = store(cwd)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and client.get_experiment(run.info.experiment_id).name == "cli-pretrain"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 9))
    assert run.data.tags["steps_done"] == "8" and run.data.tags["stop_reason"] == "completed"
    version = client.get_model_version_by_alias("cli-pretrained", "candidate")
    assert str(version.version) == "1" and version.run_id == run_id
    # the checkpoints stay where they were asked for; the registered backbone is the export's teacher, bit for bit
    assert (cwd / "ckpt" / "checkpoint-000000008.pt").is_file()
    from safetensors.torch import load_file

    from dino_model.export import load_backbone

    exported = load_file(cwd / "ckpt" / "export" / "backbone.safetensors")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{db}"
    try:
        registered = load_backbone("models:/cli-pretrained/1").state_dict()
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert exported.keys() == registered.keys()
    assert all(torch.equal(exported[k], registered[k]) for k in exported)


@pytest.fixture
def registry_of_three(tmp_path) -> tuple[Path, str]:
    """A working folder whose built-in store holds ``reeval``: v1 and v3 random ViT-Tiny/16 backbones (registered
    as ``dino register`` does, in one interpreter), v2 a version whose files do not exist (its evaluation fails)."""
    from dino_model.export import export_backbone
    from dino_model.models import build_backbone

    cwd = tmp_path / "work"
    cwd.mkdir()
    exports = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        export = tmp_path / f"export-{seed}"
        export_backbone(build_backbone("vit_tiny", patch_size=16), str(export), arch="vit_tiny", patch_size=16)
        exports.append(str(export))
    register = ("import sys\nfrom pathlib import Path\nfrom flows.cli import main\n"
                "from mlflow.tracking import MlflowClient\n"
                "assert main(['register', sys.argv[1], '--name', 'reeval']) == 0\n"
                "MlflowClient().create_model_version('reeval', Path(sys.argv[3]).as_uri())\n"
                "assert main(['register', sys.argv[2], '--name', 'reeval']) == 0\n")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, "-c", register, *exports, str(tmp_path / "deleted-export")], cwd=cwd,
                          env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    versions = {int(v.version): v.source for v in store(cwd).search_model_versions("name='reeval'")}
    assert sorted(versions) == [1, 2, 3] and versions[2].endswith("/deleted-export")
    return cwd, "reeval"


def test_dino_reevaluate_selects_versions_survives_a_failing_one_and_evaluates_all(registry_of_three, tmp_path):
    cwd, name = registry_of_three
    sets = tmp_path / "colours"
    train = write_colour_set(tmp_path / "train-img", sets / "train", range(4), 8, 0, "train")
    val = write_colour_set(tmp_path / "val-img", sets / "val", range(4), 3, 1, "val")
    settings = ["--train", train, "--val", val, "--eval", "knn", "--ks", "20", "--resize", "none", "--crop", "32",
                "--batch-size", "16", "--device", "cpu", "--features", str(tmp_path / "features")]
    client = store(cwd)
    tag = "eval.colours-val.knn20_top1"  # the val shard set's folder (a bare split word: with its parent's name)

    def scored() -> dict[int, str]:
        return {int(v.version): v.tags[tag] for v in client.search_model_versions(f"name='{name}'") if tag in v.tags}

    def evaluation_runs(version: int) -> int:
        experiment = client.get_experiment_by_name("dino-evaluate")
        return len(client.search_runs([experiment.experiment_id], f"tags.model_version = '{version}'"))

    # --versions 2,3: v2 fails, v3 is evaluated all the same, then the command fails naming v2; v1 is left alone
    failed = dino(["reevaluate", name, *settings, "--versions", "2,3"], cwd)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "evaluation failed for version(s) [2]" in failed.stderr
    # colours a random ViT separates: every val image's 20 nearest training images are mostly of its class
    assert scored() == {3: "100.00"}
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"

    # --all: every selected version, the ones that hold the score too
    everything = dino(["reevaluate", name, *settings, "--all", "--versions", "1,3"], cwd)
    assert everything.returncode == 0, everything.stdout + everything.stderr
    assert f"models:/{name}/1  (MLflow evaluation run" in everything.stdout
    assert f"models:/{name}/3  (MLflow evaluation run" in everything.stdout
    assert "knn20_top1  100.00" in everything.stdout
    assert scored() == {1: "100.00", 3: "100.00"}
    assert (evaluation_runs(1), evaluation_runs(3)) == (1, 2)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "3"  # v1 is not better: it stays

    # the default, --missing knn20_top1: both selected versions hold it, so nothing runs
    nothing = dino(["reevaluate", name, *settings, "--versions", "1,3"], cwd)
    assert nothing.returncode == 0, nothing.stdout + nothing.stderr
    assert f"nothing to evaluate: every version of {name} has {tag}" in nothing.stdout
    assert (evaluation_runs(1), evaluation_runs(3)) == (1, 2)
