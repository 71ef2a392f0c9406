"""A ``dino-pretrain`` request checked without a side effect: the resolved training config (preset, config file,
overrides), the launch (processes, nodes, rendezvous), the resume policy, the checkpoint URI's syntax, and the data
(a shard set's manifest and shards, or an ImageFolder).

The resume policy is checked here too (``never`` / ``require`` list the checkpoint URI, a read). What needs the
worker or a write stays in the ``preflight`` task (:mod:`tasks.pretrain.preflight`): MLflow reachable, the
checkpoint URI writable (a probe write), what the launcher needs (GPUs present, kubectl).

The request is built once (:class:`PretrainRequest`) and resolved once (:func:`check_pretrain_request`): the config
is loaded once and the data's store opened once; the result (:class:`ResolvedTraining`) is what the flow's later
tasks take.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dino_model.checkpoint_names import list_checkpoints
from dino_model.config import ConfigError, DinoConfig, is_checkpoint_file, load_config
from dino_model.data.counting import count_images
from dino_model.data.manifest import MANIFEST_NAME
from dino_model.storage import LocalStore, StorageError, open_store
from tasks.pretrain.trainer_process import LaunchSpec

from .errors import PreflightError, problems_message
from .shard_sets import load_shard_set, shard_problems

RESUME_POLICIES = ("auto", "never", "require")


@dataclass(frozen=True)
class PretrainRequest:
    """What ``dino-pretrain`` is asked to train: the data, where checkpoints go, the config (preset, then the
    config file, then the overrides) and the resume policy. Built once from the flow's (or the command's)
    parameters and passed on."""

    data: str
    checkpoint_uri: str
    preset: str | None = "reference"
    config_file: str | None = None
    overrides: tuple[str, ...] = ()
    resume: str = "auto"
    #: A labelled validation shard set for the learning curve during training (``monitor.val_source``).
    val_data: str | None = None


@dataclass(frozen=True)
class ResolvedTraining:
    """A :class:`PretrainRequest` whose side-effect-free checks passed: the resolved config (``config``, the plain
    dict logged to MLflow and saved in every checkpoint; ``cfg``, the same as :class:`DinoConfig`) and what the data
    check learnt (``facts``: ``data_kind``, ``dataset_hash``, ``samples``, ``shards``)."""

    config: dict[str, Any]
    cfg: DinoConfig
    facts: dict[str, Any] = field(default_factory=dict)


def load_training_config(request: PretrainRequest) -> DinoConfig:
    """Preset, then the config file, then the overrides, then ``data`` and ``checkpoint_uri``: the resolved,
    validated training config. Raises :class:`PreflightError` naming the bad field (and the closest real one for
    an unknown field)."""
    overrides = list(request.overrides)
    overrides += [f"data.source={json.dumps(request.data)}", f"checkpoint.uri={json.dumps(request.checkpoint_uri)}"]
    if request.val_data:
        overrides.append(f"monitor.val_source={json.dumps(request.val_data)}")
    try:
        return load_config(_config_source(request.config_file), overrides=overrides, preset=request.preset or None,
                           dataset_size=lambda: count_images(request.data))
    except ConfigError as e:
        raise PreflightError(f"invalid training config: {_with_suggestion(str(e))}") from e


def resolve_training_config(
    data: str,
    checkpoint_uri: str,
    preset: str | None = "reference",
    config_file: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """:func:`load_training_config` as a plain dict (what is logged to MLflow and saved in every checkpoint)."""
    request = PretrainRequest(data, checkpoint_uri, preset, config_file, tuple(overrides or ()))
    return load_training_config(request).to_dict()


def _config_source(config_file: str | None) -> str | dict[str, Any] | None:
    """The config file as :func:`load_config` takes it: a training checkpoint's saved config is read here (its
    tensors are not: :func:`dino_model.checkpoint.read_checkpoint_config`; torch is imported only then)."""
    if config_file is None or not is_checkpoint_file(config_file):
        return config_file
    from dino_model.checkpoint import read_checkpoint_config

    try:
        return read_checkpoint_config(config_file)
    except (OSError, StorageError, RuntimeError, ValueError) as e:
        raise PreflightError(f"config_file {config_file!r}: cannot read the checkpoint's config "
                             f"({type(e).__name__}: {e})") from e


def _with_suggestion(message: str) -> str:
    """An "unknown field a.b" message with the closest real fields (a typo like optim.lrr is the usual cause)."""
    m = re.search(r"unknown (?:field|section) ([\w.]+)", message)
    if not m:
        return message
    fields = [f"{section}.{name}" for section, values in DinoConfig().to_dict().items() if isinstance(values, dict)
              for name in values]
    close = difflib.get_close_matches(m.group(1), fields, n=3, cutoff=0.6)
    if close:
        options = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
        return f"{message} (did you mean {options}?)"
    return f"{message} (every field is listed, with its meaning, in dino_model/config.py)"


def pretrain_problems(cfg: DinoConfig, launch: LaunchSpec, resume: str, facts: dict[str, Any]) -> list[str]:
    """Every problem of a pretraining request with the resolved config ``cfg`` found without a side effect, each
    naming its field; ``facts`` receives what the data check learnt (``data_kind``, ``dataset_hash``,
    ``samples``, ``shards``)."""
    problems = []
    try:
        launch.validate()
    except ValueError as e:
        problems.append(f"launch: {e}")
    if resume not in RESUME_POLICIES:
        problems.append(f"resume must be one of {', '.join(RESUME_POLICIES)}, got {resume!r}")
    try:
        open_store(cfg.checkpoint.uri)
    except ValueError as e:
        problems.append(f"checkpoint: {e}")
    else:
        problems += resume_problems(cfg.checkpoint.uri, resume)
    return problems + data_problems(cfg, launch, facts) + learning_curve_problems(cfg)


def learning_curve_problems(cfg: DinoConfig) -> list[str]:
    """With ``monitor.val_source`` (``--val``), the learning curve needs two labelled shard sets with the same
    classes: the validation set and the memory (``monitor.train_source``, default the training data)."""
    if not cfg.monitor.val_source:
        return []
    memory = cfg.monitor.train_source or cfg.data.source
    field = "monitor.train_source" if cfg.monitor.train_source else "data (the learning curve's memory)"
    sets = {}
    for name, uri in ((field, memory), ("val (monitor.val_source)", cfg.monitor.val_source)):
        try:
            sets[name] = load_shard_set(open_store(uri), uri)
        except (ValueError, StorageError) as e:
            return [f"{name}: the learning curve needs a labelled shard set: {e}"]
        if not sets[name].manifest.classes:
            return [f"{name}: {uri} is unlabelled; the learning curve needs class labels"]
    train_classes, val = set(sets[field].manifest.classes), sets["val (monitor.val_source)"]
    missing = sorted(set(val.manifest.classes) - train_classes)
    if missing:
        return [f"val (monitor.val_source): {len(missing)} of its classes are not in {memory} (e.g. "
                f"{', '.join(missing[:3])}): the k-NN can only score classes its memory holds"]
    return []


def resume_problems(uri: str, resume: str) -> list[str]:
    """``never`` refuses a checkpoint URI that holds checkpoints, ``require`` one that holds none (a listing;
    ``auto`` takes either and lists nothing)."""
    if resume not in ("never", "require"):
        return []
    try:
        existing = list_checkpoints(uri)
    except (StorageError, ValueError) as e:
        return [f"checkpoint: {uri} cannot be listed: {e}"]
    if resume == "never" and existing:
        return [f"checkpoint: --resume never but {uri} already holds {len(existing)} checkpoint(s) (the newest: "
                f"{existing[-1][1]}); give a new checkpoint URI, or --resume auto to continue from it"]
    if resume == "require" and not existing:
        return [f"checkpoint: --resume require but {uri} holds no checkpoint; check the URI, or --resume auto to "
                "start a new training there"]
    return []


def data_problems(cfg: DinoConfig, launch: LaunchSpec, facts: dict[str, Any]) -> list[str]:
    """``data.source`` is a shard set (manifest readable, every shard present at its size, enough shards for the
    readers) or an ImageFolder; fills ``facts``."""
    source = cfg.data.source
    if not source:
        return ["data: no data source given"]
    try:
        store = open_store(source)
        has_manifest = store.exists(MANIFEST_NAME)
    except ValueError as e:
        return [f"data: {e}"]
    except StorageError as e:
        return [f"data: {source} is not readable: {e}"]
    if not has_manifest:
        if isinstance(store, LocalStore):
            root = Path(store.root)
            if not root.exists():
                return [f"data: {source} does not exist: give a shard set written by `dino shard` (a folder or "
                        f"s3:// prefix with {MANIFEST_NAME}) or an ImageFolder (root/<class>/*.jpg)"]
            if root.is_dir() and any(p.is_dir() for p in root.iterdir()):
                facts["data_kind"] = "imagefolder"
                return []
        return [f"data: {source} holds neither {MANIFEST_NAME} (a shard set) nor class folders (an ImageFolder)"]
    try:
        shards = load_shard_set(store, source)
    except (ValueError, StorageError) as e:
        return [f"data: {e}"]
    problems = [f"data: {p}" for p in shard_problems(shards)]
    readers = launch.nproc_per_node * launch.nnodes * max(1, cfg.data.num_workers)
    if len(shards.manifest.shards) < readers and not cfg.data.resampled:
        problems.append(
            f"data: {len(shards.manifest.shards)} shards cannot feed {readers} readers (ranks x data.num_workers); "
            "write smaller shards or lower data.num_workers"
        )
    facts.update(data_kind="shards", dataset_hash=shards.manifest.digest(), samples=shards.num_samples,
                 shards=len(shards.manifest.shards))
    return problems


def check_pretrain_request(request: PretrainRequest, launch: LaunchSpec | None = None) -> ResolvedTraining:
    """``request`` resolved, once every side-effect-free check passed (config, ``launch``, resume policy, the
    data's manifest and shards); raises :class:`PreflightError` listing each problem otherwise."""
    cfg = load_training_config(request)
    facts: dict[str, Any] = {}
    problems = pretrain_problems(cfg, launch or LaunchSpec(), request.resume, facts)
    if problems:
        raise PreflightError(problems_message("pre-flight failed", problems))
    return ResolvedTraining(cfg.to_dict(), cfg, facts)
