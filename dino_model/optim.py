"""Optimiser utilities for DINO: parameter groups, AdamW / SGD / LARS, gradient clipping, last-layer freezing.

Usage in a training step (reference order):

    groups = param_groups(model.student)             # [regularized, not_regularized (weight_decay 0)]
    opt = build_optimizer("adamw", groups)           # lr / wd are set every step from the schedules:
    for g in opt.param_groups:
        g["lr"] = sched.lr[step]
        if g["apply_weight_decay"]:
            g["weight_decay"] = sched.wd[step]
    ... loss.backward() ...
    (grad_scaler.unscale_(opt) when using fp16)
    clip_gradients_per_param(model.student, 3.0)      # or clip_gradients_global
    cancel_last_layer_gradients(model.student, epoch, freeze_last_layer=1)
    opt.step()
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

REGULARIZED = "regularized"
NOT_REGULARIZED = "not_regularized"


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups, as the reference's `get_params_groups`: parameters with more than one dimension (weights,
    including `pos_embed` and `cls_token` — deliberately NOT timm's `no_weight_decay` list) are regularized;
    biases (names ending in `.bias`) and all 1-D parameters (norm gains) are not (weight decay forced to 0).
    Frozen parameters (requires_grad False, e.g. the head's gain with norm_last_layer) are left out.

    Each group carries `name` and `apply_weight_decay` (True only for the regularized group): the training loop
    writes the weight-decay schedule only into groups with `apply_weight_decay`.
    """
    regularized: list[nn.Parameter] = []
    not_regularized: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim <= 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [
        {"params": regularized, "name": REGULARIZED, "apply_weight_decay": True},
        {"params": not_regularized, "name": NOT_REGULARIZED, "apply_weight_decay": False, "weight_decay": 0.0},
    ]


class LARS(torch.optim.Optimizer):
    """LARS as in the reference (SGD with momentum and layer-wise adaptive rate scaling).

    For every parameter p with more than one dimension: dp = grad + wd * p, then dp *= eta * ||p|| / ||dp||
    (1 when either norm is 0).  1-D parameters (biases, norm gains) get neither weight decay nor adaptation.
    Then mu = momentum * mu + dp; p -= lr * mu.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim != 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(
                        param_norm > 0.0,
                        torch.where(update_norm > 0, (g["eta"] * param_norm / update_norm), one),
                        one,
                    )
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


OPTIMIZERS = ("adamw", "sgd", "lars")


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float = 0.0, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    fused: bool = False) -> torch.optim.Optimizer:
    """The reference's optimisers, lr 0 until the schedule sets it.

    adamw: torch AdamW (betas, eps); sgd: SGD with `momentum` (0.9); lars: `LARS` with `momentum`.
    Weight decay comes from the groups / the schedule (the not-regularized group stays at 0).
    `fused` (AdamW only): PyTorch's single-kernel AdamW (the same update; the trainer uses it on CUDA).
    """
    if name == "adamw":
        if fused:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer: unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def optimizer_state(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The per-parameter state (moments, step counters, momentum buffers) in parameter order, cloned: what
    :func:`load_optimizer_state` puts into another optimiser of the same kind over the same (or copied)
    parameters — fused or not, whatever each expects."""
    return [{k: v.detach().clone() if isinstance(v, torch.Tensor) else v
             for k, v in optimizer.state.get(p, {}).items()}
            for group in optimizer.param_groups for p in group["params"]]


def load_optimizer_state(optimizer: torch.optim.Optimizer, states: list[dict[str, Any]]) -> None:
    """Put ``states`` (from :func:`optimizer_state`) into ``optimizer``'s parameters, in order. Unlike
    ``load_state_dict``, the optimiser keeps its own settings (fused or for-each): PyTorch's AdamW wants the step
    counter on the parameter's device when fused and on the CPU otherwise, so it is placed accordingly."""
    params = [(group, p) for group in optimizer.param_groups for p in group["params"]]
    if len(params) != len(states):
        raise ValueError(f"optimizer state for {len(states)} parameters, the optimizer has {len(params)}")
    optimizer.state.clear()
    for (group, p), state in zip(params, states):
        if not state:
            continue
        on_device = bool(group.get("fused") or group.get("capturable"))
        optimizer.state[p] = {
            k: (v.to(p.device if on_device else "cpu", torch.float32, copy=True) if k == "step"
                else v.to(p.device, copy=True))  # copies: the same states may go into several optimisers
            if isinstance(v, torch.Tensor) else v
            for k, v in state.items()}


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


@torch.no_grad()
def clip_gradients_per_param(model: nn.Module, clip: float) -> torch.Tensor:
    """Reference clipping: each parameter's gradient is scaled separately so that its L2 norm is at most `clip`
    (coefficient clip / (norm + 1e-6) when below 1).  Returns the per-parameter norms BEFORE clipping (1-D
    tensor, in `model.parameters()` order, parameters without gradient skipped).  No host sync.

    Called before `cancel_last_layer_gradients`, as in the reference, so a frozen last layer is clipped too
    (harmlessly: its gradient is dropped right after)."""
    grads = _grads(model)
    if not grads:
        return torch.zeros(0)
    norms = torch._foreach_norm(grads, 2.0)
    coefs = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)
    return torch.stack(norms)


@torch.no_grad()
def clip_gradients_global(model: nn.Module, clip: float) -> torch.Tensor:
    """Global-norm clipping (`torch.nn.utils.clip_grad_norm_`): all gradients scaled by one coefficient so that
    their joint L2 norm is at most `clip`.  Returns the total norm before clipping (0-dim tensor).

    The frozen last layer COUNTS in the total norm: clipping runs before `cancel_last_layer_gradients`, as in
    the reference's order, so during the `freeze_last_layer` epochs its (discarded) gradient still shrinks the
    coefficient applied to the rest of the model."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, clip)


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """During the first `freeze_last_layer` epochs, set the gradient of every parameter whose name contains
    "last_layer" to None (not zero: AdamW would still apply weight decay and update its moments for a zero
    gradient, while a None gradient makes the optimiser skip the parameter entirely)."""
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
