"""Fault injection for the fast-path tests: make a fast path wrong on purpose, to see the check catch it.

Tests only. Set ``DINO_FAST_PATH_FAULT`` to a comma-separated list of faults, each optionally restricted to one
rank with ``@RANK`` (``data@0``)::

    data         the device data path's resize is off by 8 uint8 levels (a perturbed device op)
    compile      the compiler backend raises (at the first compiled call, as a real compiler failure does)
    numerics     the compiled student's output is scaled by 1.5 (a kernel returning wrong values)
    first-steps  the run's own compile raises while the check's passes (a failure during the first steps)
    extract      the bf16 features are shifted by 0.5 (the extraction's bf16 path returning wrong features)

The variable travels to torchrun's children, so multi-process runs see it too. A process that finds it set logs a
WARNING once.
"""

from __future__ import annotations

import logging
import os

__all__ = ["FAULT_ENV", "FAULTS", "injected", "failing_backend"]

FAULT_ENV = "DINO_FAST_PATH_FAULT"
FAULTS = ("data", "compile", "numerics", "first-steps", "extract")

log = logging.getLogger("dino_model.fast_path")
_warned: set[str] = set()


def injected(fault: str) -> bool:
    """Whether ``fault`` is injected in this process (``DINO_FAST_PATH_FAULT``; ``RANK`` picks ``@rank`` ones)."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; known: {FAULTS}")
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return False
    rank = os.environ.get("RANK", "0")
    for item in (s.strip() for s in spec.split(",")):
        name, _, only_rank = item.partition("@")
        if name not in FAULTS:
            raise ValueError(f"{FAULT_ENV}: unknown fault {name!r}; known: {FAULTS}")
        if name == fault and (not only_rank or only_rank == rank):
            if spec not in _warned:
                _warned.add(spec)
                log.warning("%s=%s: faults are injected into the fast paths (tests only)", FAULT_ENV, spec)
            return True
    return False


def failing_backend(gm, example_inputs):  # noqa: ANN001 - torch.compile's backend signature
    """A ``torch.compile`` backend that fails, as a broken compiler would (dynamo reports it at the first call)."""
    raise RuntimeError(f"injected fault ({FAULT_ENV}): the compiler backend failed")
