"""DINO meta-architecture: student and teacher (backbone + head behind a multi-crop wrapper) and the loss.

    model = DINO.build("vit_small", patch_size=16, drop_path_rate=0.1, out_dim=65536, norm_last_layer=True,
                       use_bn_in_head=False, ncrops=10, nepochs=100)
    stats = model.forward_backward(crops, epoch)            # crops: 2 global + N local tensors [B, 3, H, W]
    ... clip, cancel last-layer gradients, optimizer.step() on model.student's parameters ...
    model.update_teacher(momentum_schedule[step])

The teacher is a copy of the student at construction (same weights through `load_state_dict`; built without
drop-path), never receives gradients and follows the student by EMA.  The training loop may wrap the student for
data parallelism with `model.student = DDP(model.student)`; everything here unwraps `.module` where it needs the
plain module.  Like the reference, the teacher stays in the module's train/eval mode (its BatchNorm layers, in
ResNet-50 or a BN head, use batch statistics in training).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from dino_model.losses import DINOLoss
from dino_model.models import DINOHead, MultiCropWrapper, build_backbone


class NonFiniteLossError(FloatingPointError):
    """The loss is NaN or infinite. Raised by `forward_backward` before any gradient or centre update."""

    def __init__(self, loss: float) -> None:
        super().__init__(f"loss is {loss}, stopping training")
        self.loss = loss


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or any `.module` wrapper), else the module itself."""
    return getattr(module, "module", module)


def has_batchnorms(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class DINO(nn.Module):
    """Student, teacher and DINO loss. See module docstring."""

    def __init__(self, student_backbone: nn.Module, teacher_backbone: nn.Module, embed_dim: int, out_dim: int,
                 use_bn_in_head: bool, norm_last_layer: bool, loss: DINOLoss, head_nlayers: int = 3,
                 head_hidden_dim: int = 2048, head_bottleneck_dim: int = 256) -> None:
        super().__init__()
        if loss.out_dim != out_dim:
            raise ValueError(f"out_dim ({out_dim}) differs from the loss's out_dim ({loss.out_dim})")
        head_kwargs = dict(nlayers=head_nlayers, hidden_dim=head_hidden_dim, bottleneck_dim=head_bottleneck_dim)
        self.student = MultiCropWrapper(
            student_backbone,
            DINOHead(embed_dim, out_dim, use_bn=use_bn_in_head, norm_last_layer=norm_last_layer, **head_kwargs),
        )
        self.teacher = MultiCropWrapper(
            teacher_backbone,
            DINOHead(embed_dim, out_dim, use_bn=use_bn_in_head, norm_last_layer=norm_last_layer, **head_kwargs),
        )
        s_names = [(n, p.shape) for n, p in self.student.named_parameters()]
        t_names = [(n, p.shape) for n, p in self.teacher.named_parameters()]
        if s_names != t_names:
            raise ValueError("student and teacher backbones must have the same parameters (names and shapes)")
        # The teacher starts as an exact copy of the student.
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.dino_loss = loss

    @classmethod
    def build(cls, arch: str, patch_size: int = 16, drop_path_rate: float = 0.1, out_dim: int = 65536,
              norm_last_layer: bool = True, use_bn_in_head: bool = False, ncrops: int = 10,
              warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 0,
              nepochs: int = 100, student_temp: float = 0.1, center_momentum: float = 0.9, img_size: int = 224,
              head_nlayers: int = 3, head_hidden_dim: int = 2048, head_bottleneck_dim: int = 256) -> "DINO":
        """Build student (with `drop_path_rate`), teacher (no drop-path) and loss from names and numbers."""
        student = build_backbone(arch, patch_size=patch_size, drop_path_rate=drop_path_rate, img_size=img_size)
        teacher = build_backbone(arch, patch_size=patch_size, drop_path_rate=0.0, img_size=img_size)
        loss = DINOLoss(out_dim, ncrops, warmup_teacher_temp=warmup_teacher_temp, teacher_temp=teacher_temp,
                        warmup_teacher_temp_epochs=warmup_teacher_temp_epochs, nepochs=nepochs,
                        student_temp=student_temp, center_momentum=center_momentum)
        return cls(student, teacher, student.embed_dim, out_dim, use_bn_in_head, norm_last_layer, loss,
                   head_nlayers=head_nlayers, head_hidden_dim=head_hidden_dim,
                   head_bottleneck_dim=head_bottleneck_dim)

    # -- accessors ----------------------------------------------------------------------------------------
    def student_module(self) -> MultiCropWrapper:
        """The student without its DDP wrapper."""
        return unwrap(self.student)  # type: ignore[return-value]

    def teacher_backbone(self) -> nn.Module:
        return unwrap(self.teacher).backbone

    def student_backbone(self) -> nn.Module:
        return self.student_module().backbone

    def convert_sync_batchnorm(self) -> None:
        """Replace BatchNorm by SyncBatchNorm in student and teacher (ResNet-50 / BN heads, multi-GPU), before
        wrapping the student in DDP — as the reference does when the model has batch norms."""
        if has_batchnorms(self.student_module()):
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)

    # -- training step ------------------------------------------------------------------------------------
    def forward_backward(self, crops: list[torch.Tensor], epoch: int, autocast_dtype: torch.dtype | None = None,
                         grad_scaler: Any = None, teacher_temp: float | None = None,
                         check_finite: bool = True) -> dict[str, torch.Tensor]:
        """One DINO forward and backward on `crops` (2 global crops first, then the local crops).

        Teacher forward on the 2 global crops under no_grad, student forward on all crops, loss at the teacher
        temperature of `epoch` (or `teacher_temp` when given), backward (of `grad_scaler.scale(loss)` when a
        grad scaler is given), then the centre update from the raw teacher outputs (all-reduced when
        distributed).  With `autocast_dtype` (torch.bfloat16 / torch.float16) both forwards run under autocast on
        the crops' device; the loss itself is fp32.

        With `check_finite` (default) a NaN/inf loss raises `NonFiniteLossError` BEFORE backward and before the
        centre update, leaving model and centre untouched (one host sync per step, as the reference's check).

        Returns detached 0-dim fp32 tensors: `loss`, `teacher_entropy`, `teacher_kl_to_uniform`,
        `teacher_kl_to_center` (see `DINOLoss.teacher_stats`, computed with the centre used by the loss) and
        `kl_teacher_student` = loss - teacher_entropy (the paper's decomposition H(Pt, Ps) = h(Pt) + KL(Pt|Ps),
        averaged over the pairs), plus `teacher_temp`.
        """
        if len(crops) != self.dino_loss.ncrops:
            raise ValueError(f"expected {self.dino_loss.ncrops} crops (the loss's ncrops), got {len(crops)}")
        temp = self.dino_loss.teacher_temperature(epoch if teacher_temp is None else float(teacher_temp))
        if autocast_dtype is None:
            ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        else:
            ctx = torch.autocast(device_type=crops[0].device.type, dtype=autocast_dtype)
        with ctx:
            with torch.no_grad():
                teacher_output = self.teacher(crops[:2])
            student_output = self.student(crops)
        loss = self.dino_loss(student_output, teacher_output, temp)
        if check_finite:
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(value)
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
        stats = self.dino_loss.teacher_stats(teacher_output, temp)
        self.dino_loss.update_center(teacher_output)
        loss = loss.detach()
        return {
            "loss": loss,
            "teacher_entropy": stats["entropy"],
            "teacher_kl_to_uniform": stats["kl_to_uniform"],
            "teacher_kl_to_center": stats["kl_to_center"],
            "kl_teacher_student": loss - stats["entropy"],
            "teacher_temp": torch.tensor(temp, dtype=torch.float32, device=loss.device),
        }

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- momentum * teacher + (1 - momentum) * student, over matching parameters (buffers are
        not averaged, as in the reference)."""
        student_params = [p.detach() for p in self.student_module().parameters()]
        teacher_params = list(unwrap(self.teacher).parameters())
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Student outputs for all crops [ncrops*B, out_dim] (training uses `forward_backward`)."""
        return self.student(crops)
