"""The training entry point on a tiny generated ImageFolder: a real run with metrics, progress lines, checkpoints
and export; exact resume; a 2-process torchrun (gloo) run against a single process with the same global batch;
falling loss without collapse; non-finite loss; SIGTERM; the CLI's exit codes; the metrics loggers."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dino_model.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint
from dino_model.config import DinoConfig, load_config
from dino_model.distributed import DistContext
from dino_model.meta_arch import DINO
from dino_model.metrics import (
    ConsoleLogger,
    JsonlLogger,
    MultiLogger,
    build_loggers,
    parse_progress_line,
    progress_line,
    register_logger,
)
from dino_model.optim import build_optimizer, param_groups
from dino_model.schedules import build_schedules
from dino_model.step import StepSettings, train_step
from dino_model.train import (
    EXIT_CONFIG,
    EXIT_NONFINITE,
    EXIT_TERMINATED,
    Cadence,
    NonFiniteLoss,
    build_train_loader,
    main,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
PALETTE = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 30)]
METRIC_KEYS = {"loss", "lr", "wd", "momentum", "teacher_temp", "grad_norm", "images_per_s", "teacher_entropy",
               "teacher_kl_to_uniform", "teacher_kl_to_center", "kl_teacher_student", "epoch"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory) -> Path:
    """48 JPEGs (48x48) in 4 class folders: a colour per class, stripes whose direction depends on the class, noise."""
    root = tmp_path_factory.mktemp("tiny-images")
    rng = np.random.default_rng(0)
    for i in range(48):
        c = i % 4
        img = np.zeros((48, 48, 3), np.uint8) + np.array(PALETTE[c], np.uint8)
        if c % 2:
            img[:, ::6] = 255 - img[:, ::6]
        else:
            img[::6] = 255 - img[::6]
        img = np.clip(img.astype(int) + rng.integers(-30, 30, img.shape), 0, 255).astype(np.uint8)
        (root / f"class{c}").mkdir(exist_ok=True)
        Image.fromarray(img).save(root / f"class{c}" / f"img{i:03d}.jpg", quality=90)
    return root


def tiny_overrides(source: Path, ckpt: Path, **extra) -> list[str]:
    """vit_tiny/16, 32 px global and 16 px local crops (2 locals), K = 64, batch 8: 6 steps per epoch."""
    base = {
        "model.arch": "vit_tiny", "model.patch_size": 16, "model.out_dim": 64, "model.head_hidden_dim": 64,
        "model.head_bottleneck_dim": 32, "model.drop_path_rate": 0.1,
        "crops.global_size": 32, "crops.local_size": 16, "crops.n_local": 2,
        "data.source": str(source), "data.batch_size_per_gpu": 8, "data.num_workers": 0,
        "optim.lr": 0.005, "optim.warmup_epochs": 1, "train.epochs": 2, "train.device": "cpu",
        "checkpoint.uri": str(ckpt), "checkpoint.every_n_steps": 4, "checkpoint.keep_last": 0,
        "logging.log_every": 1, "logging.loggers": [],
    }
    base.update(extra)
    return [f"{k}={json.dumps(v)}" for k, v in base.items()]


def tiny_config(source: Path, ckpt: Path, **extra) -> DinoConfig:
    return load_config(overrides=tiny_overrides(source, ckpt, **extra))


def progress_events(text: str) -> list[dict]:
    return [e for e in (parse_progress_line(line) for line in text.splitlines()) if e is not None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return env


# ------------------------------------------------------------------------------------------------------------------


def test_run_writes_metrics_progress_checkpoints_and_export(tiny_images, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    register_logger("collect", CollectingLogger)
    cfg = tiny_config(tiny_images, ckpt, **{"logging.loggers": ["console", f"jsonl:{tmp_path}/m.jsonl",
                                                                  "collect:run-a"]})
    result = train(cfg)
    assert (result.status, result.step, result.epoch) == ("completed", 12, 2)
    collected = CollectingLogger.instances[-1]
    assert collected.arg == "run-a" and collected.closed and [s for s, _ in collected.rows] == list(range(1, 13))
    assert [s for _, s in collected.checkpoints] == [4, 6, 8, 12]  # loggers with on_checkpoint hear of each one
    assert collected.checkpoints[-1][0] == latest_checkpoint(str(ckpt))

    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert METRIC_KEYS <= set(r) and all(math.isfinite(r[k]) for k in METRIC_KEYS)
    assert rows[0]["lr"] == 0.0 and rows[5]["lr"] == pytest.approx(0.005 * 8 / 256 * 5 / 5)  # warm-up to the peak
    assert rows[0]["momentum"] == pytest.approx(0.996) and rows[-1]["wd"] > rows[0]["wd"]

    events = progress_events(capsys.readouterr().out)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("step") == 12 and kinds.count("epoch") == 2
    start, end = events[0], events[-1]
    assert start["total_steps"] == 12 and start["steps_per_epoch"] == 6 and start["config"] == cfg.to_dict()
    assert end["status"] == "completed" and end["teacher_replicas_identical"] is True
    # every 4 steps plus each epoch end: 4, 6, 8, 12
    assert [s for s, _ in list_checkpoints(str(ckpt))] == [4, 6, 8, 12]
    last = read_checkpoint(latest_checkpoint(str(ckpt)))
    assert last["config"] == cfg.to_dict() and last["cursor"] == {"epoch": 2, "batch": 0}
    assert last["step"] == 12 and last["world_size"] == 1 and len(last["rng"]) == 1
    assert last["dino_loss"]["center"].abs().sum() > 0
    assert (ckpt / "export" / "backbone.safetensors").is_file() and (ckpt / "export" / "config.json").is_file()
    # A finished run resumed again does nothing but re-export.
    again = train(cfg)
    assert (again.status, again.step) == ("completed", 12)


def test_start_removes_only_stale_checkpoint_temporaries(tiny_images, tmp_path, caplog):
    """A kill during a checkpoint write leaves a temporary file; the next start removes it, logging it, and
    leaves everything else under checkpoint.uri alone."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    stale = ckpt / ".tmp-checkpoint-000000004.pt.k2j4x9"
    stale.write_bytes(b"half a checkpoint")
    others = [ckpt / "notes.txt", ckpt / ".tmp-manifest.json.abc", ckpt / ".tmp-checkpoint-latest.abc",
              ckpt / "checkpoint-000000004.pt.partial"]
    for p in others:
        p.write_bytes(b"not ours to remove")
    (ckpt / "sub").mkdir()
    nested = ckpt / "sub" / ".tmp-checkpoint-000000004.pt.abc"  # not directly under checkpoint.uri
    nested.write_bytes(b"x")
    caplog.set_level("INFO", logger="dino_model.train")
    train(tiny_config(tiny_images, ckpt, **{"train.max_steps": 1, "export.enabled": False}))
    assert not stale.exists()
    assert all(p.read_bytes() == b"not ours to remove" for p in others) and nested.exists()
    assert f"removed what an interrupted checkpoint write left: {stale}" in caplog.text


def test_cadence_decides_from_the_step():
    c = Cadence(total_steps=12, epochs=2, log_every=5, check_every=3, checkpoint_every_steps=4,
                checkpoint_every_epochs=1, max_steps=None)
    assert [s for s in range(1, 13) if c.log(s)] == [1, 5, 10, 12]
    assert [s for s in range(1, 13) if c.checkpoint(s)] == [4, 8, 12]
    assert c.checkpoint(6, finished_epoch=0) and not c.checkpoint(5)
    assert [s for s in range(1, 13) if c.sync(s, end_of_epoch=s % 6 == 0)] == [1, 3, 4, 5, 6, 8, 9, 10, 12]
    assert c.done(12) and not c.done(11)
    capped = Cadence(total_steps=12, epochs=2, log_every=5, check_every=3, checkpoint_every_steps=0,
                     checkpoint_every_epochs=2, max_steps=7)
    assert capped.done(7) and capped.log(7) and capped.checkpoint(7)
    assert not capped.checkpoint(6, finished_epoch=0)  # every 2 epochs: not after the first of them...
    assert capped.checkpoint(12, finished_epoch=1)  # ...and always after the last


def test_console_progress_line_reads_like_a_person_wrote_it():
    import io

    out = io.StringIO()
    clock = iter([0.0, 60.0, 78.54])  # seconds when each line is printed
    console = ConsoleLogger(stream=out, clock=lambda: next(clock))
    console.on_run_start(total_steps=31200, epochs=100)
    metrics = {"epoch": 0.0, "loss": 9.82134, "lr": 1.2e-4, "images_per_s": 41.3, "grad_norm": 1.5, "zeta": 2.0}
    console.log(1, metrics)
    console.log(11, metrics)  # 10 steps in 60 s: 31189 steps to go take 187134 s
    console.log(312, {**metrics, "epoch": 2.0, "images_per_s": 7.25})
    first, second, third = out.getvalue().splitlines()
    assert first == "epoch 1/100 · step 1/31200 · 41 img/s · loss 9.8213 · lr 1.200e-04 · grad_norm 1.5000 · zeta 2.0000"
    assert second.startswith("epoch 1/100 · step 11/31200 · 41 img/s · eta 51h58m · loss 9.8213")
    # 311 steps in 78.54 s since the first line: 30888 to go take 7800 s
    assert third.startswith("epoch 3/100 · step 312/31200 · 7.2 img/s · eta 2h10m · loss")
    assert "epoch 0" not in out.getvalue()


def test_resume_is_exact(tiny_images, tmp_path):
    """Interrupted at step 4 (mid-epoch, drop-path on) and resumed == uninterrupted, bit for bit."""
    full = train(tiny_config(tiny_images, tmp_path / "full"))
    part = train(tiny_config(tiny_images, tmp_path / "part", **{"train.max_steps": 4}))
    assert (part.status, part.step) == ("max_steps", 4)
    assert read_checkpoint(latest_checkpoint(str(tmp_path / "part")))["cursor"] == {"epoch": 0, "batch": 4}
    resumed = train(tiny_config(tiny_images, tmp_path / "part"))
    assert (resumed.status, resumed.step) == ("completed", 12)

    a = read_checkpoint(latest_checkpoint(str(tmp_path / "full")))
    b = read_checkpoint(latest_checkpoint(str(tmp_path / "part")))
    for part_name in ("student", "teacher", "dino_loss"):
        assert a[part_name].keys() == b[part_name].keys()
        for k in a[part_name]:
            assert torch.equal(a[part_name][k], b[part_name][k]), f"{part_name}.{k} differs after resume"
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert full.metrics["loss"] == resumed.metrics["loss"]


def reference_two_rank_run(cfg: DinoConfig) -> dict[str, torch.Tensor]:
    """A single process doing by hand what 2 ranks do together: each step on the concatenation of rank 0's and
    rank 1's batches (the same global batch), with the library's own model, loader, schedules and step."""
    cpu = torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    model = DINO.from_config(cfg)
    opt = build_optimizer(cfg.optim.optimizer, param_groups(model.student_module()), momentum=cfg.optim.sgd_momentum)
    settings = StepSettings.from_config(cfg)
    loaders = [build_train_loader(cfg, DistContext(r, 2, 0, cpu), 0) for r in (0, 1)]
    sched = build_schedules(cfg, loaders[0].batches_per_epoch, world_size=2)
    for step, (b0, b1) in enumerate(zip(*loaders)):
        crops = [torch.cat([c0, c1]) for c0, c1 in zip(b0["crops"], b1["crops"])]
        train_step(model, opt, crops, epoch=0, settings=settings, **sched.at(step))
    return {"teacher": model.teacher.state_dict(), "student": model.student.state_dict(),
            "center": model.dino_loss.center}


@pytest.mark.slow
def test_two_process_torchrun_matches_single_process(tiny_images, tmp_path):
    ckpt = tmp_path / "ckpt"
    overrides = tiny_overrides(tiny_images, ckpt, **{
        # SGD: AdamW turns gradients that are zero up to rounding (the attention's key bias) into full-size
        # steps of either sign, which would hide a real difference behind a loose tolerance.
        "data.batch_size_per_gpu": 4, "train.epochs": 1, "optim.warmup_epochs": 0, "optim.optimizer": "sgd",
        "optim.lr": 0.5,
        "model.drop_path_rate": 0.0, "logging.log_every": 2, "checkpoint.every_n_steps": 0,
    })
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "dino_model.train", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = progress_events(proc.stdout)
    start, end = events[0], events[-1]
    assert start["world_size"] == 2 and start["global_batch"] == 8 and start["total_steps"] == 6
    assert end["status"] == "completed" and end["step"] == 6
    assert end["teacher_replicas_identical"] is True  # both ranks hold bit-identical teachers
    assert sum(e["event"] == "start" for e in events) == 1  # only rank 0 prints progress

    ddp = read_checkpoint(latest_checkpoint(str(ckpt)))
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2
    ref = reference_two_rank_run(load_config(overrides=overrides))
    for part in ("teacher", "student"):
        worst = max((ddp[part][k] - v).abs().max().item() for k, v in ref[part].items())
        print(part, "max abs difference", worst)
        for k, v in ref[part].items():
            assert torch.allclose(ddp[part][k], v, atol=1e-5, rtol=1e-4), f"{part}.{k}"
    assert torch.allclose(ddp["dino_loss"]["center"], ref["center"], atol=1e-5)
    # The run actually moved the weights (the comparison is not between two initial states).
    torch.manual_seed(0)
    init = DINO.from_config(load_config(overrides=overrides)).teacher.state_dict()
    moved = {part: max((ddp[part][k] - init[k]).abs().max().item() for k in init) for part in ("teacher", "student")}
    print("moved", moved)
    assert moved["teacher"] > 1e-4 and moved["student"] > 1e-2


@pytest.mark.slow
def test_short_run_loss_falls_without_collapse(tiny_images, tmp_path):
    cfg = tiny_config(tiny_images, tmp_path / "ckpt", **{
        "optim.lr": 0.05, "optim.warmup_epochs": 0, "train.epochs": 5, "model.out_dim": 256,
        "logging.loggers": [f"jsonl:{tmp_path}/m.jsonl"], "checkpoint.every_n_steps": 0,
        "checkpoint.every_n_epochs": 5, "export.enabled": False,
    })
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    loss = np.array([r["loss"] for r in rows])
    kl = np.array([r["kl_teacher_student"] for r in rows])
    assert loss[-6:].mean() < loss[:6].mean() - 0.3, loss.round(2)
    assert kl[-6:].mean() < 0.7 * kl[:6].mean(), kl.round(2)  # the student learns to predict the teacher
    # Not collapsed: the teacher's targets are neither uniform nor the same for every image.
    entropy = np.array([r["teacher_entropy"] for r in rows[-6:]])
    to_centre = np.array([r["teacher_kl_to_center"] for r in rows[-6:]])
    assert (entropy < 0.8 * math.log(256)).all() and (to_centre > 0.5).all()


def test_nonfinite_loss_stops_naming_the_step(tiny_images, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(tiny_images, ckpt, **{"optim.lr": 1e12, "optim.warmup_epochs": 0, "optim.clip_grad": 0.0,
                                            "checkpoint.every_n_steps": 1, "export.enabled": False})
    with pytest.raises(NonFiniteLoss) as e:
        train(cfg)
    bad = e.value.step
    assert f"non-finite loss at step {bad}" in str(e.value) and bad >= 2
    # The last good checkpoint is the one before the bad step, intact and finite; nothing was written after it.
    assert [s for s, _ in list_checkpoints(str(ckpt))] == list(range(1, bad))
    good = read_checkpoint(latest_checkpoint(str(ckpt)))
    assert e.value.last_checkpoint.endswith(f"checkpoint-{bad - 1:09d}.pt")
    assert all(torch.isfinite(v).all() for v in good["student"].values() if v.is_floating_point())
    error = [ev for ev in progress_events(capsys.readouterr().out) if ev["event"] == "error"]
    assert error and error[0]["kind"] == "nonfinite" and error[0]["step"] == bad
    # The CLI maps it to exit code 3.
    assert main(tiny_overrides(tiny_images, tmp_path / "cli", **{
        "optim.lr": 1e12, "optim.warmup_epochs": 0, "optim.clip_grad": 0.0})) == EXIT_NONFINITE


def test_fp16_mode_scales_skips_and_checkpoints_the_scaler(tiny_images, tmp_path):
    """The reference's precision mode: fp16 autocast + GradScaler (on CPU here). Its first steps overflow at the
    initial scale of 65536, are skipped, and halve the scale; the scaler's state is checkpointed."""
    ckpt = tmp_path / "ckpt"
    result = train(tiny_config(tiny_images, ckpt, **{"train.precision": "fp16", "train.max_steps": 3,
                                                      "export.enabled": False}))
    assert result.metrics["grad_scale"] < 65536.0  # at least one overflowing step was skipped
    state = read_checkpoint(latest_checkpoint(str(ckpt)))
    assert state["grad_scaler"]["scale"] == result.metrics["grad_scale"]
    assert state["config"]["train"]["precision"] == "fp16"


def test_cli_config_errors_exit_2(tiny_images, tmp_path, caplog):
    assert main(["optim.lr=-1"]) == EXIT_CONFIG
    assert "optim.lr" in caplog.text
    assert main(["train.device=cpu"]) == EXIT_CONFIG  # no data.source
    assert "data.source" in caplog.text
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"arch": "vit_tiny"}, "optim": {"clip_mode": "sideways"}}))
    assert main(["--config", str(cfg_file)]) == EXIT_CONFIG
    assert "optim.clip_mode" in caplog.text


def test_sigterm_finishes_the_step_checkpoints_and_exits_143(tiny_images, tmp_path):
    """As Prefect cancels: SIGTERM to the whole process group, data-loader workers included."""
    ckpt = tmp_path / "ckpt"
    overrides = tiny_overrides(tiny_images, ckpt, **{"train.epochs": 50, "checkpoint.every_n_steps": 0,
                                                     "checkpoint.every_n_epochs": 50, "data.num_workers": 1})
    proc = subprocess.Popen([sys.executable, "-m", "dino_model.train", *overrides], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        seen = []
        deadline = time.monotonic() + 240
        for line in proc.stdout:  # wait for two steps, then ask it to stop
            ev = parse_progress_line(line)
            if ev:
                seen.append(ev)
            if ev and ev["event"] == "step" and ev["step"] >= 2:
                os.killpg(proc.pid, signal.SIGTERM)
                break
            assert time.monotonic() < deadline, "trainer made no progress"
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_TERMINATED, err[-3000:]
    events = seen + progress_events(out)
    end = [e for e in events if e["event"] == "end"]
    assert end and end[-1]["status"] == "terminated"
    stopped_at = end[-1]["step"]
    assert "SIGTERM" in err
    assert [s for s, _ in list_checkpoints(str(ckpt))] == [stopped_at]
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")]  # nothing half-written
    state = read_checkpoint(latest_checkpoint(str(ckpt)))
    assert state["cursor"]["epoch"] * 6 + state["cursor"]["batch"] == stopped_at


# ------------------------------------------------------------------------------------------------------------------
# metrics loggers and progress lines
# ------------------------------------------------------------------------------------------------------------------


class CollectingLogger:
    """A real logger that keeps what it receives (the pretrain flow plugs its MLflow logger in the same way)."""

    instances: list["CollectingLogger"] = []

    def __init__(self, arg):
        self.arg = arg
        self.rows: list[tuple[int, dict]] = []
        self.checkpoints: list[tuple[str, int]] = []
        self.closed = False
        CollectingLogger.instances.append(self)

    def log(self, step, metrics):
        self.rows.append((step, dict(metrics)))

    def on_checkpoint(self, uri, step):
        self.checkpoints.append((uri, step))

    def close(self):
        self.closed = True


def test_logger_registry_and_progress_lines(tmp_path):
    register_logger("collect", CollectingLogger)
    # "py:module:factory:argument" imports a factory: how a parent process adds a logger to a torchrun child.
    loggers = build_loggers(["collect:run-1", f"jsonl:{tmp_path}/m.jsonl",
                             f"py:dino_model.metrics:JsonlLogger:{tmp_path}/via-import.jsonl"])
    assert isinstance(loggers, MultiLogger) and len(loggers) == 3
    loggers.log(3, {"loss": 1.5, "lr": float("nan")})
    loggers.close()
    collected = CollectingLogger.instances[-1]
    assert collected.arg == "run-1" and collected.closed
    assert collected.rows[0][0] == 3 and collected.rows[0][1]["loss"] == 1.5
    for name in ("m.jsonl", "via-import.jsonl"):
        row = json.loads((tmp_path / name).read_text())
        assert row["step"] == 3 and row["loss"] == 1.5 and row["lr"] is None  # NaN -> null: still valid JSON
    with pytest.raises(ValueError, match="unknown metrics logger 'nope'"):
        build_loggers(["nope"])
    with pytest.raises(ValueError):
        JsonlLogger("")

    line = progress_line("step", step=5, loss=float("inf"), nested={"a": torch.tensor(2.0)})
    assert line.startswith("DINO_PROGRESS {")
    ev = parse_progress_line(line + "\n")
    assert ev["event"] == "step" and ev["step"] == 5 and ev["loss"] is None and ev["nested"] == {"a": 2.0}
    assert parse_progress_line("step 5 | loss 1.0") is None
    assert parse_progress_line("DINO_PROGRESS {not json") is None
