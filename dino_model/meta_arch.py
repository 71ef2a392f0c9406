"""DINO meta-architecture: student and teacher (backbone + head behind a multi-crop wrapper), the loss, the step.

    model = DINO.from_config(cfg)                             # student, teacher, loss as cfg.model / crops / loss say
    model.compile("default")                                  # optional: torch.compile student, teacher and loss
    stats = model.forward_backward(crops, teacher_temp=0.04)  # crops: 2 global + N local tensors [B, 3, H, W]
    ... clip, cancel last-layer gradients, optimizer.step() on model.student's parameters ...
    model.update_teacher(momentum_schedule[step])

The teacher is a copy of the student at construction (same weights through `load_state_dict`; built without
drop-path), never receives gradients and follows the student by EMA.  The training loop may wrap the student for
data parallelism with `model.student = DDP(model.student)`; everything here unwraps `.module` where it needs the
plain module.  Like the reference, the teacher stays in the module's train/eval mode (its BatchNorm layers, in
ResNet-50 or a BN head, use batch statistics in training).

The step is the same code on CPU and GPU; :meth:`DINO.compile` and the autocast dtype are its options. The step has
no host sync: no ``.item()``, the crop-size grouping of `MultiCropWrapper` depends only on the configured crop
sizes, and the training loop watches the loss for NaN on the device. Compiled, student and teacher are compiled
in place (``nn.Module.compile``: state-dict keys unchanged, so checkpoints, DDP and EMA see the same parameters)
and the loss with the teacher statistics as one graph; the teacher temperature enters as a 0-dim tensor, so its
warm-up never recompiles. The centre update stays eager (its all-reduce), as do clipping, the EMA and the
optimiser.

CUDA graphs (``compile("reduce-overhead")`` or ``"max-autotune"``): the compiled student, teacher and loss are
captured and replayed by torch.compile's CUDA-graph trees; `forward_backward` marks each step's start
(``torch.compiler.cudagraph_mark_step_begin``) so outputs of the previous step may be overwritten. Nothing in the
training loop keeps a step's output tensors past its step (the loss is accumulated into a separate tensor at once).
The optimiser, clipping and EMA stay outside the graphs: the per-step lr / weight decay are Python floats written
into the optimiser groups, and DDP's bucketed all-reduce runs between graph segments.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dino_model.config import DinoConfig
from dino_model.losses import DINOLoss
from dino_model.models import DINOHead, MultiCropWrapper, build_backbone

#: torch.compile modes that capture CUDA graphs: each step must be marked (see the module docstring).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or any `.module` wrapper), else the module itself."""
    return getattr(module, "module", module)


@torch.no_grad()
def feature_spread(features: torch.Tensor) -> torch.Tensor:
    """How spread out a batch of features is, 0-dim fp32: the per-dimension standard deviation of the
    L2-normalised rows, averaged over dimensions and scaled by sqrt(D). Unit vectors spread evenly over D
    dimensions have a per-dimension std of about 1/sqrt(D), so this is about 1 for well-spread features and 0
    when every image gets the same feature (representation collapse), whatever D is."""
    f = F.normalize(features.detach().float(), dim=-1)
    return f.std(dim=0, unbiased=False).mean() * math.sqrt(f.shape[-1])


def has_batchnorms(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class DINO(nn.Module):
    """Student, teacher and DINO loss. See module docstring.

    ``student`` and ``teacher`` map a list of crops to [len(crops)·B, K] (a :class:`MultiCropWrapper` of backbone
    and head); they must have the same parameters (names and shapes). The teacher's weights are replaced by the
    student's and frozen.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: DINOLoss) -> None:
        super().__init__()
        s_names = [(n, p.shape) for n, p in student.named_parameters()]
        t_names = [(n, p.shape) for n, p in teacher.named_parameters()]
        if s_names != t_names:
            raise ValueError("student and teacher must have the same parameters (names and shapes)")
        self.student = student
        self.teacher = teacher
        # The teacher starts as an exact copy of the student.
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.dino_loss = loss
        self._compiled_loss: Callable[..., Any] | None = None
        self._marks_cuda_graph_steps = False

    @classmethod
    def from_config(cls, cfg: DinoConfig) -> "DINO":
        """Student (with ``model.drop_path_rate``), teacher (no drop-path), heads and loss as ``cfg`` says. Seed the
        global RNG first for identical replicas."""
        m = cfg.model
        backbones = [build_backbone(m.arch, patch_size=m.patch_size, drop_path_rate=rate, img_size=m.img_size)
                     for rate in (m.drop_path_rate, 0.0)]
        # The heads are made after both backbones: the reference's order of random draws.
        heads = [DINOHead(b.embed_dim, m.out_dim, use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer,
                          nlayers=m.head_nlayers, hidden_dim=m.head_hidden_dim, bottleneck_dim=m.head_bottleneck_dim)
                 for b in backbones]
        student, teacher = (MultiCropWrapper(b, h) for b, h in zip(backbones, heads))
        loss = DINOLoss(m.out_dim, cfg.crops.ncrops, student_temp=cfg.loss.student_temp,
                        center_momentum=cfg.loss.center_momentum)
        return cls(student, teacher, loss)

    # -- accessors ----------------------------------------------------------------------------------------
    def student_module(self) -> nn.Module:
        """The student without its DDP wrapper."""
        return unwrap(self.student)

    def teacher_backbone(self) -> nn.Module:
        return unwrap(self.teacher).backbone

    def checkpoint_parts(self) -> dict[str, nn.Module]:
        """What a training checkpoint saves of the model, by name (:mod:`dino_model.checkpoint` asks each for its
        ``state_dict``): the student and the teacher without their wrappers, and the loss (its centre)."""
        return {"student": self.student_module(), "teacher": unwrap(self.teacher), "dino_loss": self.dino_loss}

    def convert_sync_batchnorm(self) -> None:
        """Replace BatchNorm by SyncBatchNorm in student and teacher (ResNet-50 / BN heads, multi-GPU), before
        wrapping the student in DDP — as the reference does when the model has batch norms."""
        if has_batchnorms(self.student_module()):
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)

    def compile(self, mode: str = "default", **compile_kwargs: Any) -> None:
        """``torch.compile`` student and teacher in place and the loss with the teacher statistics (see the module
        docstring). ``mode``: a torch.compile mode (``train.compile_mode``); ``compile_kwargs`` go to
        torch.compile too (tests pass ``backend="aot_eager", fullgraph=True``)."""
        if mode != "default":  # "default" is what passing no mode means
            compile_kwargs["mode"] = mode
        unwrap(self.student).compile(**compile_kwargs)
        unwrap(self.teacher).compile(**compile_kwargs)
        self._compiled_loss = torch.compile(self.dino_loss.loss_and_stats, **compile_kwargs)
        self._marks_cuda_graph_steps = mode in CUDA_GRAPH_MODES

    def uncompile(self) -> None:
        """Undo :meth:`compile`: student, teacher and loss run eagerly again (the same modules and parameters).
        The fast-path fallback uses it when a compiled step fails during the first steps."""
        for module in (unwrap(self.student), unwrap(self.teacher)):
            module._compiled_call_impl = None  # what nn.Module.compile sets; None = the plain forward
        self._compiled_loss = None
        self._marks_cuda_graph_steps = False

    # -- training step ------------------------------------------------------------------------------------
    def forward_backward(self, crops: list[torch.Tensor], teacher_temp: float,
                         autocast_dtype: torch.dtype | None = None,
                         grad_scaler: Any = None) -> dict[str, torch.Tensor]:
        """One DINO forward and backward on `crops` (2 global crops first, then the local crops).

        Teacher forward on the 2 global crops under no_grad, student forward on all crops, loss at
        `teacher_temp`, backward (of `grad_scaler.scale(loss)` when a grad scaler is given), then the centre
        update from the raw teacher outputs (all-reduced when distributed). With `autocast_dtype`
        (torch.bfloat16 / torch.float16) both forwards run under autocast on the crops' device; the loss itself
        is fp32.

        Returns detached 0-dim fp32 tensors: `loss`, `teacher_entropy`, `teacher_kl_to_uniform`,
        `teacher_kl_to_center` (see `DINOLoss.teacher_stats`, computed with the centre used by the loss) and
        `kl_teacher_student` = loss - teacher_entropy (the paper's decomposition H(Pt, Ps) = h(Pt) + KL(Pt|Ps),
        averaged over the pairs), `teacher_feature_spread` (:func:`feature_spread` of the teacher's backbone
        features of the global crops), plus `teacher_temp` (on the CPU). A non-finite loss is returned as it is: the
        caller checks it where a host sync is affordable.
        """
        if len(crops) != self.dino_loss.ncrops:
            raise ValueError(f"expected {self.dino_loss.ncrops} crops (the loss's ncrops), got {len(crops)}")
        if self._marks_cuda_graph_steps:
            torch.compiler.cudagraph_mark_step_begin()
        if autocast_dtype is None:
            ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
        else:
            ctx = torch.autocast(device_type=crops[0].device.type, dtype=autocast_dtype)
        with ctx:
            with torch.no_grad():
                teacher_output, teacher_features = self.teacher(crops[:2], with_features=True)
            student_output = self.student(crops)
        # A 0-dim CPU tensor: usable with tensors on any device, and a new value never recompiles a compiled loss.
        temp = torch.tensor(teacher_temp, dtype=torch.float32)
        loss, stats = (self._compiled_loss or self.dino_loss.loss_and_stats)(student_output, teacher_output, temp)
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
        self.dino_loss.update_center(teacher_output)
        loss = loss.detach()
        return {
            "loss": loss,
            "teacher_entropy": stats["entropy"],
            "teacher_kl_to_uniform": stats["kl_to_uniform"],
            "teacher_kl_to_center": stats["kl_to_center"],
            "kl_teacher_student": loss - stats["entropy"],
            "teacher_feature_spread": feature_spread(teacher_features),
            "teacher_temp": temp,
        }

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- momentum * teacher + (1 - momentum) * student, over matching parameters (buffers are
        not averaged, as in the reference)."""
        student_params = [p.detach() for p in self.student_module().parameters()]
        teacher_params = list(unwrap(self.teacher).parameters())
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
