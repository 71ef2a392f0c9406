"""Per-step schedules as numpy arrays (indexed by the global step `epoch * niter_per_ep + it`).

Reference semantics (facebookresearch/dino `utils.cosine_scheduler`): an optional linear warm-up of
`warmup_epochs * niter_per_ep` steps from `start_warmup_value` to `base_value` (both endpoints included, i.e.
`np.linspace`), then a half cosine from `base_value` (at its first step) towards `final_value`, never quite
reaching it: step i of the cosine part of length L is `final + (base - final) * (1 + cos(pi * i / L)) / 2`.

DINO uses
  * lr:        warm-up 0 -> lr * total_batch / 256 over `warmup_epochs` (10), cosine to `min_lr` (1e-6);
  * wd:        cosine 0.04 -> 0.4 (constant when both are equal, e.g. 1e-4 for ResNet-50);
  * momentum:  teacher EMA momentum, cosine 0.996 -> 1;
  * teacher temperature: per EPOCH (as the reference and `DINOLoss`), linear 0.04 -> `teacher_temp` over
    `warmup_teacher_temp_epochs`, then constant.  `Schedules.teacher_temp_at_step` maps a step to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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


@dataclass
class Schedules:
    """All training schedules. `lr`, `wd`, `momentum`: per step; `teacher_temp`: per epoch."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    niter_per_ep: int

    @property
    def total_steps(self) -> int:
        return len(self.lr)

    def teacher_temp_at_step(self, step: int) -> float:
        return float(self.teacher_temp[step // self.niter_per_ep])


def build_schedules(*, epochs: int, niter_per_ep: int, total_batch: int, lr: float = 5e-4, min_lr: float = 1e-6,
                    warmup_epochs: int = 10, weight_decay: float = 0.04, weight_decay_end: float = 0.4,
                    momentum_teacher: float = 0.996, warmup_teacher_temp: float = 0.04,
                    teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0) -> Schedules:
    """The DINO schedules (defaults: the reference's).  `lr` is the base lr for a total batch of 256: the peak
    is `lr * total_batch / 256` (linear scaling rule), reached at the end of the warm-up."""
    if total_batch < 1:
        raise ValueError(f"total_batch must be >= 1, got {total_batch}")
    if not 0.0 <= momentum_teacher <= 1.0:
        raise ValueError(f"momentum_teacher must be in [0, 1], got {momentum_teacher}")
    return Schedules(
        lr=cosine_schedule(lr * total_batch / 256.0, min_lr, epochs, niter_per_ep, warmup_epochs=warmup_epochs),
        wd=cosine_schedule(weight_decay, weight_decay_end, epochs, niter_per_ep),
        momentum=cosine_schedule(momentum_teacher, 1.0, epochs, niter_per_ep),
        teacher_temp=teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs),
        niter_per_ep=niter_per_ep,
    )
