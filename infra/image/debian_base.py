"""A Debian base image made on this machine: ``debootstrap --variant=minbase`` imported into Podman's store.

No registry is needed (``python:3.11-slim`` cannot be pulled where none can be reached). The Dockerfile installs
Python (Debian 12's is 3.11), git and tini on it with apt, as it does on the published base.

    python -m infra.image.debian_base                  # prints the image name; builds it when missing
    python -m infra.image.debian_base --refresh        # rebuild (newer Debian packages)

The image is named after its recipe (suite, mirror, variant, extra packages):
``localhost/dino-debian-base:bookworm-<hash>``. Podman's store is the cache: a machine that already holds that
name reuses it (about a minute saved); a changed recipe gets a new name. Suite and mirror default to this machine's
own Debian release and apt mirror (``/etc/os-release``, ``/etc/apt/sources.list[.d]``). Needs root (debootstrap)
and the ``debootstrap`` package.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .podman import Podman, PodmanError

REPOSITORY = "localhost/dino-debian-base"
#: Bump when the way the root file system is made changes (a new name, so cached bases are not reused).
RECIPE_VERSION = "1"


class BaseImageError(RuntimeError):
    """The base image could not be made; the message says what to install or pass."""


@dataclass(frozen=True)
class DebianBase:
    """What goes into the base image."""

    suite: str
    """Debian release codename, e.g. ``bookworm``."""
    mirror: str
    """Debian archive URL (the base's ``/etc/apt/sources.list`` points there too)."""
    variant: str = "minbase"
    include: tuple[str, ...] = ()
    """Extra Debian packages."""

    @property
    def tag(self) -> str:
        recipe = "\n".join([RECIPE_VERSION, self.suite, self.mirror, self.variant, *sorted(self.include)])
        return f"{REPOSITORY}:{self.suite}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def host_release(os_release: Path = Path("/etc/os-release"), apt_dir: Path = Path("/etc/apt")) -> DebianBase:
    """This machine's Debian release and the apt mirror it installs from."""
    fields = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', os_release.read_text(), re.M)) if os_release.exists() else {}
    suite = fields.get("VERSION_CODENAME", "")
    if fields.get("ID") != "debian" or not suite:
        raise BaseImageError(f"{os_release} does not describe a Debian release: pass --suite and --mirror")
    for uri, suites in _apt_sources(apt_dir):
        if suite in suites and "security" not in uri:
            return DebianBase(suite=suite, mirror=uri)
    raise BaseImageError(f"no apt source for {suite} under {apt_dir}: pass --mirror")


def _apt_sources(apt_dir: Path) -> list[tuple[str, list[str]]]:
    """``(URI, suites)`` of every ``deb`` source: one-line (``sources.list``) and deb822 (``*.sources``) formats."""
    out: list[tuple[str, list[str]]] = []
    lists = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for path in (p for p in lists if p.is_file()):
        for line in path.read_text().splitlines():
            m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m:
                out.append((m.group(1).rstrip("/"), [m.group(2)]))
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^([\w-]+):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                out += [(uri.rstrip("/"), fields.get("Suites", "").split()) for uri in fields.get("URIs", "").split()]
    return out


def ensure_base(base: DebianBase, podman: Podman | None = None, refresh: bool = False, log=print) -> str:
    """The base image's name, made first when Podman's store does not hold it (or ``refresh``)."""
    podman = podman or Podman()
    if not refresh and podman.image_exists(base.tag):
        log(f"base image {base.tag}: cached in Podman's store")
        return base.tag
    for tool in ("debootstrap", "tar"):
        if shutil.which(tool) is None:
            raise BaseImageError(f"{tool} not found: apt-get install debootstrap (needed to make {base.tag})")
    if os.geteuid() != 0:
        raise BaseImageError(f"debootstrap needs root to make {base.tag}")
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="dino-debian-base-", dir="/var/tmp"))
    try:
        rootfs = work / "rootfs"
        log(f"base image {base.tag}: debootstrap --variant={base.variant} {base.suite} from {base.mirror} ...")
        cmd = ["debootstrap", f"--variant={base.variant}", *([f"--include={','.join(base.include)}"] if base.include
                                                              else []), base.suite, str(rootfs), base.mirror]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise BaseImageError(f"`{' '.join(cmd)}` failed (exit code {done.returncode}):\n"
                                 f"{(done.stdout + done.stderr)[-3000:]}")
        # The package cache and lists are of no use in an image (the Dockerfile runs apt-get update first).
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        _import(podman, rootfs, base.tag)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"base image {base.tag}: made in {time.monotonic() - start:.0f} s")
    return base.tag


def _import(podman: Podman, rootfs: Path, tag: str) -> None:
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", "-", "."], stdout=subprocess.PIPE)
    try:
        done = subprocess.run([*podman.base(), "import", "--change", 'CMD ["/bin/bash"]', "-", tag],
                              stdin=tar.stdout, capture_output=True, text=True, timeout=1800)
    finally:
        tar.stdout.close()
        tar_rc = tar.wait()
    if tar_rc != 0 or done.returncode != 0:
        raise PodmanError(f"importing {rootfs} as {tag} failed (tar exit code {tar_rc}, podman import exit code "
                          f"{done.returncode}): {done.stderr.strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.image.debian_base", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", help="Debian codename (default: this machine's)")
    p.add_argument("--mirror", help="Debian archive URL (default: this machine's apt mirror)")
    p.add_argument("--refresh", action="store_true", help="make it again even when Podman holds it")
    args = p.parse_args(argv)
    try:
        host = host_release() if not (args.suite and args.mirror) else None
        base = DebianBase(suite=args.suite or host.suite, mirror=args.mirror or host.mirror)
        print(ensure_base(base, refresh=args.refresh, log=functools.partial(print, flush=True)))
    except (BaseImageError, PodmanError) as e:
        print(f"python -m infra.image.debian_base: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
