"""The DINO self-distillation loss with teacher centring and sharpening (Caron et al. 2021, Algorithm 1).

For teacher outputs t (the 2 global crops) and student outputs s (all `ncrops` crops, globals first):

    P_t = softmax((t - c) / tau_t)            target, no gradient
    log P_s = log_softmax(s / tau_s)          prediction, tau_s = 0.1
    loss = mean over pairs (i, v), i in {0, 1}, v in [0, ncrops), v != i, of  mean over batch of  -P_t[i] . log P_s[v]

so with 2 global and N local crops there are 2 * (2 + N - 1) pairs (a view is never compared with itself).
The teacher temperature tau_t is an argument: the training loop reads it from the per-step schedule
(:class:`dino_model.schedules.Schedules`). After each step the centre c <- m * c + (1 - m) * mean of the raw teacher
outputs over the GLOBAL batch (`update_center`, all-reduced across ranks when torch.distributed is initialised;
m = 0.9). `forward` does not update the centre: the step (:meth:`dino_model.meta_arch.DINO.forward_backward`)
calls `update_center` after the loss, as the reference does inside its forward.

How it is computed: without any [ncrops·B, K] log-softmax tensor. For student view v the teacher targets summed
over the other views are w_v (q_1 for v = 0, q_0 for v = 1, q_0 + q_1 for the locals), and since every target
sums to 1, ``-w_v · log_softmax(s_v) = c_v · logsumexp(s_v) - w_v · s_v`` with c_v the number of targets (1 or 2).
So the loss needs one logsumexp per row and one batched dot product per view; autograd keeps only the student
logits (which the backward needs anyway). At K = 65,536, B = 128, 10 crops that saves ~670 MB of fp32 activations
against a per-crop log-softmax. The value equals the pairwise formula above up to fp32 rounding (the tests keep
that formula as their oracle). The loss is computed in fp32 whatever the autocast dtype (a 65536-way softmax in
bf16 loses too much precision).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    """Cross-entropy between centred/sharpened teacher and student distributions (see module docstring).

    Buffer `center` [1, out_dim] (fp32, part of the state_dict: it must be checkpointed).
    """

    def __init__(self, out_dim: int, ncrops: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
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
        #: All-reduce the centre update across ranks when torch.distributed is initialised. A copy of the model
        #: that one rank steps alone (the fast-path check, :mod:`dino_model.fast_path`) turns it off.
        self.sync_center = True

    def _check_shapes(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> int:
        if teacher_output.ndim != 2 or teacher_output.shape[0] % 2 or teacher_output.shape[1] != self.out_dim:
            raise ValueError(f"teacher_output must be [2*B, out_dim={self.out_dim}], got {tuple(teacher_output.shape)}")
        batch = teacher_output.shape[0] // 2
        if student_output.shape != (self.ncrops * batch, self.out_dim):
            raise ValueError(
                f"student_output must be [ncrops*B, K] = [{self.ncrops * batch}, {self.out_dim}], "
                f"got {tuple(student_output.shape)}"
            )
        return batch

    def teacher_probs(self, teacher_output: torch.Tensor, teacher_temp: torch.Tensor | float) -> torch.Tensor:
        """Centred and sharpened teacher distribution softmax((t - c) / teacher_temp), fp32, detached."""
        return F.softmax((teacher_output.detach().float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                teacher_temp: torch.Tensor | float) -> torch.Tensor:
        """Scalar loss. student_output [ncrops*B, K] (crop-major), teacher_output [2*B, K] (the 2 globals);
        `teacher_temp` a float or a 0-dim tensor (a tensor lets a compiled loss take new values without
        recompiling)."""
        batch = self._check_shapes(student_output, teacher_output)
        s = (student_output.float() / self.student_temp).view(self.ncrops, batch, self.out_dim)
        q = self.teacher_probs(teacher_output, teacher_temp).view(2, batch, self.out_dim)
        lse = torch.logsumexp(s, dim=-1)  # [ncrops, B]
        # view 0 is compared with teacher view 1 only, view 1 with teacher view 0 only: one target each
        total = (lse[0] - (q[1] * s[0]).sum(-1)).mean() + (lse[1] - (q[0] * s[1]).sum(-1)).mean()
        if self.ncrops > 2:
            targets = q[0] + q[1]  # every local view is compared with both teacher views
            dots = torch.einsum("nbk,bk->nb", s[2:], targets)
            total = total + (2.0 * lse[2:] - dots).mean(dim=1).sum()
        return total / (2 * (self.ncrops - 1))

    def loss_and_stats(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                       teacher_temp: torch.Tensor | float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`forward` and `teacher_stats` in one call: what the training step runs, and what
        :meth:`dino_model.meta_arch.DINO.compile` compiles as one graph (so the teacher softmax is fused)."""
        return self(student_output, teacher_output, teacher_temp), self.teacher_stats(teacher_output, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """c <- m c + (1 - m) mean(teacher_output over the global batch); one all-reduce (sum and count)."""
        t = teacher_output.detach().float()
        summed = torch.cat((t.sum(dim=0), t.new_tensor([t.shape[0]])))
        if self.sync_center and dist.is_available() and dist.is_initialized():
            dist.all_reduce(summed)
        batch_center = (summed[:-1] / summed[-1]).unsqueeze(0)
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))

    @torch.no_grad()
    def teacher_stats(self, teacher_output: torch.Tensor,
                      teacher_temp: torch.Tensor | float) -> dict[str, torch.Tensor]:
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
        log_q = F.log_softmax((teacher_output.detach().float() - self.center) / teacher_temp, dim=-1)
        q = log_q.exp()
        entropy = -(q * log_q).sum(dim=-1).mean()
        q_bar = q.mean(dim=0)
        entropy_bar = -(q_bar * torch.log(q_bar.clamp_min(torch.finfo(q_bar.dtype).tiny))).sum()
        return {
            "entropy": entropy,
            "kl_to_uniform": math.log(q.shape[-1]) - entropy,
            "kl_to_center": (entropy_bar - entropy).clamp_min(0.0),
        }
