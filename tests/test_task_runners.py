"""The data stages on other task runners, with a real engine: a ``dask scheduler`` and two ``dask worker`` processes
on 127.0.0.1 (``infra.services.start_dask_cluster``), Prefect's process pool and a local Dask cluster.

* sharding through any runner writes the same shard set as the thread runner with the same seed (the same sample
  lists, per-shard sha256 and manifest);
* a Dask worker killed with SIGKILL in the middle of a run: the flow completes on the other worker, nothing is lost
  or written twice;
* feature extraction through Dask (one task per sample range) writes the same rows and features as one process.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from dino_model.data.manifest import load_manifest
from dino_model.storage import open_store
from infra.services import start_dask_cluster
from tasks.validation import EvaluationSettings, UserInputError
from tasks.validation.extraction_settings import FeatureSettings
from tasks.validation.task_runners import (
    TaskRunnerError,
    check_extraction_runner,
    check_task_runner,
    scheduler_address,
)
from tests.datasets import write_colour_set
from tests.test_shard_flow import copy_subset, read_shards


def test_task_runner_values():
    for value in ("threads", "processes", "dask", "slurm", "tcp://127.0.0.1:8786", "tcp://dask-scheduler.dino:8786",
                  "tcp://[::1]:8786"):
        assert check_task_runner(value) == value
    assert scheduler_address("tcp://10.0.0.5:8786") == ("10.0.0.5", 8786)
    for bad in ("thread", "Dask", "tcp://host", "tcp://host:0", "tcp://host:70000", "http://host:8786", "", None, 4):
        with pytest.raises(TaskRunnerError, match="task_runner must be one of threads, processes, dask, slurm or"):
            check_task_runner(bad)
    with pytest.raises(UserInputError, match="--nproc-per-node 2 and --task-runner dask are two ways"):
        check_extraction_runner("dask", 2, 2, prefix="--")
    with pytest.raises(UserInputError, match="parallelism must be a positive integer"):
        check_extraction_runner("processes", 0, 1)
    assert check_extraction_runner("threads", 2, 4) == "threads"  # torchrun on 4 GPUs
    with pytest.raises(ValueError, match="task_runner must be one of"):
        EvaluationSettings(train_data="a", val_data="b", task_runner="ray")


# -- sharding ------------------------------------------------------------------------------------------------------


def _shard_set(uri: str) -> tuple[list[tuple], dict[str, list[str]], dict]:
    """(name, samples, sha256) per shard, the sample keys of each shard, and the manifest minus its timestamp."""
    manifest = load_manifest(open_store(uri))
    keys: dict[str, list[str]] = {}
    for key, sample in read_shards(uri).items():
        keys.setdefault(sample["shard"], []).append(key)
    fields = json.loads(manifest.to_json())
    fields.pop("created")
    return [(s.name, s.samples, s.sha256) for s in manifest.shards], keys, fields


def _objects(uri: str) -> list[str]:
    return sorted(obj.key for obj in open_store(uri).list(""))


@pytest.fixture(scope="module")
def subset(shared_data, tmp_path_factory):
    """120 imagenette-128 train images (10 classes x 12) in an ImageFolder copy: 12 shards of 10."""
    return copy_subset(shared_data / "imagenette-128" / "train", tmp_path_factory.mktemp("subset") / "train",
                       classes=10, per_class=12)


def test_shard_on_a_dask_cluster_equals_threads(dask_cluster, s3_bucket, subset):
    from flows.shard import dino_shard

    shards = {"shard_size": 10, "seed": 5, "name": "sub"}
    threads = dino_shard(str(subset), f"{s3_bucket}/threads", shards=shards,
                         runner={"task_runner": "threads", "parallelism": 2})
    on_dask = dino_shard(str(subset), f"{s3_bucket}/dask", shards=shards,
                         runner={"task_runner": dask_cluster.address, "parallelism": 2})
    assert (threads.shards, threads.written, on_dask.shards, on_dask.written) == (12, 12, 12, 12)
    reference = _shard_set(f"{s3_bucket}/threads")
    assert _shard_set(f"{s3_bucket}/dask") == reference
    assert sum(len(k) for k in reference[1].values()) == 120
    # nothing but the shards and the manifest (no temporary object, no progress record left behind)
    assert _objects(f"{s3_bucket}/dask") == sorted([name for name, _, _ in reference[0]] + ["manifest.json"])
    # a rerun through the cluster finds every shard in place and writes nothing
    again = dino_shard(str(subset), f"{s3_bucket}/dask", shards=shards,
                       runner={"task_runner": dask_cluster.address, "parallelism": 2})
    assert (again.written, again.skipped) == (0, 12)


@pytest.mark.slow
def test_shard_on_processes_and_a_local_dask_cluster_equals_threads(s3_env, tmp_path, subset):
    """Prefect's process pool and a local Dask cluster (started and stopped by the flow) give the thread
    runner's shard set; local disk this time."""
    from flows.shard import dino_shard

    shards = {"shard_size": 10, "seed": 5, "name": "sub"}
    dino_shard(str(subset), str(tmp_path / "threads"), shards=shards, runner={"task_runner": "threads",
                                                                              "parallelism": 2})
    reference = _shard_set(str(tmp_path / "threads"))
    for runner in ("processes", "dask"):
        summary = dino_shard(str(subset), str(tmp_path / runner), shards=shards,
                             runner={"task_runner": runner, "parallelism": 2})
        assert (summary.shards, summary.written) == (12, 12), runner
        assert _shard_set(str(tmp_path / runner)) == reference, runner


def _worker_names(client) -> dict[str, str]:
    """Worker address -> name, asked of the scheduler now. ``Client.scheduler_info()`` would do the same but, when the
    call fails with an OSError (a busy machine), it logs at debug level and returns its cached answer, which may be
    stale or list no workers at all."""
    identity = client.sync(client.scheduler.identity, n_workers=-1)
    return {address: info["name"] for address, info in identity["workers"].items()}


@pytest.mark.slow
def test_a_dask_worker_killed_mid_run_loses_nothing(seaweedfs, s3_bucket, shared_data, tmp_path):
    """SIGKILL one of two workers while it runs shard tasks: Dask reruns its tasks on the other worker (the writes
    are atomic and idempotent), the flow completes, and the shard set is the thread runner's, object for object."""
    from distributed import Client

    from flows.shard import dino_shard

    src = copy_subset(shared_data / "imagenette-128" / "train", tmp_path / "src", classes=10, per_class=30)
    shards = {"shard_size": 5, "seed": 11, "name": "kill"}
    dino_shard(str(src), f"{s3_bucket}/threads", shards=shards, runner={"task_runner": "threads", "parallelism": 2})
    reference = _shard_set(f"{s3_bucket}/threads")
    assert len(reference[0]) == 60

    cluster = start_dask_cluster(tmp_path / "dask", workers=2, env=seaweedfs.env())
    try:
        victim = cluster.workers[0]
        result: dict = {}

        def run() -> None:
            try:
                result["summary"] = dino_shard(str(src), f"{s3_bucket}/dask", shards=shards,
                                               runner={"task_runner": cluster.address, "parallelism": 2})
            except BaseException as e:  # noqa: BLE001 - re-raised by the assertion below
                result["error"] = e

        flow = threading.Thread(target=run, daemon=True)  # a failed assertion must not leave pytest waiting on it
        flow.start()
        with Client(cluster.address, set_as_default=False) as client:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and flow.is_alive():
                # two calls: a worker may join between them, so an address the second does not know is not busy
                processing = client.processing()
                names = _worker_names(client)
                busy = {names[w]: len(keys) for w, keys in processing.items() if w in names}
                written = [k for k in _objects(f"{s3_bucket}/dask") if k.endswith(".tar")]
                if busy.get("worker-0") and len(written) >= 2:
                    break  # mid-run: shards written already, and the victim is running (or holding) tasks
                time.sleep(0.05)
            assert flow.is_alive(), "the flow finished before a worker could be killed: give it more shards"
            killed_with = len(written)
            os.kill(victim.pid, signal.SIGKILL)
            flow.join(timeout=300)
            assert not flow.is_alive()
            assert len(_worker_names(client)) == 1  # the victim is gone for good
    finally:
        cluster.stop()
    assert "error" not in result, result.get("error")
    assert killed_with < 60
    assert (result["summary"].shards, result["summary"].accepted) == (60, 300)
    assert _shard_set(f"{s3_bucket}/dask") == reference
    assert _objects(f"{s3_bucket}/dask") == sorted([name for name, _, _ in reference[0]] + ["manifest.json"])


# -- feature extraction ---------------------------------------------------------------------------------------------


def test_extraction_on_a_dask_cluster_equals_one_process(dask_cluster, tmp_path):
    """``dino-extract`` with ``task_runner=tcp://...``: one task per sample range on the two workers, each writing
    ``part-r<range>-*.parquet``; the dataset reads back as the single-process one (keys, labels, metadata equal,
    features within 1e-5), and it replaces the parts of an earlier single-process extraction."""
    from dino_model.eval.features import list_feature_files
    from flows.extract import dino_extract
    from tasks.evaluation import ExtractionSpec, extract_split_features
    from tests.ranged_extraction import assert_same_features, ranged_extraction_inputs

    data, export, features = ranged_extraction_inputs(tmp_path)
    single, ranged = str(tmp_path / "single"), str(tmp_path / "ranged")

    def spec(output: str) -> ExtractionSpec:
        return ExtractionSpec(export, data, output, "train", FeatureSettings(**features), "cpu",
                              {"classes_from": data})

    one = extract_split_features.fn(spec(single))
    # an earlier single-process extraction (part-00000), which the ranged one replaces
    extract_split_features.fn(spec(ranged))
    two = dino_extract(export, data, ranged, "train", features=features,
                       runner={"device": "cpu", "task_runner": dask_cluster.address})
    assert two["num_rows"] == one["num_rows"] == 21
    assert (two["dim"], two["feature_kind"]) == (one["dim"], one["feature_kind"]) == (192, "cls")
    names = [key.split("/")[1] for _, key in list_feature_files(ranged, "train")]
    assert names == ["part-r0000-00000.parquet", "part-r0001-00000.parquet"]  # one range per worker
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    with get_client(sync_client=True) as prefect:  # the flow's progress card, updated as the ranges finished
        progress = prefect.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
    assert f"features train (cls) of {data} on {dask_cluster.address}: 2/2 ranges, 21 rows" in [
        a.description for a in progress]
    assert_same_features(single, ranged, 21)


def test_a_worker_process_loads_the_backbone_once_per_extraction(tmp_path):
    """The range tasks of one extraction (one ``reuse_key``) that land on a worker process share the backbone it
    loaded first; another extraction reads the export afresh, even when it was overwritten in between."""
    from dino_model.export import export_backbone
    from dino_model.models import build_backbone
    from tasks.evaluation.features import load_model

    export = str(tmp_path / "export")

    def write_export(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        backbone = build_backbone("vit_tiny", patch_size=16)
        export_backbone(backbone, export, arch="vit_tiny", patch_size=16)
        return backbone.cls_token.detach().clone()

    first = write_export(0)
    assert torch.equal(load_model(export, "cpu", "extraction-1").cls_token, first)
    second = write_export(1)
    assert not torch.equal(first, second)
    assert torch.equal(load_model(export, "cpu", "extraction-1").cls_token, first)  # this extraction's copy
    assert torch.equal(load_model(export, "cpu", "extraction-2").cls_token, second)  # a new extraction reloads
    assert torch.equal(load_model(export, "cpu").cls_token, second)  # no key: always read


@pytest.mark.slow
def test_bf16_ranges_on_a_process_pool_share_one_fast_path_verdict(tmp_path, monkeypatch):
    """bf16 extraction as range tasks: ``check-feature-precision`` decides once for the whole extraction, so with the
    bf16 path broken (an injected fault) every range falls back to fp32 together and the result says why."""
    from dino_model.eval.features import read_features
    from dino_model.export import export_backbone
    from dino_model.fast_path.faults import FAULT_ENV
    from dino_model.models import build_backbone
    from flows.extract import dino_extract

    monkeypatch.setenv(FAULT_ENV, "extract")  # inherited by the pool's worker processes
    data = write_colour_set(tmp_path / "img", tmp_path / "train", range(3), 7, 3, "train")
    torch.manual_seed(0)
    export = tmp_path / "export"
    export_backbone(build_backbone("vit_tiny", patch_size=16), str(export), arch="vit_tiny", patch_size=16)
    out = str(tmp_path / "feats")
    res = dino_extract(str(export), data, out, "train",
                       features={"resize_size": None, "crop_size": 32, "batch_size": 3, "precision": "bf16"},
                       runner={"device": "cpu", "task_runner": "processes", "parallelism": 2})
    assert res["num_rows"] == 21 and res["precision"] == "fp32"
    assert res["fast_path"]["status"] == "fallback" and "bf16 features differ from fp32" in res["fast_path"]["reason"]
    keys, _, _, meta = read_features(out, "train")
    assert len(keys) == 21 and meta["precision"] == "fp32"
