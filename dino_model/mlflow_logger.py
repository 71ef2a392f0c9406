"""The trainer's MLflow logger (rank 0 only): step metrics, system metrics, where the checkpoints are, and what the
run did.

The pretrain flow creates (or resumes) the MLflow run and hands its id to the trainer; rank 0 then logs into it
(step metrics, and the fast-path verdicts as ``fast_path.*`` tags and params)::

    torchrun ... -m dino_model.train --config run.yaml 'logging.loggers=[console, "mlflow:<RUN_ID>"]'

The tracking server comes from the standard ``MLFLOW_TRACKING_URI``. With a server whose artifacts are proxied
(``mlflow server --artifacts-destination s3://...``) the trainer needs no S3 credentials for artifacts.

MLflow cannot delete metric points, so a resumed run must not log a step twice: at start the logger reads the
highest step already logged for ``loss`` and drops every step at or below it (a resumed trainer recomputes those
steps bit for bit, so nothing is lost). System metrics (CPU, memory, GPU through psutil / nvidia-ml-py) are sampled
by MLflow's monitor thread for as long as the logger is open, continuing the run's own ``system/`` step count.

Run tags it writes (other tools read these names, e.g. the model card):

* ``checkpoint``   the latest checkpoint's URI (checkpoints stay under ``checkpoint.uri``; copied only if asked)
* ``steps_done``   optimiser updates done (after each checkpoint, and when the run ends)
* ``steps_total``  updates the configured epochs amount to
* ``epochs_done``  ``steps_done`` in epochs, fractional (``0.4054`` after 30 of 74 steps of a 1-epoch run)
* ``stop_reason``  ``completed`` (all epochs), ``max_steps``, ``cancelled`` (a stop signal), ``failed``

The tags are written but the run's status never is: the flow that owns the run ends it (FINISHED once the model
is registered, KILLED when cancelled, FAILED otherwise). Copies of checkpoints as run artifacts
(``logging.mlflow_checkpoints``: the trainer calls :meth:`MlflowLogger.archive_checkpoint`) upload on a background
thread so training never waits on the tracking server.
"""

from __future__ import annotations

import math
import os
import queue
import shutil
import tempfile
import threading
import time
from typing import Mapping

from .storage import open_object

#: Metric whose history tells how far a previous attempt of the same run got.
PROGRESS_METRIC = "loss"


class MlflowLogger:
    """Logs step metrics into an existing MLflow run (``run_id``), skipping steps a previous attempt logged."""

    def __init__(self, run_id: str, system_metrics: bool = True):
        from mlflow.tracking import MlflowClient

        if not run_id:
            raise ValueError("the mlflow logger needs a run id: use the spec 'mlflow:<RUN_ID>'")
        self.run_id = run_id
        self.client = MlflowClient()
        self.client.get_run(run_id)  # fail now, clearly, if the server or the run is missing
        history = self.client.get_metric_history(run_id, PROGRESS_METRIC)
        #: Steps at or below this were logged by an earlier attempt and are not logged again.
        self.resume_step = max((m.step for m in history), default=-1)
        self.total_steps: int | None = None
        self.epochs: int | None = None
        self._monitor = None
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # Its own thread, attached to the run without MLflow's "active run" (whose end would set a status).
            self._monitor = SystemMetricsMonitor(run_id, resume_logging=True)
            self._monitor.start()
        self._uploads: queue.Queue = queue.Queue()
        self._upload_errors: list[str] = []
        self._uploader: threading.Thread | None = None

    def on_run_start(self, total_steps: int, epochs: int) -> None:
        self.total_steps, self.epochs = total_steps, epochs
        self.client.set_tag(self.run_id, "steps_total", str(total_steps))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.resume_step:
            return
        now = int(time.time() * 1000)
        batch = [
            Metric(key=k, value=float(v), timestamp=now, step=int(step))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def on_fast_path(self, records: Mapping[str, Mapping]) -> None:
        """The fast-path verdicts (:mod:`dino_model.fast_path`) as tags of the run (``fast_path.data`` = ``verified``
        / ``fallback: <reason>`` / ..., ``fast_path.<part>.<figure>``: the latest, also after a resume) and as
        params (the first attempt's: MLflow params cannot change, so keys already logged are left as they are)."""
        from mlflow.entities import Param, RunTag

        from .fast_path.verdict import tracking_records

        values = tracking_records(dict(records))
        logged = self.client.get_run(self.run_id).data.params
        params = [Param(k, v) for k, v in values.items() if k not in logged]
        tags = [RunTag(k, v) for k, v in values.items()]
        for i in range(0, max(len(params), len(tags)), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=params[i:i + 100], tags=tags[i:i + 100], synchronous=True)

    def on_health(self, record: Mapping) -> None:
        """The training-health verdict in force as the run's tag ``health`` (``healthy``, ``collapse:uniform``,
        ``collapse:one-hot``, ``stalled``) with ``health.detail`` (the latest window's rule and figures) and
        ``health.step``; every window as the metric ``health.bad`` (1 for a bad window, else 0) at its last step."""
        from mlflow.entities import Metric

        window = record["window"]
        self._set_tags({"health": record["called"], "health.detail": record["text"][:5000],
                        "health.step": str(window["last_step"])})
        bad = Metric(key="health.bad", value=0.0 if window["verdict"] == "healthy" else 1.0,
                     timestamp=int(time.time() * 1000), step=int(window["last_step"]))
        self.client.log_batch(self.run_id, metrics=[bad], synchronous=True)

    def on_checkpoint(self, uri: str, step: int) -> None:
        """Record the checkpoint at ``uri`` (local path or ``s3://``) as the run's latest, and the steps done."""
        self._set_tags({"checkpoint": uri, **self._progress_tags(step)})

    def archive_checkpoint(self, uri: str, step: int) -> None:
        """Queue the checkpoint at ``uri`` for upload as a run artifact under ``checkpoints/``."""
        if self._uploader is None:
            self._uploader = threading.Thread(target=self._upload_loop, name="mlflow-checkpoints", daemon=True)
            self._uploader.start()
        self._uploads.put((uri, step))

    def on_run_end(self, step: int, stop_reason: str) -> None:
        """Tag the run with what it did: steps done / total, epochs done, why it stopped."""
        self._set_tags({**self._progress_tags(step), "stop_reason": stop_reason})

    def _progress_tags(self, step: int) -> dict[str, str]:
        tags = {"steps_done": str(step)}
        if self.total_steps and self.epochs:
            tags["steps_total"] = str(self.total_steps)
            tags["epochs_done"] = epochs_text(step * self.epochs / self.total_steps)
        return tags

    def _set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)

    def _upload_loop(self) -> None:
        while True:
            item = self._uploads.get()
            if item is None:
                return
            uri, step = item
            try:
                self._upload(uri)
            except Exception as e:  # noqa: BLE001 - an artifact upload must never kill training
                self._upload_errors.append(f"{uri}: {type(e).__name__}: {e}")

    def _upload(self, uri: str) -> None:
        store, key = open_object(uri)
        local = getattr(store, "local_path", None)
        if local is not None:
            self.client.log_artifact(self.run_id, str(local(key)), artifact_path="checkpoints")
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, os.path.basename(key))
            with store.open_read(key) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            self.client.log_artifact(self.run_id, path, artifact_path="checkpoints")

    def close(self) -> None:
        if self._uploader is not None:
            self._uploads.put(None)
            self._uploader.join()
            self._uploader = None
        if self._monitor is not None:
            self._monitor.finish()  # the run's status stays as the flow that owns it sets it
            self._monitor = None
        if self._upload_errors:
            raise RuntimeError("checkpoint artifact upload failed: " + "; ".join(self._upload_errors))


def epochs_text(epochs: float) -> str:
    """Epochs as a tag value: ``0.4054``, ``2`` (four decimals at most, no trailing zeros)."""
    return f"{epochs:.4f}".rstrip("0").rstrip(".")


def build(arg: str | None) -> MlflowLogger:
    """Factory for the ``mlflow:<RUN_ID>`` logger spec (falls back to ``MLFLOW_RUN_ID``)."""
    return MlflowLogger(arg or os.environ.get("MLFLOW_RUN_ID", ""))
