"""``launcher="slurm"`` and ``--task-runner slurm`` against a real Slurm cluster of two nodes on this machine
(:mod:`tests.slurm_cluster`: Debian's slurmctld, two slurmd, munge; one cluster for every test here), with a real
MLflow server; trainings of a tiny model on CPU (gloo), 2 nodes x 1 process:

* a training on 2 Slurm nodes ends with the weights of 2 local torchrun processes, bit for bit; its credentials
  reach the job through the environment, never the script or Slurm's job record;
* the pre-limit signal (delivered here with ``scancel --batch --signal=USR1``, as ``--signal=B:USR1@LEAD`` would),
  then a preemption by a job of a higher-tier partition: each time the trainers checkpoint, the job is requeued
  (by its batch script, then by Slurm) and it finishes in the same MLflow run, with the same weights;
* a trainer SIGKILLed on one node fails the job and the task's retry (a new job) resumes and finishes, the same
  weights again;
* cancelling a flow run of the ``dino-pretrain/slurm`` deployment (a Prefect server and worker): a checkpoint, no
  process left, the MLflow run KILLED;
* ``dino shard --task-runner slurm`` writes the shard set ``threads`` writes, and ``dino-extract`` on it the
  features of one process.

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

import psutil
import pytest

from dino_model.checkpoint import list_checkpoints
from tests.datasets import write_colour_set
from tests.slurm_cluster import slurm_cluster  # noqa: F401 - the session fixture
from tests.test_pretrain_flow import TINY

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
ROOT = Path(__file__).resolve().parents[1]
#: 16 images, 2 ranks x batch 4: 2 steps per epoch, 10 steps; a checkpoint every 2, only the latest kept (disk).
OVERRIDES = TINY + ["train.epochs=5", "checkpoint.keep_last=1"]
TOTAL_STEPS = 10


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):  # noqa: F811
    for key, value in slurm_cluster.env().items():
        monkeypatch.setenv(key, value)
    return slurm_cluster


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """16 noisy 40-px images in 2 classes, 2 shards."""
    return write_colour_set(tmp_path_factory.mktemp("slurm-images"), tmp_path_factory.mktemp("slurm-shards"),
                            range(2), 8, seed=1, name="tiny")


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


def test_time_limit_and_preemption_requeue_the_job_and_it_finishes_in_one_mlflow_run(slurm_env, tracking, shards,
                                                                                    reference_weights, tmp_path):
    """The pre-limit signal (the batch script requeues), then a preemption by a job of a higher-tier partition
    (Slurm requeues): each time the trainers checkpoint and the job goes on from there."""
    from flows.pretrain import dino_pretrain

    work, ckpt = tmp_path / "jobs", tmp_path / "ckpt"

    def signal_then_preempt():
        (job_id,) = _job_ids(work)
        # What `#SBATCH --signal=B:USR1@LEAD` makes Slurm do LEAD seconds before the time limit.
        slurm_env.run("scancel", "--batch", "--signal=USR1", job_id)
        first_stop = _wait(lambda: re.search(r"Restarts=1 .*", slurm_env.run("scontrol", "show", "job", "-o", job_id))
                           and max(s for s, _ in list_checkpoints(str(ckpt))), 300, "the requeue")
        # back at work, one checkpoint further: a job of the "urgent" partition takes both nodes
        _wait(lambda: max([s for s, _ in list_checkpoints(str(ckpt))] or [0]) > first_stop, 300,
              "a checkpoint after the requeue", every=0.2)
        slurm_env.run("sbatch", "--partition=urgent", "--nodes=2", "--exclusive", f"--output={tmp_path}/urgent.out",
                      "--wrap=sleep 1")
        return job_id

    watcher = _after_first_checkpoint(str(ckpt), signal_then_preempt)
    out = dino_pretrain(data=shards, checkpoint_uri=str(ckpt), overrides=OVERRIDES, launch=_launch(),
                        slurm=_slurm(work, time_limit="30"),
                        tracking={"experiment": "slurm-requeue", "registered_model": "dino-slurm-requeue"})
    watcher.join(5)
    assert watcher.error is None and watcher.result, watcher.error
    job_id = watcher.result
    client = tracking
    run = _only_run(client, "slurm-requeue")
    assert run.info.run_id == out["run_id"] and run.info.status == "FINISHED"
    # one run, every step once: each time the job resumed where the checkpoint on the stop left off
    assert _steps(client, run.info.run_id) == list(range(1, TOTAL_STEPS + 1))
    history = run.data.tags["stop_history"]
    m = re.fullmatch(rf"time_limit@step (\d+) \(job {job_id}\); preempted@step (\d+) \(job {job_id}\)", history)
    assert m, history
    assert 2 <= int(m.group(1)) < int(m.group(2)) < TOTAL_STEPS and run.data.tags["stop_reason"] == "completed"
    record = slurm_env.run("scontrol", "show", "job", job_id)
    assert "Restarts=2" in record and "JobState=COMPLETED" in record
    log = (work / next(work.iterdir()).name / f"slurm-{job_id}.out").read_text()
    assert "stop: time_limit (SIGUSR1)" in log and "requeue: time_limit (the trainers ended: terminated)" in log
    assert "DUE TO PREEMPTION" in log
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
                        slurm=_slurm(work),
                        tracking={"experiment": "slurm-kill", "registered_model": "dino-slurm-kill"})
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


# -- a deployment run cancelled -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_worker(slurm_cluster, mlflow_server, tmp_path_factory):  # noqa: F811
    """A Prefect server, the ``dino-pretrain/slurm`` deployment of prefect.yaml deployed as the operator guide says,
    and a process worker on its ``slurm`` queue whose environment reaches Slurm and MLflow (as a login node's)."""
    from infra.services import ensure_work_pool, run_prefect, start_prefect_server, start_prefect_worker

    home = tmp_path_factory.mktemp("prefect")
    server = start_prefect_server(home / "server", ui=False)
    worker = None
    try:
        ensure_work_pool("dino-process", server.url, home / "client")
        run_prefect(["deploy", "--name", "dino-pretrain/slurm"], server.url, home / "client", cwd=ROOT, timeout=400)
        worker = start_prefect_worker("dino-process", server.url, home / "worker", home / "worker.log",
                                      env={**slurm_cluster.env(), "MLFLOW_TRACKING_URI": mlflow_server.url},
                                      work_queues=("slurm",))
        yield server.url, home / "client", home / "worker.log"
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


def _api(url: str, body: dict | None = None):
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode() if body is not None else None,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_cancelling_the_flow_run_checkpoints_and_leaves_no_process(prefect_worker, slurm_cluster, tracking, shards,
                                                                  tmp_path):  # noqa: F811
    from infra.services import run_prefect

    api, client_home, worker_log = prefect_worker
    work, ckpt = tmp_path / "jobs", tmp_path / "ckpt"
    params = {"data": shards, "checkpoint_uri": str(ckpt), "overrides": TINY + ["train.epochs=1000",
                                                                              "checkpoint.keep_last=1"],
              "launch": {"nnodes": 2, "nproc_per_node": 1, "retries": 0}, "slurm": _slurm(work),
              "tracking": {"experiment": "slurm-cancel", "registered_model": "dino-slurm-cancel"}}
    out = run_prefect(["deployment", "run", "dino-pretrain/slurm", "--params", json.dumps(params)], api,
                      client_home).stdout
    flow_run = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
    client = tracking

    def training():
        exp = client.get_experiment_by_name("slurm-cancel")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return runs[0] if runs and len(_steps(client, runs[0].info.run_id)) >= 3 else None

    def explain() -> str:
        logs = _api(f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run]}}, "limit": 200})
        return "\n".join(e["message"] for e in logs)[-5000:] + "\n--- worker ---\n" + \
            worker_log.read_text(errors="replace")[-3000:]

    try:
        run = _wait(training, 480, "three logged training steps", every=2)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{explain()}") from None
    (job_id,) = _job_ids(work)
    run_prefect(["flow-run", "cancel", flow_run], api, client_home)
    state = _wait(lambda: (s := _api(f"{api}/flow_runs/{flow_run}")["state"]["type"]) in (
        "CANCELLED", "FAILED", "CRASHED", "COMPLETED") and s, 300, "the flow run to end", every=2)
    assert state == "CANCELLED", explain()
    run = client.get_run(run.info.run_id)
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == "cancelled", explain()
    stopped_at = int(run.data.tags["steps_done"])
    assert (ckpt / f"checkpoint-{stopped_at:09d}.pt").exists(), explain()  # the trainers checkpointed on SIGTERM
    assert run.data.tags["checkpoint"].endswith(f"checkpoint-{stopped_at:09d}.pt")
    record = slurm_cluster.run("scontrol", "show", "job", job_id)
    assert re.search(r"JobState=(FAILED|CANCELLED)", record), record
    assert job_id not in slurm_cluster.jobs()
    assert _job_processes(str(work)) == [], "a process of the job outlived it"
    assert not [p for p in psutil.process_iter(["cmdline"]) if f"[{job_id}." in " ".join(p.info["cmdline"] or [])]
    assert "training cancelled at step" in explain()


# -- the data stages on Slurm ---------------------------------------------------------------------------------------


def test_dino_shard_on_slurm_writes_the_shard_set_threads_writes(slurm_cluster, shared_data, tmp_path):  # noqa: F811
    """``dino shard --task-runner slurm``: 2 Dask workers as Slurm jobs (dask-jobqueue, started and stopped by the
    flow), the same shards (sample lists, sha256) and manifest as the thread runner."""
    from flows.shard import dino_shard
    from tests.test_shard_flow import copy_subset
    from tests.test_task_runners import _shard_set

    subset = copy_subset(shared_data / "imagenette-128" / "train", tmp_path / "subset", classes=4, per_class=5)
    shards = {"shard_size": 5, "seed": 3, "name": "sub"}
    dino_shard(str(subset), str(tmp_path / "threads"), shards=shards, runner={"task_runner": "threads",
                                                                              "parallelism": 2})
    env = {**os.environ, **slurm_cluster.env(), "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(tmp_path / "dask-logs"),
           "DASK_JOBQUEUE__SLURM__MEMORY": "1GiB"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "shard", str(subset), str(tmp_path / "slurm"),
                           "--task-runner", "slurm", "--parallelism", "2", "--shard-size", "5", "--seed", "3",
                           "--name", "sub", "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _shard_set(str(tmp_path / "slurm")) == _shard_set(str(tmp_path / "threads"))
    # the workers were Slurm jobs of this cluster (their logs), all gone with the flow
    assert list((tmp_path / "dask-logs").glob("*.err")) or list((tmp_path / "dask-logs").glob("*.out"))
    _wait(lambda: not slurm_cluster.jobs(), 120, "the Dask worker jobs to end")


def test_extraction_on_slurm_writes_the_features_of_one_process(slurm_env, tmp_path):
    """``dino-extract`` with ``task_runner=slurm``: one task per sample range on 2 Dask workers that are Slurm jobs;
    the same rows and features as one process."""
    import dask

    from dino_model.eval.features import list_feature_files
    from flows.extract import dino_extract
    from tasks.evaluation import ExtractionSpec, extract_split_features
    from tasks.validation.extraction_settings import FeatureSettings
    from tests.ranged_extraction import assert_same_features, ranged_extraction_inputs

    data, export, features = ranged_extraction_inputs(tmp_path)
    single, ranged = str(tmp_path / "single"), str(tmp_path / "ranged")
    one = extract_split_features.fn(ExtractionSpec(export, data, single, "train", FeatureSettings(**features),
                                                   "cpu", {"classes_from": data}))
    with dask.config.set({"jobqueue.slurm.log-directory": str(tmp_path / "dask-logs"),
                          "jobqueue.slurm.memory": "3GiB"}):
        two = dino_extract(export, data, ranged, "train", features=features,
                           runner={"device": "cpu", "task_runner": "slurm", "parallelism": 2})
    assert two["num_rows"] == one["num_rows"] == 21
    names = [key.split("/")[1] for _, key in list_feature_files(ranged, "train")]
    assert names == ["part-r0000-00000.parquet", "part-r0001-00000.parquet"]  # one range per worker job
    assert_same_features(single, ranged, 21)
    assert list((tmp_path / "dask-logs").glob("*.err")) or list((tmp_path / "dask-logs").glob("*.out"))
    _wait(lambda: not slurm_env.jobs(), 120, "the Dask worker jobs to end")
