"""The ``slurm`` group of ``dino-pretrain``: the batch job of ``launch.launcher="slurm"``
(:mod:`tasks.pretrain.slurm`), every field checked here, before anything is submitted::

    prefect deployment run dino-pretrain/slurm --param launch='{"nnodes": 2, "nproc_per_node": 4}' \\
        --param slurm='{"partition": "gpu", "account": "vision", "time_limit": "24:00:00", "mem": "200G",
                        "setup": ["module load cuda/12.4", "source /shared/envs/dino/bin/activate"]}'

    dino pretrain /shared/shards /shared/ckpt/run1 --launcher slurm --nnodes 2 --slurm-partition gpu \\
        --slurm-time 24:00:00 --slurm-setup 'source /shared/envs/dino/bin/activate'

What a field cannot tell alone (the partition exists, the account may use it, the nodes fit) is asked of Slurm by
the ``preflight`` task with ``sbatch --test-only``. Prefect-free, like all of :mod:`tasks.validation`.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from .settings_groups import SettingsGroup

#: Slurm's time formats (``sbatch --time``): minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")
_NAME = re.compile(r"^[A-Za-z0-9_.,:+-]*$")
_MEMORY = re.compile(r"^\d+[KMGT]?$")
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,:&|\[\]*()-]*$")
#: Options the launcher writes itself (the batch script depends on them): an extra line may not set them.
RESERVED_OPTIONS = ("--nodes", "-N", "--ntasks", "-n", "--ntasks-per-node", "--output", "-o", "--error", "-e",
                    "--open-mode", "--signal", "--requeue", "--no-requeue", "--job-name", "-J", "--export",
                    "--parsable", "--wait", "--array", "-a", "--chdir", "-D")
#: Slurm refuses a ``--signal`` lead time above this (seconds).
MAX_SIGNAL_LEAD_S = 65535


def time_limit_seconds(value: str) -> int | None:
    """``sbatch --time`` in seconds; None for ``UNLIMITED`` / ``INFINITE``; ValueError for anything else."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(value)
    if m is None:
        raise ValueError(f"not a Slurm time limit: {value!r} (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = (int(m.group(k)) if m.group(k) is not None else None for k in ("days", "a", "b", "c"))
    if days is None:  # minutes | minutes:seconds | hours:minutes:seconds
        if b is None:
            return a * 60
        return a * 60 + b if c is None else a * 3600 + b * 60 + c
    # days-hours | days-hours:minutes | days-hours:minutes:seconds
    return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)


def sbatch_option(line: str) -> str:
    """An extra ``#SBATCH`` line as the option it sets: ``--exclusive`` or ``#SBATCH --exclusive`` ->
    ``--exclusive``; ValueError for anything that is not one option line or sets an option the launcher owns."""
    option = line.strip()
    if option.startswith("#SBATCH"):
        option = option[len("#SBATCH"):].strip()
    if not option.startswith("-") or any(ch in option for ch in "\n\r\0"):
        raise ValueError(f"{line!r} is not an sbatch option (e.g. '--exclusive' or '#SBATCH --reservation=dino')")
    name = re.split(r"[= ]", option, maxsplit=1)[0]
    if name in RESERVED_OPTIONS:
        raise ValueError(f"{line!r}: {name} is set by the launcher (launch.nnodes, the log file, the pre-limit "
                         "signal, requeue): use the launch and slurm settings instead")
    return option


class SlurmSettings(SettingsGroup):
    """The batch job of ``launch.launcher="slurm"``: ``launch.nnodes`` nodes, one srun task per node, each running
    torchrun with ``launch.nproc_per_node`` processes."""

    partition: str = Field("", description="Partition (sbatch --partition); empty: the cluster's default.")
    account: str = Field("", description="Account charged (sbatch --account); empty: your default account.")
    qos: str = Field("", description="Quality of service (sbatch --qos); empty: the default.")
    time_limit: str = Field("", description="Time limit of one job (sbatch --time: minutes, HH:MM:SS, "
                                            "D-HH:MM:SS); empty: the partition's. A training longer than this is "
                                            "checkpointed and requeued, again and again, until it is done.")
    constraint: str = Field("", description="Node features required (sbatch --constraint, e.g. 'a100&ib').")
    gpus_per_node: int | None = Field(None, ge=0, description="GPUs per node (sbatch --gpus-per-node); default "
                                      "launch.nproc_per_node, or none when train.device is cpu.")
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs for each node's torchrun and its processes "
                                      "(sbatch --cpus-per-task); empty: the cluster's default.")
    mem: str = Field("", description="Memory per node (sbatch --mem, e.g. '200G'; '0' = all of it); empty: the "
                                     "cluster's default.")
    extra_sbatch: list[str] = Field(default_factory=list, description="More #SBATCH lines, e.g. ['--exclusive', "
                                    "'--reservation=dino'] (not the options the launcher sets itself).")
    setup: list[str] = Field(default_factory=list, description="Shell lines run on the first node before the "
                             "trainers start, e.g. ['module load cuda/12.4', 'source /shared/venv/bin/activate']; "
                             "the job fails if one fails.")
    python: str = Field("", description="Python on the nodes that has this project installed; empty: this "
                                        "worker's interpreter (right when the nodes share its filesystem).")
    signal_lead_s: int = Field(300, ge=10, le=MAX_SIGNAL_LEAD_S, description="Seconds before the time limit the "
                               "job is told to checkpoint and requeue: the ranks agreeing to stop (up to "
                               "train.nonfinite_check_every steps; on GPU logging.log_every by default) plus a "
                               "checkpoint write, with margin (Slurm may signal up to a minute earlier still).")
    work_dir: str = Field("", description="Folder on a filesystem this worker and the nodes share, for each job's "
                                          "batch script, config and log; empty: ~/.cache/dino/slurm.")
    rdzv_port: int = Field(0, ge=0, le=65535, description="TCP port of the c10d rendezvous on the first node; 0: "
                                                          "a free port picked there at start.")
    job_prefix: str = Field("dino-pretrain", description="Job name prefix; the name is <prefix>-<flow run "
                                                         "id[:8]>.")
    cancel_grace_s: int = Field(180, ge=10, description="On cancellation, how long the trainers have to "
                                "checkpoint after their SIGTERM before the job is cancelled outright (Slurm's "
                                "KillWait also bounds it).")

    @field_validator("partition", "account", "qos", "job_prefix")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"must be a Slurm name (letters, digits, '_.,:+-'), got {value!r}")
        return value

    @field_validator("constraint")
    @classmethod
    def _constraint(cls, value: str) -> str:
        if not _CONSTRAINT.match(value):
            raise ValueError(f"must be a Slurm feature expression (e.g. 'a100&ib'), got {value!r}")
        return value

    @field_validator("mem")
    @classmethod
    def _memory(cls, value: str) -> str:
        if value and not _MEMORY.match(value):
            raise ValueError(f"must be a size such as 64G, 500M or 0 (all of the node), got {value!r}")
        return value

    @field_validator("time_limit")
    @classmethod
    def _time(cls, value: str) -> str:
        if value:
            time_limit_seconds(value)
        return value

    @field_validator("extra_sbatch")
    @classmethod
    def _options(cls, value: list[str]) -> list[str]:
        return [sbatch_option(line) for line in value]

    @field_validator("setup", "python", "work_dir")
    @classmethod
    def _one_line(cls, value):
        for line in value if isinstance(value, list) else [value]:
            if any(ch in line for ch in "\n\r\0"):
                raise ValueError(f"must be single lines, got {line!r}")
        return value

    @model_validator(mode="after")
    def _lead_within_limit(self) -> "SlurmSettings":
        limit = time_limit_seconds(self.time_limit) if self.time_limit else None
        if limit is not None and self.signal_lead_s >= limit:
            raise ValueError(f"signal_lead_s ({self.signal_lead_s} s) must be shorter than time_limit "
                             f"({self.time_limit} = {limit} s): the job would be told to stop before it starts")
        return self
