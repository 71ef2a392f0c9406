"""How long a ``dino`` command takes to report a user error: wall time from launch to exit status 2, each case in a
fresh interpreter (``python -m flows.cli ...``), as a user would run it. Results go in docs/benchmarks.md.

    .venv/bin/python benchmarks/cli_errors.py                  # this checkout, 3 runs per case (median, min, max)
    .venv/bin/python benchmarks/cli_errors.py --tree OLD_TREE  # another checkout of the project, same cases

The cases are those of issue 11: a data path that does not exist, ``--set optim.lr=-1``, ``--set optim.lrr=1``,
``--set train.epochs=abc`` for ``dino pretrain``; a missing source for ``dino shard``; a missing shard set for
``dino extract`` and ``dino evaluate``; a local export given to ``dino evaluate``; and those that needed Prefect's
start-up before: ``--resume require`` / ``never`` against the checkpoint folder, a source folder without images,
no registry in the working folder, and a version the registry does not hold. Each run gets its own empty working
folder and Prefect home, so nothing is warm but the page cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _shard_set(work: Path) -> str:
    """A small valid shard set, so the cases break exactly one thing."""
    from dino_model.data.shard_writer import ShardOptions, write_dataset
    from dino_model.data.sources import SourceSpec, scan_source

    rng = np.random.default_rng(0)
    for c in range(2):
        (work / "images" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(
                work / "images" / f"class{c}" / f"{i}.jpg")
    write_dataset(scan_source(SourceSpec(str(work / "images"))), str(work / "shards"), ShardOptions(name="s",
                                                                                                     shard_size=4))
    (work / "export").mkdir()
    (work / "used").mkdir()
    (work / "used" / "checkpoint-000000030.pt").write_bytes(b"")  # only the name is listed
    (work / "no-images" / "cls").mkdir(parents=True)
    (work / "no-images" / "cls" / "notes.txt").write_text("not an image")
    return str(work / "shards")


def _registry(work: Path) -> str:
    """An MLflow sqlite registry holding the registered model ``m`` with no version."""
    from mlflow.tracking import MlflowClient

    (work / "registry").mkdir()
    uri = f"sqlite:///{work / 'registry' / 'mlflow.db'}"
    MlflowClient(uri).create_registered_model("m")
    return uri


def cases(work: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (arguments, environment added to the command's)."""
    shards = _shard_set(work)
    registry = {"MLFLOW_TRACKING_URI": _registry(work)}
    missing = str(work / "missing")
    ckpt = str(work / "ckpt")
    one_worker = ["--set", "data.num_workers=1"]
    table = {
        "pretrain: data path does not exist": ["pretrain", missing, ckpt],
        "pretrain: --set optim.lr=-1": ["pretrain", shards, ckpt, "--set", "optim.lr=-1"],
        "pretrain: --set optim.lrr=1": ["pretrain", shards, ckpt, "--set", "optim.lrr=1"],
        "pretrain: --set train.epochs=abc": ["pretrain", shards, ckpt, "--set", "train.epochs=abc"],
        "shard: source does not exist": ["shard", missing, str(work / "out")],
        "extract: shard set does not exist": ["extract", str(work / "export"), missing, str(work / "features")],
        "evaluate: val shard set does not exist": ["evaluate", "models:/m/1", "--train", shards, "--val", missing],
        "evaluate: a local export instead of models:/": ["evaluate", str(work / "export"), "--train", shards,
                                                         "--val", shards],
        # (one data-loader worker: the set's 2 shards feed it, so the resume policy is the only problem)
        "pretrain: --resume require, no checkpoint": ["pretrain", shards, ckpt, "--resume", "require", *one_worker],
        "pretrain: --resume never, a checkpoint there": ["pretrain", shards, str(work / "used"), "--resume", "never",
                                                         *one_worker],
        "shard: a folder without images": ["shard", str(work / "no-images"), str(work / "out")],
        "evaluate: no registry in the working folder": ["evaluate", "models:/m/1", "--train", shards, "--val", shards],
        "evaluate: a version the registry does not hold": (["evaluate", "models:/m/3", "--train", shards, "--val",
                                                            shards], registry),
    }
    return {name: case if isinstance(case, tuple) else (case, {}) for name, case in table.items()}


def time_case(tree: Path, args: list[str], environ: dict[str, str], runs: int) -> tuple[list[float], int, str]:
    seconds, rc, last = [], 0, ""
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cwd:
            env = {**os.environ, "PYTHONPATH": str(tree), "PREFECT_HOME": str(Path(cwd) / ".prefect")}
            env.pop("MLFLOW_TRACKING_URI", None)
            env.update(environ)
            started = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True,
                                 text=True, timeout=600)
            seconds.append(time.monotonic() - started)
            rc = out.returncode
            last = out.stderr
    return seconds, rc, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", default=str(ROOT), help="checkout of the project to time (default: this one)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    load = os.getloadavg()[0]
    print(f"# {tree}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}; "
          f"Python {platform.python_version()}; {args.runs} runs per case")
    print("| case | exit | median s | min s | max s | tracebacks |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cmd, environ) in cases(Path(tmp)).items():
            seconds, rc, stderr = time_case(tree, cmd, environ, args.runs)
            tracebacks = stderr.count("Traceback (most recent call last)")
            print(f"| {name} | {rc} | {statistics.median(seconds):.2f} | {min(seconds):.2f} | {max(seconds):.2f} | "
                  f"{tracebacks} |", flush=True)


if __name__ == "__main__":
    main()
