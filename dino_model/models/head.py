"""DINO projection head: MLP -> L2 normalisation -> weight-normalised linear layer to K prototypes.

    Linear(in_dim, 2048) -> GELU -> Linear(2048, 2048) -> GELU -> Linear(2048, 256)   (BatchNorm optional)
    -> x / ||x||_2 -> W x,  W[k] = g[k] * v[k] / ||v[k]||_2   (no bias, K = 65536 by default)

The MLP is initialised trunc-normal (std 0.02) with zero biases; the last layer keeps PyTorch's default Linear
init for `v` and starts its gain `g` at 1.  With `norm_last_layer` (the default) `g` is frozen
(`requires_grad=False`), so every prototype stays unit-norm: the reference found this stabilises training.

The weight norm is implemented explicitly with the parameter names of `torch.nn.utils.weight_norm`
(`last_layer.weight_g` [K, 1] and `last_layer.weight_v` [K, 256]), so reference checkpoints load without
renaming; `convert_reference_head_state_dict` also accepts the `parametrizations.weight.original0/1` layout of
`torch.nn.utils.parametrizations.weight_norm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight = g * v / ||v|| (norm over each output row), like `nn.utils.weight_norm`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        # PyTorch's default Linear init for the direction (as the reference, which wraps an nn.Linear).
        v = nn.Linear(in_features, out_features, bias=False).weight.detach()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(v.clone())

    @property
    def weight(self) -> torch.Tensor:
        # torch._weight_norm is the exact kernel nn.utils.weight_norm uses (dim=0: one norm per output row).
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class DINOHead(nn.Module):
    """The DINO projection head (see module docstring). Output [B, out_dim] logits (before temperature)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init_weights)
        # Created after the MLP init, as the reference does, so a seeded build draws the same random numbers.
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # eps: F.normalize's default (1e-12), as the reference.
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


_PARAMETRIZED_G = "last_layer.parametrizations.weight.original0"
_PARAMETRIZED_V = "last_layer.parametrizations.weight.original1"


def convert_reference_head_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a copy of `sd` whose weight-norm keys are ours (`...last_layer.weight_g` / `...last_layer.weight_v`).

    Accepts the reference checkpoint layout (`nn.utils.weight_norm`: already `weight_g` [K, 1] / `weight_v`
    [K, d], copied unchanged) and the `nn.utils.parametrizations.weight_norm` layout
    (`last_layer.parametrizations.weight.original0` = g, `original1` = v).  A 1-D gain [K] is reshaped to
    [K, 1].  Any prefix before `last_layer` (`module.head.`, `head.`, ...) is kept; other keys pass through.
    Raises ValueError when a weight-norm layer has only one of its two tensors.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith(_PARAMETRIZED_G):
            key = key[: -len(_PARAMETRIZED_G)] + "last_layer.weight_g"
        elif key.endswith(_PARAMETRIZED_V):
            key = key[: -len(_PARAMETRIZED_V)] + "last_layer.weight_v"
        if key.endswith("last_layer.weight_g") and value.ndim == 1:
            value = value.unsqueeze(1)
        out[key] = value
    prefixes_g = {k[: -len("weight_g")] for k in out if k.endswith("last_layer.weight_g")}
    prefixes_v = {k[: -len("weight_v")] for k in out if k.endswith("last_layer.weight_v")}
    if prefixes_g != prefixes_v:
        raise ValueError(
            f"weight-norm head state_dict is incomplete: gains for {sorted(prefixes_g)}, "
            f"directions for {sorted(prefixes_v)}"
        )
    return out

