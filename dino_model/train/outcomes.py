"""How a training run ends: the exit codes of ``python -m dino_model.train``, the exceptions that stop a run, and
what a finished run returns (:class:`TrainResult`)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_CONFIG", "EXIT_NONFINITE", "EXIT_FAST_PATH", "EXIT_COLLAPSED",
           "EXIT_TERMINATED", "NonFiniteLoss", "TrainingCollapsed", "TrainingTerminated", "TrainResult"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_FAST_PATH = 4
EXIT_COLLAPSED = 5
EXIT_TERMINATED = 143  # 128 + SIGTERM, the shell's convention for "terminated by a signal"


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; ``step`` is the 1-based global step whose loss was first non-finite."""

    def __init__(self, step: int, epoch: int, last_checkpoint: str | None):
        self.step = step
        self.epoch = epoch
        self.last_checkpoint = last_checkpoint
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        super().__init__(
            f"non-finite loss at step {step} (epoch {epoch}): stopping without writing a checkpoint ({where}). "
            "Lower optim.lr, raise loss.teacher_temp warm-up, or check the data."
        )


class TrainingTerminated(RuntimeError):
    """SIGTERM / SIGINT / SIGHUP received: training stopped at a step boundary after writing ``checkpoint``."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint: {checkpoint or 'none'}"
        )


class TrainingCollapsed(RuntimeError):
    """``train.health=stop`` and the health monitor called a collapse (or a stall): training stopped after
    writing ``checkpoint``; ``stop_reason`` is ``collapsed:<mode>`` or ``stalled``."""

    def __init__(self, verdict: str, stop_reason: str, step: int, checkpoint: str | None, detail: str):
        self.verdict = verdict
        self.stop_reason = stop_reason
        self.step = step
        self.checkpoint = checkpoint
        self.detail = detail
        super().__init__(
            f"training stopped at step {step} ({stop_reason}, train.health=stop): {detail}; checkpoint: "
            f"{checkpoint or 'none'}. A retry would collapse again: change the recipe (teacher temperature, "
            "learning rate, centring; see dino_model/health.py) before resuming, or set train.health=warn"
        )


@dataclass
class TrainResult:
    """What :func:`dino_model.train.train` did: the global step reached, why it stopped, and where its outputs
    are."""

    step: int
    epoch: int
    status: str  #: "completed" (all epochs) or "max_steps"
    checkpoint: str | None
    export: dict[str, str] | None
    metrics: dict[str, float] = field(default_factory=dict)
