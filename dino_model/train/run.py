"""A training run between its steps: :class:`Run` holds the state (:class:`dino_model.step.TrainingState`), the
schedules and the loop's controls, and does what one step of the loop needs: take a step (through the fast path's
first-steps guard while it watches), agree across ranks, log, write a checkpoint."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dino_model import distributed as dist_utils
from dino_model.checkpoint import gather_rng_states, make_checkpoint, save_checkpoint
from dino_model.config import DinoConfig
from dino_model.data.rng import derive_seed
from dino_model.fast_path import Verdict
from dino_model.fast_path.step_canary import StepPath, canary_step_args
from dino_model.fast_path.training import FirstStepsGuard
from dino_model.health import HEALTHY, HealthMonitor, WindowVerdict
from dino_model.meta_arch import DINO
from dino_model.metrics import MultiLogger
from dino_model.schedules import Schedules
from dino_model.step import StepSettings, TrainingState, train_step

from .builders import build_train_loader, prepare_model
from .controls import Cadence, NonFiniteWatch, Progress, StopSignals, Throughput
from .knn_monitor import KnnMonitor
from .outcomes import NonFiniteLoss

__all__ = ["STAT_KEYS", "Run"]

log = logging.getLogger("dino_model.train")

# Stats of train_step that are averaged over ranks at log steps (order matters: one all-reduce).
STAT_KEYS = (
    "loss",
    "grad_norm",
    "teacher_entropy",
    "teacher_kl_to_uniform",
    "teacher_kl_to_center",
    "kl_teacher_student",
    "teacher_feature_spread",
)


@dataclass
class Run:
    """Everything a run holds between steps: made by :func:`setup_run`, advanced by :func:`run_epoch`, ended by
    :func:`finish`. ``(epoch, batch)`` is the data cursor, the next batch to read."""

    cfg: DinoConfig
    ctx: dist_utils.DistContext
    state: TrainingState  #: model, optimiser, grad scaler: what a step changes
    step_settings: StepSettings
    schedules: Schedules
    cadence: Cadence
    steps_per_epoch: int
    augment_on_device: bool  #: where batches are decoded and augmented (as the data check decided)
    step_path: StepPath  #: how the step runs (as the step check decided)
    fast_path: dict[str, Verdict]  #: the fast-path verdicts ("data", "step")
    first_steps: FirstStepsGuard
    prepare_batch: Callable[[dict[str, Any]], list[torch.Tensor]]
    loggers: MultiLogger
    progress: Progress
    watch: NonFiniteWatch
    throughput: Throughput
    step: int
    epoch: int
    batch: int
    last_checkpoint: str | None
    health: HealthMonitor | None = None  #: the training-health monitor (dino_model.health)
    knn: KnnMonitor | None = None  #: the learning curve's k-NN, on rank 0 (with monitor.val_source)
    loader: Any = None  #: the loader of the cursor's epoch once built (setup_run builds the first)
    last_metrics: dict[str, float] = field(default_factory=dict)
    collapsed: str = ""  #: the bad health verdict that stops this run (train.health=stop), once called
    health_announced: str = ""  #: the verdict the loggers were last told of as a change

    def take_loader(self) -> Any:
        """The loader of the cursor's epoch, positioned at the cursor, built here unless setup_run already did."""
        loader, self.loader = self.loader, None
        return loader if loader is not None else build_train_loader(self.cfg, self.ctx, self.epoch, self.batch,
                                                                    on_device=self.augment_on_device)

    @property
    def model(self) -> DINO:
        return self.state.model

    def take_step(self, crops: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One update at schedule index ``step`` (through the first-steps guard while it watches); advances the
        step and the cursor."""
        stats = self.guarded_step(crops) if self.first_steps.active else self.step_once(crops)
        self.step += 1
        self.batch += 1
        self.watch.observe(stats["loss"], self.step)
        return stats

    def guarded_step(self, crops: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """A step the first-steps guard watches. When it failed (the state is back to before it), the guard's
        decision is applied: the model goes plain for the guard's check, then onto the path it chose, and the same
        batch is stepped again."""
        guarded = self.first_steps.step(lambda: self.step_once(crops), self.state, self.step + 1)
        if guarded.failure is None:
            return guarded.stats
        self.use_step_path(None)  # plain: not compiled, not in DDP, so the check can copy it
        verdict, path = self.first_steps.fallback(guarded.failure, self.state, crops,
                                                  canary_step_args(self.schedules, self.step, self.epoch))
        self.use_step_path(path)
        self.record_fast_path(verdict)
        return self.step_once(crops)

    def step_once(self, crops: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """:func:`dino_model.step.train_step` at schedule index ``step``, on the run's step path."""
        # Randomness inside the step (drop-path) is a function of (seed, rank, step) rather than of everything
        # drawn before, so a resumed run draws what the uninterrupted one drew.
        torch.manual_seed(derive_seed(self.cfg.train.seed, "step", self.ctx.rank, self.step))
        return train_step(self.state.model, self.state.optimizer, crops, epoch=self.epoch,
                          settings=self.step_settings, grad_scaler=self.state.grad_scaler,
                          **self.schedules.at(self.step))

    def use_step_path(self, path: StepPath | None) -> None:
        """Run the step on ``path`` from now on (``None``: plain, for a check; see :func:`prepare_model`)."""
        prepare_model(self.cfg, self.ctx, self.state, path)
        if path is not None:
            self.step_path = path
            self.step_settings = StepSettings.from_config(self.cfg, path.autocast_dtype)

    def record_fast_path(self, *verdicts: Verdict, announce: bool = True) -> None:
        """Keep the verdicts and hand them to the loggers (MLflow tags and params, the console) and, with
        ``announce``, to the parent process as a ``fast_path`` progress line (the ``start`` line carries the first
        verdicts)."""
        for verdict in verdicts:
            self.fast_path[verdict.part] = verdict
        records = {part: v.as_record() for part, v in self.fast_path.items()}
        self.loggers.on_fast_path(records)
        if announce:
            self.progress("fast_path", **records)

    def agree(self, stop: StopSignals) -> bool:
        """Agree with the other ranks: raise :class:`NonFiniteLoss` if any rank saw one; whether any rank was
        asked to stop."""
        bad_step, stop_any = self.watch.agree(stop.requested)
        if bad_step is not None:
            self.progress("error", kind="nonfinite", step=bad_step, epoch=self.epoch,
                          last_checkpoint=self.last_checkpoint)
            raise NonFiniteLoss(bad_step, self.epoch, self.last_checkpoint)
        return bool(stop_any)

    def log_step(self, stats: dict[str, torch.Tensor]) -> None:
        """Step metrics averaged over ranks, to the loggers and as a progress line (a collective)."""
        vec = torch.stack([stats[k].float().reshape(()) for k in STAT_KEYS])
        metrics = dict(zip(STAT_KEYS, dist_utils.all_reduce_mean(vec).tolist()))
        metrics.update(epoch=float(self.epoch), **self.schedules.at(self.step - 1),
                       images_per_s=self.throughput.images_per_s(self.step))
        if self.state.grad_scaler is not None:  # fp16: NaN/inf gradients mean a skipped step and a lower scale
            metrics["grad_scale"] = float(self.state.grad_scaler.get_scale())
        self.last_metrics = metrics
        self.loggers.log(self.step, metrics)
        self.progress("step", **{"step": self.step, "total_steps": self.schedules.total_steps, "batch": self.batch,
                                 **metrics, "epoch": self.epoch})
        if self.health is not None:
            window = self.health.observe(self.step, metrics)
            if window is not None:
                self.judge_health(window)

    def measure_learning_curve(self) -> None:
        """The learning curve's next point (a collective when ``monitor.val_source`` is set): rank 0 measures the
        teacher's k-NN and hands it to the loggers (metric ``monitor.knn<k>_top1``) and the parent process
        (``knn`` progress line); the other ranks wait for it."""
        if not self.cfg.monitor.val_source:
            return
        if self.knn is not None:
            started = time.perf_counter()
            metrics = self.knn.measure(self.model.teacher_backbone())
            seconds = time.perf_counter() - started
            self.loggers.log(self.step, {**metrics, "epoch": float(self.epoch)})
            self.progress("knn", step=self.step, epoch=self.epoch, seconds=round(seconds, 3), **metrics)
            log.info("learning curve at step %d: %s (%.1f s)",
                     self.step, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), seconds)
        dist_utils.barrier()

    def checkpoint_parts(self) -> dict[str, Any]:
        """What a checkpoint of this run saves: the training state and the health monitor's history."""
        return {**self.state.parts(), **({"health": self.health} if self.health is not None else {})}

    def judge_health(self, window: WindowVerdict) -> None:
        """A window's verdict (every rank reaches the same, from the same all-reduced metrics): to the loggers
        and the parent process; a WARNING when a bad verdict is called; with ``train.health=stop`` the run stops
        at this step (:attr:`collapsed`)."""
        called = self.health.called
        changed = called != self.health_announced
        text = window.describe() if window.verdict == called else f"{called} (latest window: {window.describe()})"
        record = {"called": called, "window": window.as_record(), "text": text, "changed": changed}
        self.loggers.on_health(record)
        self.progress("health", step=self.step, **record)
        if changed and self.ctx.is_main:
            (log.info if called == HEALTHY else log.warning)("training health: %s", text)
        self.health_announced = called
        if called != HEALTHY and self.cfg.train.health == "stop":
            self.collapsed = called

    @property
    def epochs_done(self) -> float:
        """Epochs of updates done, fractional (a stop at ``max_steps`` or on a signal ends mid-epoch)."""
        return round(self.step / self.steps_per_epoch, 4)

    def write_checkpoint(self, final: bool = False) -> None:
        """A checkpoint of this step and cursor (a collective: every rank calls it; rank 0 writes). ``final``: the
        run ends after it (its last step, ``max_steps`` or a stop signal), which ``logging.mlflow_checkpoints=last``
        keeps."""
        rng = gather_rng_states(self.ctx.device)
        written = None
        if self.ctx.is_main:
            state = make_checkpoint(self.checkpoint_parts(), step=self.step, cursor=(self.epoch, self.batch), rng=rng,
                                    config=self.cfg.to_dict(), metrics=self.last_metrics,
                                    world_size=self.ctx.world_size)
            written = save_checkpoint(self.cfg.checkpoint.uri, state, keep_last=self.cfg.checkpoint.keep_last)
            self.progress("checkpoint", step=self.step, epoch=self.epoch, uri=written)
            self.loggers.on_checkpoint(written, self.step)  # e.g. MLflow records where it is
            keep = self.cfg.logging.mlflow_checkpoints
            if keep == "all" or (keep == "last" and final):
                self.loggers.archive_checkpoint(written, self.step)  # e.g. MLflow uploads a copy as a run artifact
            log.info("checkpoint written: %s", written)
        # Nobody leaves (or lets torchrun tear the group down) before the file is complete.
        dist_utils.barrier()
        self.last_checkpoint = dist_utils.broadcast_object(written)
