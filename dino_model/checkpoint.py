"""Training checkpoints: exact-resume state as tensors and plain types, written atomically to a folder or s3://.

Layout. A checkpoint URI (``checkpoint.uri``: a local folder or ``s3://bucket/prefix``) holds
``checkpoint-<step, 9 digits>.pt`` files, ``step`` being the number of optimiser updates done. The newest is found
by listing (no "latest" pointer that could disagree with the files). Writes go through
:mod:`dino_model.storage`, so a file is visible only once complete: a killed trainer leaves the previous
checkpoints intact and never a half-written one. ``keep_last`` prunes the oldest after each successful write.
What a kill during a write can leave behind (a local ``.tmp-checkpoint-*.pt.*`` file, an incomplete S3 multipart
upload of a ``checkpoint-*.pt`` key) is not a checkpoint; :func:`remove_stale_writes` removes it, and the trainer
calls it at start.

    state = make_checkpoint(TrainingState(model, optimizer, grad_scaler).parts(), step=120, cursor=(1, 20),
                            rng=gather_rng_states(dev), config=cfg.to_dict(), metrics={"loss": 9.1}, world_size=1)
    uri = save_checkpoint("s3://bucket/runs/r1", state, keep_last=3)
    restore_checkpoint(read_checkpoint(uri), parts, rank=ctx.rank, device=ctx.device)

This module owns the format, the atomic writes, retention and the RNG states; it knows nothing of DINO. What a
training saves are its *parts*: objects with ``state_dict()`` / ``load_state_dict()`` (as torchtitan's
checkpointer takes "stateful" objects), each stored under its name; a new piece of training state is saved by
adding it to the parts, without a change here. A part that is ``None`` (a grad scaler not in use) is stored as
``{}`` and not restored.

Each file is a ``torch.save`` of one dict that ``torch.load(weights_only=True)`` reads::

    format       "dino_model.checkpoint/v1"
    step         int    optimiser updates done (the next update uses schedule index ``step``)
    epoch        int    the epoch of the data cursor
    cursor       {"epoch": int, "batch": int}   next batch to read: the loader resumes with start_batch=batch
    <part>       the part's state_dict(); a training run's parts (dino_model.step.TrainingState.parts):
                 student      the student MultiCropWrapper (no DDP "module." prefix)
                 teacher      the teacher MultiCropWrapper
                 dino_loss    the loss (its ``center`` buffer)
                 optimizer    optimizer.state_dict()
                 grad_scaler  GradScaler.state_dict() ({} when no scaler is used)
    rng          list, one entry per rank: {"torch": uint8 tensor, "cuda": uint8 tensor | None,
                 "numpy": {"key": uint32 tensor, "pos": int, "has_gauss": int, "cached_gaussian": float},
                 "python": {"version": int, "state": list[int], "gauss_next": float | None}}
    world_size   int    ranks that wrote ``rng``
    config       DinoConfig.to_dict(): the resolved configuration of the run
    metrics      {name: float} of the last logged step
    torch_version str

Reference-implementation checkpoints (facebookresearch/dino ``checkpoint.pth``) load for evaluation with
:func:`dino_model.reference_checkpoint.load_reference_checkpoint`.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import random
import re
from typing import Any, Collection, Mapping, Protocol

import numpy as np
import torch

from dino_model import distributed as dist_utils
from dino_model.checkpoint_names import CHECKPOINT_NAME, checkpoint_name, latest_checkpoint, list_checkpoints
from dino_model.config import is_checkpoint_file
from dino_model.storage import LocalStore, ObjectNotFound, S3Store, open_object, open_store
from dino_model.storage.local import TEMP_PREFIX

__all__ = [
    "CHECKPOINT_FORMAT",
    "checkpoint_name",
    "list_checkpoints",
    "latest_checkpoint",
    "save_checkpoint",
    "read_checkpoint",
    "read_checkpoint_config",
    "config_source",
    "make_checkpoint",
    "resume_cursor",
    "restore_checkpoint",
    "gather_rng_states",
    "remove_stale_writes",
    "capture_rng_state",
    "restore_rng_state",
    "check_plain",
    "HEADER_KEYS",
    "Stateful",
]

_log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dino_model.checkpoint/v1"
#: The keys of a checkpoint that are not parts.
HEADER_KEYS = ("format", "step", "epoch", "cursor", "rng", "world_size", "config", "metrics", "torch_version")


class Stateful(Protocol):
    """A part of the training state: what ``nn.Module``, optimisers and ``GradScaler`` provide."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...
#: The temporary file :class:`dino_model.storage.LocalStore` writes a checkpoint into before renaming it.
_LOCAL_TEMP = re.compile(r"^" + re.escape(TEMP_PREFIX) + r"checkpoint-\d{9}\.pt\..+$")


def save_checkpoint(uri: str, state: Mapping[str, Any], keep_last: int = 0) -> str:
    """Write ``state`` (must hold ``step``) as ``<uri>/checkpoint-<step>.pt`` atomically; then delete all but the
    newest ``keep_last`` checkpoints (0 keeps all). Returns the full URI written.

    ``state`` is checked first (:func:`check_plain`) so a value ``weights_only`` loading would refuse fails here,
    at save time, rather than at resume time.
    """
    check_plain(state)
    store = open_store(uri)
    key = checkpoint_name(int(state["step"]))
    with store.open_write(key) as f:
        torch.save(dict(state), f)
    if keep_last > 0:
        older = list_checkpoints(uri)[:-keep_last]
        for _, old_uri in older:
            store.delete(old_uri.rsplit("/", 1)[1])
    return store.url(key)


def read_checkpoint(uri: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file (local path, ``file://`` or ``s3://``) with ``torch.load(weights_only=True)``."""
    store, key = open_object(os.fspath(uri))
    if isinstance(store, LocalStore):
        path = store.local_path(key)
        if not path.is_file():
            raise ObjectNotFound(f"checkpoint {uri} does not exist")
        return torch.load(path, map_location=map_location, weights_only=True)
    data = store.get_bytes(key)
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)


def read_checkpoint_config(uri: str | os.PathLike) -> dict[str, Any]:
    """The resolved config a checkpoint was written with, without reading its tensors: with
    ``map_location="meta"`` ``torch.load`` makes each tensor from the archive's metadata (dtype, shape) and skips
    its storage record, so only the zip's directory and ``data.pkl`` are read — of an ``s3://`` checkpoint by
    ranged GETs (a few hundred kB, whatever its size). ``weights_only`` still refuses anything but plain types."""
    store, key = open_object(os.fspath(uri))
    if isinstance(store, LocalStore):
        path = store.local_path(key)
        if not path.is_file():
            raise ObjectNotFound(f"checkpoint {uri} does not exist")
        return _config_without_tensor_bytes(path)
    if not isinstance(store, S3Store):
        raise TypeError(f"no checkpoint config reader for {type(store).__name__}")
    with store.open_ranged(key) as f:
        config = _config_without_tensor_bytes(f)
        _log.debug("config of %s read from %d of its %d bytes", uri, f.raw.fetched, f.raw.size)
        return config


def config_source(path: str | os.PathLike | None) -> str | os.PathLike | dict[str, Any] | None:
    """What :func:`dino_model.config.load_config` takes for a ``--config`` argument: the path of a YAML / JSON file
    as it is, or, for a training checkpoint, the resolved config saved in it (:func:`read_checkpoint_config`: its
    tensors are not read)."""
    if path is not None and is_checkpoint_file(path):
        return read_checkpoint_config(path)
    return path


def _config_without_tensor_bytes(f) -> dict[str, Any]:
    return dict(torch.load(f, map_location="meta", weights_only=True).get("config") or {})


def remove_stale_writes(uri: str) -> list[str]:
    """Remove what interrupted checkpoint writes left directly under ``uri`` — local temporary files
    ``.tmp-checkpoint-<step>.pt.*`` and incomplete S3 multipart uploads of ``checkpoint-<step>.pt`` keys — and
    nothing else; returns what was removed. Only for a time when no process writes checkpoints there (the
    trainer's rank 0 calls it at start, before its first write)."""
    store = open_store(uri)
    removed = []
    if isinstance(store, LocalStore):
        if store.root.is_dir():
            for path in sorted(store.root.iterdir()):
                if _LOCAL_TEMP.match(path.name) and path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(str(path))
    elif isinstance(store, S3Store):
        for key, upload_id in store.incomplete_uploads("checkpoint-"):
            if CHECKPOINT_NAME.match(key):
                store.abort_upload(key, upload_id)
                removed.append(f"{store.url(key)} (incomplete upload {upload_id})")
    return removed


# ------------------------------------------------------------------------------------------------------------------
# the training state: what a checkpoint holds, and putting it back
# ------------------------------------------------------------------------------------------------------------------


def make_checkpoint(
    parts: Mapping[str, Stateful | None],
    *,
    step: int,
    cursor: tuple[int, int],
    rng: list[dict[str, Any]],
    config: dict[str, Any],
    metrics: Mapping[str, float],
    world_size: int,
) -> dict[str, Any]:
    """The checkpoint dict of the layout in the module docstring: the header, and each part's ``state_dict()``
    under its name (``{}`` for a part that is None); ``cursor`` = (epoch, batch) of the next batch."""
    clash = sorted(set(parts) & set(HEADER_KEYS))
    if clash:
        raise ValueError(f"checkpoint part names {clash} are reserved for the checkpoint's header")
    epoch, batch = cursor
    return {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "epoch": epoch,
        "cursor": {"epoch": epoch, "batch": batch},
        **{name: part.state_dict() if part is not None else {} for name, part in parts.items()},
        "rng": rng,
        "world_size": world_size,
        "config": config,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "torch_version": str(torch.__version__),
    }


def resume_cursor(state: Mapping[str, Any] | None) -> tuple[int, int, int]:
    """(step, cursor epoch, cursor batch) of a checkpoint dict; (0, 0, 0) for ``None`` (a fresh run)."""
    if state is None:
        return 0, 0, 0
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a dino_model training checkpoint (format {state.get('format')!r})")
    return int(state["step"]), int(state["cursor"]["epoch"]), int(state["cursor"]["batch"])


def restore_checkpoint(
    state: Mapping[str, Any],
    parts: Mapping[str, Stateful | None],
    *,
    rank: int,
    device: torch.device,
    optional: Collection[str] = (),
) -> None:
    """Load a checkpoint dict into the live parts of this rank, and this rank's RNG state. A part the checkpoint
    does not hold is an error unless it is ``optional`` (state added after the checkpoint was written: it keeps
    its fresh value); a part that is None, or saved as ``{}``, is skipped."""
    resume_cursor(state)  # checks the format
    missing = sorted(name for name in parts if name not in state and name not in optional)
    if missing:
        raise ValueError(f"checkpoint holds no {', '.join(missing)} (it has {sorted(set(state) - set(HEADER_KEYS))})")
    for name, part in parts.items():
        saved = state.get(name)
        if part is None or not saved:
            if saved is None and part is not None:
                _log.info("checkpoint has no %s (written before it was saved): it starts fresh", name)
            continue
        part.load_state_dict(saved)
    restore_rng_state(state["rng"][rank], device)


def gather_rng_states(device: torch.device) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    mine = capture_rng_state(device)
    if not dist_utils.is_distributed():
        return [mine]
    states: list[Any] = [None] * dist_utils.get_world_size()
    torch.distributed.all_gather_object(states, mine)
    return states


# ------------------------------------------------------------------------------------------------------------------
# RNG state: plain dicts, because numpy's legacy state is a tuple with a string and python's holds a tuple of ints
# (both fine for pickle, but weights_only loading accepts only tensors and plain containers).
# ------------------------------------------------------------------------------------------------------------------


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's torch (CPU and current CUDA device), numpy-legacy and python RNG states as plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, py_state, gauss_next = random.getstate()
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device).clone()
    return {
        "torch": torch.get_rng_state().clone(),
        "cuda": cuda,
        "numpy": {
            "key": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": [int(x) for x in py_state], "gauss_next": gauss_next},
    }


def restore_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    npst = state["numpy"]
    np.random.set_state(
        ("MT19937", npst["key"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


# ------------------------------------------------------------------------------------------------------------------
# plain-type check
# ------------------------------------------------------------------------------------------------------------------

# Exact types: subclasses (torch.__version__ is a str subclass, IntEnum members are ints) pickle as their own
# class, which the weights_only unpickler refuses.
_PLAIN_EXACT = (str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def check_plain(obj: Any, path: str = "checkpoint") -> None:
    """Raise ``TypeError`` naming the first value ``torch.load(weights_only=True)`` would refuse."""
    if type(obj) in (dict, collections.OrderedDict):  # what state_dict() returns; both are allowed
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(f"{path}: key {k!r} of type {type(k).__name__} is not a str or int")
            check_plain(v, f"{path}.{k}")
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{path}[{i}]")
    elif type(obj) not in _PLAIN_EXACT and not isinstance(obj, torch.Tensor):
        raise TypeError(f"{path}: {type(obj).__module__}.{type(obj).__name__} is not a tensor or plain type")
