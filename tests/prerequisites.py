"""A test's missing prerequisite (a Debian package, a binary, root): a failure in CI, a skip elsewhere.

CI (``CI=true``, set by ``.ci/run``'s caller) installs every prerequisite, so one that is missing there is a broken
CI machine, never a reason to pass quietly; on a developer's machine the test skips and says how to install it.

    require_binaries(["podman", "runc"], "apt-get install podman runc")
"""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str, hint: str) -> None:
    """Fail (CI) or skip (elsewhere) the current test: ``what`` is missing, ``hint`` says how to get it."""
    message = f"{what} (install: {hint})"
    if in_ci():
        pytest.fail(f"prerequisite missing in CI: {message}; .ci/run should have installed it", pytrace=False)
    pytest.skip(message)


def require_binaries(names: list[str], hint: str) -> None:
    absent = [n for n in names if shutil.which(n) is None]
    if absent:
        missing(f"{', '.join(absent)} not found on PATH", hint)


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        missing(f"not running as root, needed for {why}", "run the tests as root, as CI does")
