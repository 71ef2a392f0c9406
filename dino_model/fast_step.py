"""The fast DINO step: a lean loss, ``torch.compile``d forwards and a fused optimiser — what runs on a GPU.

:func:`dino_model.train.train_step` takes a ``forward_backward`` callable; :class:`FastForwardBackward` is a
drop-in for ``DINO.forward_backward`` that

* computes the DINO cross-entropy **without any [ncrops·B, K] log-softmax tensor** (:func:`dino_cross_entropy`):
  for student view v the teacher targets summed over the other views are w_v (q_1 for v = 0, q_0 for v = 1,
  q_0 + q_1 for the locals), and since every target sums to 1,
  ``-w_v · log_softmax(s_v) = c_v · logsumexp(s_v) - w_v · s_v`` with c_v the number of targets (1 or 2).
  So the loss needs one logsumexp per row and one batched dot product per view; autograd keeps only the student
  logits (which the backward needs anyway). At K = 65,536, B = 128, 10 crops that saves ~670 MB of fp32
  activations against a per-crop log-softmax;
* takes the teacher temperature as a 0-dim tensor, so a temperature warm-up does not recompile;
* ``torch.compile``s student and teacher in place (``nn.Module.compile``: state-dict keys unchanged, so
  checkpoints, DDP and EMA see the same parameters) and the loss + teacher statistics as one function. The step
  has no host sync: no ``.item()``, the crop-size grouping of ``MultiCropWrapper`` depends only on the config's
  crop sizes (static), the loss is checked for NaN on the device by the training loop.

The centre update stays eager (its all-reduce), as do clipping (``torch._foreach_norm``), the EMA
(``torch._foreach_mul_/add_``) and the optimiser (``fused=True`` AdamW on CUDA: one kernel for all parameters).

CUDA graphs (optional, ``train.compile_mode="reduce-overhead"``): the compiled student, teacher and loss are then
captured and replayed by torch.compile's CUDA-graph trees; :meth:`FastForwardBackward.__call__` marks each
step's start (``torch.compiler.cudagraph_mark_step_begin``) so outputs of the previous step may be overwritten.
Nothing in the training loop keeps a step's output tensors past its step (the loss is accumulated into a separate
tensor at once). The optimiser, clipping and EMA stay outside the graphs: the per-step lr / weight decay are
Python floats written into the optimiser groups, and DDP's bucketed all-reduce runs between graph segments.
Unmeasured on a GPU so far.

    fwd = FastForwardBackward(model, compile=True)
    stats = train_step(model, optimizer, crops, ..., forward_backward=fwd)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from dino_model.meta_arch import DINO, unwrap

__all__ = ["resolve_compile", "dino_cross_entropy", "dino_loss_and_stats", "FastForwardBackward"]


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """``train.compile``: True / False, or ``"auto"`` = on for CUDA only."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def dino_cross_entropy(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                       teacher_temp: torch.Tensor | float, student_temp: float, ncrops: int) -> torch.Tensor:
    """The DINO loss of :class:`dino_model.losses.DINOLoss` (same value up to fp32 rounding), lean in memory: see
    the module docstring. student_output [ncrops·B, K] (crop-major), teacher_output [2·B, K]; fp32 inside."""
    k = student_output.shape[-1]
    batch = teacher_output.shape[0] // 2
    s = (student_output.float() / student_temp).view(ncrops, batch, k)
    q = F.softmax((teacher_output.detach().float() - center) / teacher_temp, dim=-1).view(2, batch, k)
    lse = torch.logsumexp(s, dim=-1)  # [ncrops, B]
    # view 0 is compared with teacher view 1 only, view 1 with teacher view 0 only: one target each
    total = (lse[0] - (q[1] * s[0]).sum(-1)).mean() + (lse[1] - (q[0] * s[1]).sum(-1)).mean()
    if ncrops > 2:
        targets = q[0] + q[1]  # every local view is compared with both teacher views
        dots = torch.einsum("nbk,bk->nb", s[2:], targets)
        total = total + (2.0 * lse[2:] - dots).mean(dim=1).sum()
    return total / (2 * (ncrops - 1))


def dino_loss_and_stats(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                        teacher_temp: torch.Tensor, student_temp: float,
                        ncrops: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, teacher entropy, KL to uniform, KL to the batch-mean target): ``DINOLoss.forward`` and
    ``DINOLoss.teacher_stats`` in one function, so compiling it fuses the teacher softmax once."""
    loss = dino_cross_entropy(student_output, teacher_output, center, teacher_temp, student_temp, ncrops)
    with torch.no_grad():
        log_q = F.log_softmax((teacher_output.detach().float() - center) / teacher_temp, dim=-1)
        q = log_q.exp()
        entropy = -(q * log_q).sum(dim=-1).mean()
        q_bar = q.mean(dim=0)
        entropy_bar = -(q_bar * torch.log(q_bar.clamp_min(torch.finfo(q_bar.dtype).tiny))).sum()
        kl_uniform = math.log(q.shape[-1]) - entropy
        kl_center = (entropy_bar - entropy).clamp_min(0.0)
    return loss, entropy, kl_uniform, kl_center


class FastForwardBackward:
    """``fwd(crops, epoch, autocast_dtype=..., grad_scaler=..., check_finite=False)``: the contract and return
    value of :meth:`DINO.forward_backward`, computed as the module docstring describes. ``compile=True`` compiles
    the student and teacher modules in place (once, here) and the loss, passing ``compile_kwargs`` on."""

    def __init__(self, model: DINO, compile: bool = False, **compile_kwargs: Any):
        self.model = model
        self.compiled = bool(compile)
        if compile_kwargs.get("mode") == "default":
            compile_kwargs.pop("mode")  # the same as passing no mode
        # modes that capture CUDA graphs: each call marks a new step (see the module docstring)
        self._cudagraph_steps = self.compiled and compile_kwargs.get("mode") in ("reduce-overhead", "max-autotune")
        loss_fn = dino_loss_and_stats
        if self.compiled:  # compile_kwargs go to torch.compile (tests: fullgraph=True to prove no graph break)
            unwrap(model.student).compile(**compile_kwargs)
            unwrap(model.teacher).compile(**compile_kwargs)
            loss_fn = torch.compile(dino_loss_and_stats, **compile_kwargs)
        self._loss_fn = loss_fn

    def __call__(self, crops: list[torch.Tensor], epoch: int, autocast_dtype: torch.dtype | None = None,
                 grad_scaler: Any = None, teacher_temp: float | None = None,
                 check_finite: bool = False) -> dict[str, torch.Tensor]:
        model, crit = self.model, self.model.dino_loss
        if len(crops) != crit.ncrops:
            raise ValueError(f"expected {crit.ncrops} crops (the loss's ncrops), got {len(crops)}")
        temp = crit.teacher_temperature(epoch if teacher_temp is None else float(teacher_temp))
        if self._cudagraph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        ctx = (contextlib.nullcontext() if autocast_dtype is None
               else torch.autocast(device_type=crops[0].device.type, dtype=autocast_dtype))
        with ctx:
            with torch.no_grad():
                teacher_output = model.teacher(crops[:2])
            student_output = model.student(crops)
        temp_t = torch.tensor(temp, dtype=torch.float32)  # a 0-dim CPU input: new values never recompile
        loss, entropy, kl_uniform, kl_center = self._loss_fn(
            student_output, teacher_output, crit.center, temp_t, crit.student_temp, crit.ncrops)
        if check_finite and not math.isfinite(loss.item()):
            from dino_model.meta_arch import NonFiniteLossError

            raise NonFiniteLossError(loss.item())
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
        crit.update_center(teacher_output)
        loss = loss.detach()
        return {
            "loss": loss,
            "teacher_entropy": entropy,
            "teacher_kl_to_uniform": kl_uniform,
            "teacher_kl_to_center": kl_center,
            "kl_teacher_student": loss - entropy,
            "teacher_temp": torch.tensor(temp, dtype=torch.float32),  # CPU: a device copy would sync
        }
