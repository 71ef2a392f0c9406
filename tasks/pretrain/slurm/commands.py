"""The Slurm commands of the ``slurm`` launcher, as data, and their runner (no Prefect here)::

    sbatch --test-only JOB.sh                     # preflight: would Slurm take the job? (nothing is submitted)
    sbatch --parsable JOB.sh                      # submit; prints the job id
    scontrol show job -o JOBID                    # polled: JobState, Reason, Restarts, ExitCode, NodeList ...
    squeue -h -j JOBID -o %T                      # the state, when scontrol no longer knows the job
    scancel --signal=TERM JOBID                   # cancellation, first: the trainers checkpoint and stop
    scancel JOBID                                 # then, after slurm.cancel_grace_s: whatever is left

No ``sacct``: many clusters (and the test cluster) run without accounting. Slurm finds its configuration as usual
(``SLURM_CONF`` or its compiled-in path); the commands carry no credential.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

#: Every command the launcher runs.
BINARIES = ("sbatch", "scontrol", "squeue", "scancel", "srun")
#: Job states after which nothing more happens to a job (Slurm's ``JOB_*`` base states).
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT")


class SlurmCommandError(RuntimeError):
    """A Slurm command is missing or failed; the message names the command and Slurm's answer."""


def sbatch_test_command(script: str) -> list[str]:
    return ["sbatch", "--test-only", script]


def sbatch_command(script: str) -> list[str]:
    return ["sbatch", "--parsable", script]


def show_job_command(job_id: str) -> list[str]:
    return ["scontrol", "show", "job", "-o", job_id]


def squeue_state_command(job_id: str) -> list[str]:
    return ["squeue", "-h", "-j", job_id, "-t", "all", "-o", "%T"]


def signal_steps_command(job_id: str, signal: str = "TERM") -> list[str]:
    """``signal`` to every process of the job's steps (the trainers and torchrun), not the batch shell."""
    return ["scancel", f"--signal={signal}", job_id]


def cancel_command(job_id: str) -> list[str]:
    return ["scancel", job_id]


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None]


def run_slurm(cmd: list[str], timeout: float = 60.0, env: dict[str, str] | None = None,
              cwd: str | None = None) -> str:
    """Run one Slurm command; its stdout, or :class:`SlurmCommandError` naming it with Slurm's message."""
    if shutil.which(cmd[0]) is None:
        raise SlurmCommandError(f"{cmd[0]} not found on PATH, needed for `{shlex.join(cmd)}` (launcher='slurm'): "
                                "run the flow on a node of the cluster (a login or service node) with Slurm's "
                                "client commands installed")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise SlurmCommandError(f"`{shlex.join(cmd)}` did not answer within {timeout:.0f} s") from e
    if done.returncode != 0:
        raise SlurmCommandError(f"`{shlex.join(cmd)}` failed (exit code {done.returncode}): "
                                f"{(done.stderr or done.stdout).strip()[-2000:]}")
    # sbatch --test-only answers on stderr
    return done.stdout if done.stdout.strip() else done.stderr


def parse_job_id(sbatch_output: str) -> str:
    """``sbatch --parsable`` prints ``<id>`` or ``<id>;<cluster>``."""
    text = sbatch_output.strip().splitlines()[-1] if sbatch_output.strip() else ""
    job_id = text.split(";", 1)[0]
    if not job_id.isdigit():
        raise SlurmCommandError(f"sbatch printed no job id: {sbatch_output.strip()!r}")
    return job_id


def parse_show_job(text: str) -> dict[str, str]:
    """``scontrol show job -o`` (one line of ``Key=Value`` pairs) as a dict. Values may hold spaces (``Reason``,
    ``Comment``): a value runs until the next `` Key=``."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    fields: dict[str, str] = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9_:/]*=|$)", line):
        fields.setdefault(m.group(1), m.group(2))
    return fields


def base_state(state: str) -> str:
    """``CANCELLED by 0`` -> ``CANCELLED``; ``RUNNING+`` -> ``RUNNING``."""
    return state.split()[0].rstrip("+") if state else ""


def exit_code(fields: dict[str, str]) -> tuple[int, int]:
    """``ExitCode=<code>:<signal>`` of the batch script."""
    code, _, sig = fields.get("ExitCode", "0:0").partition(":")
    try:
        return int(code), int(sig or 0)
    except ValueError:
        return 0, 0


def single_host_cluster() -> bool:
    """Whether every node of the cluster is this machine (a test cluster, ``NodeAddr=127.0.0.1``): then a server
    on 127.0.0.1 (MLflow, a Dask scheduler, a temporary Prefect server) is reachable from the jobs too."""
    try:
        nodes = run_slurm(["scontrol", "show", "node", "-o"], timeout=30)
    except SlurmCommandError:
        return False
    addrs = set(re.findall(r"NodeAddr=(\S+)", nodes))
    return bool(addrs) and addrs <= {"127.0.0.1", "localhost", "::1"}
