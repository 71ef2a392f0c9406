"""What stops a Slurm launch on this worker, checked by the ``preflight`` task before anything is submitted: the
Slurm commands, the shared job folder, addresses the nodes can use, and Slurm's own answer to the job's options
(``sbatch --test-only``: partition, account, QoS, time limit, nodes, memory, constraint).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from urllib.parse import urlparse

from .batch_script import SlurmJob, sbatch_directives
from .commands import SlurmCommandError, missing_binaries, run_slurm, single_host_cluster


def launch_problems(job: SlurmJob, data: str, checkpoint_uri: str, tracking_uri: str) -> list[str]:
    """Every problem, each naming its setting."""
    out = []
    missing = missing_binaries()
    if missing:
        out.append(f"slurm: {', '.join(missing)} not found on PATH: run the flow on a node of the cluster (a login "
                   "or service node) with Slurm's client commands (Debian: apt-get install slurm-client)")
    out += _folder_problems(job.job_dir)
    for what, uri in (("data", data), ("checkpoint.uri", checkpoint_uri)):
        if not (uri.startswith("s3://") or os.path.isabs(uri.removeprefix("file://"))):
            out.append(f"slurm: {what} must be an s3:// URI or an absolute path on a filesystem the nodes share, "
                       f"got {uri!r}")
    if not _nodes_reach(tracking_uri):
        out.append(f"slurm: MLFLOW_TRACKING_URI must be an http(s) MLflow server the nodes reach or an absolute "
                   f"path on the shared filesystem, got {tracking_uri!r}")
    if not missing:
        out += test_only_problems(job)
    return out


def test_only_problems(job: SlurmJob) -> list[str]:
    """``sbatch --test-only`` of the job's options: Slurm says whether it would take the job, nothing is
    submitted."""
    cmd = ["sbatch", "--test-only", *sbatch_directives(job), "--wrap=true"]
    try:
        run_slurm(cmd, timeout=60)
    except SlurmCommandError as e:
        answer = str(e).split(": ", 1)[-1] if "failed" in str(e) else str(e)
        return [f"slurm: Slurm would not take the job (`{shlex.join(cmd)}`): {answer}"]
    return []


def _folder_problems(folder: Path) -> list[str]:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return [f"slurm: slurm.work_dir: cannot write the job's folder {folder}: {e}"]
    return []


def _nodes_reach(uri: str) -> bool:
    """Whether the nodes can use the tracking URI: a server not on loopback (unless the nodes are this machine),
    or a store at an absolute path (``sqlite:////abs/mlflow.db``: four slashes)."""
    if uri.startswith(("http://", "https://")):
        return urlparse(uri).hostname not in ("localhost", "127.0.0.1", "::1") or single_host_cluster()
    if uri.startswith("sqlite:"):
        return uri.startswith("sqlite:////")
    if uri.startswith("file:"):
        return os.path.isabs(urlparse(uri).path)
    return os.path.isabs(uri)
