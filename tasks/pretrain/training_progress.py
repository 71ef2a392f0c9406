"""The pretraining progress as a person reads it, from the trainer's progress records (no Prefect here): step x/y,
epoch, loss, images/s and the time left, for the Prefect progress artifact; and the machines the run uses, for
the MLflow run's ``hardware`` tag and the model card.

    >>> p = TrainingProgress()
    >>> p.update({"event": "start", "step": 0, "total_steps": 9000, "epochs": 100, "global_batch": 512,
    ...           "world_size": 8, "device": "cuda:0", "precision": "torch.bfloat16", "time": 0.0})
    >>> p.update({"event": "step", "step": 120, "total_steps": 9000, "epoch": 1, "loss": 9.82131,
    ...           "images_per_s": 4096.0, "time": 15.0})
    >>> p.describe()
    'step 120/9000 (1.3 %) · epoch 2/100 · loss 9.8213 · 4,096 img/s · ETA 18 min 30 s'

The records are the ones :mod:`dino_model.metrics` documents (``start``: ``step``, ``total_steps``, ``epochs``,
``global_batch``, ``world_size``, ``device``, ``precision``; ``step``: ``step``, ``total_steps``, ``epoch``
(0-based), ``loss``, ``images_per_s``; every record: ``time``). A field a record lacks is left out of the line.
The time left comes from the average step rate since the first step record this process saw (so a resumed run's
skipped steps and the first steps' compilation do not distort it), else from ``images_per_s`` and the global batch.
"""

from __future__ import annotations

from typing import Any


def format_duration(seconds: float) -> str:
    """``4230`` -> ``'1 h 10 min'``; ``1110`` -> ``'18 min 30 s'``; ``42`` -> ``'42 s'``."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h} h {m:02d} min"
    if m:
        return f"{m} min {s:02d} s"
    return f"{s} s"


def _precision(value: Any) -> str:
    text = str(value or "fp32")
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}.get(text, text)


def describe_hardware(start: dict[str, Any], accelerator: str | None = None) -> str:
    """``'8 processes on cuda (NVIDIA H100 80GB HBM3), bf16, global batch 512'`` from a ``start`` record;
    ``accelerator`` names the device model when the launcher knows it."""
    world = int(start.get("world_size") or 1)
    device = str(start.get("device") or "?").split(":")[0]
    text = f"{world} process{'es' if world != 1 else ''} on {device}"
    if accelerator:
        text += f" ({accelerator})"
    text += f", {_precision(start.get('precision'))}"
    if start.get("global_batch"):
        text += f", global batch {int(start['global_batch'])}"
    return text


class TrainingProgress:
    """Follows the trainer's progress records; :meth:`describe` and :meth:`percent` say where training is."""

    def __init__(self) -> None:
        self.start: dict[str, Any] = {}
        self.last: dict[str, Any] = {}
        self.health: str = ""  #: the training-health verdict in force (``health`` records)
        self.knn: list[tuple[int, float]] = []  #: the learning curve: (step, k-NN top-1 %) of ``knn`` records
        self._first: tuple[float, int] | None = None  # (time, step) of the first step record seen

    def update(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "start":
            self.start = dict(record)
            self._first = None
        elif event == "step":
            self.last = dict(record)
            if self._first is None and record.get("time") is not None:
                self._first = (float(record["time"]), int(record.get("step") or 0))
        elif event == "health":
            self.health = str(record.get("called") or "")
        elif event == "knn":
            value = next((v for k, v in record.items() if k.startswith("monitor.knn")), None)
            if value is not None:
                self.knn.append((int(record.get("step") or 0), float(value)))

    def learning(self) -> str:
        """``health healthy · k-NN 41.3 % (random 24.0 %)``: the verdict in force and the learning curve's last point
        beside its first (the randomly initialised backbone, when the curve starts at step 0); empty before any."""
        parts = [f"health {self.health}"] if self.health else []
        if self.knn:
            text = f"k-NN {self.knn[-1][1]:.1f} %"
            if self.knn[0][0] == 0 and len(self.knn) > 1:
                text += f" (random {self.knn[0][1]:.1f} %)"
            parts.append(text)
        return " · ".join(parts)

    @property
    def total_steps(self) -> int | None:
        total = self.last.get("total_steps") or self.start.get("total_steps")
        return int(total) if total else None

    def percent(self) -> float:
        total, step = self.total_steps, self.last.get("step")
        if not total or step is None:
            return 0.0
        return min(100.0, 100.0 * float(step) / total)

    def seconds_left(self) -> float | None:
        """The time left, or None before there is a rate to estimate it from."""
        total, step = self.total_steps, self.last.get("step")
        if not total or step is None:
            return None
        remaining = max(0, total - int(step))
        if self._first is not None and self.last.get("time") is not None:
            t0, s0 = self._first
            dt, ds = float(self.last["time"]) - t0, int(step) - s0
            if dt > 0 and ds > 0:
                return remaining * dt / ds
        ips, batch = self.last.get("images_per_s"), self.start.get("global_batch")
        if ips and batch:
            return remaining * float(batch) / float(ips)
        return None

    def describe(self) -> str:
        """One line: ``step 120/9000 (1.3 %) · epoch 2/100 · loss 9.8213 · 4,096 img/s · ETA 18 min 30 s``, then
        the health verdict and the learning curve when there are any (:meth:`learning`)."""
        if not self.last:
            return "DINO pretraining: starting" + (f" ({self.total_steps} steps)" if self.total_steps else "")
        step = int(self.last.get("step") or 0)
        total = self.total_steps
        parts = [f"step {step}/{total} ({self.percent():.1f} %)" if total else f"step {step}"]
        if self.last.get("epoch") is not None:
            epochs = self.start.get("epochs")
            epoch = int(self.last["epoch"]) + 1
            parts.append(f"epoch {epoch}/{int(epochs)}" if epochs else f"epoch {epoch}")
        if self.last.get("loss") is not None:
            parts.append(f"loss {float(self.last['loss']):.4f}")
        if self.last.get("images_per_s"):
            parts.append(f"{float(self.last['images_per_s']):,.0f} img/s")
        left = self.seconds_left()
        if left is not None:
            parts.append(f"ETA {format_duration(left)}")
        if self.learning():
            parts.append(self.learning())
        return " · ".join(parts)
