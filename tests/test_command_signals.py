"""Every ``dino`` command stops cleanly on SIGTERM, SIGHUP and SIGINT and leaves nothing behind, even on SIGKILL
(flows/cli/stops.py, flows/cli/command_server.py): ``dino pretrain`` under each signal, checked as a user sees it
(exit status, the resume line, the checkpoint, the MLflow run, the flow run) and by the process table (no process
of the command's tree alive after a bounded wait); ``dino shard --task-runner dask`` killed with SIGKILL leaves no
Dask worker. Every wait is for a state, with a generous bound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dino_model.checkpoint import latest_checkpoint, list_checkpoints
from tests.datasets import write_colour_set

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.arch=vit_tiny", "model.out_dim=64", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
        "crops.global_size=32", "crops.local_size=16", "crops.n_local=2", "data.batch_size_per_gpu=8",
        "data.num_workers=1", "optim.warmup_epochs=1", "train.device=cpu", "train.epochs=200",
        "checkpoint.every_n_steps=3", "checkpoint.keep_last=2", "logging.log_every=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("signal-data")
    return write_colour_set(root / "images", root / "shards", range(4), 12, seed=0, name="train")


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def command_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "PREFECT_API"))}
    env.update(PREFECT_HOME=str(home / "prefect"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    (cwd / "prefect").mkdir(parents=True, exist_ok=True)
    # Its own session: the test sends the signal to the command alone, as `kill PID` does.
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=command_env(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """The command and every live process under it (a short-lived child already exited but not yet reaped is
    left out)."""
    try:
        found = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return [p for p in found if cmdline(p)]


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def assert_nothing_left(processes: list[psutil.Process], timeout: float = 120) -> None:
    def gone() -> bool:
        return not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    wait_for(gone, timeout, "every process of the command's tree to end")


def flow_runs(cwd: Path) -> list[dict]:
    """The command's flow runs (name, state, message), read from its own Prefect database."""
    code = ("import json\nfrom prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    print(json.dumps([{'name': r.name, 'flow': str(r.flow_id), 'state': r.state.type.value,\n"
            "                       'message': r.state.message} for r in c.read_flow_runs()]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=command_env(cwd), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def mlflow_run(cwd: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd}/mlruns-dino/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("dino-pretrain").experiment_id])
    return run


def pretrain_until_a_checkpoint(shards: str, cwd: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    ckpt = cwd / "ckpt"
    proc = start(["pretrain", shards, str(ckpt), "--retries", "0", *[a for o in TINY for a in ("--set", o)]], cwd)
    wait_for(lambda: proc.poll() is not None or (ckpt.is_dir() and list_checkpoints(str(ckpt))), 600,
             "the first checkpoint")
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    # the whole tree as it is now: the command, its Prefect server, torchrun, the trainer, its data-loader worker
    processes = wait_for(lambda: len(tree(proc)) >= 5 and tree(proc), 120, "the trainer's data-loader worker")
    return proc, processes


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_is_an_ordinary_stop_of_dino_pretrain(shards, tmp_path, sig):
    proc, processes = pretrain_until_a_checkpoint(shards, tmp_path)
    names = " ".join(cmdline(p) for p in processes)
    assert "uvicorn" in names and "torch.distributed.run" in names and "dino_model.train" in names
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert f"dino pretrain: stopped by {sig.name}; " in err and "run the same command again to resume" in err
    latest = latest_checkpoint(str(tmp_path / "ckpt"))
    assert f"the trainer's last checkpoint: {latest}" in out
    assert_nothing_left(processes)
    run = mlflow_run(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == f"signal:{sig.name}"
    assert run.data.tags["checkpoint"] == latest and int(run.data.tags["steps_done"]) == int(latest[-12:-3])
    (flow_run,) = [r for r in flow_runs(tmp_path)]
    assert flow_run["state"] == "CRASHED"
    assert sig.name in flow_run["message"] or (sig == signal.SIGTERM and "termination signal" in flow_run["message"])


@pytest.mark.slow
def test_sigkill_of_dino_pretrain_leaves_no_process_and_a_checkpoint(shards, tmp_path):
    proc, processes = pretrain_until_a_checkpoint(shards, tmp_path)
    before = list_checkpoints(str(tmp_path / "ckpt"))[-1][0]
    proc.kill()
    proc.communicate(timeout=60)
    # the server and torchrun get SIGTERM from the kernel (PR_SET_PDEATHSIG); torchrun stops the trainer, which
    # writes its checkpoint: nobody is left to end the MLflow run, which keeps what the trainer recorded
    assert_nothing_left(processes)
    latest = list_checkpoints(str(tmp_path / "ckpt"))[-1][0]
    assert latest >= before
    run = mlflow_run(tmp_path)
    assert run.data.tags["stop_reason"] == "cancelled" and int(run.data.tags["steps_done"]) == latest


@pytest.mark.slow
def test_sigkill_of_a_dask_shard_run_leaves_no_worker(tmp_path):
    from dino_model.data.synthetic import make_synthetic_imagefolder

    make_synthetic_imagefolder(tmp_path / "images", classes=6, per_class=120, size=64, seed=0)
    dest = tmp_path / "shards"
    proc = start(["shard", str(tmp_path / "images"), str(dest), "--shard-size", "4", "--task-runner", "dask",
                  "--parallelism", "2"], tmp_path)

    def workers_busy():
        if proc.poll() is not None:
            return None
        spawned = [p for p in tree(proc) if "multiprocessing" in cmdline(p)]
        return len(spawned) >= 2 and dest.is_dir() and any(dest.glob("*.tar")) and tree(proc)

    processes = wait_for(lambda: proc.poll() is not None or workers_busy(), 600, "two busy Dask workers")
    assert proc.poll() is None, "the shard run finished before it could be killed: give it more images"
    proc.kill()
    proc.communicate(timeout=60)
    assert_nothing_left(processes)
