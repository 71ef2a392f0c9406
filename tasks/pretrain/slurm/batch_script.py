"""The batch script of a Slurm training, rendered from the job's settings (no Prefect, no side effect).

``sbatch`` runs it on the job's first node. It

1. asks Slurm for ``USR1`` on the batch shell ``slurm.signal_lead_s`` seconds before the time limit
   (``#SBATCH --signal=B:USR1@LEAD``) and traps it, and ``TERM`` (a cancel, a preemption);
2. runs the ``setup`` lines (module loads, an environment activated); the job fails if one fails;
3. finds the first node's address (``scontrol show node``: node names need not resolve) and a rendezvous port;
4. starts one task per node with ``srun --kill-on-bad-exit=1`` (each its own log file), each running
   ``torchrun --nnodes=N --rdzv-backend=c10d --rdzv-endpoint=FIRST_NODE:PORT --rdzv-id=$SLURM_JOB_ID
   -m dino_model.train --config CONFIG`` (the resolved config of the flow, rank 0 logging into its MLflow run);
5. on ``USR1`` it sends ``SIGTERM`` to the trainers (``scancel --signal=TERM`` of its job's steps: the trainer and
   torchrun stop cleanly on SIGTERM, not on USR1), waits for them to checkpoint and, when rank 0's ``end`` record
   says ``terminated``, requeues the job (``scontrol requeue``): Slurm never requeues a timed-out job by itself.
   The requeued job (same id, ``SLURM_RESTART_COUNT`` + 1) resumes from the latest checkpoint in the same MLflow
   run. A health stop (``collapsed:<mode>`` / ``stalled``) or a finished training is never requeued.

The lines of the script that start with ``dino-slurm:`` are what the flow reads back (:mod:`.job`): the stop and
its reason, the requeue. Nothing secret is in it: credentials reach the job through the environment
(``--export=ALL``), never its text or arguments.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tasks.validation.slurm_settings import SlurmSettings

from ..trainer_process import LaunchSpec, torchrun_command

#: Prefix of the batch script's own lines in the job's log (the flow parses them).
MARK = "dino-slurm:"
#: The requeue decision: rank 0's last ``end`` record since this start of the job says ``terminated`` (a stop on
#: request, with its checkpoint), not ``completed`` nor a health stop.
_STOPPED_CLEANLY = r'''
import glob, json, os, sys
prefix, starts, status = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2].split()), ""
for path in sorted(glob.glob(prefix + "-task-*.out")):
    with open(path, "rb") as log:
        log.seek(int(starts.get(os.path.basename(path), 0)))
        lines = log.read().decode("utf-8", "replace").splitlines()
    for text in lines:
        if text.startswith("DINO_PROGRESS "):
            try:
                record = json.loads(text[len("DINO_PROGRESS "):])
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == "end":
                status = str(record.get("status", ""))
print(status or "none")
sys.exit(0 if status == "terminated" else 1)
'''


@dataclass
class SlurmJob:
    """One training's batch job, resolved: what :func:`render_batch_script` writes and :mod:`.job` follows."""

    name: str
    """``--job-name`` (``<slurm.job_prefix>-<flow run id[:8]>``)."""
    job_dir: Path
    """Folder shared by the flow's worker and the nodes: the script, the config, the log ``slurm-<job id>.out``."""
    nnodes: int
    nproc_per_node: int
    gpus_per_node: int
    settings: SlurmSettings
    python: str
    """The interpreter on the nodes."""
    shutdown_timeout_s: int = 120
    """torchrun's ``--shutdown-timeout``: how long its workers get to checkpoint after SIGTERM."""
    env: dict[str, str] = field(default_factory=dict)
    """Added to the job's environment by ``sbatch`` (the MLflow run id and tracking URI): never written here."""

    @property
    def script_path(self) -> Path:
        return self.job_dir / "job.sh"

    @property
    def config_path(self) -> Path:
        return self.job_dir / "config.json"

    def log_path(self, job_id: str) -> Path:
        """The batch shell's log; node n's is ``slurm-<job id>-task-<n>.out`` beside it."""
        return self.job_dir / f"slurm-{job_id}.out"


def sbatch_directives(job: SlurmJob) -> list[str]:
    """The ``#SBATCH`` options of the job, in order (also what ``sbatch --test-only`` is asked about)."""
    s = job.settings
    out = [f"--job-name={job.name}", f"--nodes={job.nnodes}", "--ntasks-per-node=1",
           f"--output={job.job_dir}/slurm-%j.out", "--open-mode=append", "--requeue",
           f"--signal=B:USR1@{s.signal_lead_s}", "--export=ALL"]
    if job.gpus_per_node > 0:
        out.append(f"--gpus-per-node={job.gpus_per_node}")
    for option, value in (("--cpus-per-task", s.cpus_per_task), ("--mem", s.mem), ("--partition", s.partition),
                          ("--account", s.account), ("--qos", s.qos), ("--time", s.time_limit),
                          ("--constraint", s.constraint)):
        if value not in (None, ""):
            out.append(f"{option}={value}")
    return out + list(s.extra_sbatch)


def trainer_command(job: SlurmJob) -> str:
    """One node's torchrun, as a shell line: the endpoint and the job id are expanded on the node."""
    spec = LaunchSpec(nproc_per_node=job.nproc_per_node, nnodes=job.nnodes,
                      rdzv_endpoint="${DINO_RDZV_HOST}:${DINO_RDZV_PORT}", rdzv_id="${SLURM_JOB_ID}",
                      shutdown_timeout_s=job.shutdown_timeout_s)
    cmd = torchrun_command(spec, str(job.config_path))
    cmd[0] = job.python
    return " ".join(f'"{arg}"' if "${" in arg else shlex.quote(arg) for arg in cmd)


def srun_command(job: SlurmJob) -> str:
    """The step: one task per node, each writing its own log (``slurm-<job>-task-<n>.out``, whole lines: ``srun
    --label`` would cut long ones); one task failing ends the others."""
    cmd = ["srun", "--kill-on-bad-exit=1", f"--nodes={job.nnodes}", f"--ntasks={job.nnodes}", "--ntasks-per-node=1",
           f"--output={job.job_dir}/slurm-%j-task-%t.out", "--open-mode=append"]
    if job.settings.cpus_per_task:
        cmd.append(f"--cpus-per-task={job.settings.cpus_per_task}")  # Slurm >= 22.05: srun does not inherit it
    return " ".join(cmd) + " " + trainer_command(job)


def render_batch_script(job: SlurmJob, flow_run_id: str, run_id: str) -> str:
    """The batch script (see the module docstring)."""
    s = job.settings
    q = shlex.quote
    port = str(s.rdzv_port) if s.rdzv_port else (
        f"$({q(job.python)} -c 'import socket; s = socket.socket(); s.bind((\"\", 0)); print(s.getsockname()[1])')")
    lines = ["#!/bin/bash",
             f"# dino-pretrain on Slurm (tasks/pretrain/slurm/batch_script.py): flow run {flow_run_id}, MLflow run "
             f"{run_id}", *(f"#SBATCH {d}" for d in sbatch_directives(job)), "",
             f'LOGS={q(str(job.job_dir))}/slurm-"$SLURM_JOB_ID"',
             '# where this run of the job starts in each node\'s log (a requeued job appends to them)',
             'STARTS=$(for f in "$LOGS"-task-*.out; do [ -e "$f" ] && echo "${f##*/}=$(stat -c %s "$f")"; done)',
             f'log() {{ echo "{MARK} $*"; }}',
             'STOP=""',
             'on_signal() {  # $1: why, $2: the signal',
             '    [ -n "$STOP" ] && return',
             '    STOP=$1',
             '    log "stop: $1 (SIG$2) at $(date -u +%FT%TZ): the trainers checkpoint and stop"',
             '    scancel --signal=TERM "$SLURM_JOB_ID" || true',
             '}',
             "trap 'on_signal time_limit USR1' USR1",
             "trap 'on_signal stopped TERM' TERM",
             'log "start: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NUM_NODES node(s) '
             '$SLURM_JOB_NODELIST"',
             "set -e", *s.setup, "set +e",
             'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             'HEAD_ADDR=$(scontrol show node "$HEAD_NODE" | tr " " "\\n" | sed -n "s/^NodeAddr=//p" | head -n 1)',
             'export DINO_RDZV_HOST="${HEAD_ADDR:-$HEAD_NODE}"',
             f'export DINO_RDZV_PORT="{port}"',
             "export PYTHONUNBUFFERED=1 DINO_PARENT_DEATH_SIGNAL=SIGTERM",
             # torchrun sets 1 only for several processes per node: else the node's CPUs shared by its processes
             # (a user's value kept); the same threads as a local run give the same sums
             'if [ -z "${OMP_NUM_THREADS:-}" ]; then',
             f'    OMP_NUM_THREADS=$(( ${{SLURM_CPUS_PER_TASK:-1}} / {job.nproc_per_node} ))',
             '    [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1',
             '    export OMP_NUM_THREADS',
             'fi',
             *_run_trainers(job)]
    return "\n".join(lines) + "\n"


def _run_trainers(job: SlurmJob) -> list[str]:
    q = shlex.quote
    return [
        'if [ -n "$STOP" ]; then CODE=143; else',
        '    log "rendezvous $DINO_RDZV_HOST:$DINO_RDZV_PORT"',
        f"    {srun_command(job)} &",
        '    SRUN=$!',
        '    while :; do wait "$SRUN"; CODE=$?; kill -0 "$SRUN" 2>/dev/null || break; done',
        'fi',
        'log "trainers exited with code $CODE"',
        'if [ "$STOP" = time_limit ]; then',
        f'    ENDED=$({q(job.python)} -c {q(_STOPPED_CLEANLY)} "$LOGS" "$STARTS")',
        '    if [ $? -eq 0 ] || [ "$ENDED" = none ]; then',
        '        log "requeue: time_limit (the trainers ended: $ENDED)"',
        '        scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '        log "scontrol requeue failed: the job ends here"',
        '    else',
        '        log "not requeued: the training ended $ENDED"',
        '    fi',
        'fi',
        'exit "$CODE"',
    ]


def slurm_launch_spec(nproc_per_node: int, nnodes: int, settings: SlurmSettings) -> LaunchSpec:
    """The processes and rendezvous of a Slurm training, as the request's checks see them: the endpoint is the
    job's first node (known once the job runs), the rendezvous id its job id."""
    port = settings.rdzv_port or "<free port>"
    return LaunchSpec(nproc_per_node=nproc_per_node, nnodes=nnodes, rdzv_endpoint=f"<first node of the job>:{port}",
                      rdzv_id="<Slurm job id>")
