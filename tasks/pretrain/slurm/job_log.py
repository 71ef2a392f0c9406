"""The job's log as the flow reads it, on the shared filesystem: ``slurm-<job id>.out`` written by the batch shell
(its ``dino-slurm:`` lines, the setup's output, srun's messages) and ``slurm-<job id>-task-<n>.out`` by node n's
torchrun (``srun --output``: each node writes its own file, whole lines; ``srun --label`` would cut long lines,
such as the trainer's progress records). Each read by offset as it grows (a requeued job appends to them).

Rank 0's lines go to the flow run's log and its progress records to the progress artifact; rank 0 is the task
whose output carries the trainer's progress records (torchrun's rendezvous, not Slurm, orders the nodes), and
until it is known every task's lines are shown. Every source keeps its last lines for an error message.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Callable

from dino_model.metrics import parse_progress_line

from ..trainer_process import last_error
from .batch_script import MARK

_TASK_FILE = re.compile(r"-task-(\d+)\.out$")
#: slurmstepd's notice in the batch log of why it ended the job: ``*** JOB 7 ON n1 CANCELLED AT ... DUE TO
#: PREEMPTION ***``.
_SLURM_ENDED = re.compile(r"\*\*\* JOB \d+ ON \S+ CANCELLED AT \S+ DUE TO ([A-Z ]+?) \*\*\*")
#: That notice's reason as a stop reason.
SLURM_REASONS = {"PREEMPTION": "preempted", "NODE FAILURE": "node_fail", "TIME LIMIT": "time_limit"}
#: torchrun's summary of a failed worker: ``exitcode  : 5 (pid: 123)``.
_WORKER_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")
BATCH = "batch"


class JobLog:
    """Follows one job's log file (see the module docstring)."""

    def __init__(self, on_line: Callable[[str], None], on_progress: Callable[[dict], None], tail_lines: int = 40):
        self.on_line, self.on_progress = on_line, on_progress
        self.tail_lines = tail_lines
        self.path: Path | None = None
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        self.rank0_task: str | None = None
        self.tails: dict[str, collections.deque[str]] = {}
        self.end_record: dict | None = None
        self.error_record: dict | None = None
        self.stop_reason: str | None = None
        """The batch script's ``stop: <reason>`` of the current run of the job (``time_limit``, ``stopped``)."""
        self.slurm_reason: str | None = None
        """Why Slurm ended the current run (slurmstepd's notice): ``preempted``, ``node_fail``, ``time_limit``."""
        self.requeued = False

    def open(self, path: Path) -> None:
        """Follow the logs of a new job: ``path`` (the batch shell's) and its tasks' beside it."""
        self.path, self._offsets, self._partial = path, {}, {}
        self.new_run()

    def new_run(self) -> None:
        """The job started again (requeued): what describes one run of it starts afresh."""
        self.end_record = self.error_record = self.stop_reason = self.slurm_reason = None
        self.requeued = False
        self.tails = {}

    def poll(self) -> None:
        """Read what was appended since the last call."""
        if self.path is None:
            return
        for path in [self.path, *sorted(self.path.parent.glob(f"{self.path.stem}-task-*.out"))]:
            self._read(path)

    def _read(self, path: Path, final: bool = False) -> None:
        m = _TASK_FILE.search(path.name)
        task = m.group(1) if m else None
        try:
            with open(path, "rb") as f:
                offset = self._offsets.get(path, 0)
                if f.seek(0, 2) < offset:  # truncated (the cluster ignores --open-mode=append): from the start
                    offset = 0
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offsets[path] = offset + len(data)
        *lines, rest = (self._partial.get(path, b"") + data).split(b"\n")
        if final and rest:
            lines, rest = lines + [rest], b""
        self._partial[path] = rest
        for raw in lines:
            self._line(task, raw.decode("utf-8", "replace").rstrip("\r"))

    def flush(self) -> None:
        """Everything, the last lines even without their newline (the job is over)."""
        if self.path is None:
            return
        for path in [self.path, *sorted(self.path.parent.glob(f"{self.path.stem}-task-*.out"))]:
            self._read(path, final=True)

    def _line(self, task: str | None, text: str) -> None:
        record = parse_progress_line(text)
        if record is not None:
            if self.rank0_task is None and task is not None:
                self.rank0_task = task
            if record.get("event") == "end":
                self.end_record = record
            elif record.get("event") == "error":
                self.error_record = record
            self.on_progress(record)
            return
        self.tails.setdefault(task or BATCH, collections.deque(maxlen=self.tail_lines)).append(text)
        if task is None and text.startswith(MARK):
            self._mark(text[len(MARK):].strip())
        ended = _SLURM_ENDED.search(text) if task is None else None
        if ended:
            self.slurm_reason = SLURM_REASONS.get(ended.group(1), self.slurm_reason)
        if task is None or task == self.rank0_task:
            self.on_line(text)
        elif self.rank0_task is None:
            self.on_line(f"task {task}: {text}")

    def _mark(self, text: str) -> None:
        if text.startswith("stop: "):
            self.stop_reason = text.split()[1]
        elif text.startswith("requeue"):
            self.requeued = True

    # -- what the log says about the run that just ended ---------------------------------------------------------------

    def requeue_reason(self) -> str:
        """Why the job was requeued: the batch script's own requeue (its stop reason: ``time_limit``), else Slurm's
        notice (``preempted``, ``node_fail``), else ``requeued`` (by an administrator, ``scontrol requeue``)."""
        if self.requeued:
            return self.stop_reason or "requeued"
        return self.slurm_reason or "requeued"

    def trainer_error(self) -> str:
        """The trainer's own error (its ``error`` record, else the last traceback line of rank 0 then of any
        task), else the last line of the batch shell that looks like one (a setup line that failed)."""
        if self.error_record and self.error_record.get("message"):
            return str(self.error_record["message"])
        order = [t for t in (self.rank0_task,) if t] + sorted(t for t in self.tails if t not in (BATCH,
                                                                                                  self.rank0_task))
        for task in order + [BATCH]:
            found = last_error(self.tails.get(task, ()))
            if found:
                return found
        return ""

    def worker_exit_codes(self) -> list[int]:
        """The exit codes torchrun reported for its failed workers, on any node."""
        return [int(m.group(1)) for tail in self.tails.values() for line in tail
                for m in [_WORKER_EXIT.search(line)] if m]

    def last_output(self, lines: int = 15) -> str:
        """The last lines of each source, rank 0's first, for an error message."""
        parts = []
        for key in sorted(self.tails, key=lambda k: (k != self.rank0_task, k == BATCH, k)):
            name = "batch script and srun" if key == BATCH else f"task {key}" + (" (rank 0)"
                                                                                  if key == self.rank0_task else "")
            parts.append(f"--- {name} ---\n" + "\n".join(list(self.tails[key])[-lines:]))
        return "\n".join(parts)
