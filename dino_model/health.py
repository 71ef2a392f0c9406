"""Training health: is DINO learning, or has it collapsed? Named per window of steps, from statistics the step
already computes.

DINO's usual failure on new data is *collapse*: every image gets the same target, and the loss stops carrying
information while the run goes on for days. Two modes (Caron et al. 2021, §5.3: centring alone collapses to a
uniform output, sharpening alone to one dimension):

* **uniform** — every teacher target is (nearly) uniform over the K prototypes; the loss sits near ln K
  (facebookresearch/dino #246: 11.09 = ln 65,536 for 200 epochs; facebookresearch/dinov2 #407: 8.32 = ln 4,096,
  caused by a teacher that was the student object).
* **one-hot** — one prototype wins for every image; the loss falls towards 0 (dinov2 #272: ~0.05 within an
  epoch).

The monitor reads what :meth:`dino_model.meta_arch.DINO.forward_backward` returns at every logged step (averaged
over ranks, so every rank reaches the same verdict with no extra communication or host sync), in nats, with
K = ``model.out_dim``:

==========================  ==================================================================================
``teacher_entropy`` H       mean entropy of the centred, sharpened targets; ln K when they are uniform
``teacher_kl_to_center``    mutual information between image and prototype, H(q̄) - H (q̄: the batch's mean
                            target): 0 when every image gets the same target, whatever that target is; at most
                            ln(min(K, R)) for R targets (2 per image of the batch per rank)
H(q̄) = H + MI               entropy of the batch's mean target: ln 2 means the batch's targets use ~2 prototypes
``kl_teacher_student``      KL(teacher ‖ student) = loss - H: what is left to learn
``teacher_feature_spread``  spread of the teacher's L2-normalised backbone features (~1 spread out, 0 collapsed:
                            :func:`dino_model.meta_arch.feature_spread`)
==========================  ==================================================================================

Each window of ``health.window_steps`` steps after the warm-ups (learning rate and teacher temperature; or from
``health.start_step``) is judged on the means of its logged steps, in this order (the thresholds are the fields
of :class:`dino_model.config.HealthConfig`, where each is documented with the figures it comes from):

1. ``collapse:one-hot`` — H(q̄) <= ln(``one_hot_prototypes``): the whole batch's targets fall on ~1-3 prototypes.
2. ``collapse:uniform`` — H >= ``uniform_entropy`` · ln K: every target is nearly uniform.
3. ``collapse:<uniform|one-hot>`` — MI <= ``min_information`` · ln(min(K, R)), R = 2 × the batch per rank (the
   rows the statistic is computed on: their mutual information cannot exceed ln R): every image gets nearly the
   same target; or the feature spread <= ``min_feature_spread`` (every image gets nearly the same feature). A
   collapse even though its target is neither extreme yet; named uniform when H >= ln K / 2, else one-hot.
4. ``stalled`` — KL(teacher ‖ student) <= ``stalled_kl`` · ln K and the loss moved by less than
   ``stalled_loss_change`` (relative) since the previous window: the student reproduces the teacher and nothing
   changes.
5. ``healthy`` otherwise.

A bad verdict is *called* once ``patience`` windows in a row are bad (one window can be a transient; the latest
window names it: a collapse may look uniform in one window and one-hot in the next); what the run
does then is ``train.health``: ``warn`` (a warning, the MLflow tag, the flow's progress artifact, the model card),
``stop`` (checkpoint, exit code 5, ``stop_reason=collapsed:<mode>``) or ``off``. The history of windows is part
of the checkpoint (the ``health`` part), so a resumed run keeps it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

__all__ = ["HEALTHY", "STALLED", "COLLAPSE_UNIFORM", "COLLAPSE_ONE_HOT", "SIGNALS", "WindowVerdict",
           "HealthMonitor", "information_capacity", "judge_window", "stop_reason", "warmup_end_step"]

HEALTHY = "healthy"
STALLED = "stalled"
COLLAPSE_UNIFORM = "collapse:uniform"
COLLAPSE_ONE_HOT = "collapse:one-hot"

#: The step statistics the monitor reads (keys of the logged metrics).
SIGNALS = ("loss", "teacher_entropy", "teacher_kl_to_center", "kl_teacher_student", "teacher_feature_spread")


@dataclass(frozen=True)
class WindowVerdict:
    """The verdict on one window of steps ``[first_step, last_step]``, with the means it was reached from and the
    rule that decided it."""

    verdict: str
    first_step: int
    last_step: int
    figures: dict[str, float]
    reason: str

    @property
    def bad(self) -> bool:
        return self.verdict != HEALTHY

    def describe(self) -> str:
        """One line: the verdict, the steps, the rule and the figures."""
        f = self.figures
        numbers = (f"loss {f['loss']:.4g}, target entropy {f['entropy_ratio']:.3f}·ln K, batch-target entropy "
                   f"{f['batch_entropy']:.3g} nats (~{math.exp(f['batch_entropy']):.3g} prototypes), information "
                   f"{f['information_ratio']:.3f} of its most, KL(teacher‖student) {f['kl_ratio']:.3g}·ln K, feature "
                   f"spread {f['feature_spread']:.3g}")
        return f"{self.verdict} over steps {self.first_step}-{self.last_step}: {self.reason} ({numbers})"

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def information_capacity(out_dim: int, rows: int) -> float:
    """The most information (nats) targets of ``rows`` images over ``out_dim`` prototypes can carry about the
    image: ln(min(K, rows))."""
    return math.log(max(2, min(out_dim, rows)))


def judge_window(means: Mapping[str, float], out_dim: int, rows: int, thresholds: Any,
                 previous_loss: float | None) -> tuple[str, str]:
    """``(verdict, reason)`` for a window's mean signals (:data:`SIGNALS`) measured on ``rows`` teacher outputs
    per rank (2 × the batch per rank); ``thresholds``: a :class:`dino_model.config.HealthConfig`;
    ``previous_loss``: the previous window's mean loss, if any."""
    log_k = math.log(out_dim)
    entropy, information = means["teacher_entropy"], max(means["teacher_kl_to_center"], 0.0)
    batch_entropy = entropy + information
    if batch_entropy <= math.log(thresholds.one_hot_prototypes):
        return COLLAPSE_ONE_HOT, (f"the batch's targets use ~{math.exp(batch_entropy):.2g} prototypes "
                                  f"(<= {thresholds.one_hot_prototypes:g})")
    if entropy >= thresholds.uniform_entropy * log_k:
        return COLLAPSE_UNIFORM, f"the targets are nearly uniform (entropy >= {thresholds.uniform_entropy:g}·ln K)"
    same_target = information <= thresholds.min_information * information_capacity(out_dim, rows)
    same_feature = means["teacher_feature_spread"] <= thresholds.min_feature_spread
    if same_target or same_feature:
        mode = COLLAPSE_UNIFORM if entropy >= log_k / 2 else COLLAPSE_ONE_HOT
        what = (f"every image gets nearly the same target (information <= {thresholds.min_information:g} of the "
                f"most {rows} targets can carry)" if same_target else
                f"every image gets nearly the same feature (spread <= {thresholds.min_feature_spread:g})")
        return mode, what
    if previous_loss is not None and means["kl_teacher_student"] <= thresholds.stalled_kl * log_k:
        change = abs(means["loss"] - previous_loss) / max(abs(previous_loss), 1e-12)
        if change <= thresholds.stalled_loss_change:
            return STALLED, (f"the student reproduces the teacher (KL <= {thresholds.stalled_kl:g}·ln K) and the "
                             f"loss moved by {change:.2g} (<= {thresholds.stalled_loss_change:g})")
    return HEALTHY, "the targets differ between images and the student still learns"


def stop_reason(verdict: str) -> str:
    """The ``stop_reason`` of a run that ``train.health=stop`` ended: ``collapsed:uniform``,
    ``collapsed:one-hot`` or ``stalled``."""
    return verdict.replace("collapse:", "collapsed:")


def warmup_end_step(cfg: Any, steps_per_epoch: int) -> int:
    """The first step the monitor judges: ``health.start_step``, or the end of the longer of the learning-rate and
    teacher-temperature warm-ups (targets and updates change by design before)."""
    if cfg.health.start_step is not None:
        return int(cfg.health.start_step)
    return max(cfg.optim.warmup_epochs, cfg.loss.warmup_teacher_temp_epochs) * steps_per_epoch


@dataclass
class HealthMonitor:
    """Judges windows of logged step statistics (see the module docstring). Feed it with :meth:`observe` at every
    logged step; it returns a :class:`WindowVerdict` when a window closes. ``called`` is the verdict in force (a
    bad one once ``patience`` windows agreed), ``history`` every window so far; both are checkpointed
    (``state_dict`` / ``load_state_dict``)."""

    thresholds: Any  #: dino_model.config.HealthConfig
    out_dim: int
    rows: int  #: teacher outputs per rank the statistics are computed on: 2 x the batch per rank
    start_step: int
    called: str = ""  #: "" until the first window is judged
    history: list[dict[str, Any]] = field(default_factory=list)
    _sums: dict[str, float] = field(default_factory=dict)
    _points: int = 0
    _window_first: int = 0

    @classmethod
    def from_config(cls, cfg: Any, steps_per_epoch: int) -> "HealthMonitor":
        return cls(cfg.health, cfg.model.out_dim, 2 * cfg.data.batch_size_per_gpu, warmup_end_step(cfg, steps_per_epoch))

    def observe(self, step: int, metrics: Mapping[str, float]) -> WindowVerdict | None:
        """One logged step's metrics (``step``: updates done). Steps before :attr:`start_step` are not judged."""
        if step <= self.start_step or not all(k in metrics for k in SIGNALS):
            return None
        if not self._points:
            self._window_first = step
        for key in SIGNALS:
            self._sums[key] = self._sums.get(key, 0.0) + float(metrics[key])
        self._points += 1
        window = self.thresholds.window_steps
        if step - self._window_first + 1 < window or self._points < self.thresholds.min_points:
            return None
        return self._close_window(step)

    def _close_window(self, step: int) -> WindowVerdict:
        means = {k: v / self._points for k, v in self._sums.items()}
        previous = self.history[-1]["figures"]["loss"] if self.history else None
        verdict, reason = judge_window(means, self.out_dim, self.rows, self.thresholds, previous)
        log_k = math.log(self.out_dim)
        figures = {"loss": means["loss"], "entropy_ratio": means["teacher_entropy"] / log_k,
                   "batch_entropy": means["teacher_entropy"] + max(means["teacher_kl_to_center"], 0.0),
                   "information_ratio": (max(means["teacher_kl_to_center"], 0.0)
                                         / information_capacity(self.out_dim, self.rows)),
                   "kl_ratio": means["kl_teacher_student"] / log_k,
                   "feature_spread": means["teacher_feature_spread"], "points": float(self._points)}
        result = WindowVerdict(verdict, self._window_first, step, figures, reason)
        self.history.append(result.as_record())
        self._sums, self._points = {}, 0
        recent = [w["verdict"] for w in self.history[-self.thresholds.patience:]]
        if len(recent) == self.thresholds.patience and HEALTHY not in recent:
            self.called = verdict  # (a collapse may change its face from window to window: any bad verdicts count)
        elif verdict == HEALTHY or not self.called:
            self.called = HEALTHY  # a bad window that is not yet called leaves the verdict in force
        return result

    @property
    def last(self) -> WindowVerdict | None:
        """The latest window's verdict."""
        return WindowVerdict(**self.history[-1]) if self.history else None

    # -- checkpoint part -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"called": self.called, "history": [dict(w) for w in self.history], "sums": dict(self._sums),
                "points": self._points, "window_first": self._window_first}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.called = str(state["called"])
        self.history = [dict(w) for w in state["history"]]
        self._sums = {k: float(v) for k, v in state["sums"].items()}
        self._points, self._window_first = int(state["points"]), int(state["window_first"])
