"""``launcher="slurm"`` and ``--task-runner slurm`` against a real Slurm cluster of two nodes on this machine
(:mod:`tests.slurm_cluster`: Debian's slurmctld, two slurmd, munge; one cluster for every test here), with a real
MLflow server; trainings of a tiny model on CPU (gloo), 2 nodes x 1 process:

* a training on 2 Slurm nodes ends with the weights of 2 local torchrun processes, bit for bit; its credentials
  reach the job through the environment, never the script or Slurm's job record;
* the pre-limit signal (delivered here with ``scancel --batch --signal=USR1``, as ``--signal=B:USR1@LEAD`` would):
  the trainers checkpoint, the job is requeued and finishes in the same MLflow run, with the same weights;
* a trainer SIGKILLed on one node fails the job and the task's retry (a new job) resumes and finishes, the same
  weights again;
* cancelling a flow run of the ``dino-pretrain/slurm`` deployment (a Prefect server and worker): a checkpoint, no
  process left, the MLflow run KILLED;
* ``dino shard --task-runner slurm`` writes the shard set ``threads`` writes.

Every wait is on a state with a generous bound; the signals are delivered by the tests, never left to the clock.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from dino_model.checkpoint import list_checkpoints
from dino_model.data.shard_writer import ShardOptions, write_dataset
from dino_model.data.sources import SourceSpec, scan_source
from tests.slurm_cluster import slurm_cluster  # noqa: F401 - the session fixture
from tests.test_pretrain_flow import TINY

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
#: 16 images, 2 ranks x batch 4: 2 steps per epoch, 6 steps; a checkpoint every 2, only the latest kept (disk).
OVERRIDES = TINY + ["train.epochs=3", "checkpoint.keep_last=1"]
TOTAL_STEPS = 6


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):  # noqa: F811
    for key, value in slurm_cluster.env().items():
        monkeypatch.setenv(key, value)
    return slurm_cluster


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """16 random 40-px images in 2 classes, 2 shards."""
    root = tmp_path_factory.mktemp("slurm-images")
    rng = np.random.default_rng(1)
    for c in range(2):
        (root / f"class{c}").mkdir()
        for i in range(8):
            img = np.clip(np.full((40, 40, 3), 40 * c, np.uint8) + rng.integers(0, 90, (40, 40, 3)), 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(root / f"class{c}" / f"img{i}.jpg", quality=90)
    dest = tmp_path_factory.mktemp("slurm-shards")
    write_dataset(scan_source(SourceSpec(str(root))), str(dest), ShardOptions(name="tiny", shard_size=8))
    return str(dest)


@pytest.fixture(scope="module")
def reference_weights(shards, tmp_path_factory):
    """The teacher backbone of the same training as 2 local torchrun processes (no MLflow: logging changes no
    weight)."""
    from tasks.pretrain.trainer_process import LaunchSpec, run_trainer, torchrun_command

    ckpt = tmp_path_factory.mktemp("reference") / "ckpt"
    cmd = torchrun_command(LaunchSpec(nproc_per_node=2), None,
                           ["--preset", "reference", *OVERRIDES, f"data.source={shards}", f"checkpoint.uri={ckpt}"])
    end = run_trainer(cmd, {}, on_line=lambda line: None, on_progress=lambda record: None)
    assert end["status"] == "completed" and end["step"] == TOTAL_STEPS
    weights = _weights(ckpt)
    shutil.rmtree(ckpt)
    return weights


@pytest.fixture(autouse=True)
def _free_disk(tmp_path):
    """Checkpoints are big next to the rest: removed once the test is over."""
    yield
    for folder in tmp_path.glob("ckpt*"):
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    from mlflow.tracking import MlflowClient

    return MlflowClient(mlflow_server.url)


def _weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "export" / "backbone.safetensors"))


def _assert_same_weights(ckpt: Path, reference: dict) -> None:
    import torch

    weights = _weights(ckpt)
    assert weights.keys() == reference.keys()
    different = [k for k in weights if not torch.equal(weights[k], reference[k])]
    assert not different, f"{len(different)} tensors differ from the local run's, e.g. {different[:3]}"


def _slurm(work: Path, **settings) -> dict:
    return {"work_dir": str(work), "mem": "2G", **settings}


def _launch(retries: int = 0) -> dict:
    return {"launcher": "slurm", "nnodes": 2, "nproc_per_node": 1, "retries": retries}


def _steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


def _only_run(client, experiment: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def _job_ids(work: Path) -> list[str]:
    """The ids of the jobs submitted from ``work`` (their batch logs), oldest first."""
    return sorted((m.group(1) for p in work.glob("*/slurm-*.out") for m in [re.fullmatch(r"slurm-(\d+)\.out", p.name)]
                   if m), key=int)


def _wait(condition, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _after_first_checkpoint(ckpt: str, action) -> threading.Thread:
    """Run ``action()`` in a thread once the training under ``ckpt`` has written its first checkpoint; the thread
    records what it did in ``thread.result`` (or the error in ``thread.error``)."""
    def watch():
        try:
            _wait(lambda: list_checkpoints(ckpt), 400, f"a first checkpoint under {ckpt}", every=0.2)
            watcher.result = action()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            watcher.error = e

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.result, watcher.error = None, None
    watcher.start()
    return watcher


def _job_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose command line names ``marker`` (a job folder: srun's --output, torchrun's --config)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_two_slurm_nodes_train_bit_identically_to_two_local_processes(slurm_env, tracking, shards,
                                                                     reference_weights, tmp_path, monkeypatch):
    from flows.pretrain import dino_pretrain

    secret = secrets.token_hex(16)
    monkeypatch.setenv("DINO_TEST_SECRET", secret)  # a credential: it must reach the job by the environment only
    work, ckpt = tmp_path / "jobs", tmp_path / "ckpt"
    out = dino_pretrain(data=shards, checkpoint_uri=str(ckpt), overrides=OVERRIDES, launch=_launch(),
                        slurm=_slurm(work, setup=['test -n "$DINO_TEST_SECRET"  # fails the job without it']),
                        tracking={"experiment": "slurm-2n", "registered_model": "dino-slurm-2n"})
    _assert_same_weights(ckpt, reference_weights)
    client = tracking
    run = _only_run(client, "slurm-2n")
    assert run.info.run_id == out["run_id"] and run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id) == list(range(1, TOTAL_STEPS + 1))
    assert run.data.tags["stop_reason"] == "completed" and "stop_history" not in run.data.tags
    assert run.data.tags["hardware"].startswith("2 processes on cpu")
    assert client.get_model_version_by_alias("dino-slurm-2n", "candidate").run_id == run.info.run_id
    (job_id,) = _job_ids(work)
    script = slurm_env.run("scontrol", "write", "batch_script", job_id, "-")
    record = slurm_env.run("scontrol", "show", "job", "-dd", job_id)
    assert "#SBATCH --nodes=2" in script and "--rdzv-backend=c10d" in script
    assert "JobState=COMPLETED" in record and "NumNodes=2" in record
    for text in (script, record, *(p.read_text() for p in (work).rglob("*") if p.is_file())):
        assert secret not in text


def test_pre_limit_signal_checkpoints_requeues_and_finishes_in_one_mlflow_run(slurm_env, tracking, shards,
                                                                              reference_weights, tmp_path):
    from flows.pretrain import dino_pretrain

    work, ckpt = tmp_path / "jobs", tmp_path / "ckpt"

    def pre_limit_signal():
        (job_id,) = _job_ids(work)
        # What `#SBATCH --signal=B:USR1@LEAD` makes Slurm do LEAD seconds before the time limit.
        slurm_env.run("scancel", "--batch", "--signal=USR1", job_id)
        return job_id

    watcher = _after_first_checkpoint(str(ckpt), pre_limit_signal)
    out = dino_pretrain(data=shards, checkpoint_uri=str(ckpt), overrides=OVERRIDES, launch=_launch(),
                        slurm=_slurm(work, time_limit="30"),
                        tracking={"experiment": "slurm-requeue", "registered_model": "dino-slurm-requeue"})
    watcher.join(5)
    assert watcher.error is None and watcher.result, watcher.error
    job_id = watcher.result
    client = tracking
    run = _only_run(client, "slurm-requeue")
    assert run.info.run_id == out["run_id"] and run.info.status == "FINISHED"
    # one run, every step once: the requeued job resumed where the checkpoint on the signal left off
    assert _steps(client, run.info.run_id) == list(range(1, TOTAL_STEPS + 1))
    history = run.data.tags["stop_history"]
    stopped_at = int(re.fullmatch(rf"time_limit@step (\d+) \(job {job_id}\)", history).group(1))
    assert 2 <= stopped_at < TOTAL_STEPS and run.data.tags["stop_reason"] == "completed"
    record = slurm_env.run("scontrol", "show", "job", job_id)
    assert "Restarts=1" in record and "JobState=COMPLETED" in record
    log = (work / next(work.iterdir()).name / f"slurm-{job_id}.out").read_text()
    assert "stop: time_limit (SIGUSR1)" in log and "requeue: time_limit (the trainers ended: terminated)" in log
    _assert_same_weights(ckpt, reference_weights)


def test_a_trainer_killed_on_one_node_fails_the_job_and_the_retry_resumes(slurm_env, tracking, shards,
                                                                          reference_weights, tmp_path):
    from flows.pretrain import dino_pretrain

    work, ckpt = tmp_path / "jobs", tmp_path / "ckpt"

    def kill_the_trainer_on_the_second_node():
        for p in _job_processes(str(work)):
            cmd = " ".join(p.cmdline())
            if "dino_model.train" in cmd and "torch.distributed.run" not in cmd \
                    and p.environ().get("SLURM_NODEID") == "1":
                step = max(s for s, _ in list_checkpoints(str(ckpt)))
                os.kill(p.pid, signal.SIGKILL)
                return step
        return None

    watcher = _after_first_checkpoint(str(ckpt), kill_the_trainer_on_the_second_node)
    out = dino_pretrain(data=shards, checkpoint_uri=str(ckpt), overrides=OVERRIDES, launch=_launch(retries=1),
                        slurm=_slurm(work), tracking={"experiment": "slurm-kill", "registered_model": "dino-slurm-kill"})
    watcher.join(5)
    assert watcher.error is None and watcher.result is not None, f"no trainer killed: {watcher.error}"
    first, second = _job_ids(work)
    assert "JobState=FAILED" in slurm_env.run("scontrol", "show", "job", first)
    assert "JobState=COMPLETED" in slurm_env.run("scontrol", "show", "job", second)
    client = tracking
    run = _only_run(client, "slurm-kill")
    assert run.info.run_id == out["run_id"] and run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id) == list(range(1, TOTAL_STEPS + 1))
    _assert_same_weights(ckpt, reference_weights)
