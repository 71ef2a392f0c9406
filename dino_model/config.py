"""The training configuration: typed dataclasses, validated, with presets, files and command-line overrides.

A run's configuration is built in three layers, each overriding the one before:

1. a **preset** (``reference`` by default; ``boost``, ``multicrop10``, ``small`` and ``resnet50`` change a few
   fields on top of it; several can be chained: ``--preset boost,small``),
2. a **YAML or JSON file** holding a nested dict of sections (``model:``, ``crops:``, ``optim:`` ...); the file may
   name its own presets under a top-level ``preset:`` key,
3. **overrides** ``key.sub=value`` from the command line (``optim.lr=1e-3 data.batch_size_per_gpu=32``); values are
   parsed as YAML scalars (``1e-3``, ``true``, ``[0.4, 1.0]``, ``null``) and converted to the field's type.

    >>> cfg = load_config("run.yaml", overrides=["optim.epochs=10"], preset="small")
    >>> cfg.to_dict()          # plain types only: saved in every checkpoint and logged as MLflow params
    >>> DinoConfig.from_dict(d) # the exact inverse (validates)

Defaults are the reference implementation's (``main_dino.py`` of facebookresearch/dino). Every bad value raises
:class:`ConfigError` with a message naming the dotted field (``optim.lr must be > 0, got -1``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "CropsConfig",
    "DataConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "ExportConfig",
    "DinoConfig",
    "PRESETS",
    "load_config",
    "apply_overrides",
    "parse_override",
]

VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base")
ARCHS = VIT_ARCHS + ("resnet50",)
OPTIMIZERS = ("adamw", "sgd", "lars")
CLIP_MODES = ("per_param", "global")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
AUGMENT_ON = ("auto", "workers", "device")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the dotted field."""


# ------------------------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Backbone and projection head."""

    arch: str = "vit_small"
    """Backbone: ``vit_tiny``, ``vit_small``, ``vit_base`` or ``resnet50``."""
    patch_size: int = 16
    """ViT patch size in pixels (8 or 16 in the paper; ignored for ResNet-50)."""
    img_size: int = 224
    """Input size the ViT position embeddings are learned at (other crop sizes are interpolated, as the reference
    does; keep 224 so exports match timm's ``*_224`` models)."""
    drop_path_rate: float = 0.1
    """Stochastic-depth rate of the student (the teacher never drops paths)."""
    out_dim: int = 65536
    """K, the number of prototypes: output dimension of the head's last layer."""
    norm_last_layer: bool = True
    """Freeze the weight-norm gain of the head's last layer at 1 (the reference suggests ``false`` for ViT-S)."""
    use_bn_in_head: bool = False
    """BatchNorm in the head's MLP (the reference uses it only with ResNet-50 runs that ask for it)."""
    head_hidden_dim: int = 2048
    """Width of the head's hidden layers."""
    head_bottleneck_dim: int = 256
    """Width of the head's bottleneck, L2-normalised before the last layer."""
    head_nlayers: int = 3
    """Number of linear layers in the head's MLP (before the weight-normalised last layer)."""
    sync_bn: bool = False
    """Convert BatchNorm layers to SyncBatchNorm when distributed (the ResNet-50 recipe)."""

    def _validate(self, p: str) -> None:
        _choice(p, "arch", self.arch, ARCHS)
        _positive_int(p, "patch_size", self.patch_size)
        _positive_int(p, "img_size", self.img_size)
        if self.img_size < self.patch_size:
            raise ConfigError(f"{p}img_size must be >= {p}patch_size ({self.patch_size}), got {self.img_size}")
        _in_range(p, "drop_path_rate", self.drop_path_rate, 0.0, 1.0, hi_open=True)
        _positive_int(p, "out_dim", self.out_dim)
        _positive_int(p, "head_hidden_dim", self.head_hidden_dim)
        _positive_int(p, "head_bottleneck_dim", self.head_bottleneck_dim)
        _positive_int(p, "head_nlayers", self.head_nlayers)


@dataclass
class CropsConfig:
    """Multi-crop augmentation: 2 global crops and ``n_local`` local crops."""

    global_size: int = 224
    """Side of the 2 global crops in pixels."""
    local_size: int = 96
    """Side of the local crops in pixels."""
    global_scale: tuple[float, float] = (0.4, 1.0)
    """Area range (fraction of the image) of the global random-resized crops."""
    local_scale: tuple[float, float] = (0.05, 0.4)
    """Area range (fraction of the image) of the local random-resized crops."""
    n_local: int = 8
    """Number of local crops (0 disables them; 10 in the paper's best runs)."""

    def _validate(self, p: str) -> None:
        _positive_int(p, "global_size", self.global_size)
        _positive_int(p, "local_size", self.local_size)
        _scale_pair(p, "global_scale", self.global_scale)
        _scale_pair(p, "local_scale", self.local_scale)
        if not isinstance(self.n_local, int) or self.n_local < 0:
            raise ConfigError(f"{p}n_local must be an integer >= 0, got {self.n_local!r}")

    @property
    def ncrops(self) -> int:
        """Total number of crops per image (2 global + locals)."""
        return 2 + self.n_local


@dataclass
class DataConfig:
    """Where the images come from and how they are batched."""

    source: str = ""
    """Shard-set URI (a folder or ``s3://`` prefix holding ``manifest.json``) or an ImageFolder directory."""
    batch_size_per_gpu: int = 64
    """Images per process per step; the global batch is this times the world size."""
    num_workers: int = 10
    """Data-loader worker processes per rank (0 = load in the training process)."""
    shuffle_buffer: int = 1000
    """Shuffle buffer size of the shard reader."""
    resampled: bool = False
    """Sample shards with replacement (infinite stream) instead of one pass per epoch."""
    epoch_length: int | None = None
    """Batches per epoch when ``resampled`` (or to cap an epoch); ``null`` = one pass over the data."""
    pin_memory: bool = True
    """Pin host memory for faster host-to-GPU copies (ignored on CPU)."""
    augment_on: str = "auto"
    """Where images are decoded and augmented: ``workers`` (data-loader processes, per image, on the CPU),
    ``device`` (the workers only read bytes and draw each sample's random parameters; the training process decodes
    and augments whole batches on its device, see :mod:`dino_model.data.gpu_augment`) or ``auto`` (``device`` on
    CUDA, ``workers`` otherwise). Both draw the same parameters from (seed, epoch, sample key), so resume stays
    exact in either mode."""
    prefetch_batches: int = 1
    """Batches made ready on the device ahead of the step, by a background thread on a side CUDA stream (decode +
    augmentation with ``augment_on=device``, the host-to-device copy otherwise), so that work overlaps the step
    (see :mod:`dino_model.data.device_prefetch`); 0 = prepare each batch inline. Results do not depend on it."""

    def _validate(self, p: str) -> None:
        if not isinstance(self.source, str):
            raise ConfigError(f"{p}source must be a string URI or path, got {self.source!r}")
        _positive_int(p, "batch_size_per_gpu", self.batch_size_per_gpu)
        _nonneg_int(p, "num_workers", self.num_workers)
        _nonneg_int(p, "shuffle_buffer", self.shuffle_buffer)
        if self.epoch_length is not None:
            _positive_int(p, "epoch_length", self.epoch_length)
        if self.resampled and self.epoch_length is None:
            raise ConfigError(f"{p}epoch_length must be set when {p}resampled is true (the stream is infinite)")
        _choice(p, "augment_on", self.augment_on, AUGMENT_ON)
        _nonneg_int(p, "prefetch_batches", self.prefetch_batches)


@dataclass
class LossConfig:
    """The DINO cross-entropy between centred, sharpened teacher outputs and student outputs."""

    warmup_teacher_temp: float = 0.04
    """Teacher temperature at the start of the warm-up."""
    teacher_temp: float = 0.04
    """Teacher temperature after the warm-up (above 0.07 is unstable)."""
    warmup_teacher_temp_epochs: int = 0
    """Epochs of linear teacher-temperature warm-up (30 in the reference's better recipe)."""
    student_temp: float = 0.1
    """Student temperature."""
    center_momentum: float = 0.9
    """EMA momentum of the centre applied to the teacher outputs."""

    def _validate(self, p: str) -> None:
        _positive(p, "warmup_teacher_temp", self.warmup_teacher_temp)
        _positive(p, "teacher_temp", self.teacher_temp)
        _nonneg_int(p, "warmup_teacher_temp_epochs", self.warmup_teacher_temp_epochs)
        _positive(p, "student_temp", self.student_temp)
        _in_range(p, "center_momentum", self.center_momentum, 0.0, 1.0)


@dataclass
class OptimConfig:
    """Optimiser, schedules, clipping and the EMA teacher."""

    optimizer: str = "adamw"
    """``adamw``, ``sgd`` or ``lars``."""
    lr: float = 5e-4
    """Peak learning rate for a global batch of 256; scaled linearly: peak = lr * global_batch / 256."""
    min_lr: float = 1e-6
    """Final learning rate of the cosine schedule."""
    warmup_epochs: int = 10
    """Epochs of linear learning-rate warm-up from 0."""
    weight_decay: float = 0.04
    """Weight decay at the start of its cosine schedule (parameters with more than one dimension only)."""
    weight_decay_end: float = 0.4
    """Weight decay at the end of its cosine schedule (equal to ``weight_decay`` for a constant one)."""
    momentum_teacher: float = 0.996
    """Starting EMA momentum of the teacher; rises to 1 on a cosine schedule over all steps."""
    clip_grad: float = 3.0
    """Maximal gradient norm; 0 disables clipping."""
    clip_mode: str = "per_param"
    """``per_param`` clips each parameter's gradient norm separately (the reference); ``global`` clips the total
    norm of all gradients. The last layer's gradients count in both even while frozen: they are dropped after
    clipping, as the reference does."""
    freeze_last_layer: int = 1
    """Epochs during which the head's last layer gets no gradient (set to ``None`` after clipping)."""
    sgd_momentum: float = 0.9
    """Momentum of SGD and LARS."""

    def _validate(self, p: str) -> None:
        _choice(p, "optimizer", self.optimizer, OPTIMIZERS)
        _positive(p, "lr", self.lr)
        _nonneg(p, "min_lr", self.min_lr)
        _nonneg_int(p, "warmup_epochs", self.warmup_epochs)
        _nonneg(p, "weight_decay", self.weight_decay)
        _nonneg(p, "weight_decay_end", self.weight_decay_end)
        _in_range(p, "momentum_teacher", self.momentum_teacher, 0.0, 1.0)
        _nonneg(p, "clip_grad", self.clip_grad)
        _choice(p, "clip_mode", self.clip_mode, CLIP_MODES)
        _nonneg_int(p, "freeze_last_layer", self.freeze_last_layer)
        _in_range(p, "sgd_momentum", self.sgd_momentum, 0.0, 1.0, hi_open=True)


@dataclass
class TrainConfig:
    """Length of the run, determinism, device and precision."""

    epochs: int = 100
    """Number of epochs; schedules span ``epochs * batches_per_epoch`` steps."""
    seed: int = 0
    """Seed of model initialisation, sample order and augmentations (each rank offsets it by its rank)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    precision: str = "auto"
    """``auto`` (bf16 autocast on GPUs that support it, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16`` (autocast +
    gradient scaler, unscaled before clipping: the reference's mode, kept for parity)."""
    max_steps: int | None = None
    """Stop (with a checkpoint) once this many global steps are done, without changing the schedules: used to
    interrupt a run on purpose and for short trials. ``null`` = run all epochs."""
    compile: bool | str = "auto"
    """``torch.compile`` the student and teacher forwards and the loss (``true``/``false``; ``auto`` = on for CUDA,
    off on CPU, where compiling costs more than it saves on short runs). With it on CUDA the AdamW update is the
    fused kernel too (see :mod:`dino_model.fast_step`)."""
    compile_mode: str = "default"
    """``torch.compile`` mode when ``compile`` is on: ``default``; ``reduce-overhead`` (CUDA graphs: the compiled
    forwards, backwards and loss are replayed as graphs, which removes per-kernel launch overhead — worth it
    when the step is launch-bound, i.e. small models or batches); ``max-autotune`` (autotuned kernels + CUDA
    graphs, long compile); ``max-autotune-no-cudagraphs``. The modes with CUDA graphs are optional and have not
    been measured on a GPU yet (docs/benchmarks.md)."""
    nonfinite_check_every: int = 0
    """Check the loss for NaN/inf (and, across ranks, for a stop signal) every this many steps; 0 = every step on
    CPU and every ``logging.log_every`` steps on GPU, where each check is a host-device sync. Steps between checks
    are still watched on the device, so the failure names the first bad step; a check always precedes a
    checkpoint, so no checkpoint ever holds non-finite weights."""

    def _validate(self, p: str) -> None:
        _positive_int(p, "epochs", self.epochs)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"{p}seed must be an integer >= 0, got {self.seed!r}")
        _choice(p, "device", self.device, DEVICES)
        _choice(p, "precision", self.precision, PRECISIONS)
        if self.max_steps is not None:
            _positive_int(p, "max_steps", self.max_steps)
        _nonneg_int(p, "nonfinite_check_every", self.nonfinite_check_every)
        _choice(p, "compile_mode", self.compile_mode, COMPILE_MODES)
        if self.compile not in (True, False, "auto") or isinstance(self.compile, int) and not isinstance(
                self.compile, bool):
            raise ConfigError(f"{p}compile must be true, false or 'auto', got {self.compile!r}")


@dataclass
class CheckpointConfig:
    """Where and how often checkpoints are written."""

    uri: str = "checkpoints"
    """Folder or ``s3://`` prefix for checkpoints (and the final export unless ``export.uri`` is set)."""
    every_n_steps: int = 1000
    """Write a checkpoint every this many global steps (0 = only at epoch ends and at the end)."""
    every_n_epochs: int = 1
    """Write a checkpoint at the end of every this many epochs (the last epoch always gets one)."""
    keep_last: int = 3
    """Number of step checkpoints to keep (older ones are deleted); 0 keeps all."""
    resume: bool = True
    """Resume from the latest checkpoint under ``uri`` when one exists."""

    def _validate(self, p: str) -> None:
        if not isinstance(self.uri, str) or not self.uri:
            raise ConfigError(f"{p}uri must be a non-empty path or s3:// URI, got {self.uri!r}")
        _nonneg_int(p, "every_n_steps", self.every_n_steps)
        _positive_int(p, "every_n_epochs", self.every_n_epochs)
        _nonneg_int(p, "keep_last", self.keep_last)


@dataclass
class LoggingConfig:
    """Metrics and progress output (rank 0 only)."""

    log_every: int = 10
    """Log step metrics every this many steps (the first and last step are always logged)."""
    loggers: list[str] = field(default_factory=lambda: ["console"])
    """Metric loggers by spec, see :mod:`dino_model.metrics`: ``console``, ``jsonl:PATH``, or any registered one
    (the pretrain flow adds ``mlflow``)."""
    progress: bool = True
    """Print machine-readable ``DINO_PROGRESS {json}`` lines on stdout for a parent process."""

    def _validate(self, p: str) -> None:
        _positive_int(p, "log_every", self.log_every)
        if not isinstance(self.loggers, list) or not all(isinstance(s, str) and s for s in self.loggers):
            raise ConfigError(f"{p}loggers must be a list of logger specs (strings), got {self.loggers!r}")


@dataclass
class ExportConfig:
    """The final teacher-backbone export (safetensors + JSON config, loadable by timm)."""

    enabled: bool = True
    """Write the export when training finishes."""
    uri: str = ""
    """Folder or ``s3://`` prefix of the export; empty = ``<checkpoint.uri>/export``."""

    def _validate(self, p: str) -> None:
        if not isinstance(self.uri, str):
            raise ConfigError(f"{p}uri must be a string, got {self.uri!r}")


@dataclass
class DinoConfig:
    """The whole configuration of a DINO run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone and head."""
    crops: CropsConfig = field(default_factory=CropsConfig)
    """Multi-crop augmentation."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data source and batching."""
    loss: LossConfig = field(default_factory=LossConfig)
    """DINO loss temperatures and centring."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser, schedules, clipping, teacher EMA."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Epochs, seed, device, precision."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint location and cadence."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics loggers and progress lines."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Final teacher export."""

    def validate(self) -> "DinoConfig":
        """Check every field (raises :class:`ConfigError` naming the field); returns ``self``."""
        for f in dataclasses.fields(self):
            getattr(self, f.name)._validate(f"{f.name}.")
        # The schedules are arrays over all epochs: a warm-up longer than the run has no meaning.
        if self.optim.warmup_epochs > self.train.epochs:
            raise ConfigError(
                f"optim.warmup_epochs must be <= train.epochs ({self.train.epochs}), got {self.optim.warmup_epochs}"
            )
        if self.loss.warmup_teacher_temp_epochs > self.train.epochs:
            raise ConfigError(
                "loss.warmup_teacher_temp_epochs must be <= train.epochs "
                f"({self.train.epochs}), got {self.loss.warmup_teacher_temp_epochs}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Nested dict of plain types (str, int, float, bool, None, list, dict): tuples become lists."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DinoConfig":
        """Build and validate a config from a nested dict (the inverse of :meth:`to_dict`); unknown keys and
        wrongly typed values raise :class:`ConfigError` naming the field."""
        return _build(cls, d, "").validate()


# ------------------------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------------------------

#: Named changes on top of the reference defaults; applied in order when several are chained.
PRESETS: dict[str, dict[str, Any]] = {
    # The reference implementation's defaults (main_dino.py): nothing to change.
    "reference": {},
    # The reference README's better ViT-S recipe.
    "boost": {
        "train": {"epochs": 300},
        "loss": {"teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30},
        "model": {"norm_last_layer": False},
    },
    # The paper's best multi-crop setting.
    "multicrop10": {
        "crops": {"n_local": 10, "global_scale": [0.25, 1.0], "local_scale": [0.05, 0.25]},
    },
    # Small images (e.g. 128 px imagenette): 128 px global and 64 px local crops.
    "small": {
        "crops": {"global_size": 128, "local_size": 64},
    },
    # The reference's ResNet-50 recipe: SGD, constant weight decay 1e-4, tighter crops, SyncBatchNorm.
    "resnet50": {
        "model": {"arch": "resnet50", "sync_bn": True},
        "optim": {"optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4, "weight_decay_end": 1e-4},
        "crops": {"global_scale": [0.14, 1.0], "local_scale": [0.05, 0.14]},
    },
}


def preset_names(preset: str | Sequence[str] | None) -> list[str]:
    """``"boost,small"`` / ``["boost", "small"]`` / ``None`` -> a list of known preset names."""
    if preset is None or preset == "":
        return []
    names = [n.strip() for n in preset.split(",")] if isinstance(preset, str) else list(preset)
    for n in names:
        if n not in PRESETS:
            raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {n!r}")
    return names


# ------------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    preset: str | Sequence[str] | None = None,
) -> DinoConfig:
    """Reference defaults, then the presets (from ``preset`` and the file's ``preset:`` key), then the file, then
    the ``key.sub=value`` overrides; validated."""
    file_dict: dict[str, Any] = {}
    if path is not None:
        file_dict = read_config_file(path)
    names = preset_names(file_dict.pop("preset", None)) + preset_names(preset)
    merged: dict[str, Any] = DinoConfig().to_dict()
    for n in names:
        merged = _deep_merge(merged, PRESETS[n], "")
    merged = _deep_merge(merged, file_dict, "")
    merged = apply_overrides(merged, overrides)
    return DinoConfig.from_dict(merged)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or JSON (``.json``) config file as a dict; the config dict stored in a training
    checkpoint is accepted too (``.pt``/``.pth``)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pt", ".pth"):
        from .checkpoint import read_checkpoint  # a checkpoint's resolved config

        return read_checkpoint(path)["config"]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read: {e.strerror or e}") from e
    try:
        data = json.loads(text) if ext == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {path!r} is not valid {'JSON' if ext == '.json' else 'YAML'}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> ``(["optim", "lr"], 0.001)``; the value is parsed as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override must look like section.field=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
    return key.split("."), value


def apply_overrides(d: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a nested config dict (a copy is returned). Unknown keys are refused
    here when the section exists in ``d`` so a typo fails loudly."""
    out = json.loads(json.dumps(d))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a config section")
            node = nxt
        if parts[-1] not in node:
            raise ConfigError(f"override {text!r}: unknown field {'.'.join(parts)}")
        node[parts[-1]] = value
    return out


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], update: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if k not in base:
            raise ConfigError(f"unknown config field {prefix}{k}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{prefix}{k} must be a section (mapping), got {v!r}")
            out[k] = _deep_merge(base[k], v, f"{prefix}{k}.")
        else:
            out[k] = v
    return out


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _build(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config field {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name in names:
        if name in d:
            kwargs[name] = _coerce(hints[name], d[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, name: str) -> Any:
    """Convert ``v`` to the annotated type ``tp`` (int from an integral float, tuple from a list...) or raise."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, name + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner[:-1]:  # e.g. ``bool | str``: the first type that accepts the value
            try:
                return _coerce(a, v, name)
            except ConfigError:
                pass
        return _coerce(inner[-1], v, name)
    if origin is tuple:
        if not isinstance(v, (list, tuple)) or len(v) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} values, got {v!r}")
        return tuple(_coerce(a, x, f"{name}[{i}]") for i, (a, x) in enumerate(zip(args, v)))
    if origin is list:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {v!r}")
        return [_coerce(args[0], x, f"{name}[{i}]") for i, x in enumerate(v)]
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise ConfigError(f"{name} must be true or false, got {v!r}")
    if tp is int:
        if isinstance(v, bool):
            raise ConfigError(f"{name} must be an integer, got {v!r}")
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        raise ConfigError(f"{name} must be an integer, got {v!r}")
    if tp is float:
        if isinstance(v, bool):
            raise ConfigError(f"{name} must be a number, got {v!r}")
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(v)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {v!r}")
    if tp is str:
        if isinstance(v, str):
            return v
        raise ConfigError(f"{name} must be a string, got {v!r}")
    return v


def _field(p: str, name: str) -> str:
    return f"{p}{name}"


def _choice(p: str, name: str, v: Any, choices: Sequence[str]) -> None:
    if v not in choices:
        raise ConfigError(f"{_field(p, name)} must be one of {list(choices)}, got {v!r}")


def _positive_int(p: str, name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{_field(p, name)} must be an integer > 0, got {v!r}")


def _nonneg_int(p: str, name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"{_field(p, name)} must be an integer >= 0, got {v!r}")


def _finite(p: str, name: str, v: Any) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ConfigError(f"{_field(p, name)} must be a finite number, got {v!r}")


def _positive(p: str, name: str, v: Any) -> None:
    _finite(p, name, v)
    if v <= 0:
        raise ConfigError(f"{_field(p, name)} must be > 0, got {v!r}")


def _nonneg(p: str, name: str, v: Any) -> None:
    _finite(p, name, v)
    if v < 0:
        raise ConfigError(f"{_field(p, name)} must be >= 0, got {v!r}")


def _in_range(p: str, name: str, v: Any, lo: float, hi: float, hi_open: bool = False) -> None:
    _finite(p, name, v)
    if v < lo or v > hi or (hi_open and v == hi):
        raise ConfigError(f"{_field(p, name)} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}")


def _scale_pair(p: str, name: str, v: Any) -> None:
    if not isinstance(v, tuple) or len(v) != 2:
        raise ConfigError(f"{_field(p, name)} must be a pair [low, high], got {v!r}")
    lo, hi = v
    _finite(p, name, lo)
    _finite(p, name, hi)
    if not (0 < lo <= hi <= 1):
        raise ConfigError(f"{_field(p, name)} must satisfy 0 < low <= high <= 1, got {list(v)!r}")
