"""Build the trainer image (``infra/docker/Dockerfile``) with Podman: labels, this machine's pip configuration,
Podman's layer cache, timing.

    python -m infra.image.build --base debian                  # local Debian base (no registry), tag
                                                               # localhost/dino-pipeline:<version>
    python -m infra.image.build --base python:3.11-slim        # the published base (needs a registry)
    python -m infra.image.build --base debian --tag registry.example/dino:0.1.0 --no-host-pip-config

What it does:

* ``--base debian`` makes (once, then reuses) a Debian base of this machine's release with ``debootstrap``
  (:mod:`infra.image.debian_base`) and passes it as ``BASE_IMAGE``;
* mounts this machine's pip configuration read-only (:mod:`infra.image.pip_config`): the build's pip finds the
  same indexes, local wheels and constraints as ``make setup`` does, and none of it enters the image;
* labels the image ``org.opencontainers.image.version`` (pyproject's version), ``...revision`` (``git rev-parse
  HEAD``; ``dino.source.dirty=true`` when tracked files differ from it) and ``...title``;
* streams Podman's output (prefixed) and reports the time, the image's size and how many steps came from the
  cache. Podman's store is the cache: the dependency layer (3-4 GB: the CUDA build of torch and its NVIDIA wheels)
  is rebuilt only when ``pyproject.toml``, the base or the steps before it change.

Needs ``podman`` (Debian: ``apt-get install podman runc``; ``debootstrap`` for ``--base debian``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .debian_base import BaseImageError, host_release, ensure_base
from .pip_config import PipConfigError, host_pip_mounts
from .podman import Podman, PodmanError

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
REPOSITORY = "localhost/dino-pipeline"


@dataclass
class ImageBuild:
    """One finished build."""

    image_id: str
    tag: str
    base: str
    seconds: float
    size_bytes: int
    steps: int
    cached_steps: int
    labels: dict[str, str]

    def summary(self) -> str:
        return (f"{self.tag} ({self.image_id[:12]}) on {self.base}: {self.size_bytes / 1e9:.2f} GB, built in "
                f"{self.seconds:.0f} s, {self.cached_steps} of {self.steps} steps from the cache")


def project_version(root: Path = ROOT) -> str:
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]


def source_labels(root: Path = ROOT) -> dict[str, str]:
    """OCI labels naming the code in the image: version, git commit, whether the work tree differed from it."""
    labels = {"org.opencontainers.image.title": "dino-pipeline",
              "org.opencontainers.image.version": project_version(root)}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode == 0:
        labels["org.opencontainers.image.revision"] = head.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        labels["dino.source.dirty"] = "true" if dirty else "false"
    return labels


def build_image(
    base: str = "python:3.11-slim",
    tag: str | None = None,
    host_pip_config: bool = True,
    pip_env: dict[str, str] | None = None,
    podman: Podman | None = None,
    log: Callable[[str], None] = print,
    timeout: float = 3600.0,
    extra_labels: dict[str, str] | None = None,
    replace_previous: bool = True,
) -> ImageBuild:
    """Build the image on ``base`` (``"debian"``: the local Debian base) and return what was built.

    ``pip_env``: the environment in which this machine's pip configuration is read (default: this process's).
    ``replace_previous``: the image ``tag`` named before, when the build gives it a new one, is removed with the
    layers only it used (``podman rmi``, which refuses an image another tag or a container still uses), so that
    rebuilds after a dependency change do not pile up 7 GB layers."""
    podman = podman or Podman()
    if base == "debian":
        base = ensure_base(host_release(), podman, log=log)
    tag = tag or f"{REPOSITORY}:{project_version()}"
    labels = {**source_labels(), **(extra_labels or {})}
    previous = podman.inspect_image(tag)["Id"] if podman.image_exists(tag) else None
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        mounts = stack.enter_context(host_pip_mounts(env=pip_env)) if host_pip_config else []
        iid_file = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dino-build-"))) / "iid"
        build_args = {"BASE_IMAGE": base, "GIT_COMMIT": labels.get("org.opencontainers.image.revision", "unknown")}
        cmd = podman.build_command(str(ROOT), str(DOCKERFILE), tag, build_args, labels,
                                   extra=[*mounts, "--iidfile", str(iid_file)])
        steps, cached = _stream(cmd, log, timeout)
        image_id = iid_file.read_text().strip().removeprefix("sha256:")
    seconds = time.monotonic() - start
    size = int(podman.inspect_image(image_id)["Size"])
    if replace_previous and previous and previous != image_id:
        removed = podman.run("rmi", previous, check=False)
        log(f"previous {tag} ({previous[:12]}): " + ("removed" if removed.returncode == 0 else
                                                       f"kept ({removed.stderr.strip()[-200:]})"))
    return ImageBuild(image_id, tag, base, seconds, size, steps, cached, labels)


def _stream(cmd: list[str], log: Callable[[str], None], timeout: float) -> tuple[int, int]:
    """Run the build, each output line to ``log``; ``(steps, steps from the cache)``."""
    steps = cached = 0
    tail: list[str] = []
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            steps += bool(re.match(r"^STEP \d+/\d+:", line))
            cached += line.startswith("--> Using cache")
            tail = (tail + [line])[-60:]
            log(f"  build | {line}")
            if time.monotonic() > deadline:
                raise PodmanError(f"the image build ran past {timeout:.0f} s")
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    if rc != 0:
        raise PodmanError(f"podman build failed (exit code {rc}):\n" + "\n".join(tail))
    return steps, cached


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.image.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="python:3.11-slim",
                   help="base image, or 'debian' for a Debian base made here with debootstrap (no registry)")
    p.add_argument("--tag", help=f"image name (default {REPOSITORY}:<project version>)")
    p.add_argument("--no-host-pip-config", action="store_true",
                   help="let pip use its defaults (PyPI) instead of this machine's pip configuration")
    args = p.parse_args(argv)
    try:
        build = build_image(base=args.base, tag=args.tag, host_pip_config=not args.no_host_pip_config,
                            pip_env=dict(os.environ), log=functools.partial(print, flush=True))
    except (BaseImageError, PipConfigError, PodmanError) as e:
        print(f"python -m infra.image.build: error: {e}", file=sys.stderr)
        return 2
    print(build.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
