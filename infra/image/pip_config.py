"""This machine's pip configuration, handed to ``podman build`` as read-only bind mounts.

The image's ``pip install`` steps must find packages exactly where this machine's pip does (its index, extra
indexes on local disk, ``find-links`` folders, the constraints file, the CA bundle) without any of it entering the
image: a build argument or an ``ENV`` is recorded in the image's history, a ``COPY`` in a layer. So:

1. ``pip config list`` gives the effective configuration (every config file pip reads, then the ``PIP_*``
   variables, which win over the files as they do in pip);
2. every local path it names (a plain path or a ``file://`` URL) is bind-mounted read-only under
   ``/run/host-pip/root`` with its host layout kept, and the values are rewritten to point there; an index given
   as a ``file://`` URL brings its parent folder (a PEP 503 repository keeps the files its pages link to,
   ``../../files/...``, beside ``simple/``);
3. one merged ``pip.conf`` is written to a private (0700) temporary folder, mounted at ``/run/host-pip``; the
   Dockerfile's pip steps read it with ``PIP_CONFIG_FILE=/run/host-pip/pip.conf`` (only that path is in the
   history). Without the mount (``docker build``, a plain ``podman build``) pip ignores the missing file and uses
   its defaults (PyPI).

    with host_pip_mounts() as mounts:            # ["-v", "/tmp/x:/run/host-pip:ro", "-v", "/opt/pypi:...", ...]
        subprocess.run(["podman", "build", *mounts, ...])

The only trace left in the image is the empty mount-point folder ``/run/host-pip``.
"""

from __future__ import annotations

import ast
import configparser
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

#: Where the merged configuration is mounted in the build; the Dockerfile names this path.
MOUNT_POINT = "/run/host-pip"
CONFIG_FILE = f"{MOUNT_POINT}/pip.conf"
_ROOT = f"{MOUNT_POINT}/root"

#: Options that point at this machine's own state or change where pip installs: never carried into the build.
_HOST_ONLY = {"config-file", "cache-dir", "log", "log-file", "target", "prefix", "root", "src", "user", "build-dir",
              "require-virtualenv", "break-system-packages"}
#: Options whose ``file://`` values are package indexes (their parent folder is mounted, see the module docstring).
_INDEX_KEYS = {"index-url", "extra-index-url"}


class PipConfigError(RuntimeError):
    """pip's configuration could not be read; the message says why."""


@dataclass
class PipBuildConfig:
    """The merged configuration (``section -> key -> value``, paths already rewritten) and the mounts it needs."""

    sections: dict[str, dict[str, str]] = field(default_factory=dict)
    mounts: dict[str, str] = field(default_factory=dict)
    """host path -> path in the build."""

    def text(self) -> str:
        parser = configparser.RawConfigParser()
        for section, values in self.sections.items():
            parser[section] = values
        out = io.StringIO()
        parser.write(out)
        return out.getvalue()


def effective_pip_config(python: str = sys.executable, env: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """``section -> key -> value`` as pip sees it on this machine (``pip config list``), ``PIP_*`` variables folded
    into ``[global]`` and removed from the other sections, as pip lets them win."""
    done = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, env=env,
                          timeout=120)
    if done.returncode != 0:
        raise PipConfigError(f"`{python} -m pip config list` failed: {(done.stderr or done.stdout).strip()[-1000:]}")
    sections: dict[str, dict[str, str]] = {}
    from_env: dict[str, str] = {}
    for line in done.stdout.splitlines():
        name, sep, raw = line.partition("=")
        section, dot, key = name.rpartition(".")
        if not sep or not dot:
            continue
        value = str(ast.literal_eval(raw))
        if section == ":env:":
            from_env[key] = value
        else:
            sections.setdefault(section, {})[key] = value  # pip lists files in load order: later ones win
    for key, value in from_env.items():
        for values in sections.values():
            values.pop(key, None)
        sections.setdefault("global", {})[key] = value
    return {s: {k: v for k, v in vals.items() if k not in _HOST_ONLY} for s, vals in sections.items() if vals}


def for_build(sections: dict[str, dict[str, str]]) -> PipBuildConfig:
    """The configuration with every local path moved under ``/run/host-pip/root`` and the mounts that needs."""
    out = PipBuildConfig()
    for section, values in sections.items():
        out.sections[section] = {key: " ".join(_rewrite(token, key, out.mounts) for token in value.split())
                                 for key, value in values.items()}
    # A path inside another mounted path needs no mount of its own (and nested mounts would shadow each other).
    for host in sorted(out.mounts):
        if any(host != other and Path(host).is_relative_to(other) for other in out.mounts):
            del out.mounts[host]
    return out


def _rewrite(token: str, key: str, mounts: dict[str, str]) -> str:
    url = urlparse(token)
    if url.scheme == "file":
        path = Path(unquote(url.path))
        if not path.exists():
            return token
        mounted = path.parent if key in _INDEX_KEYS or path.is_file() else path
        mounts[str(mounted)] = _ROOT + str(mounted)
        return "file://" + _ROOT + str(path) + ("/" if token.endswith("/") else "")
    if token.startswith("/") and Path(token).exists():
        mounts[token.rstrip("/") or "/"] = _ROOT + token.rstrip("/")
        return _ROOT + token
    return token


@contextlib.contextmanager
def host_pip_mounts(python: str = sys.executable, env: dict[str, str] | None = None) -> Iterator[list[str]]:
    """``podman build`` arguments (``-v SRC:DST:ro`` ...) that give the build this machine's pip configuration;
    the merged file lives in a private temporary folder, removed on exit."""
    config = for_build(effective_pip_config(python, env))
    folder = Path(tempfile.mkdtemp(prefix="dino-pip-"))  # mode 0700: the config may hold index credentials
    try:
        conf = folder / "pip.conf"
        conf.write_text(config.text())
        conf.chmod(0o600)
        args = ["-v", f"{folder}:{MOUNT_POINT}:ro"]
        for host, inside in sorted(config.mounts.items()):
            # The mount point must exist inside the (read-only) folder mounted at /run/host-pip.
            target = folder / Path(inside).relative_to(MOUNT_POINT)
            if Path(host).is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            args += ["-v", f"{host}:{inside}:ro"]
        yield args
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def describe(python: str = sys.executable, env: dict[str, str] | None = None) -> str:
    """What the build will see, for people: the mounted folders and the option names (values left out: they may
    hold credentials)."""
    config = for_build(effective_pip_config(python, env))
    keys = sorted(f"{s}.{k}" for s, vals in config.sections.items() for k in vals)
    mounts = ", ".join(sorted(config.mounts)) or "none"
    return f"pip options {', '.join(keys) or 'none'}; read-only mounts: {mounts}"


if __name__ == "__main__":  # python -m infra.image.pip_config: what a build would get
    print(describe(env=dict(os.environ)))
