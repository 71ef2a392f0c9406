"""Where training metrics go: pluggable loggers, and machine-readable progress lines for a parent process.

**Loggers.** Anything with ``log(step, metrics)`` and ``close()`` is a :class:`MetricsLogger`. Loggers are named by
*specs* — ``"name"`` or ``"name:argument"`` — and built from a registry, so code outside this library (the
pretrain flow's MLflow logger) plugs in without the trainer knowing about it::

    register_logger("mlflow", lambda arg: MyMlflowLogger(run_id=arg))   # factory(argument or None)
    logger = build_loggers(["console", "jsonl:/tmp/metrics.jsonl", "mlflow:RUN_ID"])
    logger.on_run_start(total_steps=31200, epochs=100)                  # optional hooks, passed on to the
    logger.log(10, {"loss": 9.1, "lr": 1e-4})                           # loggers that define them (the console;
    logger.on_checkpoint("s3://b/runs/r1/checkpoint-000000010.pt", 10)  # MLflow records where checkpoints are,
    logger.archive_checkpoint("s3://b/runs/r1/checkpoint-000000010.pt", 10)  # keeps a copy when asked to
    logger.on_run_end(10, "max_steps")                                  # and tags what the run did;
    logger.on_fast_path({"data": {...}, "step": {...}})                 # the fast-path verdicts: MLflow tags
                                                                        # and params, a console line)
    logger.on_health({"called": "healthy", "window": {...}, ...})       # a window's health verdict (MLflow
                                                                        # tags; a console line when it changes)
    logger.close()

Built in: ``mlflow:RUN_ID`` (:mod:`dino_model.mlflow_logger`: step and system metrics, where the checkpoints are,
copies of them as artifacts when ``logging.mlflow_checkpoints`` asks, what the run did as run tags),
``console`` (progress and metrics a person reads, on stdout) and ``jsonl:PATH`` (one JSON object per call,
appended, so a resumed run continues the same file). Only rank 0 builds loggers; other ranks get an empty
:class:`MultiLogger`.
A factory may also be given as ``"package.module:callable"`` in a spec (``"py:package.module:callable"``), which
lets a launcher add a logger to a ``torchrun`` child without editing this file.

**Progress lines.** With ``logging.progress`` on, rank 0 prints one line per event on stdout::

    DINO_PROGRESS {"event": "step", "step": 120, "total_steps": 9000, "epoch": 1, ...}

The JSON object always has ``event`` (``start``, ``fast_path``, ``step``, ``health``, ``knn``, ``checkpoint``,
``epoch``, ``end``, ``error``) and ``time`` (Unix seconds); :func:`parse_progress_line` turns such a line back into a dict (``None``
for other lines).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Protocol, TextIO, runtime_checkable

__all__ = [
    "MetricsLogger",
    "ConsoleLogger",
    "JsonlLogger",
    "MultiLogger",
    "register_logger",
    "registered_loggers",
    "build_loggers",
    "PROGRESS_PREFIX",
    "progress_line",
    "emit_progress",
    "parse_progress_line",
]

#: Prefix of machine-readable progress lines on the trainer's stdout.
PROGRESS_PREFIX = "DINO_PROGRESS "


@runtime_checkable
class MetricsLogger(Protocol):
    """Receives step metrics (plain floats, keyed by name) from rank 0."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` at global ``step``."""

    def close(self) -> None:
        """Flush and release resources; called once at the end of training (also on failure)."""


class ConsoleLogger:
    """Human-readable lines on a text stream (stdout by default), e.g.
    ``epoch 1/100 · step 312/31200 · 41 img/s · eta 2h10m · loss 9.8213 · lr 1.200e-04 · ...``.

    The epoch is counted from 1 (from the ``epoch`` metric, 0-based in the training loop); the rate is the
    ``images_per_s`` metric; the ETA extrapolates the steps per second this logger has seen since its first line.
    Totals come from :meth:`on_run_start` (the trainer calls it) or the constructor."""

    #: Metrics shown after the progress part, in this order; any others follow alphabetically.
    ORDER = ("loss", "lr", "wd", "momentum", "teacher_temp", "grad_norm")
    #: Metrics the progress part shows.
    PROGRESS = ("epoch", "images_per_s")

    def __init__(self, stream: TextIO | None = None, total_steps: int | None = None, epochs: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.total_steps = total_steps
        self.epochs = epochs
        self.clock = clock
        self._first: tuple[int, float] | None = None  # (step, time) of the first line

    def on_run_start(self, total_steps: int, epochs: int) -> None:
        self.total_steps, self.epochs = total_steps, epochs

    def on_health(self, record: Mapping[str, Any]) -> None:
        """``health · healthy · steps 200-399 · ...`` when the verdict in force changes (every window's verdict is
        in the metrics)."""
        if record.get("changed"):
            print(f"health · {record['text']}", file=self.stream or sys.stdout, flush=True)

    def on_fast_path(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """One line per checked part: ``fast path · step · verified · compiled (default), bf16 autocast, ...``."""
        for part, r in records.items():
            print(f"fast path · {part} · {r['verdict']} · {r['path']}", file=self.stream or sys.stdout, flush=True)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        parts = []
        if "epoch" in metrics:
            parts.append(f"epoch {int(metrics['epoch']) + 1}" + (f"/{self.epochs}" if self.epochs else ""))
        parts.append(f"step {step}" + (f"/{self.total_steps}" if self.total_steps else ""))
        if "images_per_s" in metrics:
            rate = float(metrics["images_per_s"])
            parts.append(f"{rate:.0f} img/s" if rate >= 10 else f"{rate:.2g} img/s")
        eta = self._eta(step)
        if eta is not None:
            parts.append(f"eta {_duration(eta)}")
        keys = [k for k in self.ORDER if k in metrics]
        keys += sorted(k for k in metrics if k not in self.ORDER and k not in self.PROGRESS)
        parts += [f"{k} {_fmt(metrics[k])}" for k in keys]
        print(" · ".join(parts), file=self.stream or sys.stdout, flush=True)

    def _eta(self, step: int) -> float | None:
        """Seconds to the last step at this logger's pace so far; None before there is a pace to go by."""
        now = self.clock()
        if self._first is None:
            self._first = (step, now)
        first_step, first_time = self._first
        if not self.total_steps or step <= first_step:
            return None
        return (now - first_time) / (step - first_step) * max(self.total_steps - step, 0)

    def close(self) -> None:
        (self.stream or sys.stdout).flush()


class JsonlLogger:
    """Appends ``{"step": N, "time": T, **metrics}`` as one JSON line per call to a local file."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not path:
            raise ValueError("jsonl logger needs a file path: 'jsonl:/path/metrics.jsonl'")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _json_number(v) for k, v in metrics.items()})
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class MultiLogger:
    """Fans each call out to several loggers; itself a :class:`MetricsLogger`. Empty = logs nothing."""

    def __init__(self, loggers: Iterable[MetricsLogger] = ()):
        self.loggers = list(loggers)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for lg in self.loggers:
            lg.log(step, metrics)

    def on_run_start(self, total_steps: int, epochs: int) -> None:
        """Tell the loggers that care (those with an ``on_run_start`` method, e.g. the console's) how long the run
        is."""
        for lg in self.loggers:
            hook = getattr(lg, "on_run_start", None)
            if hook is not None:
                hook(total_steps, epochs)

    def on_checkpoint(self, uri: str, step: int) -> None:
        """Tell the loggers that care (those with an ``on_checkpoint`` method, e.g. MLflow's) that a checkpoint
        was written at ``uri``."""
        self._call("on_checkpoint", uri, step)

    def archive_checkpoint(self, uri: str, step: int) -> None:
        """Ask the loggers that keep copies of checkpoints (those with an ``archive_checkpoint`` method: MLflow's
        run artifacts) to keep this one; the trainer asks as ``logging.mlflow_checkpoints`` says."""
        self._call("archive_checkpoint", uri, step)

    def on_run_end(self, step: int, stop_reason: str) -> None:
        """Tell the loggers that care (``on_run_end``) how the run ended: at global ``step``, because of
        ``stop_reason`` (``completed``, ``max_steps``, ``cancelled`` by a stop signal, ``failed``)."""
        self._call("on_run_end", step, stop_reason)

    def _call(self, hook_name: str, *args: Any) -> None:
        for lg in self.loggers:
            hook = getattr(lg, hook_name, None)
            if hook is not None:
                hook(*args)

    def on_fast_path(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Tell the loggers that care (those with an ``on_fast_path`` method: MLflow's, the console's) the
        fast-path verdicts (:meth:`dino_model.fast_path.Verdict.as_record` per part), at start and whenever a
        verdict changes."""
        self._call("on_fast_path", records)

    def on_health(self, record: Mapping[str, Any]) -> None:
        """Tell the loggers that care (``on_health``: MLflow's, the console's) the training-health monitor's verdict
        on a window of steps (:mod:`dino_model.health`): ``{"called", "window": WindowVerdict record, "text"}``."""
        self._call("on_health", record)

    def close(self) -> None:
        errors = []
        for lg in self.loggers:
            try:
                lg.close()
            except Exception as e:  # noqa: BLE001 - close every logger, then report the first failure
                errors.append(e)
        if errors:
            raise errors[0]

    def __len__(self) -> int:
        return len(self.loggers)


# ------------------------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------------------------

LoggerFactory = Callable[[str | None], MetricsLogger]

_REGISTRY: dict[str, LoggerFactory] = {}


def register_logger(name: str, factory: LoggerFactory) -> None:
    """Make ``name`` (or ``name:argument``) usable in ``logging.loggers``; ``factory(argument_or_None)`` builds it.
    Registering an existing name replaces it."""
    if not name or ":" in name:
        raise ValueError(f"logger name must be non-empty and contain no ':', got {name!r}")
    _REGISTRY[name] = factory


def registered_loggers() -> list[str]:
    """Names currently in the registry."""
    return sorted(_REGISTRY)


def build_logger(spec: str) -> MetricsLogger:
    """One logger from its spec: ``name``, ``name:argument`` or ``py:package.module:callable[:argument]``."""
    name, _, arg = spec.partition(":")
    if name == "py":
        # "py:pkg.mod:factory" or "py:pkg.mod:factory:argument": import the factory from a module.
        module_name, _, rest = arg.partition(":")
        attr, _, arg = rest.partition(":")
        if not module_name or not attr:
            raise ValueError(f"logger spec {spec!r} must look like 'py:package.module:factory[:argument]'")
        factory = getattr(importlib.import_module(module_name), attr)
        return factory(arg or None)
    if name not in _REGISTRY:
        raise ValueError(f"unknown metrics logger {name!r} in spec {spec!r}; registered: {registered_loggers()}")
    return _REGISTRY[name](arg or None)


def build_loggers(specs: Iterable[str]) -> MultiLogger:
    """All loggers named by ``specs``, combined into one :class:`MultiLogger`."""
    return MultiLogger(build_logger(s) for s in specs)


def _mlflow_logger(arg: str | None) -> MetricsLogger:
    # Imported on use: MLflow is only needed by runs that log to it.
    from dino_model.mlflow_logger import build

    return build(arg)


register_logger("console", lambda arg: ConsoleLogger())
register_logger("jsonl", lambda arg: JsonlLogger(arg or ""))
register_logger("mlflow", _mlflow_logger)


# ------------------------------------------------------------------------------------------------------------------
# progress lines
# ------------------------------------------------------------------------------------------------------------------


def progress_line(event: str, **fields: Any) -> str:
    """``DINO_PROGRESS {"event": ..., "time": ..., **fields}`` (non-finite floats become ``null``)."""
    record = {"event": event, "time": round(time.time(), 3)}
    record.update({k: _json_value(v) for k, v in fields.items()})
    return PROGRESS_PREFIX + json.dumps(record, allow_nan=False)


def emit_progress(event: str, stream: TextIO | None = None, **fields: Any) -> None:
    """Print a progress line on stdout (or ``stream``) and flush, so a parent reading the pipe sees it at once."""
    print(progress_line(event, **fields), file=stream or sys.stdout, flush=True)


def parse_progress_line(line: str) -> dict[str, Any] | None:
    """The dict carried by a progress line, or ``None`` if ``line`` is not one (e.g. a console log line)."""
    line = line.strip()
    if not line.startswith(PROGRESS_PREFIX.strip()):
        return None
    try:
        record = json.loads(line[len(PROGRESS_PREFIX.strip()) :])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "event" in record else None


def _json_number(v: Any) -> Any:
    v = float(v)
    return v if math.isfinite(v) else None


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # 0-d tensors / numpy scalars
        return _json_value(v.item())
    return v


def _duration(seconds: float) -> str:
    """``2h10m``, ``5m03s`` or ``42s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    v = float(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4f}"
