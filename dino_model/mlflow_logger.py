"""The trainer's MLflow logger (rank 0 only): step metrics, system metrics and checkpoint artifacts.

The pretrain flow creates (or resumes) the MLflow run and hands its id to the trainer; rank 0 then logs into it
(step metrics, and the fast-path verdicts as ``fast_path.*`` tags and params)::

    torchrun ... -m dino_model.train --config run.yaml 'logging.loggers=[console, "mlflow:<RUN_ID>"]'

The tracking server comes from the standard ``MLFLOW_TRACKING_URI``. With a server whose artifacts are proxied
(``mlflow server --artifacts-destination s3://...``) the trainer needs no S3 credentials for artifacts.

MLflow cannot delete metric points, so a resumed run must not log a step twice: at start the logger reads the
highest step already logged for ``loss`` and drops every step at or below it. System metrics (CPU, memory, GPU
through psutil / nvidia-ml-py) are sampled by MLflow's own monitor thread for as long as the logger is open.
Checkpoint uploads run on a background thread so training never waits on the tracking server.
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

    def __init__(self, run_id: str, system_metrics: bool = True, checkpoint_artifacts: bool = True):
        import mlflow
        from mlflow.tracking import MlflowClient

        if not run_id:
            raise ValueError("the mlflow logger needs a run id: use the spec 'mlflow:<RUN_ID>'")
        self.run_id = run_id
        self.client = MlflowClient()
        self.client.get_run(run_id)  # fail now, clearly, if the server or the run is missing
        history = self.client.get_metric_history(run_id, PROGRESS_METRIC)
        #: Steps at or below this were logged by an earlier attempt and are not logged again.
        self.resume_step = max((m.step for m in history), default=-1)
        self._run = None
        if system_metrics:
            # Attaching to the run with log_system_metrics starts MLflow's sampler thread in this process.
            self._run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
        self._uploads: queue.Queue = queue.Queue()
        self._upload_errors: list[str] = []
        self._uploader = None
        if checkpoint_artifacts:
            self._uploader = threading.Thread(target=self._upload_loop, name="mlflow-checkpoints", daemon=True)
            self._uploader.start()

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

    def on_checkpoint(self, uri: str, step: int) -> None:
        """Queue the checkpoint at ``uri`` (local path or ``s3://``) for upload as a run artifact."""
        if self._uploader is not None:
            self._uploads.put((uri, step))

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
        if self._run is not None:
            import mlflow

            # Stops the system-metrics thread. The run stays RUNNING: the flow that owns it sets the final status
            # once the model is registered (or FAILED if the trainer died).
            mlflow.end_run(status="RUNNING")
            self._run = None
        if self._upload_errors:
            raise RuntimeError("checkpoint artifact upload failed: " + "; ".join(self._upload_errors))


def build(arg: str | None) -> MlflowLogger:
    """Factory for the ``mlflow:<RUN_ID>`` logger spec (falls back to ``MLFLOW_RUN_ID``)."""
    return MlflowLogger(arg or os.environ.get("MLFLOW_RUN_ID", ""))
