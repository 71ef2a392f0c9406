"""What a person sees, checked in a real browser: a tiny evaluation against a real MLflow server, then the model
version page (the model card's score table), the registered model page, the evaluation experiment's runs table
and the evaluation report, each rendered by headless Chromium (Debian package ``chromium``).

Without ``/usr/bin/chromium`` it skips, saying how to install it, and fails under ``CI=true`` (``.ci/run`` installs
it: tests/prerequisites.py). Set
``DINO_SCREENSHOT_DIR`` to also get PNG screenshots of the pages (model version, registered model, runs table,
evaluation run, report) for a look::

    DINO_SCREENSHOT_DIR=/tmp/shots .venv/bin/python -m pytest tests/test_browser_ui.py
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.datasets import write_colour_set
from tests.prerequisites import missing

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.slow


def _browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium, isolated (own profile, no background traffic, no sync), the page given time to render."""
    require_chromium()
    profile = tmp_path / f"chromium-{secrets.token_hex(3)}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def require_chromium() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"{CHROMIUM} is not installed", "apt-get install chromium fonts-dejavu-core")


def rendered_text(tmp_path: Path, url: str, expect: str, size: str = "1500,2000") -> str:
    """The DOM after the page's scripts ran (``--dump-dom``); the single-page MLflow UI loads its data after the
    first paint, so the dump is retried (3 times) until ``expect`` is in it."""
    dom = ""
    for _ in range(3):
        dom = _browser(tmp_path, f"--window-size={size}", "--dump-dom", url).stdout
        if expect in dom:
            break
    return dom


def screenshot(tmp_path: Path, url: str, name: str, size: str = "1500,2000") -> None:
    """A PNG of the page into ``$DINO_SCREENSHOT_DIR`` when that is set (for a person to look at; each costs a
    browser start, so the suite skips them otherwise)."""
    keep = os.environ.get("DINO_SCREENSHOT_DIR")
    if not keep:
        return
    path = Path(keep) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    _browser(tmp_path, f"--window-size={size}", f"--screenshot={path}", url)
    assert path.is_file() and Image.open(path).size == tuple(int(v) for v in size.split(","))


def _text(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def _register(name: str, tmp_path: Path) -> int:
    import mlflow

    from dino_model.export import export_backbone
    from dino_model.mlflow_model import log_backbone_model
    from dino_model.models import build_backbone

    torch.manual_seed(0)
    export = tmp_path / "export"
    export_backbone(build_backbone("vit_tiny", patch_size=16), str(export), arch="vit_tiny", patch_size=16)
    with mlflow.start_run():
        info = log_backbone_model(str(export), name="backbone", embed_dim=192, example_size=32)
    return int(mlflow.register_model(info.model_uri, name).version)


def test_model_card_runs_and_report_in_a_browser(mlflow_server, shared_data, tmp_path, monkeypatch):
    require_chromium()
    from mlflow.tracking import MlflowClient

    from flows.evaluate import dino_evaluate
    from tasks.evaluation import EvaluationSettings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    client = MlflowClient(mlflow_server.url)
    sets = tmp_path / "imagenette-toy"
    train = write_colour_set(tmp_path / "train-img", sets / "train", range(4), 8, 0, "train")
    val = write_colour_set(tmp_path / "val-img", sets / "val", range(1, 4), 3, 1, "val")
    name = f"ui-{secrets.token_hex(3)}"
    version = _register(name, tmp_path)
    experiment = f"ui-eval-{secrets.token_hex(3)}"
    settings = EvaluationSettings(
        train_data=train, val_data=val, features_root=str(tmp_path / "features"), experiment=experiment,
        evaluations=["knn", "linear_fast", "attention", "davis"], davis_root=str(shared_data / "davis-mini"),
        davis_sequences=["car-shadow"], davis_max_frames=4, attention_max_frames=1, resize_size=None, crop_size=32,
        batch_size=16, linear_fast_epochs=3, linear_batch_size=8, davis_short_side=64, attention_size=64)
    result = dino_evaluate(f"models:/{name}/{version}", settings)
    set_name = result["evaluation_set_names"]["classification"]
    assert set_name == "imagenette-toy-val"
    knn20 = f"{result['metrics']['knn20_top1']:.2f}"
    view = "workflowType=machine_learning"

    # the model version page: the card's score tables, rendered from its markdown
    page = f"{mlflow_server.url}/#/models/{name}/versions/{version}?{view}"
    dom = rendered_text(tmp_path, page, "k-NN 20 top-1")
    tables = re.findall(r"<table[^>]*>.*?</table>", dom, flags=re.S)
    scores = [t for t in tables if "k-NN 20 top-1" in t]
    assert scores, "no rendered score table on the model version page"
    assert re.search(r"k-NN 20 top-1.*?<strong>" + re.escape(knn20) + "</strong>", scores[0], flags=re.S)
    text = _text(dom)
    assert f"Scores on {set_name}" in text and "Scores on davis-mini" in text and "DAVIS J&amp;F mean" in dom
    assert "All scores are in percent" in text and "evaluation report" in text
    screenshot(tmp_path, page, "model-version")

    # the registered model page: the versions list shows the card's first line, headline score first
    page = f"{mlflow_server.url}/#/models/{name}?{view}"
    dom = rendered_text(tmp_path, page, "Aliases")
    assert "champion" in _text(dom) and "the best evaluated version" in _text(dom)
    screenshot(tmp_path, page, "registered-model", "1500,1000")

    # the evaluation experiment: model-training view, the run named by what it evaluates, its Dataset and Model
    exp = client.get_experiment_by_name(experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    page = f"{mlflow_server.url}/#/experiments/{exp.experiment_id}?{view}"
    dom = rendered_text(tmp_path, page, f"{name}-v{version}", "2400,900")
    text = _text(dom)
    assert f"{name}-v{version} knn+linear_fast+attention+davis" in text  # the run's name
    assert f"{set_name} (" in text  # the Dataset column: name (digest)
    assert re.search(rf">\s*{re.escape(name)}-v{version}\s*<", dom)  # the Models column's link text
    screenshot(tmp_path, page, "evaluation-runs", "2400,900")
    run_page = f"{mlflow_server.url}/#/experiments/{exp.experiment_id}/runs/{result['run_id']}?{view}"
    screenshot(tmp_path, run_page, "evaluation-run", "2200,1300")

    # the report: downloaded as a user would, opened from disk in the browser, no outside address in it
    report = tmp_path / "evaluation-report.html"
    with urllib.request.urlopen(f"{mlflow_server.url}/get-artifact?path={result['report']}"
                                f"&run_uuid={result['run_id']}", timeout=60) as r:
        report.write_bytes(r.read())
    html = report.read_text()
    assert not re.search(r"https?://", html)
    dom = rendered_text(tmp_path, report.as_uri(), "feature-map")
    for section in ("scores", "retrieval", "knn", "attention", "davis", "feature-map"):
        assert re.search(rf'<section id="{section}">\s*<h2>', dom), section
    assert len(re.findall(r'<img src="data:image/(?:png|jpeg);base64,', dom)) >= 6
    assert f"Evaluation of {name} v{version}" in dom and "Nearest-neighbour retrieval" in dom
    screenshot(tmp_path, report.as_uri(), "evaluation-report", "1300,6000")
