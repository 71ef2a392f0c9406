"""``dino demo`` (the README's first command) end to end, as a user runs it: generated data, the whole pipeline,
the score table, then what training learnt — the trained backbone's k-NN beside a randomly initialised one on the
same validation images, the learning curve and the training-health verdict — each checked against what MLflow
recorded."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_demo_runs_and_shows_what_training_learnt(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "PREFECT_API"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    work = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--workdir", str(work)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1400)
    out = done.stdout
    assert done.returncode == 0, done.stderr[-4000:]
    assert "180 training and 300 validation images" in out
    assert "Traceback" not in done.stderr, done.stderr[-4000:]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/run/mlflow/mlflow.db")
    # the score table: every evaluation the demo runs, each value as the evaluation run recorded it
    (evaluation,) = client.search_runs([client.get_experiment_by_name("dino-demo-evaluate").experiment_id])
    table = {m: float(v) for m, v in re.findall(r"^([a-z][a-z0-9_]+)\s+(\d+\.\d\d)(?:  \(approximate|$)", out, re.M)}
    for metric in ("knn20_top1", "knn10_top1", "linear_approx_best_top1", "attn_jaccard_best_head",
                   "attn_jaccard_mean_heads", "davis_jf_mean"):
        assert metric in table, (metric, out[-3000:])
    assert table == {m: round(evaluation.data.metrics[m], 2) for m in table}
    (run,) = client.search_runs([client.get_experiment_by_name("dino-demo").experiment_id])
    curve = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "monitor.knn20_top1"))
    # the first point is the randomly initialised backbone; then every 2 epochs and after the last (66 steps)
    assert [s for s, _ in curve] == [0, 22, 44, 66]
    learning = re.search(r"trained (\d+\.\d\d) %, randomly initialised backbone (\d+\.\d\d) % \(([+-]\d+\.\d\d) "
                         r"points\)", out)
    assert learning, out[-3000:]
    trained, random_init, gain = map(float, learning.groups())
    assert (trained, random_init) == (round(curve[-1][1], 2), round(curve[0][1], 2))
    assert gain == round(curve[-1][1] - curve[0][1], 2)
    assert "curve: " + " · ".join(f"{v:.1f} % (step {s})" for s, v in curve) in out
    assert (gain < 10) == ("not clearly better than a random backbone" in out)
    health = run.data.tags["health"]
    assert health in ("healthy", "collapse:uniform", "collapse:one-hot", "stalled")
    assert f"health:        {health} — {run.data.tags['health.detail']}" in out
    assert re.search(r"demo finished in \d+ s", out)
