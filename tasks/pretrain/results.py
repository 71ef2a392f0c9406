"""What a finished training leaves besides its MLflow run: the loss curve (a run artifact), the registered model
version with alias ``candidate`` (:func:`tasks.pretrain.registration.register_export`, shared with ``dino
register``) and the summary artifact of the flow run."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from ..model_card import HARDWARE_TAG, version_page
from ..tracking import mlflow_ui_link
from .mlflow_run import outcome_tags
from .registration import register_export


@task(name="log-loss-curve", cache_policy=NO_CACHE)
def log_loss_curve(run_id: str) -> None:
    """Plot the run's loss (and teacher entropy) against the step and log the PNG as a run artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss",):
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ax.plot([m.step for m in hist], [m.value for m in hist], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("DINO loss")
    ax.grid(alpha=0.3)
    ax.legend()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "loss_curve.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        client.log_artifact(run_id, path)


@task(name="register-backbone", cache_policy=NO_CACHE)
def register_backbone(run_id: str, export_uri: str, registered_model: str, tags: dict[str, str],
                      alias: str = "candidate") -> int:
    """Log the exported teacher backbone as an MLflow model of the run, register it as a new version of
    ``registered_model`` with ``tags``, and point ``alias`` at it (:func:`tasks.registration.register_export`, which
    ``dino register`` uses too). Returns the version number."""
    version = register_export(run_id, export_uri, registered_model, tags, alias)
    get_run_logger().info("registered %s version %s with alias %r", registered_model, version, alias)
    return version


@task(name="pretrain-summary", cache_policy=NO_CACHE)
def pretrain_summary(run_id: str, registered_model: str, version: int, end: dict[str, Any], facts: dict[str, Any],
                     export_uri: str) -> str:
    """A markdown artifact: what was trained, the final metrics, and links to the MLflow run and model."""
    import mlflow
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(run_id)
    base = mlflow.get_tracking_uri().rstrip("/")
    run_link = mlflow_ui_link(f"experiments/{run.info.experiment_id}/runs/{run_id}")
    model_link = mlflow_ui_link(version_page(registered_model, version))
    metrics = run.data.metrics
    lines = [
        f"# DINO pretraining: {registered_model} v{version}",
        "",
        f"- MLflow run: [{run_id}]({run_link})" if run_link else f"- MLflow run: `{run_id}` ({base})",
        f"- Registered model: [{registered_model} v{version}]({model_link}) (its description is the model card)"
        if model_link else f"- Registered model: `models:/{registered_model}/{version}`",
        f"- Export: `{export_uri}`",
        f"- Data: {facts.get('samples', '?')} samples in {facts.get('shards', '?')} shards "
        f"(hash `{str(facts.get('dataset_hash', '-'))[:12]}`)",
        f"- Steps: {end.get('step', '?')} of {end.get('total_steps', '?')} ({outcome_tags(end).get('epochs_done', '?')}"
        f" epochs), stopped: {end.get('status', '?')}",
        f"- Hardware: {run.data.tags.get(HARDWARE_TAG, 'not recorded')}",
        *[f"- Fast path · {part}: {r['verdict']} — {r['path']}" for part, r in (end.get("fast_path") or {}).items()],
        "",
        "| metric | last value |",
        "|---|---|",
        *[f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()) if not k.startswith("system/")],
    ]
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown, key="dino-pretrain-summary", description="DINO pretraining run")
    return markdown
