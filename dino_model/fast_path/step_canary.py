"""The step canary: one optimiser step of the fast path against the fp32 eager step, on copies of the run's model.

A *step path* is how :func:`dino_model.step.train_step` runs: compiled or eager, the autocast dtype (bf16 / fp16 /
none = fp32), fused AdamW or PyTorch's for-each update. The **reference** is eager, fp32, for-each: the formulation
the parity tests check against the paper's. From the run's state at start (initial or resumed: weights, teacher,
centre, optimiser moments), on the same crops (rank 0's first batch), each path takes one step on a deep copy
(the run's own model is not touched) and the figures compare them:

* ``loss_rel``: |loss_fast - loss_ref| / |loss_ref|;
* ``grad_rel``: ||g_fast - g_ref|| / ||g_ref|| over every student gradient (after clipping: what the optimiser
  receives);
* ``update_rel``: ||Δp_fast - Δp_ref|| / ||Δp_ref||, Δp the parameters' change in the step;
* ``param_max_diff``: max |p_fast - p_ref| after the step.

Tolerances, from the unit roundoff u of the narrowest format the fast path computes in (bf16 2^-8 = 3.9e-3, fp16
2^-11; fp32 paths differ only by compiled / fused kernels summing in another order, so u = 2^-16 there):
``loss_rel <= 8 u`` and ``grad_rel <= 32 u`` (bf16: 0.031 and 0.125). The student's bf16 logits are divided by
its temperature 0.1 before the loss, so the loss moves by a few u on a small model: measured on this CPU with
bf16 autocast, loss_rel 3.1e-3 and grad_rel 0.018 for the tests' ViT-Tiny with K = 64 on real crops, 2e-5 .. 2e-4
and 0.009 .. 0.013 for ViT-Tiny/Small with K = 64 .. 16,384 on random crops; compiled fp32: 0 and 1.4e-6.
AdamW's first update is lr · g / (|g| + eps) ≈ ±lr per element whatever |g|: a gradient whose sign rounding flips
moves by 2 lr the other way, so ``update_rel`` follows the fraction of flipped signs (bf16: ~0.5 % of elements,
update_rel 0.12 .. 0.16) and is held to 0.5 — a skipped, doubled or unrelated update gives >= 1 — and
``param_max_diff`` is held to 2.5 times the reference's largest change (a flipped sign moves an element by twice
its change, weight decay a little more; garbage or a non-finite value goes far beyond).
With fp16 a GradScaler step that found inf/NaN is skipped: the parameters are then not compared (``fp16_skipped``).

Drop-path draws its masks from the RNG, and compiled code draws them with another generator than eager code, so
the copies run with drop-path off; every kernel, the autocast and the optimiser are the run's. With a CUDA-graph
``compile_mode`` the fast copy takes its step three times from the same state (the third call replays the
captured graphs) and the last is compared.

When the fast path fails (or raises while compiling / capturing graphs), the eager step in the same autocast
dtype is checked the same way; if it passes the run uses it, else the reference (:func:`choose_step_path`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

from dino_model.config import DinoConfig
from dino_model.meta_arch import CUDA_GRAPH_MODES, DINO
from dino_model.optim import build_optimizer, load_optimizer_state, optimizer_state, param_groups
from dino_model.step import StepSettings, resolve_compile, resolve_precision, train_step

from .faults import failing_backend, injected
from .verdict import exception_reason

__all__ = [
    "StepPath",
    "REFERENCE_PATH",
    "UNIT_ROUNDOFF",
    "LOSS_REL_UNITS",
    "GRAD_REL_UNITS",
    "UPDATE_REL_TOL",
    "configured_step_path",
    "compile_model",
    "canary_step_args",
    "choose_step_path",
]

#: Unit roundoff u per autocast dtype (None = fp32; see the module docstring).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, None: 2.0 ** -16}
LOSS_REL_UNITS = 8.0
GRAD_REL_UNITS = 32.0
UPDATE_REL_TOL = 0.5
#: param_max_diff <= this x the reference's largest change (2: one flipped sign; the rest: weight decay acting on
#: the other sign's side, Adam's ratio above 1 with resumed moments)
PARAM_BOUND_FACTOR = 2.5
#: Steps the fast copy takes with a CUDA-graph compile mode (warm-up, record, replay).
CUDA_GRAPH_STEPS = 3
_DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class StepPath:
    """How the training step runs (see the module docstring)."""

    compiled: bool
    autocast_dtype: torch.dtype | None
    fused: bool
    compile_mode: str = "default"
    compile_backend: str = "inductor"

    @property
    def is_reference(self) -> bool:
        return not self.compiled and self.autocast_dtype is None and not self.fused

    @property
    def precision(self) -> str:
        return _DTYPE_NAMES[self.autocast_dtype]

    def eager(self) -> "StepPath":
        """The same autocast without compile and with the for-each optimiser: the first fallback."""
        return StepPath(False, self.autocast_dtype, False)

    def describe(self) -> str:
        if self.compiled:
            how = self.compile_mode + ("" if self.compile_backend == "inductor" else f", {self.compile_backend}")
            parts = [f"compiled ({how})"]
        else:
            parts = ["eager"]
        parts.append("fp32" if self.autocast_dtype is None else f"{self.precision} autocast")
        parts.append("fused AdamW" if self.fused else "for-each optimiser")
        return ", ".join(parts)


REFERENCE_PATH = StepPath(False, None, False)


def configured_step_path(cfg: DinoConfig, device: torch.device) -> StepPath:
    """The step path ``cfg`` asks for on ``device`` (``train.compile`` / ``precision`` resolved; fused AdamW on
    CUDA)."""
    dtype, _ = resolve_precision(cfg.train.precision, device)
    return StepPath(resolve_compile(cfg.train.compile, device), dtype,
                    device.type == "cuda" and cfg.optim.optimizer == "adamw", cfg.train.compile_mode,
                    cfg.train.compile_backend)


def compile_model(model: DINO, path: StepPath, *, for_check: bool = False) -> None:
    """``model.compile`` as ``path`` says (mode, backend), with the ``compile`` / ``first-steps`` faults of
    :mod:`dino_model.fast_path.faults` applied: ``compile`` breaks every compile, ``first-steps`` only the run's
    own (not the check's)."""
    broken = injected("compile") or (not for_check and injected("first-steps"))
    backend = failing_backend if broken else path.compile_backend
    model.compile(path.compile_mode, **({} if backend == "inductor" else {"backend": backend}))


def canary_step_args(schedules, step: int, epoch: int) -> dict[str, Any]:
    """The schedule's values at the run's step, with the peak learning rate where the schedule's is 0 (the first
    warm-up step): with lr 0 no parameter would move and the update could not be compared."""
    args = schedules.at(min(step, schedules.total_steps - 1))
    if args["lr"] <= 0:
        args["lr"] = float(max(schedules.lr))
    return {**args, "epoch": epoch}


def _without_drop_path(model: torch.nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "drop_prob"):  # timm's DropPath
            m.drop_prob = 0.0


def _step_on_copy(model: DINO, optimizer: torch.optim.Optimizer, grad_scaler: torch.amp.GradScaler | None,
                  crops: list[torch.Tensor], path: StepPath, cfg: DinoConfig, step_args: dict[str, Any],
                  seed: int) -> tuple[DINO, float, bool]:
    """A deep copy of the plain ``model`` after one step on ``path``: (copy, loss, whether an fp16 GradScaler
    skipped the step)."""
    twin = copy.deepcopy(model)
    _without_drop_path(twin)
    twin.dino_loss.sync_center = False  # rank 0 steps alone: no all-reduce with ranks that do not
    repeats = 1
    if path.compiled:
        compile_model(twin, path, for_check=True)
        if injected("numerics"):
            twin.student_module().register_forward_hook(lambda module, args, out: out * 1.5)
        repeats = CUDA_GRAPH_STEPS if path.compile_mode in CUDA_GRAPH_MODES else 1
    twin_opt = build_optimizer(cfg.optim.optimizer, param_groups(twin.student_module()),
                               momentum=cfg.optim.sgd_momentum, fused=path.fused)
    states = optimizer_state(optimizer)
    start = {k: v.detach().clone() for k, v in twin.state_dict().items()} if repeats > 1 else None
    settings = StepSettings.from_config(cfg, path.autocast_dtype)
    loss, skipped = float("nan"), False
    for i in range(repeats):
        if i:
            twin.load_state_dict(start)  # in place: CUDA-graph inputs keep their addresses
        load_optimizer_state(twin_opt, states)
        scaler = None
        if path.autocast_dtype == torch.float16:
            scaler = torch.amp.GradScaler(crops[0].device.type)
            if grad_scaler is not None:
                scaler.load_state_dict(grad_scaler.state_dict())
        scale_before = scaler.get_scale() if scaler is not None else None
        torch.manual_seed(seed)
        stats = train_step(twin, twin_opt, crops, settings=settings, grad_scaler=scaler, **step_args)
        loss = float(stats["loss"])
        skipped = scaler is not None and scaler.get_scale() < scale_before
    return twin, loss, skipped


def _compare(reference: tuple[list[torch.Tensor], list[torch.Tensor], float], fast: DINO, fast_loss: float,
             fast_skipped: bool, start: list[torch.Tensor], unit: float) -> tuple[str, dict[str, float]]:
    """Figures of the fast copy against the reference's (params, grads, loss) and the start parameters."""
    ref_params, ref_grads, ref_loss = reference
    sq = dict.fromkeys(("grad_diff", "grad", "update_diff", "update"), 0.0)
    param_max_diff = ref_max_update = 0.0
    for param, p_ref, g_ref, p0 in zip(fast.student_module().parameters(), ref_params, ref_grads, start):
        p = param.detach().float()
        g = param.grad.detach().float() if param.grad is not None else torch.zeros_like(p)
        sq["grad_diff"] += float((g - g_ref).square().sum())
        sq["grad"] += float(g_ref.square().sum())
        sq["update_diff"] += float((p - p_ref).square().sum())  # (p - p0) - (p_ref - p0)
        sq["update"] += float((p_ref - p0).square().sum())
        param_max_diff = max(param_max_diff, float((p - p_ref).abs().max()))
        ref_max_update = max(ref_max_update, float((p_ref - p0).abs().max()))
    figures = {
        "loss_rel": abs(fast_loss - ref_loss) / max(abs(ref_loss), 1e-30),
        "grad_rel": math.sqrt(sq["grad_diff"] / sq["grad"]) if sq["grad"] > 0 else math.sqrt(sq["grad_diff"]),
        "update_rel": math.sqrt(sq["update_diff"] / sq["update"]) if sq["update"] > 0 else math.sqrt(sq["update_diff"]),
        "param_max_diff": param_max_diff,
        "loss_rel_tol": LOSS_REL_UNITS * unit,
        "grad_rel_tol": GRAD_REL_UNITS * unit,
        "update_rel_tol": UPDATE_REL_TOL,
        "param_max_diff_tol": PARAM_BOUND_FACTOR * ref_max_update,
        "loss_fast": fast_loss,
        "loss_reference": ref_loss,
    }
    checked = ["loss_rel"]
    if fast_skipped:
        figures["fp16_skipped"] = 1.0  # the scaled gradients overflowed: only the loss is comparable
    else:
        checked += ["grad_rel", "update_rel", "param_max_diff"]
    problems = [f"{name} {figures[name]:.3g} > {figures[name + '_tol']:.3g}" for name in checked
                if not figures[name] <= figures[name + "_tol"]]  # NaN fails too
    return "; ".join(problems), figures


def choose_step_path(model: DINO, optimizer: torch.optim.Optimizer, grad_scaler: torch.amp.GradScaler | None,
                     crops: list[torch.Tensor], cfg: DinoConfig, step_args: dict[str, Any], seed: int,
                     configured: StepPath, failure: str = "") -> tuple[StepPath, str, dict[str, float]]:
    """The step path the run should use: ``configured`` if it passes against the reference, else its eager form
    if that passes, else the reference. Returns (path, failure in words — empty when ``configured`` passed —,
    figures). ``failure`` given: ``configured`` already failed (an exception in the run's first steps); only the
    fallbacks are checked. ``model`` must be plain (no DDP, not compiled); it is not changed."""
    if configured.is_reference:
        return configured, failure, {}
    start = [p.detach().float().clone() for p in model.student_module().parameters()]
    with torch.random.fork_rng(devices=[crops[0].device] if crops[0].device.type == "cuda" else []):
        ref_model, ref_loss, _ = _step_on_copy(model, optimizer, grad_scaler, crops, REFERENCE_PATH, cfg,
                                               step_args, seed)
        reference = ([p.detach().float() for p in ref_model.student_module().parameters()],
                     [p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                      for p in ref_model.student_module().parameters()], ref_loss)
        del ref_model
        candidates = [configured] if not failure else []
        eager = configured.eager()
        if not eager.is_reference and eager != configured:
            candidates.append(eager)
        figures: dict[str, float] = {}
        try:
            for path in candidates:
                prefix = "" if path == configured else "eager_"
                try:
                    twin, loss, skipped = _step_on_copy(model, optimizer, grad_scaler, crops, path, cfg, step_args,
                                                        seed)
                    problem, measured = _compare(reference, twin, loss, skipped, start,
                                                 UNIT_ROUNDOFF[path.autocast_dtype])
                    problem = problem and f"{path.describe()} vs fp32 eager: {problem}"
                    del twin
                except Exception as error:  # noqa: BLE001 - a failing fast path is what the check is for
                    problem, measured = exception_reason(f"the {path.describe()} step", error), {}
                figures.update({prefix + k: v for k, v in measured.items()})
                if not problem:
                    return path, failure, figures
                failure = (f"{failure}; " if failure else "") + problem
        finally:
            if any(path.compiled for path in candidates):
                torch._dynamo.reset()  # the copies' compiled code and CUDA-graph pools go with them
    return REFERENCE_PATH, failure, figures
