"""Training health (dino_model/health.py): the rules on known figures, the monitor's windows, patience and
checkpoint state; then real tiny runs — a healthy one is never flagged, and each collapse the issue trackers
know (uniform: a far too hot teacher; one-hot: no centring; a teacher that is the student object) is named
within a bounded number of steps; ``train.health=stop`` checkpoints, exits 5 and records its stop reason."""

from __future__ import annotations

import json
import math

import pytest

from dino_model.checkpoint import latest_checkpoint, read_checkpoint
from dino_model.config import HealthConfig, load_config
from dino_model.health import (
    COLLAPSE_ONE_HOT,
    COLLAPSE_UNIFORM,
    HEALTHY,
    STALLED,
    HealthMonitor,
    judge_window,
    stop_reason,
)
from dino_model.metrics import register_logger
from dino_model.train import EXIT_COLLAPSED, main, run_epoch, setup_run
from dino_model.train.controls import StopSignals
from tests.test_train import tiny_images, tiny_overrides  # noqa: F401 - the module fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 64
LOG_K = math.log(K)
ROWS = 16  # 2 global crops x 8 images: information is at most ln 16 = 0.667 ln K


def means(entropy, information, kl=1.0, spread=0.8, loss=3.0) -> dict:
    """Window means in units of ln K for the entropies (as the thresholds are written)."""
    return {"teacher_entropy": entropy * LOG_K, "teacher_kl_to_center": information * LOG_K,
            "kl_teacher_student": kl * LOG_K, "teacher_feature_spread": spread, "loss": loss}


def test_each_rule_on_the_figures_measured_in_tiny_runs():
    t = HealthConfig()
    # healthy tiny run (steps 20-240): entropy 0.43-0.55, information 0.19-0.33 ln K, KL >= 0.17, spread >= 0.6
    assert judge_window(means(0.45, 0.28, kl=0.2, spread=0.62), K, ROWS, t, 3.0)[0] == HEALTHY
    # teacher temperature 1.0: entropy 0.997, information 0.002
    assert judge_window(means(0.997, 0.002, kl=0.03), K, ROWS, t, None)[0] == COLLAPSE_UNIFORM
    # no centring: the batch's targets on ~1.7 prototypes; on ~2.5, with little information (the textures run)
    verdict, reason = judge_window(means(0.11, 0.017), K, ROWS, t, None)
    assert verdict == COLLAPSE_ONE_HOT and "prototypes" in reason
    textures = {"teacher_entropy": 0.25, "teacher_kl_to_center": 0.63, "kl_teacher_student": 0.57,
                "teacher_feature_spread": 0.49, "loss": 0.8}
    assert judge_window(textures, 1024, 128, t, None)[0] == COLLAPSE_ONE_HOT
    textures.update(teacher_entropy=4.4, teacher_kl_to_center=0.56)  # the same run later: spread-out targets,
    assert judge_window(textures, 1024, 128, t, None)[0] == COLLAPSE_UNIFORM  # still < 1 bit about the image
    # the same target for every image, neither extreme yet: named by its entropy
    assert judge_window(means(0.7, 0.02), K, ROWS, t, None)[0] == COLLAPSE_UNIFORM
    assert judge_window(means(0.3, 0.03), K, ROWS, t, None)[0] == COLLAPSE_ONE_HOT
    # every image gets the same feature although the targets still differ
    verdict, reason = judge_window(means(0.45, 0.28, spread=0.01), K, ROWS, t, None)
    assert verdict == COLLAPSE_ONE_HOT and "same feature" in reason
    # nothing left to learn and nothing moves; the same KL with a moving loss is not a stall
    assert judge_window(means(0.45, 0.28, kl=0.001, loss=3.0), K, ROWS, t, 3.0001)[0] == STALLED
    assert judge_window(means(0.45, 0.28, kl=0.001, loss=3.0), K, ROWS, t, 3.3)[0] == HEALTHY
    assert judge_window(means(0.45, 0.28, kl=0.001), K, ROWS, t, None)[0] == HEALTHY  # no previous window
    # thresholds are the user's
    assert judge_window(means(0.45, 0.28), K, ROWS, HealthConfig(min_information=0.5), None)[0] == COLLAPSE_ONE_HOT
    assert stop_reason(COLLAPSE_UNIFORM) == "collapsed:uniform" and stop_reason(STALLED) == "stalled"


def feed(monitor: HealthMonitor, steps, entropy, information) -> list:
    metrics = means(entropy, information)
    return [w for w in (monitor.observe(s, metrics) for s in steps) if w is not None]


def test_windows_start_after_the_warm_ups_and_a_verdict_needs_patience():
    cfg = load_config(overrides=["model.out_dim=64", "optim.warmup_epochs=2", "loss.warmup_teacher_temp_epochs=1",
                                 "train.epochs=10", "health.window_steps=10", "health.patience=2"])
    monitor = HealthMonitor.from_config(cfg, steps_per_epoch=5)
    assert monitor.start_step == 10  # the longer warm-up: 2 epochs of 5 steps
    assert feed(monitor, range(1, 11), 0.999, 0.0) == [] and monitor.called == ""  # warming up: not judged
    first = feed(monitor, range(11, 21), 0.999, 0.0)
    assert [w.verdict for w in first] == [COLLAPSE_UNIFORM] and monitor.called == HEALTHY  # one window: not yet
    assert (first[0].first_step, first[0].last_step) == (11, 20)
    feed(monitor, range(21, 31), 0.3, 0.02)  # bad again, in another face: called, named by the latest window
    assert monitor.called == COLLAPSE_ONE_HOT
    feed(monitor, range(31, 41), 0.45, 0.28)
    assert monitor.called == HEALTHY and len(monitor.history) == 3
    # state round trip mid-window
    feed(monitor, range(41, 45), 0.45, 0.28)
    again = HealthMonitor.from_config(cfg, steps_per_epoch=5)
    again.load_state_dict(json.loads(json.dumps(monitor.state_dict())))
    assert again.state_dict() == monitor.state_dict()
    assert [w.last_step for w in feed(again, range(45, 51), 0.45, 0.28)] == [50]
    # a window grows until it has min_points logged steps (sparse logging)
    sparse = HealthMonitor(HealthConfig(window_steps=5, min_points=3), K, ROWS, 0)
    assert [w.last_step for w in feed(sparse, range(10, 100, 10), 0.45, 0.28)] == [30, 60, 90]


# ------------------------------------------------------------------------------------------------------------------
# real tiny runs (ViT-Tiny, K = 64, 48 images, 6 steps per epoch)
# ------------------------------------------------------------------------------------------------------------------


class HealthRecords:
    """A logger that keeps the health records and the end of the run (registered as ``health-records``)."""

    runs: dict[str, "HealthRecords"] = {}

    def __init__(self, name):
        self.records, self.stop_reason = [], None
        HealthRecords.runs[name] = self

    def log(self, step, metrics):
        pass

    def on_health(self, record):
        self.records.append(record)

    def on_run_end(self, step, reason):
        self.stop_reason = reason

    def close(self):
        pass


def health_overrides(images, ckpt, name: str, **extra) -> list[str]:
    register_logger("health-records", HealthRecords)
    return tiny_overrides(images, ckpt, **{
        "logging.loggers": [f"health-records:{name}"], "logging.progress": False, "export.enabled": False,
        "checkpoint.every_n_steps": 0, "checkpoint.keep_last": 1, "health.window_steps": 12, "health.patience": 2,
        **extra})


def run_tiny(overrides: list[str], shared_teacher: bool = False):
    """Train as ``train()`` does, optionally with the dinov2 #407 bug: the teacher is the student object."""
    run = setup_run(load_config(overrides=overrides))
    if shared_teacher:
        run.state.model.teacher = run.state.model.student
    try:
        with StopSignals() as stop:
            while not run.cadence.done(run.step) and not run_epoch(run, stop):
                pass
    finally:
        run.loggers.close()
    return run


@pytest.mark.slow
def test_a_healthy_run_is_never_flagged(tiny_images, tmp_path):
    run = run_tiny(health_overrides(tiny_images, tmp_path / "ckpt", "healthy", **{"train.epochs": 12}))
    windows = run.health.history
    assert len(windows) >= 5 and windows[0]["first_step"] > 6  # judged only after the 1-epoch warm-up
    assert {w["verdict"] for w in windows} == {HEALTHY} and run.health.called == HEALTHY
    records = HealthRecords.runs["healthy"].records
    assert [r["changed"] for r in records] == [True] + [False] * (len(records) - 1)  # announced once


@pytest.mark.slow
@pytest.mark.parametrize("case, extra, expected", [
    # a teacher temperature far above the paper's 0.04-0.07: every target nearly uniform (loss ~ ln K)
    ("uniform", {"loss.teacher_temp": 1.0, "loss.warmup_teacher_temp": 1.0}, {COLLAPSE_UNIFORM}),
    # no centring (the centre stays at zero) with a fast learning rate: one prototype wins for every image
    ("one-hot", {"loss.center_momentum": 1.0, "optim.lr": 0.05, "optim.warmup_epochs": 0}, {COLLAPSE_ONE_HOT}),
])
def test_collapses_are_named_within_a_bounded_number_of_steps(tiny_images, tmp_path, case, extra, expected):
    run = run_tiny(health_overrides(tiny_images, tmp_path / "ckpt", case, **{"train.epochs": 14, **extra}))
    assert run.health.called in expected, run.health.history
    called_at = next(r["window"]["last_step"] for r in HealthRecords.runs[case].records if r["called"] != HEALTHY)
    assert called_at <= 84


@pytest.mark.slow
def test_a_teacher_that_is_the_student_collapses_and_is_named(tiny_images, tmp_path):
    run = run_tiny(health_overrides(tiny_images, tmp_path / "ckpt", "shared", **{"train.epochs": 14}),
                   shared_teacher=True)
    assert run.health.called in (COLLAPSE_UNIFORM, COLLAPSE_ONE_HOT), run.health.history
    assert run.health.last.figures["information_ratio"] <= 0.15


@pytest.mark.slow
def test_stop_checkpoints_exits_5_and_records_why(tiny_images, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    overrides = health_overrides(tiny_images, ckpt, "stop", **{
        "train.epochs": 14, "train.health": "stop", "loss.teacher_temp": 1.0, "loss.warmup_teacher_temp": 1.0,
        "logging.progress": True})
    assert main(overrides) == EXIT_COLLAPSED
    ended = HealthRecords.runs["stop"]
    assert ended.stop_reason == "collapsed:uniform"
    out = capsys.readouterr().out
    end = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("DINO_PROGRESS")]
    end = [e for e in end if e["event"] == "end"][-1]
    assert end["status"] == "collapsed:uniform" and end["checkpoint"]
    state = read_checkpoint(latest_checkpoint(str(ckpt)))
    assert state["step"] == end["step"] < 84  # stopped early, at the step the verdict was called
    assert state["health"]["called"] == COLLAPSE_UNIFORM and len(state["health"]["history"]) >= 2
    # a resumed run keeps the history (here with warn: it goes on, and the verdict is still in force)
    resumed = run_tiny(health_overrides(tiny_images, ckpt, "resumed", **{
        "train.epochs": 14, "loss.teacher_temp": 1.0, "loss.warmup_teacher_temp": 1.0, "train.max_steps": 84}))
    assert resumed.health.history[:len(state["health"]["history"])] == state["health"]["history"]
    assert resumed.health.called == COLLAPSE_UNIFORM


@pytest.mark.slow
def test_the_learning_curve_starts_at_the_random_backbone_and_follows_the_epochs(tmp_path, capsys):
    from dino_model.metrics import parse_progress_line
    from tests.datasets import write_colour_set

    train = write_colour_set(tmp_path / "train-images", tmp_path / "train", range(4), 12, seed=0, name="train")
    val = write_colour_set(tmp_path / "val-images", tmp_path / "val", range(4), 5, seed=1, name="val")
    overrides = tiny_overrides(train, tmp_path / "ckpt", **{
        "data.source": train, "train.epochs": 3, "monitor.val_source": val, "monitor.train_samples": 40,
        "monitor.every_epochs": 2, "monitor.crop_size": 32, "logging.loggers": [f"jsonl:{tmp_path}/m.jsonl"],
        "export.enabled": False, "checkpoint.keep_last": 1})
    assert main(overrides) == 0
    events = [e for e in map(parse_progress_line, capsys.readouterr().out.splitlines()) if e and e["event"] == "knn"]
    # before the first step, after epoch 2 (every_epochs) and after the last epoch
    assert [e["step"] for e in events] == [0, 12, 18]
    assert all(0.0 <= e["monitor.knn20_top1"] <= 100.0 for e in events)
    logged = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["monitor.knn20_top1"]) for r in logged if "monitor.knn20_top1" in r]
    assert curve == [(e["step"], e["monitor.knn20_top1"]) for e in events]
    # an unlabelled or missing set is a configuration error that names the field
    with pytest.raises(Exception, match="monitor"):
        run_tiny(tiny_overrides(train, tmp_path / "ckpt2", **{"data.source": train,
                                                              "monitor.val_source": str(tmp_path / "nowhere")}))


@pytest.mark.slow
def test_the_small_data_recipe_trains_without_tripping_the_monitor(tmp_path):
    """docs/small-data.md: the recipe's quality is a GPU measurement; here, that it trains and stays healthy (a
    ViT-Tiny for the CPU, everything else the recipe's: K = 1,024, teacher 0.02, momentum 0.99, 2x128 + 6x64)."""
    from tests.datasets import write_colour_set

    train = write_colour_set(tmp_path / "images", tmp_path / "train", range(4), 12, seed=0, name="train")
    register_logger("health-records", HealthRecords)
    overrides = [f"data.source={json.dumps(train)}", f"checkpoint.uri={json.dumps(str(tmp_path / 'ckpt'))}",
                 "model.arch=vit_tiny", "data.batch_size_per_gpu=8", "data.num_workers=0", "train.device=cpu",
                 "train.epochs=6", "optim.warmup_epochs=1", "health.window_steps=8", "logging.log_every=1",
                 "logging.loggers=[health-records:small-data]", "logging.progress=false", "export.enabled=false",
                 "checkpoint.every_n_steps=0", "checkpoint.keep_last=1"]
    cfg = load_config(overrides=overrides, preset="small-data", dataset_size=lambda: 48)
    assert (cfg.model.out_dim, cfg.loss.teacher_temp, cfg.crops.global_size, cfg.crops.n_local) == (1024, 0.02, 128, 6)
    run = setup_run(cfg)
    try:
        with StopSignals() as stop:
            while not run.cadence.done(run.step):
                run_epoch(run, stop)
    finally:
        run.loggers.close()
    assert len(run.health.history) >= 3 and run.health.called == HEALTHY, run.health.history


# ------------------------------------------------------------------------------------------------------------------
# through the dino-pretrain flow: MLflow, the progress artifact, the model card, no retry of a health stop
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def labelled_shards(tmp_path):
    from tests.datasets import write_colour_set

    train = write_colour_set(tmp_path / "train-images", tmp_path / "train", range(4), 12, seed=0, name="train")
    val = write_colour_set(tmp_path / "val-images", tmp_path / "val", range(4), 5, seed=1, name="val")
    return train, val


FLOW_TINY = ["model.arch=vit_tiny", "model.out_dim=64", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
             "crops.global_size=32", "crops.local_size=16", "crops.n_local=2", "data.batch_size_per_gpu=8",
             "data.num_workers=0", "optim.warmup_epochs=1", "train.device=cpu", "logging.log_every=1",
             "checkpoint.every_n_steps=0", "checkpoint.keep_last=1", "health.window_steps=12", "monitor.crop_size=32"]


@pytest.mark.slow
def test_a_flow_run_stopped_by_its_health_monitor_fails_once_and_says_why(labelled_shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.pretrain import dino_pretrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    train, _ = labelled_shards
    state = dino_pretrain(data=train, checkpoint_uri=str(tmp_path / "ckpt"), overrides=FLOW_TINY + [
        "train.epochs=14", "train.health=stop", "loss.teacher_temp=1.0", "loss.warmup_teacher_temp=1.0"],
        launch={"retries": 2}, tracking={"experiment": "health", "registered_model": "health"}, return_state=True)
    assert state.is_failed() and "collapsed:uniform" in state.message and "Not retried" in state.message
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs()
    train_runs = [r for r in runs if r.flow_run_id == state.state_details.flow_run_id and r.name.startswith("train")]
    assert len(train_runs) == 1 and train_runs[0].run_count == 1  # no retry: it would collapse again
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("health").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["stop_reason"] == "collapsed:uniform"
    assert run.data.tags["health"] == "collapse:uniform" and "nearly uniform" in run.data.tags["health.detail"]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "health.bad")][-2:] == [1.0, 1.0]
    assert latest_checkpoint(run.data.tags["checkpoint_uri"]) is not None
    assert not client.search_registered_models()  # nothing registered


@pytest.mark.slow
def test_the_learning_curve_reaches_mlflow_the_progress_artifact_and_the_model_card(labelled_shards, tmp_path,
                                                                                    monkeypatch):
    from mlflow.tracking import MlflowClient

    from flows.pretrain import dino_pretrain
    from tests.test_pretrain_flow import _last_progress_description

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    train, val = labelled_shards
    out = dino_pretrain(data=train, checkpoint_uri=str(tmp_path / "ckpt"), val_data=val,
                        overrides=FLOW_TINY + ["train.epochs=3", "monitor.every_epochs=1"],
                        tracking={"experiment": "curve", "registered_model": "curve"})
    client = MlflowClient()
    curve = sorted((m.step, m.value) for m in client.get_metric_history(out["run_id"], "monitor.knn20_top1"))
    assert [s for s, _ in curve] == [0, 6, 12, 18]
    description = _last_progress_description()
    assert f"k-NN {curve[-1][1]:.1f} % (random {curve[0][1]:.1f} %)" in description and "health " in description
    card = client.get_model_version("curve", out["version"]).description
    assert "- **learning curve**: k-NN 20 top-1: " in card and f"{curve[0][1]:.1f} % (step 0)" in card
    assert f"{curve[-1][1] - curve[0][1]:+.1f} points over the randomly initialised backbone" in card
    assert "- **training health**: **healthy**" in card
