"""The DINO self-distillation loss with teacher centring and sharpening (Caron et al. 2021, Algorithm 1).

For teacher outputs t (the 2 global crops) and student outputs s (all `ncrops` crops, globals first):

    P_t = softmax((t - c) / tau_t)            target, no gradient
    log P_s = log_softmax(s / tau_s)          prediction, tau_s = 0.1
    loss = mean over pairs (i, v), i in {0, 1}, v in [0, ncrops), v != i, of  mean over batch of  -P_t[i] . log P_s[v]

so with 2 global and N local crops there are 2 * (2 + N - 1) pairs (a view is never compared with itself).
tau_t comes from the per-epoch `teacher_temp_schedule` (linear warm-up, then constant).  After each step the
centre c <- m * c + (1 - m) * mean of the raw teacher outputs over the GLOBAL batch (`update_center`, all-reduced
across ranks when torch.distributed is initialised; m = 0.9).  `forward` does not update the centre: the caller
(`dino_model.meta_arch.DINO.forward_backward`) calls `update_center` after the loss, as the reference does inside
its forward.

Memory: the reference computes one log-softmax per pair (2·(ncrops-1) tensors of [B, K] kept for backward).
Here the student log-softmax is computed once per crop and summed over crops, so each teacher view needs one
extra [B, K] tensor: sum_{v != i} log P_s[v] = S - log P_s[i] with S = sum_v log P_s[v].  The loss is computed
in fp32 whatever the autocast dtype (a 65536-way softmax in bf16 loses too much precision).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dino_model.schedules import teacher_temp_schedule


class DINOLoss(nn.Module):
    """Cross-entropy between centred/sharpened teacher and student distributions (see module docstring).

    Buffer `center` [1, out_dim] (fp32, part of the state_dict: it must be checkpointed).
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 0, nepochs: int = 100, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if ncrops < 2:
            raise ValueError(f"ncrops must be >= 2 (the two global crops), got {ncrops}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule: np.ndarray = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs
        )

    def teacher_temperature(self, epoch_or_temp: int | float) -> float:
        """An int is an epoch index into `teacher_temp_schedule`; a float is used as the temperature itself."""
        if isinstance(epoch_or_temp, bool):
            raise TypeError("epoch_or_temp must be an epoch (int) or a temperature (float), not bool")
        if isinstance(epoch_or_temp, numbers.Integral):
            epoch = int(epoch_or_temp)
            if not 0 <= epoch < len(self.teacher_temp_schedule):
                raise ValueError(
                    f"epoch {epoch} is outside the teacher temperature schedule "
                    f"(nepochs={len(self.teacher_temp_schedule)})"
                )
            return float(self.teacher_temp_schedule[epoch])
        temp = float(epoch_or_temp)
        if not temp > 0:
            raise ValueError(f"teacher temperature must be > 0, got {temp}")
        return temp

    def _check_shapes(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> int:
        if teacher_output.ndim != 2 or teacher_output.shape[0] % 2:
            raise ValueError(f"teacher_output must be [2*B, K], got {tuple(teacher_output.shape)}")
        batch = teacher_output.shape[0] // 2
        if student_output.shape != (self.ncrops * batch, teacher_output.shape[1]):
            raise ValueError(
                f"student_output must be [ncrops*B, K] = [{self.ncrops * batch}, {teacher_output.shape[1]}], "
                f"got {tuple(student_output.shape)}"
            )
        return batch

    def teacher_probs(self, teacher_output: torch.Tensor, temp: float) -> torch.Tensor:
        """Centred and sharpened teacher distribution softmax((t - c) / temp), fp32, detached."""
        return F.softmax((teacher_output.detach().float() - self.center) / temp, dim=-1)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                epoch_or_temp: int | float) -> torch.Tensor:
        """Scalar loss. student_output [ncrops*B, K] (crop-major), teacher_output [2*B, K] (the 2 globals)."""
        self._check_shapes(student_output, teacher_output)
        temp = self.teacher_temperature(epoch_or_temp)
        log_p = F.log_softmax(student_output.float() / self.student_temp, dim=-1).chunk(self.ncrops)
        log_p_sum = torch.stack(log_p).sum(0) if self.ncrops > 2 else log_p[0] + log_p[1]
        targets = self.teacher_probs(teacher_output, temp).chunk(2)
        total = student_output.new_zeros((), dtype=torch.float32)
        for i, q in enumerate(targets):
            # sum over the student views v != i of the per-sample cross-entropy, averaged over the batch.
            total = total - (q * (log_p_sum - log_p[i])).sum(dim=-1).mean()
        return total / (2 * (self.ncrops - 1))

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean(teacher_output over the global batch); one all-reduce (sum and count)."""
        t = teacher_output.detach().float()
        summed = torch.cat((t.sum(dim=0), t.new_tensor([t.shape[0]])))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(summed)
        batch_center = (summed[:-1] / summed[-1]).unsqueeze(0)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))

    @torch.no_grad()
    def teacher_stats(self, teacher_output: torch.Tensor, temp: float) -> dict[str, torch.Tensor]:
        """Collapse indicators of the centred, sharpened teacher distribution q_i = softmax((t_i - c) / temp).

        All in nats, averaged over the rows of `teacher_output` on this rank (both global views), 0-dim fp32:
          * entropy:       mean_i H(q_i).  Near 0: every sample's target is one-hot (sharpening dominates);
                           near log K: targets are uniform.
          * kl_to_uniform: mean_i KL(q_i || uniform) = log K - entropy.  -> 0 signals collapse to uniform.
          * kl_to_center:  mean_i KL(q_i || q_bar) = H(q_bar) - entropy, with q_bar = mean_i q_i the batch's
                           average target (the "centre" of the teacher distribution, NOT the DINO centre
                           buffer c).  It is the mutual information between sample and prototype: -> 0 when
                           all samples get the same target, i.e. either collapse mode (uniform or one
                           dominating dimension); high values mean the teacher distinguishes images.
        Uses the current `center`, so call it before `update_center` to describe the loss's targets.
        """
        log_q = F.log_softmax((teacher_output.detach().float() - self.center) / temp, dim=-1)
        q = log_q.exp()
        entropy = -(q * log_q).sum(dim=-1).mean()
        q_bar = q.mean(dim=0)
        entropy_bar = -(q_bar * torch.log(q_bar.clamp_min(torch.finfo(q_bar.dtype).tiny))).sum()
        return {
            "entropy": entropy,
            "kl_to_uniform": math.log(q.shape[-1]) - entropy,
            "kl_to_center": (entropy_bar - entropy).clamp_min(0.0),
        }
