"""How the ``dino`` command runs flows (flows/cli/prefect_session.py) and how the flows treat user errors:

* a successful command ends without a traceback: the in-process Prefect server is stopped only once it has
  recorded every task run (it used to be stopped mid-write, and its task-run recorder printed an asyncio
  ``CancelledError`` traceback);
* a flow run with bad input fails in its first task, with the message the command prints, and user errors are
  never retried;
* the command's own error records from Prefect are dropped unless ``--debug``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dino_model.data.synthetic import make_synthetic_imagefolder

ROOT = Path(__file__).resolve().parents[1]

#: 40 task runs in one flow, then the command's shutdown sequence, then a count of what the server recorded.
MANY_TASKS = """
import sys
from datetime import datetime, timezone
from prefect import flow, task
from prefect.client.orchestration import get_client
from flows.cli.prefect_session import count_task_runs, flow_session

@task
def square(i: int) -> int:
    return i * i

@flow
def many_tasks(n: int) -> int:
    return sum(square(i) for i in range(n))

since = datetime.now(timezone.utc)
with flow_session():
    many_tasks(40)
with get_client(sync_client=True) as client:
    ours = {"start_time": {"after_": since.isoformat()}}
    print("recorded", count_task_runs(client, ours),
          "completed", count_task_runs(client, ours, {"state": {"type": {"any_": ["COMPLETED"]}}}))
"""


def _env(tmp_path: Path) -> dict[str, str]:
    """A fresh Prefect home per process (its own sqlite database and ephemeral server), as a user's first run."""
    home = tmp_path / f"prefect-{len(list(tmp_path.glob('prefect-*')))}"
    home.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    return env


def test_session_waits_until_the_server_recorded_every_task_run(tmp_path):
    """Right after a flow of 40 tasks returns, the server has typically recorded only a few of them (its recorder
    works through the events in the background); the session's exit waits for all 40, so stopping the server
    then interrupts nothing."""
    out = subprocess.run([sys.executable, "-c", MANY_TASKS], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "recorded 40 completed 40" in out.stdout, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr


@pytest.mark.slow
def test_successful_shard_prints_no_traceback(tmp_path):
    """``dino shard`` with 24 shard tasks, three times in fresh processes: status 0 and no traceback on stderr."""
    images = tmp_path / "images"
    make_synthetic_imagefolder(images, classes=3, per_class=8, size=32, seed=0)
    for attempt in range(3):
        out = subprocess.run([sys.executable, "-m", "flows.cli", "shard", str(images), str(tmp_path / f"s{attempt}"),
                              "--shard-size", "1", "--no-progress"], cwd=ROOT, env=_env(tmp_path),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "24 shards (24 written" in out.stdout
        assert "Traceback" not in out.stderr and "Error flushing" not in out.stderr, out.stderr


def test_a_user_error_fails_the_flow_run_in_its_first_task(tmp_path):
    """A deployment run gets no CLI checks: the flow's first task runs the same ones and fails with the same
    message; nothing after it runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pretrain import dino_pretrain
    from tasks.validation import PretrainRequest, check_pretrain_request

    with pytest.raises(ValueError) as cli_side:
        check_pretrain_request(PretrainRequest(str(tmp_path / "missing"), str(tmp_path / "ckpt")))
    state = dino_pretrain(data=str(tmp_path / "missing"), checkpoint_uri=str(tmp_path / "ckpt"), return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError) as flow_side:
        state.result()
    assert str(flow_side.value) == str(cli_side.value)
    with get_client(sync_client=True) as client:
        ours = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        runs = client.read_task_runs(flow_run_filter=ours)
    assert [(r.name.rsplit("-", 1)[0], r.state_type.value, r.run_count) for r in runs] == \
        [("resolve-training-config", "FAILED", 1)]
    assert not (tmp_path / "ckpt").exists()


def test_user_errors_are_never_retried():
    from prefect import flow, task

    from tasks.validation import PreflightError, retry_unless_user_error

    attempts = {"user": 0, "transient": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_unless_user_error)
    def fails(kind: str) -> None:
        attempts[kind] += 1
        if kind == "user":
            raise PreflightError("pre-flight failed: data: /x does not exist")
        raise ConnectionError("storage hiccup")

    @flow
    def both() -> None:
        for kind in attempts:
            fails(kind, return_state=True)

    both()
    assert attempts == {"user": 1, "transient": 3}


def test_reported_errors_are_dropped_from_prefect_logs_unless_debug(caplog):
    from flows.cli.prefect_session import RUN_LOGGERS, ReportedErrors
    from tasks.validation import PreflightError, UserInputError

    quiet = ReportedErrors((PreflightError,))
    logger = logging.getLogger(RUN_LOGGERS[1])
    err = PreflightError("pre-flight failed: data: /x does not exist")

    def record(message, exc=None):
        return logging.LogRecord(logger.name, logging.ERROR, __file__, 1, message, None,
                                 (type(exc), exc, None) if exc else None)

    assert not quiet.filter(record("Task run failed with exception: PreflightError(...)", err))
    assert not quiet.filter(record("Finished in state Failed('Task run encountered an exception PreflightError: "
                                   "pre-flight failed')"))
    subclass = ReportedErrors((UserInputError,))  # the names of its subclasses count too
    assert not subclass.filter(record("Finished in state Failed(\"Flow run encountered an exception: "
                                      "ModelVersionNotFound: registered model 'x' does not exist\")"))
    assert quiet.filter(record("Task run failed with exception", RuntimeError("a bug")))
    assert quiet.filter(record("Finished in state Failed('Task run encountered an exception RuntimeError: x')"))
    assert quiet.filter(record("Finished in state Completed()"))
