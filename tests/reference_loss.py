"""The test oracle for the DINO loss: the reference implementation's pairwise formulation (facebookresearch/dino
``DINOLoss.forward``: one log-softmax per student view, one cross-entropy per (teacher view, student view) pair).

:class:`dino_model.losses.DINOLoss` computes the same value without the per-pair tensors; the tests compare the two
(values, gradients, whole training trajectories) by putting :class:`PairwiseDINOLoss` in a model's place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dino_model.losses import DINOLoss


def pairwise_dino_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor,
                       teacher_temp: torch.Tensor | float, student_temp: float, ncrops: int) -> torch.Tensor:
    student_out = (student_output.float() / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output.detach().float() - center) / teacher_temp, dim=-1).chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue  # a view is never compared with itself
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


class PairwiseDINOLoss(DINOLoss):
    """:class:`DINOLoss` with the reference's pairwise ``forward`` (centre, statistics and state dict unchanged)."""

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor,
                teacher_temp: torch.Tensor | float) -> torch.Tensor:
        self._check_shapes(student_output, teacher_output)
        return pairwise_dino_loss(student_output, teacher_output, self.center, teacher_temp, self.student_temp,
                                  self.ncrops)

    @classmethod
    def replacing(cls, loss: DINOLoss) -> "PairwiseDINOLoss":
        """A pairwise loss with ``loss``'s settings and centre."""
        out = cls(loss.out_dim, loss.ncrops, student_temp=loss.student_temp, center_momentum=loss.center_momentum)
        out.load_state_dict(loss.state_dict())
        return out.to(loss.center.device)
