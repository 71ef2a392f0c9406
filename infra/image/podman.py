"""Podman command lines for building and running the trainer image on a machine like the project's.

    podman --runtime runc build --network host --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 ...
    podman --runtime runc run --rm --network host --ulimit ... IMAGE dino --help

Why these options (each one learnt on the project's Debian 12 machines, see /work/shared/notes/known-traps.md):

* ``--runtime runc``: Debian's default ``crun`` fails on hybrid (v1 + v2) cgroups; ``runc`` works on both. Used
  when ``runc`` is installed, else Podman's default runtime.
* ``--ulimit nofile=20000:20000 --ulimit nproc=32768:32768``: Podman otherwise raises the container's limits to
  its own defaults, which a process without ``CAP_SYS_RESOURCE`` may not do ("error setting rlimit").
* ``--network host``: the build's apt/pip and the containers reach the servers on 127.0.0.1 (SeaweedFS, MLflow)
  and the package indexes directly; Podman's default bridge network (10.88.0.0/16) is never used.

Environment values are passed as ``--env NAME`` (Podman copies the value from its own environment), so a secret
never appears on a command line (``ps``) or in a log of the command.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Iterable

ULIMITS = ("nofile=20000:20000", "nproc=32768:32768")


class PodmanError(RuntimeError):
    """A podman command failed or podman is missing; the message names the command."""


@dataclass
class Podman:
    """How podman is called here (see the module docstring)."""

    binary: str = "podman"
    runtime: str | None = field(default_factory=lambda: "runc" if shutil.which("runc") else None)
    ulimits: tuple[str, ...] = ULIMITS
    network: str = "host"

    def base(self) -> list[str]:
        return [self.binary, *(["--runtime", self.runtime] if self.runtime else [])]

    def limits(self) -> list[str]:
        return [a for u in self.ulimits for a in ("--ulimit", u)] + ["--network", self.network]

    def build_command(self, context: str, dockerfile: str, tag: str, build_args: dict[str, str],
                      labels: dict[str, str], extra: Iterable[str] = ()) -> list[str]:
        cmd = [*self.base(), "build", "--layers", "-f", dockerfile, "-t", tag, *self.limits()]
        for key, value in build_args.items():
            cmd += ["--build-arg", f"{key}={value}"]
        # --label, not a LABEL from a build argument: Podman 4.3 reuses a cached LABEL step whose argument changed.
        for key, value in labels.items():
            cmd += ["--label", f"{key}={value}"]
        return [*cmd, *extra, context]

    def run_command(self, image: str, args: Iterable[str] = (), env_names: Iterable[str] = (),
                    env_values: dict[str, str] | None = None, entrypoint: list[str] | None = None, name: str | None = None, user: str | None = None,
                    volumes: Iterable[str] = (), extra: Iterable[str] = ()) -> list[str]:
        """``podman run --rm`` of ``image``; ``env_names`` are passed by name (values from the caller's
        environment: use it for secrets), ``env_values`` (never secrets) on the command line; ``entrypoint``
        replaces the image's (as a Kubernetes ``command:`` does)."""
        cmd = [*self.base(), "run", "--rm", *self.limits()]
        cmd += ["--name", name] if name else []
        cmd += ["--user", user] if user else []
        cmd += ["--entrypoint", json.dumps(entrypoint)] if entrypoint is not None else []
        for key, value in (env_values or {}).items():
            cmd += ["--env", f"{key}={value}"]
        for env_name in env_names:
            cmd += ["--env", env_name]
        for volume in volumes:
            cmd += ["-v", volume]
        return [*cmd, *extra, image, *args]

    def run(self, *args: str, timeout: float = 600.0, check: bool = True) -> subprocess.CompletedProcess:
        """``podman ARGS`` (with the runtime option); its output, or :class:`PodmanError` with podman's message."""
        cmd = [*self.base(), *args]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError as e:
            raise PodmanError(f"{self.binary} not found (Debian: apt-get install podman runc)") from e
        if check and done.returncode != 0:
            raise PodmanError(f"`{' '.join(cmd)}` failed (exit code {done.returncode}): "
                              f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return done

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "exists", ref, check=False).returncode == 0

    def inspect_image(self, ref: str) -> dict:
        return json.loads(self.run("image", "inspect", ref).stdout)[0]
