"""One DINO update: the optimiser step around :meth:`dino_model.meta_arch.DINO.forward_backward`, on any device.

    settings = StepSettings.from_config(cfg, autocast_dtype)
    stats = train_step(model, optimizer, crops, epoch=epoch, settings=settings, **schedules.at(step))

In the reference's order: lr / weight decay into the optimiser groups -> forward + backward (and the centre update)
-> unscale (fp16) -> clip -> drop the last layer's gradients while frozen -> optimiser step -> teacher EMA. The
same code runs on CPU and GPU; on CUDA the training loop compiles the model (``DINO.compile``), uses bf16 autocast
and the fused AdamW kernel. Returns 0-dim device tensors: no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dino_model.config import DinoConfig
from dino_model.meta_arch import DINO
from dino_model.optim import (
    cancel_last_layer_gradients,
    clip_gradients_global,
    clip_gradients_per_param,
    load_optimizer_state,
    optimizer_state,
)

__all__ = ["StepSettings", "TrainingState", "train_step", "resolve_precision", "resolve_compile"]


@dataclass
class TrainingState:
    """The live objects a step changes: the model (student, teacher, loss centre), the optimiser and the fp16
    grad scaler (None otherwise). The training run owns them; the fast-path checks copy them and snapshot them,
    a checkpoint saves :meth:`parts`."""

    model: DINO
    optimizer: torch.optim.Optimizer
    grad_scaler: torch.amp.GradScaler | None

    def parts(self) -> dict[str, Any]:
        """Each stateful piece by its checkpoint name (``state_dict`` / ``load_state_dict``; None = not in use)."""
        return {**self.model.checkpoint_parts(), "optimizer": self.optimizer, "grad_scaler": self.grad_scaler}

    def snapshot(self) -> dict[str, Any]:
        """Copies (on the device) of everything one step changes, for :meth:`restore`."""
        modules = {name: {k: v.detach().clone() for k, v in part.state_dict().items()}
                   for name, part in self.model.checkpoint_parts().items()}
        return {**modules, "optimizer": optimizer_state(self.optimizer),
                "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Back to a :meth:`snapshot` (the same objects, their values replaced)."""
        for name, part in self.model.checkpoint_parts().items():
            part.load_state_dict(snapshot[name])
        load_optimizer_state(self.optimizer, snapshot["optimizer"])
        if self.grad_scaler is not None and snapshot["grad_scaler"] is not None:
            self.grad_scaler.load_state_dict(snapshot["grad_scaler"])


@dataclass(frozen=True)
class StepSettings:
    """Per-run constants of :func:`train_step`."""

    clip_grad: float
    clip_mode: str
    freeze_last_layer: int
    autocast_dtype: torch.dtype | None

    @classmethod
    def from_config(cls, cfg: DinoConfig, autocast_dtype: torch.dtype | None = None) -> "StepSettings":
        return cls(cfg.optim.clip_grad, cfg.optim.clip_mode, cfg.optim.freeze_last_layer, autocast_dtype)


def train_step(
    model: DINO,
    optimizer: torch.optim.Optimizer,
    crops: list[torch.Tensor],
    *,
    epoch: int,
    lr: float,
    wd: float,
    momentum: float,
    teacher_temp: float,
    settings: StepSettings,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor]:
    """One DINO update (see the module docstring) at the schedules' ``lr``, ``wd``, teacher EMA ``momentum`` and
    ``teacher_temp``; ``epoch`` decides whether the last layer is still frozen. Returns the stats of
    ``DINO.forward_backward`` plus ``grad_norm`` (before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_weight_decay", True):
            group["weight_decay"] = wd
    optimizer.zero_grad(set_to_none=True)
    stats = model.forward_backward(crops, teacher_temp, autocast_dtype=settings.autocast_dtype,
                                   grad_scaler=grad_scaler)
    student = model.student_module()
    if grad_scaler is not None:
        grad_scaler.unscale_(optimizer)  # clip the true gradients, as the reference does
    if settings.clip_grad > 0:
        if settings.clip_mode == "global":
            grad_norm = clip_gradients_global(student, settings.clip_grad)
        else:
            grad_norm = clip_gradients_per_param(student, settings.clip_grad).norm()
    else:
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        grad_norm = torch.stack(torch._foreach_norm(grads, 2.0)).norm() if grads else torch.zeros(())
    cancel_last_layer_gradients(student, epoch, settings.freeze_last_layer)
    if grad_scaler is not None:
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        optimizer.step()
    model.update_teacher(momentum)
    stats["grad_norm"] = grad_norm.detach().float()
    return stats


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``train.precision`` -> (autocast dtype or None, whether to use a GradScaler): ``auto`` = bf16 on GPUs that
    support it, fp16 with a scaler on older GPUs (the reference's mode), fp32 on CPU."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    return torch.float16, True


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """``train.compile``: True / False, or ``"auto"`` = on for CUDA only (on a CPU a compile costs more than it
    saves on the short runs done there)."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)
