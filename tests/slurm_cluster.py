"""A real Slurm cluster of two nodes on this machine, for the tests (Debian 12: ``apt-get install slurmctld slurmd
slurm-client munge``, Slurm 22.05): its own ``munged`` (own key and socket), ``slurmctld`` and one ``slurmd`` per
simulated node (the Debian build runs several on one host: ``slurmd -N n1``), all on 127.0.0.1 and free ports,
in the foreground so that they are stopped by PID. The configuration is written into a fresh folder; clients find
it through ``SLURM_CONF`` (:meth:`SlurmCluster.env`).

    cluster = start_slurm_cluster()
    subprocess.run(["sinfo"], env={**os.environ, **cluster.env()})
    cluster.stop()

Facts this relies on (docs: /work/shared/notes/known-traps.md): no systemd, so the daemons are started directly;
no accounting (no ``sacct``; OUT_OF_MEMORY and QoS preemption cannot be produced); node names do not resolve
(``NodeAddr=127.0.0.1``, each node its own ``Port=``); a node needs ``RealMemory`` or jobs asking for memory
(dask-jobqueue does) stay pending; a requeued job waits for the credential expiry, lowered here to 10 s
(``AuthInfo=cred_expire=10``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from infra.services import free_port, stop_pid

#: Debian's packages that make a cluster; the hint printed when they are missing.
INSTALL_HINT = "apt-get install slurmctld slurmd slurm-client munge"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")


def find_binary(name: str) -> str | None:
    """``name`` on PATH, or in /usr/sbin (daemons; not on every user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


@dataclass
class SlurmCluster:
    """A running test cluster: its folder, configuration, nodes and daemons."""

    folder: Path
    conf: Path
    nodes: list[str]
    partition: str
    pids: dict[str, int] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """A Slurm client command against this cluster; its stdout."""
        done = subprocess.run(list(args), env={**os.environ, **self.env()}, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def jobs(self) -> list[str]:
        """Ids of the jobs not yet finished."""
        return self.run("squeue", "-h", "-o", "%i").split()

    def log(self, daemon: str = "slurmctld") -> str:
        path = self.folder / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Cancel every job (its processes end with it), then stop the daemons by PID and remove the folder."""
        try:
            if self.jobs():
                self.run("scancel", "--full", *self.jobs(), check=False)
                deadline = time.monotonic() + 90
                while self.jobs() and time.monotonic() < deadline:
                    time.sleep(1)
        except Exception:  # noqa: BLE001 - the controller is already gone: stop what is left
            pass
        for name in [n for n in self.pids if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            if name in self.pids:
                stop_pid(self.pids.pop(name))
        shutil.rmtree(self.folder, ignore_errors=True)


def start_slurm_cluster(nodes: tuple[str, ...] = ("n1", "n2"), cpus: int = 2, memory_mb: int = 8000,
                        timeout: float = 90.0) -> SlurmCluster:
    """Start munged, slurmctld and one slurmd per node; return once every node is idle."""
    # Not under pytest's 0700 temporary folders: munged (user munge) must reach its socket.
    folder = Path(tempfile.mkdtemp(prefix="dino-slurm-"))
    folder.chmod(0o711)
    cluster = SlurmCluster(folder, folder / "slurm.conf", list(nodes), "debug")
    try:
        for sub in ("state", "spool"):
            (folder / sub).mkdir()
        socket_path = _start_munged(cluster)
        cluster.conf.write_text(_config(folder, socket_path, nodes, cpus, memory_mb))
        env = {**os.environ, **cluster.env()}
        cluster.pids["slurmctld"] = _spawn([find_binary("slurmctld"), "-D", "-f", str(cluster.conf)], env,
                                           folder / "slurmctld.out")
        for node in nodes:
            cluster.pids[f"slurmd-{node}"] = _spawn([find_binary("slurmd"), "-D", "-f", str(cluster.conf), "-N", node],
                                                    env, folder / f"slurmd-{node}.out")
        _wait_idle(cluster, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_munged(cluster: SlurmCluster) -> Path:
    import pwd

    munge = pwd.getpwnam("munge")
    home = cluster.folder / "munge"
    home.mkdir(mode=0o711)
    os.chown(home, munge.pw_uid, munge.pw_gid)
    key = home / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chown(key, munge.pw_uid, munge.pw_gid)
    key.chmod(0o600)
    sock = home / "munge.socket"
    args = [find_binary("munged"), "-F", f"--socket={sock}", f"--key-file={key}", f"--pid-file={home}/munged.pid",
            f"--log-file={home}/munged.log", f"--seed-file={home}/munged.seed"]
    cluster.pids["munged"] = _spawn(args, dict(os.environ), cluster.folder / "munged.out", user="munge")
    deadline = time.monotonic() + 30
    while not sock.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"munged did not create {sock}: {(home / 'munged.log').read_text(errors='replace')}")
        time.sleep(0.2)
    return sock


def _config(folder: Path, munge_socket: Path, nodes: tuple[str, ...], cpus: int, memory_mb: int) -> str:
    lines = [
        "ClusterName=dinotest",
        f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # A requeued job waits for the credential of its last run to expire (default 120 s).
        f"AuthInfo=socket={munge_socket},cred_expire=10",
        f"StateSaveLocation={folder}/state",
        f"SlurmdSpoolDir={folder}/spool/%n",
        f"SlurmctldPidFile={folder}/slurmctld.pid",
        f"SlurmdPidFile={folder}/slurmd-%n.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log",
        f"SlurmdLogFile={folder}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "ReturnToService=2",
        "KillWait=30",
        "MinJobAge=600",
    ]
    for node in nodes:
        lines.append(f"NodeName={node} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus} RealMemory={memory_mb} "
                     "State=UNKNOWN")
    # A job in "urgent" preempts the jobs of "debug" it needs the room of; Slurm requeues them (no accounting needed,
    # unlike QoS preemption).
    lines += ["PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE",
              f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP PriorityTier=1",
              f"PartitionName=urgent Nodes={','.join(nodes)} MaxTime=INFINITE State=UP PriorityTier=2"]
    return "\n".join(lines) + "\n"


def _spawn(args: list[str], env: dict[str, str], out: Path, user: str | None = None) -> int:
    with open(out, "wb") as f:
        proc = subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, user=user, group=user)
    return proc.pid


def _wait_idle(cluster: SlurmCluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        try:
            states = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
        except subprocess.TimeoutExpired:
            states = ""
        seen = dict(line.split()[:2] for line in states.strip().splitlines() if len(line.split()) >= 2)
        if sorted(seen) == sorted(cluster.nodes) and set(seen.values()) == {"idle"}:  # a line per partition
            return
        time.sleep(0.5)
    raise RuntimeError(f"the Slurm test cluster did not come up within {timeout:.0f} s (sinfo: {states!r}); "
                       f"slurmctld log:\n{cluster.log()[-3000:]}")


@pytest.fixture(scope="session")
def slurm_cluster():
    """One Slurm test cluster for the test session (each pytest-xdist worker that uses it); every Slurm test
    shares it. Missing Slurm: a failure under CI=true, else a skip that says how to install it."""
    from tests.prerequisites import missing, require_root

    require_root("the Slurm test cluster (slurmd runs jobs as root, munged as user munge)")
    absent = [name for name in BINARIES if find_binary(name) is None]
    if absent:
        missing(f"Slurm's {', '.join(absent)} not found", INSTALL_HINT)
    cluster = start_slurm_cluster()
    yield cluster
    cluster.stop()
