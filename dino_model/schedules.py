"""Per-step schedules as numpy arrays (indexed by the global step `epoch * niter_per_ep + it`).

    sched = build_schedules(cfg, steps_per_epoch=loader.batches_per_epoch, world_size=2)
    train_step(..., **sched.at(step))          # lr, wd, momentum, teacher_temp of that step

Reference semantics (facebookresearch/dino `utils.cosine_scheduler`): an optional linear warm-up of
`warmup_epochs * niter_per_ep` steps from `start_warmup_value` to `base_value` (both endpoints included, i.e.
`np.linspace`), then a half cosine from `base_value` (at its first step) towards `final_value`, never quite
reaching it: step i of the cosine part of length L is `final + (base - final) * (1 + cos(pi * i / L)) / 2`.

DINO uses
  * lr:        warm-up 0 -> lr * total_batch / 256 over `warmup_epochs` (10), cosine to `min_lr` (1e-6);
  * wd:        cosine 0.04 -> 0.4 (constant when both are equal, e.g. 1e-4 for ResNet-50);
  * momentum:  teacher EMA momentum, cosine 0.996 -> 1;
  * teacher temperature: per EPOCH (as the reference), linear 0.04 -> `teacher_temp` over
    `warmup_teacher_temp_epochs`, then constant; `Schedules.teacher_temp` repeats each epoch's value for its steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dino_model.config import DinoConfig


def cosine_schedule(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                    warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Array of length `epochs * niter_per_ep`: linear warm-up then half cosine (see module docstring)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if niter_per_ep < 1:
        raise ValueError(f"niter_per_ep must be >= 1, got {niter_per_ep}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    schedule = np.concatenate((warmup, cosine)).astype(np.float64)
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                          nepochs: int) -> np.ndarray:
    """Per-epoch teacher temperature, length `nepochs`: `np.linspace(warmup, final, warmup_epochs)` then final."""
    if nepochs < 1:
        raise ValueError(f"nepochs must be >= 1, got {nepochs}")
    if not 0 <= warmup_teacher_temp_epochs <= nepochs:
        raise ValueError(
            f"warmup_teacher_temp_epochs must be in [0, nepochs={nepochs}], got {warmup_teacher_temp_epochs}"
        )
    if warmup_teacher_temp <= 0 or teacher_temp <= 0:
        raise ValueError(
            f"teacher temperatures must be > 0, got warmup_teacher_temp={warmup_teacher_temp}, "
            f"teacher_temp={teacher_temp}"
        )
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    )).astype(np.float64)


@dataclass(frozen=True)
class Schedules:
    """Every per-step value of a run, indexed by the global step (length ``epochs * steps_per_epoch``)."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @property
    def total_steps(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> dict[str, float]:
        """``{"lr", "wd", "momentum", "teacher_temp"}`` at global ``step``: what the training step takes."""
        return {"lr": float(self.lr[step]), "wd": float(self.wd[step]), "momentum": float(self.momentum[step]),
                "teacher_temp": float(self.teacher_temp[step])}


def build_schedules(cfg: DinoConfig, steps_per_epoch: int, world_size: int = 1) -> Schedules:
    """The schedules of ``cfg`` for epochs of ``steps_per_epoch`` steps on ``world_size`` ranks. ``optim.lr`` is
    the base lr for a global batch of 256: the peak is ``lr * global_batch / 256`` (linear scaling rule), reached
    at the end of the warm-up. The teacher temperature changes per epoch, as in the reference: each epoch's
    value is repeated for its steps."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    epochs, o, loss = cfg.train.epochs, cfg.optim, cfg.loss
    global_batch = cfg.data.batch_size_per_gpu * world_size
    per_epoch_temp = teacher_temp_schedule(loss.warmup_teacher_temp, loss.teacher_temp,
                                           loss.warmup_teacher_temp_epochs, epochs)
    return Schedules(
        lr=cosine_schedule(o.lr * global_batch / 256.0, o.min_lr, epochs, steps_per_epoch,
                           warmup_epochs=o.warmup_epochs),
        wd=cosine_schedule(o.weight_decay, o.weight_decay_end, epochs, steps_per_epoch),
        momentum=cosine_schedule(o.momentum_teacher, 1.0, epochs, steps_per_epoch),
        teacher_temp=np.repeat(per_epoch_temp, steps_per_epoch),
    )
