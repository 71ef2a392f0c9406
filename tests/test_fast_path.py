"""Every run checks its fast path on its first batch (dino_model.fast_path): the canaries measure on the CPU (the
device data path, compiled / bf16 steps and bf16 extraction all run here), faults injected through
``DINO_FAST_PATH_FAULT`` make each fast path wrong on purpose and the run falls back, completes and records why;
``strict`` stops with the message; two torchrun ranks take one verdict; a run without a fault records ``verified``.

Compiled steps use the ``aot_eager`` backend (it traces forward and backward as inductor does, without generating
code: seconds instead of the ~50 s of a cold inductor compile here)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from dino_model.checkpoint import latest_checkpoint, read_checkpoint
from dino_model.config import CropsConfig, load_config
from dino_model.data.gpu_augment import CropParamSampler, DeviceMultiCrop
from dino_model.data.reader import LoaderSettings, build_loader
from dino_model.eval.features import FeatureRecipe, extract_features, read_features
from dino_model.fast_path import FastPathError, Verdict
from dino_model.fast_path.data_canary import AUGMENT_MEAN_LEVELS, compare_data_paths, device_multicrop
from dino_model.fast_path.faults import FAULT_ENV, injected
from dino_model.fast_path.step_canary import REFERENCE_PATH, StepPath, choose_step_path
from dino_model.fast_path.verdict import combine, tracking_records
from dino_model.models import build_backbone
from dino_model.train import EXIT_FAST_PATH, main, train
from tests.test_features import CROP, _batches
from tests.test_step import one_block_model_and_crops
from tests.test_train import (  # noqa: F401 - tiny_images is a fixture
    ROOT,
    free_port,
    progress_events,
    subprocess_env,
    tiny_config,
    tiny_images,
    tiny_overrides,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: the step arguments of the unit checks (epoch 1: the last layer trains too)
STEP_ARGS = dict(epoch=1, lr=1e-3, wd=0.04, momentum=0.996, teacher_temp=0.04)


@pytest.fixture(autouse=True)
def no_fault(monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)


def run_records(out: str) -> dict:
    """The verdict records of the ``start`` progress line of a run's stdout."""
    return progress_events(out)[0]["fast_path"]


# -- the data canary ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_batch(shared_data):
    """The first batch of a decode=False loader over real ImageNet JPEGs (~500x375), the paper's crops."""
    loader = build_loader(str(shared_data / "imagenet-sample"), LoaderSettings(batch_size=8, seed=0),
                          transform=None, decode=False, param_sampler=CropParamSampler(CropsConfig()), epoch=0)
    return next(iter(loader))


def test_data_check_passes_the_device_path_and_its_matmul_resize(first_batch):
    cfg = CropsConfig()
    failure, fig = compare_data_paths(first_batch, DeviceMultiCrop(cfg, "cpu"), cfg)
    assert failure == "" and fig["samples"] == 8
    assert fig["decode_max_levels"] == 0 and fig["augment_max_levels"] < 0.01  # the CPU's own resize: exact
    # the batched matmul resize CUDA uses, on this CPU: within what the CPU tests measured, under the tolerances
    failure, fig = compare_data_paths(first_batch, DeviceMultiCrop(cfg, "cpu", resize="matmul"), cfg)
    assert failure == "", failure
    assert 0 < fig["augment_mean_levels"] < AUGMENT_MEAN_LEVELS / 5 and fig["augment_q999_levels"] <= 2, fig


def test_data_check_catches_a_perturbed_device_op(first_batch, monkeypatch):
    cfg = CropsConfig()
    monkeypatch.setenv(FAULT_ENV, "data")
    failure, fig = compare_data_paths(first_batch, device_multicrop(cfg, "cpu"), cfg)
    assert failure.startswith("device crops differ from the CPU workers'") and "augment mean" in failure
    assert fig["augment_mean_levels"] > 4 and fig["decode_mean_levels"] == 0  # the fault is in the augmentation


def test_faults_parse_and_select_a_rank(monkeypatch):
    assert not injected("data")
    monkeypatch.setenv(FAULT_ENV, "data@1, compile")
    monkeypatch.setenv("RANK", "0")
    assert injected("compile") and not injected("data") and not injected("extract")
    monkeypatch.setenv("RANK", "1")
    assert injected("data")
    monkeypatch.setenv(FAULT_ENV, "dtaa")
    with pytest.raises(ValueError, match="unknown fault 'dtaa'"):
        injected("data")


# -- the step canary ---------------------------------------------------------------------------------------------


@pytest.fixture
def step_cfg():
    """Only the optimiser and clipping settings matter to the check (the model is given)."""
    return load_config(overrides=["optim.freeze_last_layer=1"])


def test_step_check_verifies_a_compiled_bf16_step_and_catches_wrong_numerics(step_cfg, monkeypatch):
    torch._dynamo.reset()
    model, opt, crops = one_block_model_and_crops()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # dynamo's own "eager" backend: the check's logic is the subject here, not the compiler (seconds faster)
    compiled = StepPath(True, torch.bfloat16, False, compile_backend="eager")
    path, failure, fig = choose_step_path(model, opt, None, crops, step_cfg, STEP_ARGS, 0, compiled)
    assert path == compiled and failure == "", failure
    for name in ("loss_rel", "grad_rel", "update_rel", "param_max_diff"):
        assert 0 < fig[name] <= fig[name + "_tol"], (name, fig)
    assert fig["grad_rel_tol"] == 32 * 2 ** -8 and fig["loss_rel_tol"] == 8 * 2 ** -8
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the run's model is untouched
    assert not opt.state  # nor its optimiser

    monkeypatch.setenv(FAULT_ENV, "numerics")  # the compiled student's output scaled by 1.5
    path, failure, fig = choose_step_path(model, opt, None, crops, step_cfg, STEP_ARGS, 0, compiled)
    assert path == compiled.eager() == StepPath(False, torch.bfloat16, False)
    assert failure.startswith("compiled (default, eager), bf16 autocast, for-each optimiser vs fp32 eager: ")
    assert fig["grad_rel"] > fig["grad_rel_tol"] and "grad_rel" in failure
    assert fig["eager_grad_rel"] <= fig["eager_grad_rel_tol"]  # the eager bf16 step passed: the run takes it


def test_step_check_falls_back_when_the_compiler_fails(step_cfg, monkeypatch):
    torch._dynamo.reset()
    model, opt, crops = one_block_model_and_crops()
    monkeypatch.setenv(FAULT_ENV, "compile")
    compiled = StepPath(True, torch.bfloat16, False, compile_backend="aot_eager")
    path, failure, fig = choose_step_path(model, opt, None, crops, step_cfg, STEP_ARGS, 0, compiled)
    assert path == compiled.eager()
    assert "step raised BackendCompilerFailed" in failure and "the compiler backend failed" in failure
    assert "eager_loss_rel" in fig and "loss_rel" not in fig
    # compiled fp32: its eager form is the reference itself
    path, failure, _ = choose_step_path(model, opt, None, crops, step_cfg, STEP_ARGS, 0,
                                        StepPath(True, None, False, compile_backend="aot_eager"))
    assert path == REFERENCE_PATH and "BackendCompilerFailed" in failure


# -- the extraction canary ---------------------------------------------------------------------------------------


def test_extraction_checks_bf16_and_falls_back_to_fp32(tmp_path, monkeypatch):
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=16).eval()
    batches, *_ = _batches(6, 3)

    def extract(name, **kw):
        res = extract_features(backbone, batches, str(tmp_path / name), "val", {}, recipe=FeatureRecipe(CROP, **kw),
                               progress=False)
        return res.metadata, read_features(str(tmp_path / name), "val")[2]

    meta, bf16 = extract("bf16", precision="bf16")
    assert meta["precision"] == "bf16" and meta["fast_path"]["verdict"] == "verified"
    assert meta["fast_path"]["figures"]["min_cosine"] > 0.999
    meta, fp32 = extract("fp32", precision="fp32")
    assert meta["fast_path"]["verdict"] == "reference"

    monkeypatch.setenv(FAULT_ENV, "extract")  # the bf16 path returns shifted features
    meta, fell_back = extract("fallback", precision="bf16")
    assert meta["precision"] == "fp32" and meta["fast_path"]["status"] == "fallback"
    assert meta["fast_path"]["verdict"].startswith("fallback: bf16 features differ from fp32: min cosine similarity")
    np.testing.assert_array_equal(fell_back, fp32)  # the whole extraction ran in fp32
    assert read_features(str(tmp_path / "fallback"), "val")[3]["fast_path"]["status"] == "fallback"  # in the files
    with pytest.raises(FastPathError, match=r"fast path check failed \(extract; fast_path_check=strict\)"):
        extract("strict", precision="bf16", fast_path_check="strict")
    meta, _ = extract("off", precision="bf16", fast_path_check="off")
    assert meta["precision"] == "bf16" and meta["fast_path"]["verdict"] == "off"


# -- training runs -----------------------------------------------------------------------------------------------


def test_a_run_checks_its_fast_paths_and_records_verified(tiny_images, tmp_path, capsys):
    """Device augmentation + bf16 autocast on the CPU: both checks run on the first batch and pass."""
    train(tiny_config(tiny_images, tmp_path / "ckpt", **{
        "data.augment_on": "device", "train.precision": "bf16", "train.max_steps": 2, "export.enabled": False,
        "logging.loggers": ["console"]}))
    out = capsys.readouterr().out
    events = progress_events(out)
    start, end = events[0], events[-1]
    assert start["event"] == "start" and start["augment_on"] == "device"
    assert start["step_path"] == "eager, bf16 autocast, for-each optimiser" and start["precision"] == "bf16"
    records = start["fast_path"]
    assert records["data"]["verdict"] == "verified" and records["data"]["figures"]["augment_mean_levels"] < 0.01
    assert records["step"]["verdict"] == "verified"
    assert records["step"]["figures"]["grad_rel"] < records["step"]["figures"]["grad_rel_tol"]
    assert end["fast_path"] == records
    assert "fast path · data · verified · device decode + augmentation" in out
    assert "fast path · step · verified · eager, bf16 autocast" in out


def test_a_failing_device_data_path_falls_back_to_the_workers(tiny_images, tmp_path, monkeypatch, capsys, caplog):
    """The perturbed device resize fails the data check; the workers augment, so the run trains exactly as one
    configured with data.augment_on=workers."""
    common = {"train.max_steps": 3, "export.enabled": False}
    train(tiny_config(tiny_images, tmp_path / "workers", **{"data.augment_on": "workers", **common}))
    capsys.readouterr()
    monkeypatch.setenv(FAULT_ENV, "data")
    train(tiny_config(tiny_images, tmp_path / "device", **{"data.augment_on": "device", **common}))
    start = progress_events(capsys.readouterr().out)[0]
    data = start["fast_path"]["data"]
    assert start["augment_on"] == "workers" and data["status"] == "fallback"
    assert data["path"] == "CPU workers' augmentation" and "augment mean" in data["reason"]
    assert data["figures"]["augment_mean_levels"] > data["figures"]["augment_mean_levels_tol"]
    assert "fast path data: FALLBACK to CPU workers' augmentation" in caplog.text
    a = read_checkpoint(latest_checkpoint(str(tmp_path / "workers")))
    b = read_checkpoint(latest_checkpoint(str(tmp_path / "device")))
    for k, v in a["teacher"].items():
        assert torch.equal(b["teacher"][k], v), k


def test_strict_stops_with_exit_code_4_and_the_figures(tiny_images, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv(FAULT_ENV, "data")
    code = main(tiny_overrides(tiny_images, tmp_path / "ckpt", **{
        "data.augment_on": "device", "train.fast_path_check": "strict", "logging.progress": True}))
    assert code == EXIT_FAST_PATH == 4
    assert "fast path check failed (data; fast_path_check=strict): device crops differ" in caplog.text
    assert "augment_mean_levels" in caplog.text  # the figures
    error = progress_events(capsys.readouterr().out)[-1]
    assert error["event"] == "error" and error["kind"] == "fast_path" and error["part"] == "data"
    assert latest_checkpoint(str(tmp_path / "ckpt")) is None  # stopped before training


def test_a_failing_compiler_falls_back_to_the_eager_step(tiny_images, tmp_path, monkeypatch, capsys):
    """The compiler raises in the step check: the run takes the eager bf16 step (checked against fp32 too) and
    trains exactly as a run configured without compile."""
    common = {"train.precision": "bf16", "train.max_steps": 2, "export.enabled": False}
    train(tiny_config(tiny_images, tmp_path / "eager", **{"train.compile": False, **common}))
    capsys.readouterr()
    monkeypatch.setenv(FAULT_ENV, "compile")
    torch._dynamo.reset()
    train(tiny_config(tiny_images, tmp_path / "compiled", **{
        "train.compile": True, "train.compile_backend": "aot_eager", **common}))
    step = run_records(capsys.readouterr().out)["step"]
    assert step["status"] == "fallback" and step["path"] == "eager, bf16 autocast, for-each optimiser"
    assert step["reason"].startswith("the compiled (default, aot_eager), bf16 autocast, for-each optimiser step "
                                     "raised BackendCompilerFailed")
    assert step["figures"]["eager_grad_rel"] <= step["figures"]["eager_grad_rel_tol"]
    a = read_checkpoint(latest_checkpoint(str(tmp_path / "eager")))
    b = read_checkpoint(latest_checkpoint(str(tmp_path / "compiled")))
    for k, v in a["student"].items():
        assert torch.equal(b["student"][k], v), k


@pytest.mark.slow
def test_an_exception_in_the_first_steps_falls_back_and_the_run_completes(tiny_images, tmp_path, monkeypatch,
                                                                           capsys, caplog):
    """The check's compile passes (verified), the run's own compile raises at its first step: the guard restores
    the state, picks the eager bf16 step and steps the same batch again; the run completes, the records say why."""
    monkeypatch.setenv(FAULT_ENV, "first-steps")
    torch._dynamo.reset()
    result = train(tiny_config(tiny_images, tmp_path / "ckpt", **{
        "train.compile": True, "train.compile_backend": "aot_eager", "train.precision": "bf16",
        "train.max_steps": 3, "export.enabled": False}))
    assert result.step == 3
    events = progress_events(capsys.readouterr().out)
    assert events[0]["fast_path"]["step"]["verdict"] == "verified"
    changed = [e for e in events if e["event"] == "fast_path"]
    assert len(changed) == 1 and changed[0]["step"]["status"] == "fallback"
    assert changed[0]["step"]["reason"].startswith("the compiled (default, aot_eager), bf16 autocast, for-each "
                                                   "optimiser step 1 raised BackendCompilerFailed")
    assert changed[0]["step"]["path"] == "eager, bf16 autocast, for-each optimiser"
    assert events[-1]["fast_path"]["step"] == changed[0]["step"]
    assert caplog.text.count("Traceback") == 1  # logged once
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]  # step 1 was not lost nor doubled


@pytest.mark.slow
def test_two_torchrun_ranks_take_rank_0s_verdict(tiny_images, tmp_path):
    """Only rank 0's device data path is perturbed: rank 0's check fails and both ranks train on the workers'
    crops (rank 1 alone would have passed); the replicas stay identical."""
    overrides = tiny_overrides(tiny_images, tmp_path / "ckpt", **{
        "data.batch_size_per_gpu": 4, "train.epochs": 1, "optim.warmup_epochs": 0, "data.augment_on": "device",
        "train.precision": "bf16", "logging.log_every": 3, "checkpoint.every_n_steps": 0})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "dino_model.train", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env={**subprocess_env(), FAULT_ENV: "data@0"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = progress_events(proc.stdout)
    start, end = events[0], events[-1]
    assert start["world_size"] == 2 and start["augment_on"] == "workers"
    assert start["fast_path"]["data"]["status"] == "fallback" and start["fast_path"]["step"]["status"] == "verified"
    assert end["status"] == "completed" and end["teacher_replicas_identical"] is True
    for rank in (0, 1):  # every rank logged the one verdict
        assert f"[rank {rank}] WARNING dino_model.fast_path: fast path data: FALLBACK to CPU workers'" in proc.stderr


@pytest.mark.slow
def test_two_torchrun_extraction_ranks_take_rank_0s_verdict(tmp_path, monkeypatch):
    """bf16 extraction on 2 processes with rank 0's bf16 path broken: both ranks extract in fp32, so the files
    equal a single-process fp32 extraction."""
    from dino_model.export import export_backbone
    from tasks.evaluation import ExtractionSpec, extract_split_features
    from tasks.validation.extraction_settings import FeatureSettings
    from tests.datasets import write_colour_set

    data = write_colour_set(tmp_path / "img", tmp_path / "shards", range(3), 4, 3, "train")
    torch.manual_seed(0)
    export = tmp_path / "export"
    export_backbone(build_backbone("vit_tiny", patch_size=16), str(export), arch="vit_tiny", patch_size=16)
    common = dict(resize_size=None, crop_size=32, batch_size=3)
    fp32 = extract_split_features.fn(ExtractionSpec(str(export), data, str(tmp_path / "fp32"), "train",
                                                    FeatureSettings(**common), "cpu"))
    monkeypatch.setenv(FAULT_ENV, "extract@0")
    two = extract_split_features.fn(ExtractionSpec(str(export), data, str(tmp_path / "two"), "train",
                                                   FeatureSettings(precision="bf16", **common), "cpu"),
                                    nproc_per_node=2)
    assert two["precision"] == "fp32" and two["fast_path"]["status"] == "fallback"
    assert fp32["fast_path"]["verdict"] == "reference"
    _, _, f1, _ = read_features(str(tmp_path / "fp32"), "train")
    _, _, f2, meta = read_features(str(tmp_path / "two"), "train")  # parts of both ranks
    np.testing.assert_allclose(f2, f1, rtol=1e-5, atol=1e-5)
    assert meta["precision"] == "fp32"


# -- records -----------------------------------------------------------------------------------------------------


def test_records_combine_and_become_tags():
    verified = Verdict("extract", "verified", "bf16 autocast", figures={"min_cosine": 0.99997})
    failed = Verdict("extract", "fallback", "fp32", "bf16 features differ", {"min_cosine": 0.5})
    both = combine("extract", {"cls/train": verified, "cls/val": failed})
    assert both.text == "fallback: cls/val: bf16 features differ" and both.path == "bf16 autocast, fp32"
    assert both.figures == {"cls/train.min_cosine": 0.99997, "cls/val.min_cosine": 0.5}
    assert combine("extract", {"a": verified, "b": verified}).text == "verified"
    assert combine("data", {"a": Verdict("data", "reference", "x")}).text == "reference"
    tags = tracking_records({"extract": both.as_record()})
    assert tags["fast_path.extract"] == "fallback: cls/val: bf16 features differ"
    assert tags["fast_path.extract.cls/val.min_cosine"] == "0.5" and tags["fast_path.extract.path"] == both.path


def test_mlflow_logger_records_verdicts_as_tags_and_params(mlflow_server, monkeypatch):
    """Tags hold the latest verdict (a resumed run checks again); params keep the first (MLflow params cannot
    change)."""
    from mlflow.tracking import MlflowClient

    from dino_model.mlflow_logger import MlflowLogger

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment(f"fast-path-{tmp_name()}")).info.run_id
    logger = MlflowLogger(run_id, system_metrics=False)
    step = Verdict("step", "verified", "compiled (default), bf16 autocast, fused AdamW", figures={"grad_rel": 0.01})
    logger.on_fast_path({"step": step.as_record(), "data": Verdict("data", "reference", "CPU").as_record()})
    again = Verdict("step", "fallback", "eager, fp32, for-each optimiser", "grad_rel 0.5 > 0.125",
                    {"grad_rel": 0.5})
    logger.on_fast_path({"step": again.as_record()})
    logger.close()
    run = client.get_run(run_id)
    assert run.data.tags["fast_path.step"] == "fallback: grad_rel 0.5 > 0.125"
    assert run.data.tags["fast_path.step.grad_rel"] == "0.5" and run.data.tags["fast_path.data"] == "reference"
    assert run.data.params["fast_path.step"] == "verified" and run.data.params["fast_path.step.grad_rel"] == "0.01"


def tmp_name() -> str:
    import secrets

    return secrets.token_hex(4)


def test_the_check_command_measures_every_part_and_exits_4_on_a_fallback(tiny_images, monkeypatch, capsys):
    """``python -m dino_model.fast_path`` (what gpu_session.sh runs first): every part measured and printed."""
    import json

    from dino_model.train.check_fast_path import main as check_main

    monkeypatch.setenv(FAULT_ENV, "extract")
    overrides = [o for o in tiny_overrides(tiny_images, tiny_images / "unused") if not o.startswith("checkpoint.")]
    code = check_main(["--steps", "1", *overrides, "data.augment_on=device", "train.precision=bf16"])
    out = capsys.readouterr().out
    records = json.loads(next(line for line in out.splitlines() if line.startswith("FAST_PATH "))[10:])
    assert code == 4 and set(records) == {"data", "step", "extract"}
    assert records["data"]["verdict"] == records["step"]["verdict"] == "verified"
    assert records["extract"]["status"] == "fallback" and "min cosine similarity" in records["extract"]["reason"]
    assert "fast path · extract · fallback: bf16 features differ from fp32" in out
    assert not (tiny_images / "unused").exists()  # checkpoints went to a temporary folder


def test_the_check_command_keeps_its_name_and_the_fast_path_package_never_imports_the_loop():
    """``python -m dino_model.fast_path`` runs the training package's check as a new program (no import upward)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "dino_model.fast_path", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m dino_model.fast_path") and "--steps STEPS" in out.stdout
    for path in (root / "dino_model" / "fast_path").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n == "dino_model.train" or n.startswith("dino_model.train.") for n in names), path


def test_settings_validate():
    from dino_model.config import ConfigError

    assert load_config().train.fast_path_check == "fallback" and load_config().train.compile_backend == "inductor"
    with pytest.raises(ConfigError, match="train.fast_path_check"):
        load_config(overrides=["train.fast_path_check=sometimes"])
    with pytest.raises(ConfigError, match="train.compile_backend"):
        load_config(overrides=["train.compile_backend=tvm"])
    from tasks.evaluation import EvaluationSettings

    with pytest.raises(ValueError, match="fast_path_check"):
        EvaluationSettings(train_data="a", val_data="b", fast_path_check="never")
