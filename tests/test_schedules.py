"""Per-step schedules against hand-computed values (reference `cosine_scheduler` semantics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dino_model.config import load_config
from dino_model.schedules import build_schedules, cosine_schedule, teacher_temp_schedule


def test_cosine_with_warmup_endpoints():
    sched = cosine_schedule(1.0, 0.1, epochs=5, niter_per_ep=4, warmup_epochs=2, start_warmup_value=0.0)
    assert len(sched) == 20
    # warm-up: linspace(0, 1, 8) -> first 0, last exactly the base value
    assert sched[0] == 0.0
    assert sched[1] == pytest.approx(1 / 7)
    assert sched[7] == pytest.approx(1.0)
    # cosine part of 12 steps starts at the base value and ends one step short of the final value
    assert sched[8] == pytest.approx(1.0)
    assert sched[14] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 6 / 12)))  # midpoint 0.55
    assert sched[19] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 11 / 12)))
    assert sched[19] > 0.1
    assert np.all(np.diff(sched[8:]) < 0)


def test_cosine_without_warmup_and_constant():
    sched = cosine_schedule(0.04, 0.4, epochs=2, niter_per_ep=3)
    assert sched[0] == pytest.approx(0.04)
    assert sched[3] == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert np.all(cosine_schedule(1e-4, 1e-4, 3, 2) == 1e-4)


def test_invalid_schedule_arguments_name_the_field():
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_schedule(1.0, 0.0, epochs=2, niter_per_ep=1, warmup_epochs=3)
    with pytest.raises(ValueError, match="niter_per_ep"):
        cosine_schedule(1.0, 0.0, epochs=2, niter_per_ep=0)
    with pytest.raises(ValueError, match="niter_per_ep"):
        build_schedules(load_config(), steps_per_epoch=0)
    with pytest.raises(ValueError, match="world_size"):
        build_schedules(load_config(), steps_per_epoch=1, world_size=0)


def test_teacher_temp_schedule_warmup():
    sched = teacher_temp_schedule(0.04, 0.07, 3, 5)
    assert np.allclose(sched, [0.04, 0.055, 0.07, 0.07, 0.07])
    # the reference recipe's 30-epoch warm-up
    sched = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert isinstance(sched, np.ndarray) and len(sched) == 100
    assert sched[0] == pytest.approx(0.04)
    assert sched[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert sched[29] == pytest.approx(0.07)
    assert np.allclose(sched[30:], 0.07)
    assert np.allclose(teacher_temp_schedule(0.04, 0.04, 0, 5), 0.04)
    with pytest.raises(ValueError, match="warmup_teacher_temp_epochs"):
        teacher_temp_schedule(0.04, 0.07, 20, 10)


def test_build_schedules_dino_defaults():
    cfg = load_config(overrides=[
        "train.epochs=20", "data.batch_size_per_gpu=256", "optim.lr=5e-4", "optim.min_lr=1e-6",
        "optim.warmup_epochs=10", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4",
        "optim.momentum_teacher=0.996", "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07",
        "loss.warmup_teacher_temp_epochs=4",
    ])
    s = build_schedules(cfg, steps_per_epoch=5, world_size=2)  # a global batch of 512
    assert s.total_steps == 100 and len(s.wd) == 100 and len(s.momentum) == 100
    # lr: 0 -> 5e-4 * 512 / 256 = 1e-3 at the end of the 50 warm-up steps, then cosine towards 1e-6
    assert s.lr[0] == 0.0
    assert s.lr[49] == pytest.approx(1e-3)
    assert s.lr[50] == pytest.approx(1e-3)
    assert s.lr[99] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 49 / 50)))
    assert s.wd[0] == pytest.approx(0.04) and s.wd[50] == pytest.approx(0.22)
    assert s.momentum[0] == pytest.approx(0.996) and 0.996 < s.momentum[-1] < 1.0
    assert s.momentum[50] == pytest.approx(0.998)
    # teacher temperature: the reference's per-epoch values, each repeated for the epoch's steps
    assert len(s.teacher_temp) == 100
    assert np.array_equal(s.teacher_temp, np.repeat(teacher_temp_schedule(0.04, 0.07, 4, 20), 5))
    assert np.allclose(s.teacher_temp[::5][:5], [0.04, 0.05, 0.06, 0.07, 0.07])
    assert s.teacher_temp[4] == pytest.approx(0.04)
    assert s.teacher_temp[5] == pytest.approx(0.05)
    assert s.at(5) == {"lr": s.lr[5], "wd": s.wd[5], "momentum": s.momentum[5], "teacher_temp": s.teacher_temp[5]}
