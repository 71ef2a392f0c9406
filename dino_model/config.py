"""The training configuration: typed sections (pydantic models), validated, with presets, files and overrides.

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
:class:`ConfigError` with a message naming the dotted field (``optim.lr must be > 0, got -1``), whether it comes
from a file, an override or a section built in code (``CropsConfig(n_local=-1)``). This module imports neither
torch nor anything heavy, so a command can check a configuration in a fraction of a second.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Callable, ClassVar, Iterable, Literal, Sequence

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

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
    "HealthConfig",
    "MonitorConfig",
    "DinoConfig",
    "PRESETS",
    "SMALL_DATA_BUCKETS",
    "small_data_preset",
    "load_config",
    "is_checkpoint_file",
    "read_config_file",
    "apply_overrides",
    "parse_override",
]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the dotted field."""


# ------------------------------------------------------------------------------------------------------------------
# value types: pydantic converts (an integral float to int, "1e-3" to float, a list to a tuple); these add the
# rules it lacks (no true/false where a number is meant) and messages that say what is allowed
# ------------------------------------------------------------------------------------------------------------------


def _rule(ok: Callable[[Any], bool], message: str, when: Literal["before", "after"] = "after") -> Any:
    """A validator that refuses values for which ``ok`` is false, with ``message`` (completed by the field name
    and the value)."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise PydanticCustomError("rule", message)
        return value

    return AfterValidator(check) if when == "after" else BeforeValidator(check)


def _between(lo: float, hi: float, hi_open: bool = False) -> Any:
    return _rule(lambda v: lo <= v <= hi and not (hi_open and v == hi), f"must be in [{lo}, {hi}{')' if hi_open else ']'}")


def _list_of(n: int, what: str) -> Any:
    return _rule(lambda v: isinstance(v, (list, tuple)) and len(v) == n, f"must be {what}", when="before")


Int = Annotated[int, _rule(lambda v: not isinstance(v, bool), "must be an integer", when="before")]
PositiveInt = Annotated[Int, _rule(lambda v: v > 0, "must be an integer > 0")]
NonNegInt = Annotated[Int, _rule(lambda v: v >= 0, "must be an integer >= 0")]
Number = Annotated[float, _rule(lambda v: not isinstance(v, bool), "must be a number", when="before")]
PositiveNumber = Annotated[Number, Field(gt=0)]
NonNegNumber = Annotated[Number, Field(ge=0)]
Probability = Annotated[Number, _between(0.0, 1.0)]
Range = Annotated[tuple[Number, Number], _list_of(2, "a pair [low, high]")]
AreaRange = Annotated[Range, _rule(lambda v: 0 < v[0] <= v[1] <= 1, "must satisfy 0 < low <= high <= 1")]
PositiveRange = Annotated[Range, _rule(lambda v: 0 < v[0] <= v[1], "must satisfy 0 < low <= high")]
RGB = Annotated[tuple[Number, Number, Number], _list_of(3, "3 values (R, G, B)")]
Uri = Annotated[str, _rule(bool, "must be a non-empty path or s3:// URI")]

#: Messages for pydantic's own error types (``{gt}`` etc. come from the error's context).
_MESSAGES = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "literal_error": "must be {expected}",
    "model_type": "must be a section (mapping)",
}


def _describe(error: ValidationError, section: str, model: type[BaseModel]) -> str:
    """The first problem of a pydantic ``ValidationError`` as one line that names the dotted field."""
    e = error.errors(include_url=False)[0]
    kind, loc, ctx = e["type"], e["loc"], e.get("ctx") or {}
    if kind == "value_error":  # a rule across fields (DinoConfig._check_across_sections): a whole sentence
        return str(ctx["error"])
    field = section
    for part in loc:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    if kind == "extra_forbidden":
        for part in loc[:-1]:
            model = model.model_fields[part].annotation
        return f"unknown config field {field} (known: {', '.join(sorted(model.model_fields))})"
    text = _MESSAGES[kind].format(**ctx) if kind in _MESSAGES else e["msg"]
    return f"{field or 'config'} {text}, got {e['input']!r}"


class Section(BaseModel):
    """A config section: unknown fields refused, every problem a :class:`ConfigError` naming the field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)
    #: The section's name in dotted field names (``crops`` -> ``crops.n_local``); empty for the whole config.
    section: ClassVar[str] = ""

    def __init__(self, /, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise ConfigError(_describe(e, self.section, type(self))) from None


# ------------------------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------------------------


class ModelConfig(Section):
    """Backbone and projection head."""

    section: ClassVar[str] = "model"
    arch: Literal["vit_tiny", "vit_small", "vit_base", "resnet50"] = "vit_small"
    """Backbone: ``vit_tiny``, ``vit_small``, ``vit_base`` or ``resnet50``."""
    patch_size: PositiveInt = 16
    """ViT patch size in pixels (8 or 16 in the paper; ignored for ResNet-50)."""
    img_size: PositiveInt = 224
    """Input size the ViT position embeddings are learned at (other crop sizes are interpolated, as the reference
    does; keep 224 so exports match timm's ``*_224`` models)."""
    drop_path_rate: Annotated[Number, _between(0.0, 1.0, hi_open=True)] = 0.1
    """Stochastic-depth rate of the student (the teacher never drops paths)."""
    out_dim: PositiveInt = 65536
    """K, the number of prototypes: output dimension of the head's last layer."""
    norm_last_layer: bool = True
    """Freeze the weight-norm gain of the head's last layer at 1 (the reference suggests ``false`` for ViT-S)."""
    use_bn_in_head: bool = False
    """BatchNorm in the head's MLP (the reference uses it only with ResNet-50 runs that ask for it)."""
    head_hidden_dim: PositiveInt = 2048
    """Width of the head's hidden layers."""
    head_bottleneck_dim: PositiveInt = 256
    """Width of the head's bottleneck, L2-normalised before the last layer."""
    head_nlayers: PositiveInt = 3
    """Number of linear layers in the head's MLP (before the weight-normalised last layer)."""
    sync_bn: bool = False
    """Convert BatchNorm layers to SyncBatchNorm when distributed (the ResNet-50 recipe)."""


class CropsConfig(Section):
    """Multi-crop augmentation (:mod:`dino_model.data.augment`): 2 global crops and ``n_local`` local crops, each
    a random resized crop, then flip, colour jitter, greyscale, blur, solarisation and normalisation. The
    defaults are the paper's / the reference implementation's."""

    section: ClassVar[str] = "crops"
    global_size: PositiveInt = 224
    """Side in pixels of the 2 global crops (the teacher sees only these)."""
    local_size: PositiveInt = 96
    """Side in pixels of the local crops (student only)."""
    global_scale: AreaRange = (0.4, 1.0)
    """Area range (fraction of the image) of the global random-resized crops, sampled uniformly."""
    local_scale: AreaRange = (0.05, 0.4)
    """Area range (fraction of the image) of the local random-resized crops, sampled uniformly."""
    n_local: NonNegInt = 8
    """Number of local crops (0 disables them; 10 in the paper's best runs)."""
    ratio: PositiveRange = (3 / 4, 4 / 3)
    """Aspect-ratio range (width / height) of the crop box, sampled uniformly in log space."""
    flip_p: Probability = 0.5
    """Probability of a horizontal flip, per crop."""
    jitter_p: Probability = 0.8
    """Probability of applying colour jitter, per crop."""
    brightness: NonNegNumber = 0.4
    """Colour-jitter brightness strength: factor uniform in [max(0, 1 - b), 1 + b]; 0 disables."""
    contrast: NonNegNumber = 0.4
    """Colour-jitter contrast strength: factor uniform in [max(0, 1 - c), 1 + c]; 0 disables."""
    saturation: NonNegNumber = 0.2
    """Colour-jitter saturation strength: factor uniform in [max(0, 1 - s), 1 + s]; 0 disables."""
    hue: Annotated[Number, _between(0.0, 0.5)] = 0.1
    """Colour-jitter hue strength: shift uniform in [-h, h] of a full turn (at most 0.5); 0 disables."""
    grayscale_p: Probability = 0.2
    """Probability of converting a crop to greyscale (3 equal channels), per crop."""
    blur_p_global1: Probability = 1.0
    """Probability of Gaussian blur on the first global crop."""
    blur_p_global2: Probability = 0.1
    """Probability of Gaussian blur on the second global crop."""
    blur_p_local: Probability = 0.5
    """Probability of Gaussian blur on each local crop."""
    blur_sigma: PositiveRange = (0.1, 2.0)
    """Range of the blur's standard deviation in pixels, sampled uniformly; the kernel covers ±3σ."""
    solarize_p_global2: Probability = 0.2
    """Probability of solarisation on the second global crop (never on the others, as in the reference)."""
    solarize_threshold: Annotated[Int, _between(0, 256)] = 128
    """Pixels >= this value (on the 0–255 scale) are inverted, as PIL's ``ImageOps.solarize``."""
    mean: RGB = (0.485, 0.456, 0.406)
    """Per-channel mean subtracted after augmentation (images scaled to [0, 1]; ImageNet's)."""
    std: Annotated[RGB, _rule(lambda v: min(v) > 0, "must be positive")] = (0.229, 0.224, 0.225)
    """Per-channel standard deviation divided out after subtracting the mean (ImageNet's)."""

    @property
    def ncrops(self) -> int:
        """Total number of crops per image (2 global + locals)."""
        return 2 + self.n_local


class DataConfig(Section):
    """Where the images come from and how they are batched."""

    section: ClassVar[str] = "data"
    source: str = ""
    """Shard-set URI (a folder or ``s3://`` prefix holding ``manifest.json``) or an ImageFolder directory."""
    batch_size_per_gpu: PositiveInt = 64
    """Images per process per step; the global batch is this times the world size."""
    num_workers: NonNegInt = 10
    """Data-loader worker processes per rank (0 = load in the training process)."""
    shuffle_buffer: NonNegInt = 1000
    """Shuffle buffer size of the shard reader."""
    resampled: bool = False
    """Sample shards with replacement (infinite stream) instead of one pass per epoch."""
    epoch_length: PositiveInt | None = None
    """Batches per epoch when ``resampled`` (or to cap an epoch); ``null`` = one pass over the data."""
    pin_memory: bool = True
    """Pin host memory for faster host-to-GPU copies (ignored on CPU)."""
    augment_on: Literal["auto", "workers", "device"] = "auto"
    """Where images are decoded and augmented: ``workers`` (data-loader processes, per image, on the CPU),
    ``device`` (the workers only read bytes and draw each sample's random parameters; the training process decodes
    and augments whole batches on its device, see :mod:`dino_model.data.gpu_augment`) or ``auto`` (``device`` on
    CUDA, ``workers`` otherwise). Both draw the same parameters from (seed, epoch, sample key), so resume stays
    exact in either mode."""
    prefetch_batches: NonNegInt = 1
    """Batches made ready on the device ahead of the step, by a background thread on a side CUDA stream (decode +
    augmentation with ``augment_on=device``, the host-to-device copy otherwise), so that work overlaps the step
    (see :mod:`dino_model.data.device_prefetch`); 0 = prepare each batch inline. Results do not depend on it."""


class LossConfig(Section):
    """The DINO cross-entropy between centred, sharpened teacher outputs and student outputs."""

    section: ClassVar[str] = "loss"
    warmup_teacher_temp: PositiveNumber = 0.04
    """Teacher temperature at the start of the warm-up."""
    teacher_temp: PositiveNumber = 0.04
    """Teacher temperature after the warm-up (above 0.07 is unstable)."""
    warmup_teacher_temp_epochs: NonNegInt = 0
    """Epochs of linear teacher-temperature warm-up (30 in the reference's better recipe)."""
    student_temp: PositiveNumber = 0.1
    """Student temperature."""
    center_momentum: Annotated[Number, _between(0.0, 1.0)] = 0.9
    """EMA momentum of the centre applied to the teacher outputs."""


class OptimConfig(Section):
    """Optimiser, schedules, clipping and the EMA teacher."""

    section: ClassVar[str] = "optim"
    optimizer: Literal["adamw", "sgd", "lars"] = "adamw"
    """``adamw``, ``sgd`` or ``lars``."""
    lr: PositiveNumber = 5e-4
    """Peak learning rate for a global batch of 256; scaled linearly: peak = lr * global_batch / 256."""
    min_lr: NonNegNumber = 1e-6
    """Final learning rate of the cosine schedule."""
    warmup_epochs: NonNegInt = 10
    """Epochs of linear learning-rate warm-up from 0."""
    weight_decay: NonNegNumber = 0.04
    """Weight decay at the start of its cosine schedule (parameters with more than one dimension only)."""
    weight_decay_end: NonNegNumber = 0.4
    """Weight decay at the end of its cosine schedule (equal to ``weight_decay`` for a constant one)."""
    momentum_teacher: Annotated[Number, _between(0.0, 1.0)] = 0.996
    """Starting EMA momentum of the teacher; rises to 1 on a cosine schedule over all steps."""
    clip_grad: NonNegNumber = 3.0
    """Maximal gradient norm; 0 disables clipping."""
    clip_mode: Literal["per_param", "global"] = "per_param"
    """``per_param`` clips each parameter's gradient norm separately (the reference); ``global`` clips the total
    norm of all gradients. The last layer's gradients count in both even while frozen: they are dropped after
    clipping, as the reference does."""
    freeze_last_layer: NonNegInt = 1
    """Epochs during which the head's last layer gets no gradient (set to ``None`` after clipping)."""
    sgd_momentum: Annotated[Number, _between(0.0, 1.0, hi_open=True)] = 0.9
    """Momentum of SGD and LARS."""


class TrainConfig(Section):
    """Length of the run, determinism, device and precision."""

    section: ClassVar[str] = "train"
    epochs: PositiveInt = 100
    """Number of epochs; schedules span ``epochs * batches_per_epoch`` steps."""
    seed: NonNegInt = 0
    """Seed of model initialisation, sample order and augmentations (each rank offsets it by its rank)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto`` (bf16 autocast on GPUs that support it, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16`` (autocast +
    gradient scaler, unscaled before clipping: the reference's mode, kept for parity)."""
    max_steps: PositiveInt | None = None
    """Stop (with a checkpoint) once this many global steps are done, without changing the schedules: used to
    interrupt a run on purpose and for short trials. ``null`` = run all epochs."""
    compile: Annotated[Literal[True, False, "auto"],
                       _rule(lambda v: v in (True, False, "auto") and type(v) in (bool, str),
                             "must be true, false or 'auto'", when="before")] = "auto"
    """``torch.compile`` the student and teacher forwards and the loss (``true``/``false``; ``auto`` = on for CUDA,
    off on CPU, where compiling costs more than it saves on short runs); see :meth:`dino_model.meta_arch.DINO.compile`.
    On CUDA the AdamW update is the fused kernel whatever this says."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """``torch.compile`` mode when ``compile`` is on: ``default``; ``reduce-overhead`` (CUDA graphs: the compiled
    forwards, backwards and loss are replayed as graphs, which removes per-kernel launch overhead — worth it
    when the step is launch-bound, i.e. small models or batches); ``max-autotune`` (autotuned kernels + CUDA
    graphs, long compile); ``max-autotune-no-cudagraphs``. The speed of the modes with CUDA graphs is not
    measured yet (docs/benchmarks.md)."""
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    """``torch.compile`` backend: ``inductor`` (generated kernels: the fast path) or ``aot_eager`` (traces forward
    and backward as inductor does but runs PyTorch's own kernels: no speed-up; to tell an inductor problem from a
    tracing one when the fast-path check falls back, and for quick tests)."""
    fast_path_check: Literal["fallback", "strict", "off"] = "fallback"
    """Before training, the run proves its fast paths on its own first batch (:mod:`dino_model.fast_path`): the
    device data path against the CPU workers' crops, and the fast step (compiled, bf16 / fp16 autocast, fused AdamW)
    against the fp32 eager step from the same state. ``fallback``: a path that fails its check is replaced by the
    reference path (workers augment; the step runs eager, in bf16 autocast if that alone passes, else fp32), with a
    WARNING and the reason in the run's records; ``strict``: the run stops with exit code 4 instead (benchmarks);
    ``off``: no check. Every verdict is recorded (MLflow tags ``fast_path.data`` / ``fast_path.step``)."""
    health: Literal["warn", "stop", "off"] = "warn"
    """What the run does when the training-health monitor (:mod:`dino_model.health`, thresholds in ``health.*``)
    calls a window of steps after the warm-ups ``collapse:uniform``, ``collapse:one-hot`` or ``stalled``: ``warn``
    (default: one WARNING with the figures, the MLflow tag ``health`` and metric ``health.bad``, a line in the
    pretrain flow's progress artifact and a row in the model card; training goes on, because the thresholds are
    heuristics and a wrongly stopped run loses its GPU time too), ``stop`` (write a checkpoint, exit with code 5 and
    ``stop_reason=collapsed:<mode>``; the flow fails without retrying, since a retry would collapse again) or
    ``off`` (the verdicts are still logged)."""
    nonfinite_check_every: NonNegInt = 0
    """Check the loss for NaN/inf (and, across ranks, for a stop signal) every this many steps; 0 = every step on
    CPU and every ``logging.log_every`` steps on GPU, where each check is a host-device sync. Steps between checks
    are still watched on the device, so the failure names the first bad step; a check always precedes a
    checkpoint, so no checkpoint ever holds non-finite weights."""


class HealthConfig(Section):
    """Thresholds of the training-health monitor (:mod:`dino_model.health`; what it does: ``train.health``). The
    figures behind the defaults were measured on the tests' tiny runs (ViT-Tiny, K = 64, batches of 8 images, so
    16 targets per step whose information is at most ln 16): healthy runs keep target entropy 0.43-0.55·ln K,
    batch-target entropy >= 0.71·ln K (~20 prototypes), information 0.29-0.50 of its most, KL(teacher‖student)
    >= 0.17·ln K and feature spread >= 0.6; a uniform collapse (teacher temperature 1) reaches entropy 0.997·ln K
    and information 0.003 of its most; no centring (one-hot) falls below 2 prototypes with information 0.01-0.06;
    a teacher that is the student object gives information <= 0.08 and a feature spread of 0.13-0.3; a ViT-Tiny
    on 600 synthetic textures (K = 1,024, teacher 0.02, batch 64) whose k-NN fell from 56 % to 29 % sat at ~2-2.5
    prototypes and information 0.10-0.14."""

    section: ClassVar[str] = "health"
    window_steps: PositiveInt = 200
    """Steps per judged window; a window is judged on the means of its logged steps (``logging.log_every``)."""
    min_points: PositiveInt = 3
    """Logged steps a window needs at least before it is judged (it grows beyond ``window_steps`` until then)."""
    patience: PositiveInt = 2
    """Consecutive bad windows before a verdict is called (and ``train.health`` acts): one window can be a
    transient."""
    start_step: NonNegInt | None = None
    """First step judged; ``null`` = when the learning-rate and teacher-temperature warm-ups end (targets and
    updates change by design before)."""
    one_hot_prototypes: Annotated[Number, Field(ge=1)] = 3.0
    """``collapse:one-hot`` when the batch's mean target has an entropy <= ln(this): its targets fall on about
    this many prototypes or fewer (healthy tiny runs: ~20; ImageNet batches: hundreds)."""
    uniform_entropy: Annotated[Number, _between(0.5, 1.0)] = 0.95
    """``collapse:uniform`` when the mean target entropy is >= this · ln K (healthy: about 0.4-0.6 on the tests'
    runs; uniform collapse: 0.99+)."""
    min_information: Annotated[Number, _between(0.0, 1.0)] = 0.15
    """A collapse when the information the targets carry about the image (mutual information, the
    ``teacher_kl_to_center`` metric) is <= this fraction of the most they can carry, ln(min(K, 2 × batch per
    rank)): every image gets nearly the same target (healthy tiny runs: >= 0.29; every collapse measured:
    <= 0.14)."""
    min_feature_spread: NonNegNumber = 0.05
    """A collapse when the teacher's backbone features' spread (the ``teacher_feature_spread`` metric, ~1 when
    spread out) is <= this: every image gets nearly the same feature."""
    stalled_kl: NonNegNumber = 0.01
    """``stalled`` when KL(teacher‖student) is <= this · ln K (nothing left to learn) ..."""
    stalled_loss_change: NonNegNumber = 0.001
    """... and the mean loss changed by <= this fraction since the previous window."""


class MonitorConfig(Section):
    """The learning curve during training (:mod:`dino_model.train.knn_monitor`): on rank 0, every
    ``every_epochs`` epochs (and before the first step), the teacher backbone's weighted k-NN top-1 (the paper's
    protocol: k = 20, T = 0.07, cosine similarity) of a bounded labelled subset, logged as the metric
    ``monitor.knn<k>_top1`` (percent). The subsets' centre crops are decoded once and kept in memory as uint8
    (``(train_samples + val_samples) · 3 · crop_size²`` bytes: 0.9 GB for the defaults at 224 px)."""

    section: ClassVar[str] = "monitor"
    val_source: str = ""
    """A labelled shard set (``manifest.json``) to measure on, e.g. the validation split written by ``dino shard``;
    empty = no learning curve."""
    train_source: str = ""
    """The labelled shard set whose features are the k-NN's memory; empty = ``data.source`` (which must then be a
    labelled shard set)."""
    every_epochs: PositiveInt | None = None
    """Measure after every this many epochs (and after the last one); ``null`` = often enough for a curve and
    rarely enough to cost about 2 % of the training time: every ``ceil((train_samples + val_samples) /
    (0.2 · images per epoch))`` epochs (a monitored image costs about 1/9 of a trained one: 2x224 + 8x96 crops
    with a backward pass against one 224 px forward pass, ``benchmarks/knn_monitor_cost.py``). ImageNet: every
    epoch (0.05 %); a 6,000-image set: every 5 epochs."""
    train_samples: PositiveInt = 5000
    """Samples of the memory (the first ones in manifest order: ``dino shard`` mixes classes across shards)."""
    val_samples: PositiveInt = 1000
    """Samples measured (the first ones in manifest order)."""
    k: PositiveInt = 20
    """Neighbours voting (the paper's 20)."""
    temperature: PositiveNumber = 0.07
    """Temperature of the vote weights exp(similarity / T) (the paper's 0.07)."""
    crop_size: PositiveInt | None = None
    """Side of the centre crop the images are resized to (short side · 256 / 224, then cropped); ``null`` =
    ``crops.global_size``."""
    batch_size: PositiveInt = 128
    """Images per forward pass."""


class CheckpointConfig(Section):
    """Where and how often checkpoints are written."""

    section: ClassVar[str] = "checkpoint"
    uri: Uri = "checkpoints"
    """Folder or ``s3://`` prefix for checkpoints (and the final export unless ``export.uri`` is set). At start
    the trainer removes temporary objects an interrupted checkpoint write left there (and nothing else)."""
    every_n_steps: NonNegInt = 1000
    """Write a checkpoint every this many global steps (0 = only at epoch ends and at the end)."""
    every_n_epochs: PositiveInt = 1
    """Write a checkpoint at the end of every this many epochs (the last epoch always gets one)."""
    keep_last: NonNegInt = 3
    """Number of step checkpoints to keep (older ones are deleted); 0 keeps all."""
    resume: bool = True
    """Resume from the latest checkpoint under ``uri`` when one exists."""


class LoggingConfig(Section):
    """Metrics and progress output (rank 0 only)."""

    section: ClassVar[str] = "logging"
    log_every: PositiveInt = 10
    """Log step metrics every this many steps (the first and last step are always logged)."""
    loggers: list[Annotated[str, _rule(bool, "must be a logger spec such as 'console' or 'jsonl:PATH'")]] = Field(
        default_factory=lambda: ["console"])
    """Metric loggers by spec, see :mod:`dino_model.metrics`: ``console``, ``jsonl:PATH``, or any registered one
    (the pretrain flow adds ``mlflow``)."""
    progress: bool = True
    """Print machine-readable ``DINO_PROGRESS {json}`` lines on stdout for a parent process."""
    mlflow_checkpoints: Literal["none", "last", "all"] = "none"
    """Copies of checkpoints as MLflow run artifacts (``mlflow`` logger): ``none`` — the run only records where they
    are (tag ``checkpoint``: the latest one under ``checkpoint.uri``), so storage is not doubled; ``last`` — also a
    copy of the checkpoint written when the run ends (its last step, ``train.max_steps`` or a stop signal);
    ``all`` — a copy of every checkpoint. The registered model's artifacts are the export either way."""


class ExportConfig(Section):
    """The final teacher-backbone export (safetensors + JSON config, loadable by timm)."""

    section: ClassVar[str] = "export"
    enabled: bool = True
    """Write the export when training finishes."""
    uri: str = ""
    """Folder or ``s3://`` prefix of the export; empty = ``<checkpoint.uri>/export``."""


class DinoConfig(Section):
    """The whole configuration of a DINO run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """Backbone and head."""
    crops: CropsConfig = Field(default_factory=CropsConfig)
    """Multi-crop augmentation."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Data source and batching."""
    loss: LossConfig = Field(default_factory=LossConfig)
    """DINO loss temperatures and centring."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimiser, schedules, clipping, teacher EMA."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Epochs, seed, device, precision."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint location and cadence."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Metrics loggers and progress lines."""
    export: ExportConfig = Field(default_factory=ExportConfig)
    """Final teacher export."""
    health: HealthConfig = Field(default_factory=HealthConfig)
    """Thresholds of the training-health monitor."""
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    """The learning curve (k-NN of the teacher during training)."""

    @model_validator(mode="after")
    def _check_across_sections(self) -> "DinoConfig":
        if self.model.img_size < self.model.patch_size:
            raise ValueError(f"model.img_size must be >= model.patch_size ({self.model.patch_size}), "
                             f"got {self.model.img_size}")
        if self.data.resampled and self.data.epoch_length is None:
            raise ValueError("data.epoch_length must be set when data.resampled is true (the stream is infinite)")
        # The schedules are arrays over all epochs: a warm-up longer than the run has no meaning.
        for name, value in (("optim.warmup_epochs", self.optim.warmup_epochs),
                            ("loss.warmup_teacher_temp_epochs", self.loss.warmup_teacher_temp_epochs)):
            if value > self.train.epochs:
                raise ValueError(f"{name} must be <= train.epochs ({self.train.epochs}), got {value}")
        return self

    def validate(self) -> "DinoConfig":
        """Check every field again (after fields were assigned in code); raises :class:`ConfigError` naming the
        field; returns ``self``."""
        type(self).from_dict(self.to_dict())
        return self

    @property
    def export_uri(self) -> str:
        """Where the final export goes: ``export.uri``, or ``<checkpoint.uri>/export`` when that is empty."""
        return self.export.uri or f"{self.checkpoint.uri.rstrip('/')}/export"

    def to_dict(self) -> dict[str, Any]:
        """Nested dict of plain types (str, int, float, bool, None, list, dict): tuples become lists."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: Any) -> "DinoConfig":
        """Build and validate a config from a nested dict (the inverse of :meth:`to_dict`); unknown keys and
        wrongly typed values raise :class:`ConfigError` naming the field."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a mapping, got {d!r}")
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise ConfigError(_describe(e, "", cls)) from None


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
    # Small data sets (about 5k-200k images of 64-128 px; docs/small-data.md gives each value's source). The
    # prototypes K, the teacher temperature and the teacher's EMA momentum follow LightlyTrain's size rule for DINO
    # (K: 1,024 below 20k images, 2,048 below 50k, 4,096 below 100k, 16,384 below 200k; temperature 0.02 at 20k
    # rising linearly to 0.07 at ImageNet's size; momentum 0.99 -> 0.996 likewise): a large K and a soft teacher
    # collapse to uniform on small sets (facebookresearch/dino #279, #43). Crops: 2 x 128 px + 6 x 64 px, lightly's
    # Imagenette benchmark. `--preset small-data` picks the bucket from the data set's size.
    **{name: {"model": {"out_dim": out_dim},
              "loss": {"teacher_temp": temp, "warmup_teacher_temp": temp, "warmup_teacher_temp_epochs": 0},
              "optim": {"momentum_teacher": momentum},
              "crops": {"global_size": 128, "local_size": 64, "n_local": 6}}
       for name, out_dim, temp, momentum in (("small-data-20k", 1024, 0.02, 0.99), ("small-data-50k", 2048, 0.02, 0.99),
                                             ("small-data-100k", 4096, 0.02, 0.99),
                                             ("small-data-200k", 16384, 0.03, 0.991))},
    # The reference's ResNet-50 recipe: SGD, constant weight decay 1e-4, tighter crops, SyncBatchNorm.
    "resnet50": {
        "model": {"arch": "resnet50", "sync_bn": True},
        "optim": {"optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4, "weight_decay_end": 1e-4},
        "crops": {"global_scale": [0.14, 1.0], "local_scale": [0.05, 0.14]},
    },
}


#: ``small-data`` resolves to the first bucket whose size bound the data set stays below (``--preset small-data``).
SMALL_DATA_BUCKETS = ((20_000, "small-data-20k"), (50_000, "small-data-50k"), (100_000, "small-data-100k"),
                      (200_000, "small-data-200k"))
SMALL_DATA = "small-data"


def small_data_preset(dataset_size: int) -> str:
    """The ``small-data-*`` preset for a data set of ``dataset_size`` images; from 200,000 images on, the paper's
    own recipe (``reference``) is the one to use."""
    for bound, name in SMALL_DATA_BUCKETS:
        if dataset_size < bound:
            return name
    return "reference"


def preset_names(preset: str | Sequence[str] | None,
                 dataset_size: int | Callable[[], int] | None = None) -> list[str]:
    """``"boost,small"`` / ``["boost", "small"]`` / ``None`` -> a list of known preset names. ``small-data`` is
    resolved by ``dataset_size`` (images in the training data, or a function that counts them)."""
    if preset is None or preset == "":
        return []
    names = [n.strip() for n in preset.split(",")] if isinstance(preset, str) else list(preset)
    for i, n in enumerate(names):
        if n == SMALL_DATA:
            if dataset_size is None:
                raise ConfigError(f"preset {SMALL_DATA} is chosen by the data set's size, which is not known here: "
                                  f"name a bucket instead ({', '.join(b for _, b in SMALL_DATA_BUCKETS)})")
            names[i] = small_data_preset(dataset_size() if callable(dataset_size) else dataset_size)
        elif n not in PRESETS:
            raise ConfigError(f"preset must be one of {sorted([*PRESETS, SMALL_DATA])}, got {n!r}")
    return names


# ------------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------------


def load_config(
    source: str | os.PathLike | dict[str, Any] | None = None,
    overrides: Iterable[str] = (),
    preset: str | Sequence[str] | None = None,
    dataset_size: int | Callable[[], int] | None = None,
) -> DinoConfig:
    """Reference defaults, then the presets (from ``preset`` and the file's ``preset:`` key), then the file, then
    the ``key.sub=value`` overrides; validated. ``source``: a YAML or JSON file, or a config dict already read
    (for a training checkpoint: ``dino_model.checkpoint.read_checkpoint_config(path)``, see
    :func:`is_checkpoint_file`). ``dataset_size``: what resolves the ``small-data`` preset (an int, or a function
    called only then)."""
    file_dict: dict[str, Any] = {}
    if isinstance(source, dict):
        file_dict = json.loads(json.dumps(source))  # a copy: the preset key is popped below
    elif source is not None:
        file_dict = read_config_file(source)
    names = preset_names(file_dict.pop("preset", None), dataset_size) + preset_names(preset, dataset_size)
    merged: dict[str, Any] = DinoConfig().to_dict()
    for n in names:
        merged = _deep_merge(merged, PRESETS[n], "")
    merged = _deep_merge(merged, file_dict, "")
    merged = apply_overrides(merged, overrides)
    return DinoConfig.from_dict(merged)


#: Extensions of training checkpoints (``torch.save`` archives), whose saved config can serve as a config file.
CHECKPOINT_EXTENSIONS = (".pt", ".pth")


def is_checkpoint_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a training checkpoint rather than a YAML / JSON file: its config is read with
    ``dino_model.checkpoint.read_checkpoint_config`` (torch; this module imports none) and passed to
    :func:`load_config` as a dict."""
    return os.path.splitext(os.fspath(path))[1].lower() in CHECKPOINT_EXTENSIONS


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or JSON (``.json``) config file as a dict. A training checkpoint is refused
    here: its config is read by ``dino_model.checkpoint.read_checkpoint_config`` (:func:`is_checkpoint_file`)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if is_checkpoint_file(path):
        raise ConfigError(f"config file {path!r} is a training checkpoint: read its config with "
                          "dino_model.checkpoint.read_checkpoint_config and pass the dict to load_config")
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
