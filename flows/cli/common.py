"""What every ``dino`` subcommand shares: the subcommand registry (:func:`command`), :class:`UsageError`, argument
parsers for sizes, the trainer's progress bar, and the embedded-MLflow environment of local runs."""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

from tasks.validation.errors import UserInputError, is_user_error

__all__ = ["COMMANDS", "Command", "UsageError", "add_debug_option", "add_task_runner_option", "command",
           "is_user_error", "parse_bytes", "print_mlflow_hint", "print_warnings", "size_or_none",
           "trainer_progress_bar", "use_embedded_mlflow", "use_registry"]


@dataclass(frozen=True)
class Command:
    """One ``dino`` subcommand."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: name -> subcommand, in the order they appear in ``dino --help``.
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``run(args) -> int`` as ``dino <name>``."""

    def register(run: Callable[[argparse.Namespace], int]):
        if name in COMMANDS:
            raise ValueError(f"dino subcommand {name!r} registered twice")
        COMMANDS[name] = Command(help, configure, run)
        return run

    return register


class UsageError(UserInputError):
    """A bad command line or unusable input: printed as ``dino <cmd>: error: ...`` with exit status 2."""


def add_debug_option(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, also print its traceback (and Prefect's logs of it)")


def task_runner_choice(text: str) -> str:
    """``--task-runner``: threads, processes, dask or tcp://HOST:PORT (:mod:`tasks.validation.task_runners`)."""
    from tasks.validation.task_runners import TaskRunnerError, check_task_runner

    try:
        return check_task_runner(text, "--task-runner")
    except TaskRunnerError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--task-runner ")) from e


def add_task_runner_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--task-runner", type=task_runner_choice, default="threads", metavar="RUNNER",
                        help=f"where the {what} run: threads (default, in this process), processes (of this "
                             f"machine), dask (a local Dask cluster of --parallelism workers) or tcp://HOST:PORT "
                             f"(a running Dask scheduler)")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """``"200MB"`` -> 200_000_000, ``"1GiB"`` -> 1_073_741_824, ``"4096"`` -> 4096."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 1GiB, 1048576)")
    unit = (m.group(2) or "").lower().removesuffix("b")
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"unknown size unit in {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


class trainer_progress_bar:
    """A tqdm bar over the trainer's steps, fed by its ``DINO_PROGRESS`` records while the flow runs; the learning
    curve's points and each change of the training-health verdict are printed above it."""

    def __enter__(self):
        from tasks.pretrain.progress_artifact import trainer_progress

        self.bar = None
        self.checkpoint = None  # the trainer's last checkpoint, said when a stop ends the command
        trainer_progress.add(self.update)
        return self

    def update(self, record: dict) -> None:
        from tqdm import tqdm

        event = record.get("event")
        if event in ("checkpoint", "end") and (record.get("uri") or record.get("checkpoint")):
            self.checkpoint = record.get("uri") or record.get("checkpoint")
        if event == "start":
            if self.bar is None:
                self.bar = tqdm(total=record.get("total_steps"), unit="step", desc="dino pretrain", dynamic_ncols=True)
            self.bar.n = record.get("step", 0)
            self.bar.refresh()
        elif self.bar is not None and event == "step":
            self.bar.n = record["step"]
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", epoch=record.get("epoch"),
                                 refresh=False)
            self.bar.refresh()
        elif self.bar is not None and event == "error":
            self.bar.write(f"trainer error: {record.get('message') or record}")
        elif self.bar is not None and event == "knn":
            points = ", ".join(f"{k.removeprefix('monitor.')} {v:.1f} %" for k, v in record.items()
                               if k.startswith("monitor.knn"))
            self.bar.write(f"learning curve at step {record.get('step')}: {points}")
        elif self.bar is not None and event == "health" and record.get("changed"):
            self.bar.write(f"training health: {record.get('text') or record.get('called')}")

    def __exit__(self, exc_type, exc, tb):
        from tasks.pretrain.progress_artifact import trainer_progress

        trainer_progress.remove(self.update)
        if self.bar is not None:
            self.bar.close()
        if exc is not None and not isinstance(exc, Exception) and self.checkpoint:  # a stop: where training resumes
            print(f"the trainer's last checkpoint: {self.checkpoint} (training resumes from it)")


def use_embedded_mlflow(folder: str) -> None:
    """Without ``MLFLOW_TRACKING_URI``, track into an embedded sqlite store (and local artifacts) in ``folder``."""
    # MLflow's per-download progress bars and INFO lines (database set-up, registration) would tear the command's
    # own progress bar; its warnings still show (a user's settings win).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    os.makedirs(folder, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{os.path.abspath(folder)}/mlflow.db"
    # Read by tasks.tracking when the flows create an experiment: keep artifacts beside the store.
    os.environ.setdefault("DINO_MLFLOW_ARTIFACT_ROOT", os.path.join(os.path.abspath(folder), "artifacts"))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def use_registry(reference: str, name: str | None = None, versions: list[int] | None = None) -> None:
    """Before Prefect starts (the last check: it imports MLflow): the registry exists, and ``reference`` (a
    ``models:/`` URI) or, with ``name``, that registered model and its ``versions`` are in it. Then the command
    tracks into that registry (the embedded one in ``./mlruns-dino`` without ``MLFLOW_TRACKING_URI``)."""
    from tasks.validation.registry import check_registry_available, find_model_version, require_registered_model

    check_registry_available(reference)
    use_embedded_mlflow(os.path.join(os.getcwd(), "mlruns-dino"))
    if name:
        require_registered_model(name, versions)
    else:
        find_model_version(reference)


def print_mlflow_hint() -> None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    # MLflow 3.17's UI opens in its GenAI view unless the link asks for the model-training one
    if uri.startswith("sqlite:"):
        print(f"browse the runs: mlflow ui --backend-store-uri {uri} --host 127.0.0.1, then open "
              "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning")
    elif uri:
        print(f"browse the runs: {uri.rstrip('/')}/#/experiments?workflowType=machine_learning")


def size_or_none(text: str) -> int | None:
    """``none`` or ``0`` -> None (no resize / no crop), else the positive integer."""
    if text.lower() in ("none", "0"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (a positive number of pixels, or none)")
    return value


def print_warnings(command_name: str, warnings: list[str]) -> None:
    """What the input checks found questionable but usable, on stderr before the work starts."""
    for warning in warnings:
        print(f"dino {command_name}: warning: {warning}", file=sys.stderr)
