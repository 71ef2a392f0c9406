"""User errors of every ``dino`` command: exit status 2 with one ``dino <cmd>: error: ...`` message naming the field
and the fix, no traceback (``--debug`` prints it), nothing created, and reported before anything slow started.

Each case runs the real command in a fresh interpreter, as a user would. "Before anything slow" is checked by what
happened, never by the clock (a loaded machine makes any time bound flaky): neither Prefect nor torch was imported,
and, as Python's audit hooks saw it, the command bound no port and started no program (no Prefect server, no MLflow
server, no torchrun) but MLflow's harmless ``uname -p``. The time it takes (about a second on a quiet machine) is
measured by benchmarks/cli_errors.py, in docs/benchmarks.md."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_model.data.shard_writer import ShardOptions, write_dataset
from dino_model.data.sources import SourceSpec, scan_source

ROOT = Path(__file__).resolve().parents[1]
#: Runs `dino ARGS...`, then reports whether Prefect (or torch) was imported on the way to the exit status, and which
#: programs the command started (every way Python starts a process raises an audit event) and the ports it bound.
RUN_DINO = (
    "import os, sys\n"
    "started = {'programs': [], 'ports': []}\n"
    "def program(event, args):\n"
    "    if event == 'subprocess.Popen':\n"
    "        argv = [args[1]] if isinstance(args[1], (str, bytes)) else list(args[1])\n"
    "        return args[0] or argv[0]\n"
    "    return args[0] if event in ('os.posix_spawn', 'os.exec', 'os.spawn', 'os.system') and args else event\n"
    "def audit(event, args):\n"
    "    if event in ('subprocess.Popen', 'os.fork', 'os.forkpty', 'os.posix_spawn', 'os.spawn', 'os.system',\n"
    "                 'os.exec'):\n"
    "        started['programs'].append(os.path.basename(str(program(event, args))))\n"
    "    elif event == 'socket.bind' and isinstance(args[1], tuple) and args[1][1]:\n"
    "        started['ports'].append(args[1][1])\n"
    "sys.addaudithook(audit)\n"
    "from flows.cli import main\n"
    "try:\n"
    "    rc = main(sys.argv[1:])\n"
    "except SystemExit as e:  # argparse's own errors\n"
    "    rc = e.code\n"
    "print('imported: prefect=%s torch=%s' % ('prefect' in sys.modules, 'torch' in sys.modules))\n"
    "print('started: %s bound: %s' % (sorted(set(started['programs'])), started['ports']))\n"
    "sys.exit(rc)\n"
)
#: What a command may start before its checks are done: `uname -p`, which MLflow's import runs (platform.platform()
#: for its telemetry schema) in the registry lookup, the last check. A server, torchrun or a worker would show here.
HARMLESS_PROGRAMS = {"uname"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """A valid 4-class shard set of 40-px images (the inputs a case does not break)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"class{c}").mkdir()
        for i in range(4):
            img = rng.integers(0, 255, (40, 40, 3)).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"img{i}.jpg", quality=90)
    dest = tmp_path_factory.mktemp("shards")
    write_dataset(scan_source(SourceSpec(str(root))), str(dest), ShardOptions(name="s", shard_size=4))
    return str(dest)


def dino(args: list[str], cwd: Path, **environ: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(environ)
    out = subprocess.run([sys.executable, "-c", RUN_DINO, *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    return out.returncode, out.stdout, out.stderr


def assert_user_error(args: list[str], cwd: Path, *expected: str, **environ: str) -> None:
    """The command fails as a user error: status 2, one ``dino <cmd>: error:`` message, no traceback, neither
    Prefect nor torch imported, no process started and no server listening, nothing written to the working
    folder."""
    before = sorted(cwd.rglob("*"))
    rc, stdout, stderr = dino(args, cwd, **environ)
    assert rc == 2, (rc, stdout, stderr)
    # one message (argparse's own errors come after its usage lines)
    assert [line for line in stderr.splitlines() if "error:" in line][0].startswith(f"dino {args[0]}: error: ")
    assert stderr.count("error:") == 1 and (stderr.startswith((f"dino {args[0]}: error: ", "usage: "))), stderr
    for text in expected:
        assert text in stderr, (text, stderr)
    assert "Traceback" not in stderr
    assert "imported: prefect=False torch=False" in stdout, stdout
    started = stdout.split("started: ", 1)[1].split(" bound: ")
    assert set(ast.literal_eval(started[0])) <= HARMLESS_PROGRAMS and started[1].strip() == "[]", stdout
    assert sorted(cwd.rglob("*")) == before, f"a failed command left {sorted(set(cwd.rglob('*')) - set(before))}"


def test_pretrain_user_errors(shards, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    assert_user_error(["pretrain", str(tmp_path / "missing"), ckpt], cwd, "data:", "does not exist", "dino shard")
    assert_user_error(["pretrain", shards, ckpt, "--set", "optim.lr=-1"], cwd, "optim.lr must be > 0, got -1")
    assert_user_error(["pretrain", shards, ckpt, "--set", "optim.lrr=1"], cwd, "unknown field optim.lrr",
                      "did you mean optim.lr")
    assert_user_error(["pretrain", shards, ckpt, "--set", "train.epochs=abc"], cwd,
                      "train.epochs must be an integer, got 'abc'")
    assert_user_error(["pretrain", shards, ckpt, "--preset", "smal"], cwd, "preset must be one of")
    assert_user_error(["pretrain", shards, ckpt, "--nproc-per-node", "0"], cwd, "nproc_per_node must be >= 1")
    assert_user_error(["pretrain", shards, ckpt, "--set", "data.num_workers=8"], cwd, "cannot feed 8 readers")
    assert_user_error(["pretrain", shards, ckpt, "--resume", "require"], cwd, "--resume require but", "holds no "
                      "checkpoint")
    assert not (tmp_path / "ckpt").exists()
    # --resume never against a URI that holds a checkpoint: only the names are listed, nothing is read or written.
    used = tmp_path / "used"
    used.mkdir()
    (used / "checkpoint-000000030.pt").write_bytes(b"")
    assert_user_error(["pretrain", shards, str(used), "--resume", "never"], cwd, "--resume never but",
                      "holds 1 checkpoint(s)", "checkpoint-000000030.pt")
    assert sorted(p.name for p in used.iterdir()) == ["checkpoint-000000030.pt"]


def test_shard_user_errors(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    dest = str(tmp_path / "dest")
    assert_user_error(["shard", str(tmp_path / "missing"), dest], cwd, "source root", "does not exist")
    no_images = tmp_path / "no-images"
    (no_images / "cls").mkdir(parents=True)
    (no_images / "cls" / "notes.txt").write_text("not an image")
    assert_user_error(["shard", str(no_images), dest], cwd, f"no images found under {no_images}")
    (no_images / "cls" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # an image signature: the cases below pass it
    assert_user_error(["shard", str(no_images), dest, "--shard-size", "-3"], cwd, "shard_size must be a positive")
    assert_user_error(["shard", str(no_images), dest, "--parallelism", "0"], cwd, "--parallelism must be >= 1")
    assert_user_error(["shard", str(no_images), "ftp://host/x"], cwd, "unsupported storage URI scheme 'ftp'")
    assert_user_error(["shard", str(no_images), dest, "--task-runner", "threadz"], cwd,
                      "argument --task-runner: must be one of threads, processes, dask, slurm or", "tcp://HOST:PORT")


def test_extract_user_errors(shards, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = str(tmp_path / "features")
    assert_user_error(["extract", str(tmp_path / "missing-export"), shards, out], cwd, "does not exist",
                      "an export folder (config.json + backbone.safetensors)")
    assert_user_error(["extract", "models:/m/1", str(tmp_path / "missing"), out], cwd, "data:",
                      "holds no manifest.json", "dino shard")
    assert_user_error(["extract", "models:/m/1", shards, out, "--classes-from", str(tmp_path / "missing")], cwd,
                      "classes_from:")
    assert_user_error(["extract", "models:/m/1", shards, out, "--crop", "abc"], cwd, "not a size: 'abc'")
    assert_user_error(["extract", "models:/m/1", shards, out, "--device", "gpu"], cwd,
                      "device 'gpu' is not a device name")
    assert_user_error(["extract", "models:m/1", shards, out], cwd, "model must be models:/<name>/<version>")
    assert_user_error(["extract", "models:/m/1", shards, out, "--nproc-per-node", "2", "--task-runner", "dask"], cwd,
                      "--nproc-per-node 2 and --task-runner dask are two ways")


def test_evaluate_user_errors(shards, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    export = tmp_path / "export"
    export.mkdir()
    sets = ["--train", shards, "--val", shards]
    assert_user_error(["evaluate", str(export), *sets], cwd, "models:/<name>/<version>",
                      f"dino register {export} --name NAME")
    assert_user_error(["evaluate", "models:/m/1", "--train", shards, "--val", str(tmp_path / "missing")], cwd,
                      "val_data:", "holds no manifest.json")
    assert_user_error(["evaluate", "models:/m/1", *sets, "--crop", "none", "--eval", "linear"], cwd,
                      "crop_size none: the full linear probe")
    assert_user_error(["evaluate", "models:/m/1", *sets, "--ks", "5,x"], cwd, "knn_ks: expected comma-separated int")
    assert_user_error(["evaluate", "models:/m/1", *sets, "--task-runner", "dask", "--parallelism", "0"], cwd,
                      "parallelism: parallelism must be >= 1")
    assert_user_error(["evaluate", "models:/m/1", *sets, "--ks", "5", "--champion-metric", "knn20_top1"], cwd,
                      "champion_metric 'knn20_top1' is not produced")
    assert_user_error(["evaluate", "models:/m/1", "--davis", str(tmp_path / "no-davis")], cwd,
                      "davis_root:", "is not a folder")


def test_a_model_the_registry_does_not_hold_fails_before_prefect_starts(shards, tmp_path):
    """The registry lookup is a read: a missing registry, model, version or alias, or an unreachable tracking
    server, is reported before Prefect starts (it is the last check: it imports MLflow)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    sets = ["--train", shards, "--val", shards]
    assert_user_error(["evaluate", "models:/m/1", *sets], cwd, "no model registry here", "mlruns-dino/mlflow.db",
                      "MLFLOW_TRACKING_URI")
    assert_user_error(["extract", "models:/m/1", shards, str(tmp_path / "f")], cwd, "no model registry here")
    assert_user_error(["evaluate", "models:/m/1", *sets], cwd, "MLflow tracking server http://127.0.0.1:9",
                      "is not reachable", MLFLOW_TRACKING_URI="http://127.0.0.1:9")

    from mlflow.tracking import MlflowClient

    (cwd / "mlruns-dino").mkdir()
    client = MlflowClient(f"sqlite:///{cwd / 'mlruns-dino' / 'mlflow.db'}")
    client.create_registered_model("m")
    client.get_registered_model("m")
    assert_user_error(["evaluate", "models:/other@champion", *sets], cwd,
                      "registered model 'other' does not exist (asked for models:/other@champion)")
    assert_user_error(["evaluate", "models:/m/3", *sets], cwd, "registered model 'm' has no version 3")
    assert_user_error(["evaluate", "models:/m@champion", *sets], cwd, "registered model 'm' has no alias 'champion'")
    assert_user_error(["extract", "models:/m/2", shards, str(tmp_path / "f")], cwd, "has no version 2")
    assert_user_error(["reevaluate", "other", *sets], cwd, "registered model 'other' does not exist")
    assert_user_error(["reevaluate", "m", *sets, "--versions", "1,2"], cwd, "registered model 'm' has no version(s)"
                      " [1, 2]")


def test_reevaluate_user_errors(shards, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    sets = ["--train", shards, "--val", shards]
    assert_user_error(["reevaluate", "m", *sets, "--missing", "davis_jf_mean"], cwd, "--missing davis_jf_mean",
                      "or use --all")
    assert_user_error(["reevaluate", "m", *sets, "--versions", "1,b"], cwd, "--versions: expected")
    assert_user_error(["reevaluate", "m", "--train", str(tmp_path / "missing"), "--val", shards], cwd, "train_data:")


def test_pipeline_demo_and_register_user_errors(shards, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    workspace = str(tmp_path / "ws")
    images = str(tmp_path)
    assert_user_error(["pipeline", str(tmp_path / "missing"), images, workspace], cwd, "train_source:",
                      "does not exist")
    assert_user_error(["pipeline", images, images, workspace, "--set", "optim.lr=0"], cwd, "optim.lr must be > 0")
    assert_user_error(["pipeline", images, images, workspace, "--davis", str(tmp_path / "no-davis")], cwd,
                      "davis_root:")
    assert_user_error(["pipeline", images, images, workspace, "--parallelism", "0"], cwd,
                      "parallelism must be a positive integer")
    assert_user_error(["pipeline", images, images, workspace, "--task-runner", "tcp://host"], cwd,
                      "argument --task-runner: must be one of threads, processes, dask, slurm or")
    assert_user_error(["demo", "--workdir", str(tmp_path / "demo"), "--epochs", "0"], cwd, "train.epochs must be")
    assert not (tmp_path / "demo").exists()
    assert_user_error(["register", str(tmp_path / "missing"), "--name", "m"], cwd, "does not exist")
    assert_user_error(["register", shards, "--name", "bad name"], cwd, "--name 'bad name'")


def test_debug_prints_the_traceback(shards, tmp_path):
    for args in (["--debug", "pretrain"], ["pretrain"]):
        rc, _, stderr = dino([*args, shards, str(tmp_path / "c"), "--set", "optim.lr=-1"]
                                + (["--debug"] if args == ["pretrain"] else []), tmp_path)
        assert rc == 2 and "Traceback (most recent call last)" in stderr
        assert stderr.rstrip().endswith("dino pretrain: error: invalid training config: optim.lr must be > 0, got -1")
