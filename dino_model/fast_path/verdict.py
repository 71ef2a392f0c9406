"""What a fast-path check decided, how it is reported, and how every rank comes to take rank 0's decision.

A :class:`Verdict` per checked part (``data``, ``step``, ``extract``)::

    verified                          the fast path ran on this run's first batch and matched the reference
    fallback: <reason with numbers>   it did not (or raised); the run uses the reference path instead
    off                               the check is disabled (``*.fast_path_check=off``): the fast path runs unchecked
    reference                         nothing to check: the configured path is the reference itself (e.g. CPU
                                      workers' augmentation, an fp32 eager step, fp32 extraction)

with the figures that decided it. :func:`settle` logs a verdict (a WARNING on fallback) and, in ``strict`` mode,
raises :class:`FastPathError` instead of falling back. :func:`on_rank0` runs a check on rank 0 alone and hands its
verdict to every rank, so all ranks take the same path.
"""

from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable, TypeVar

__all__ = [
    "MODES",
    "VERIFIED",
    "FALLBACK",
    "OFF",
    "REFERENCE",
    "FastPathError",
    "Verdict",
    "settle",
    "on_rank0",
    "exception_reason",
    "combine",
    "tracking_records",
]

#: ``train.fast_path_check`` / the extraction's ``fast_path_check``.
MODES = ("fallback", "strict", "off")
VERIFIED, FALLBACK, OFF, REFERENCE = "verified", "fallback", "off", "reference"

log = logging.getLogger("dino_model.fast_path")
T = TypeVar("T")


class FastPathError(RuntimeError):
    """A fast path failed its check with ``fast_path_check=strict``; the message holds the figures."""

    def __init__(self, verdict: "Verdict"):
        self.verdict = verdict
        super().__init__(f"fast path check failed ({verdict.part}; fast_path_check=strict): {verdict.reason}. "
                         f"Figures: {verdict.figures_text()}. Set fast_path_check=fallback to run on the reference "
                         "path instead, or off to skip the check.")


@dataclass(frozen=True)
class Verdict:
    """One part's decision: ``status`` (verified / fallback / off / reference), ``path`` (what the run uses from
    now on, in words), ``reason`` (for a fallback: what failed, with numbers), ``figures`` (the measurements and
    tolerances, plain floats) and ``seconds`` (what the check cost)."""

    part: str
    status: str
    path: str
    reason: str = ""
    figures: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def text(self) -> str:
        """``verified``, ``fallback: <reason>``, ``off`` or ``reference``: the MLflow tag's value."""
        return f"{FALLBACK}: {self.reason}" if self.status == FALLBACK else self.status

    @property
    def fell_back(self) -> bool:
        return self.status == FALLBACK

    def figures_text(self) -> str:
        return ", ".join(f"{k} {_number(v)}" for k, v in self.figures.items()) or "none"

    def as_record(self) -> dict[str, Any]:
        """Plain values (JSON): what progress lines, Parquet metadata and the run records carry."""
        return {"verdict": self.text, "status": self.status, "path": self.path, "reason": self.reason,
                "figures": dict(self.figures), "seconds": round(self.seconds, 3)}

    @classmethod
    def from_record(cls, part: str, record: dict[str, Any]) -> "Verdict":
        return cls(part, record["status"], record["path"], record.get("reason", ""), dict(record.get("figures", {})),
                   float(record.get("seconds", 0.0)))

    def took(self, seconds: float) -> "Verdict":
        return replace(self, seconds=seconds)


def settle(verdict: Verdict, mode: str, logger: logging.Logger = log) -> Verdict:
    """Log ``verdict`` (INFO, or WARNING for a fallback) and return it; in ``strict`` mode a fallback raises
    :class:`FastPathError` instead."""
    if mode not in MODES:
        raise ValueError(f"fast_path_check must be one of {MODES}, got {mode!r}")
    if verdict.fell_back:
        if mode == "strict":
            raise FastPathError(verdict)
        logger.warning("fast path %s: FALLBACK to %s: %s (figures: %s; the check took %.1f s)", verdict.part,
                       verdict.path, verdict.reason, verdict.figures_text(), verdict.seconds)
    else:
        logger.info("fast path %s: %s, %s (figures: %s; %.1f s)", verdict.part, verdict.status, verdict.path,
                    verdict.figures_text(), verdict.seconds)
    return verdict


def on_rank0(check: Callable[[], T], is_main: bool) -> T:
    """``check()`` on rank 0 only, its result broadcast to every rank (a collective: every rank calls it; in a
    single process it is just ``check()``). Other ranks wait meanwhile; the check must not use collectives."""
    from dino_model import distributed as dist_utils

    return dist_utils.broadcast_object(check() if is_main else None)


def exception_reason(what: str, error: BaseException) -> str:
    """``<what> raised <Type>: <first line>``, after logging the whole traceback once (the reason itself goes into
    tags and summaries, which want one line)."""
    log.warning("%s raised:\n%s", what, "".join(traceback.format_exception(error)).rstrip())
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{what} raised {type(error).__name__}: {message[:300]}"


def _number(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or (math.isfinite(v) and v == int(v) and abs(v) < 1e6):
        return str(int(v)) if isinstance(v, int) else f"{v:g}"
    return f"{v:.3g}"


def combine(part: str, verdicts: dict[str, Verdict]) -> Verdict:
    """One verdict for several checks of one part (e.g. an evaluation's extractions, keyed ``cls/train``...): a
    fallback if any fell back (its reason names which), else verified if any was verified, else their common
    status; the figures keyed ``<label>.<figure>``."""
    if not verdicts:
        raise ValueError("combine needs at least one verdict")
    fell = {label: v for label, v in verdicts.items() if v.fell_back}
    statuses = {v.status for v in verdicts.values()}
    status = FALLBACK if fell else VERIFIED if VERIFIED in statuses else statuses.pop() if len(statuses) == 1 else OFF
    paths = sorted({v.path for v in verdicts.values()})
    return Verdict(part, status, ", ".join(paths), "; ".join(f"{label}: {v.reason}" for label, v in fell.items()),
                   {f"{label}.{k}": x for label, v in verdicts.items() for k, x in v.figures.items()},
                   sum(v.seconds for v in verdicts.values()))


def tracking_records(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """MLflow tags / params of the verdict records (``{part: Verdict.as_record()}``): ``fast_path.<part>`` = the
    verdict (``verified``, ``fallback: ...``), ``fast_path.<part>.path`` = what runs, and
    ``fast_path.<part>.<figure>`` per figure. Values fit MLflow's limits (5000 characters)."""
    out: dict[str, str] = {}
    for part, r in records.items():
        out[f"fast_path.{part}"] = r["verdict"][:5000]
        out[f"fast_path.{part}.path"] = r["path"][:5000]
        out[f"fast_path.{part}.seconds"] = f"{r.get('seconds', 0.0):g}"
        for name, value in r.get("figures", {}).items():
            out[f"fast_path.{part}.{name}"] = _number(value)
    return out
