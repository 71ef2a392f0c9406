"""The evaluation settings (:class:`EvaluationSettings`, shared by ``dino-evaluate`` and ``dino-reevaluate``),
which metrics they produce (:func:`metric_family`) and the version-tag name of a score.

Prefect-free, like all of :mod:`tasks.validation`: the ``dino`` command builds and validates the settings before
Prefect starts; :mod:`tasks.evaluation` re-exports them for the flows."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .task_runners import check_task_runner


EVALUATIONS = ("knn", "linear_fast", "linear", "attention", "davis")
CLASSIFICATION = ("knn", "linear_fast", "linear")
VIDEO = ("attention", "davis")


class EvaluationSettings(BaseModel):
    """What to evaluate and how (shared by ``dino-evaluate`` and ``dino-reevaluate``). Defaults are the paper's."""

    model_config = ConfigDict(extra="forbid")

    evaluations: list[Literal["knn", "linear_fast", "linear", "attention", "davis"]] | None = Field(
        None, description="Evaluations to run; None = knn + linear_fast when train_data/val_data are given, "
                          "attention + davis when davis_root is given.")
    train_data: str | None = Field(None, description="Training shard set (k-NN memory bank / probe training), "
                                                     "local path or s3://.")
    val_data: str | None = Field(None, description="Validation shard set, local path or s3://.")
    features_root: str = Field("dino-features", description="Where Parquet features go (local or s3://): "
                               "<root>/<model>/v<version>/<set hash>/<feature kind>/<split>/part-*.parquet.")
    resize_size: int | None = Field(256, description="Short side before the centre crop (None: no resize).")
    crop_size: int | None = Field(224, description="Centre-crop side (also the full probe's random-resized-crop "
                                  "side); None keeps the resized image whole (images of one size only; not with "
                                  "the full linear probe).")
    batch_size: int = Field(64, description="Images per forward pass.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Inference precision (fp32 = reference).")
    fast_path_check: Literal["fallback", "strict", "off"] = Field(
        "fallback", description="With precision bf16: each extraction first compares bf16 with fp32 features on its "
                                "first batch (cosine similarity per sample); fallback = extract in fp32 when that "
                                "fails (recorded as tag fast_path.extract), strict = fail, off = no check.")
    feature_dtype: Literal["float32", "float16"] = Field(
        "float32", description="How the cached features are stored: float32, or float16 (half the bytes on disk "
                               "and in memory; k-NN and probe top-1 move by under 0.1 point, docs/benchmarks.md).")
    bf16_parity: bool = Field(True, description="With precision bf16 and k-NN: also run the k-NN on fp32 features "
                              "of a subset and record knn<k>_top1_bf16_minus_fp32 (see knn_bf16_parity).")
    bf16_parity_train_samples: int | None = Field(
        20000, description="Parity check: memory bank = the first N training samples in manifest order (shards "
                           "are written globally shuffled, so a class-uniform random subset); None = all. 20000 = "
                           "~20 per class on ImageNet-1k, the whole of Imagenette; ~1.6 % of an ImageNet extraction.")
    bf16_parity_val_samples: int | None = Field(
        2000, description="Parity check: the first N val samples (None = all). The same images are classified "
                          "in both precisions (a paired comparison), so 2000 resolves 0.05 points: one changed "
                          "prediction, 10x finer than the default tolerance.")
    bf16_parity_tolerance: float = Field(0.5, description="Parity check: |bf16 - fp32| k-NN top-1 (points) above "
                                                          "which a warning is logged.")
    nproc_per_node: int = Field(1, description="Feature-extraction processes (one per GPU): 1 = in the task's "
                                               "process; > 1 = torchrun -m dino_model.eval.extract.")
    task_runner: str = Field("threads", description="Where feature extraction runs: 'threads' (in the flow's "
                             "process, or torchrun with nproc_per_node > 1), or one task per sample range on "
                             "'processes' (this machine), 'dask' (a local Dask cluster) or 'tcp://HOST:PORT' (a "
                             "running Dask scheduler).")
    parallelism: int = Field(2, description="Worker processes of task_runner 'processes' / 'dask' (a tcp:// "
                                            "cluster has its own).")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu', 'cuda', 'cuda:1', ...")
    knn_ks: list[int] = Field([10, 20, 100, 200], description="k values of the weighted k-NN.")
    knn_temperature: float = Field(0.07, description="k-NN vote temperature T: weight exp(sim / T).")
    linear_n_last_blocks: int = Field(4, description="Probe features: [CLS] of the last n blocks (4 for ViT-S).")
    linear_avgpool: bool = Field(False, description="Probe features: append averaged patch tokens (ViT-B).")
    linear_epochs: int = Field(100, description="Epochs of the full linear probe.")
    linear_fast_epochs: int = Field(100, description="Epochs of the fast probe on cached features.")
    linear_batch_size: int = Field(256, description="Probe batch size (lr = base_lr x batch / 256).")
    linear_base_lr: float = Field(0.001, description="Probe base learning rate.")
    davis_root: str | None = Field(None, description="Local DAVIS-2017 folder (JPEGImages/, Annotations/, "
                                                     "ImageSets/).")
    davis_sequences: list[str] | None = Field(None, description="Sequences to use (default: ImageSets/2017/val.txt).")
    davis_max_frames: int | None = Field(None, description="Keep the first N frames per sequence (quick runs).")
    davis_short_side: int = Field(480, description="Label propagation: frames' short side (reference 480).")
    davis_multiple: int = Field(64, description="Label propagation: long side floored to a multiple of this.")
    davis_predictions_uri: str | None = Field(None, description="Where to write the propagated indexed PNGs.")
    attention_frame_step: int = Field(10, description="Attention maps: score every n-th annotated frame.")
    attention_max_frames: int | None = Field(None, description="Attention maps: first N frames per sequence.")
    attention_size: int = Field(480, description="Attention maps: short side of the frames fed to the model.")
    attention_threshold: float = Field(0.6, description="Attention mass kept by each head's mask (paper: 0.6).")
    experiment: str = Field("dino-evaluate", description="MLflow experiment of the evaluation runs.")
    classification_set_name: str | None = Field(
        None, description="Human name of the k-NN / linear-probe evaluation set, used in the version tags "
                          "eval.<name>.<metric> and the model card; default: the val shard set's name (its "
                          "manifest name, else its folder, e.g. imagenette-128-val).")
    video_set_name: str | None = Field(
        None, description="Human name of the attention / DAVIS evaluation set; default: the DAVIS folder's name.")
    report: bool = Field(True, description="Build the HTML evaluation report (retrieval, per-class accuracy, "
                                           "attention heads, DAVIS masks, feature map) and log it to the run.")
    champion_metric: str | None = Field(None, description="Metric deciding the 'champion' alias; None = knn20_top1 "
                                        "(or the first k), else the first of linear_approx_best_top1, "
                                        "linear_best_top1, davis_jf_mean, attn_jaccard_best_head that runs.")
    champion_policy: Literal["always", "if_better", "never"] = Field(
        "if_better", description="always: move champion to the evaluated version; if_better: only when it beats "
                                 "the champion's score on the same evaluation set; never: leave it.")
    higher_is_better: bool = Field(True, description="Direction of champion_metric.")

    @field_validator("task_runner")
    @classmethod
    def _task_runner(cls, v: str):
        return check_task_runner(v)

    @field_validator("batch_size", "linear_n_last_blocks", "nproc_per_node", "parallelism", "linear_epochs", "linear_fast_epochs",
                     "linear_batch_size", "davis_short_side", "davis_multiple", "attention_frame_step",
                     "attention_size")
    @classmethod
    def _positive(cls, v: int, info):
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("resize_size", "crop_size", "davis_max_frames", "attention_max_frames",
                     "bf16_parity_train_samples", "bf16_parity_val_samples")
    @classmethod
    def _positive_or_none(cls, v: int | None, info):
        if v is not None and v < 1:
            raise ValueError(f"{info.field_name} must be >= 1 or None, got {v}")
        return v

    @field_validator("knn_ks")
    @classmethod
    def _ks(cls, v: list[int]):
        if not v or any(k < 1 for k in v):
            raise ValueError(f"knn_ks must be a non-empty list of positive integers, got {v}")
        return sorted(set(v))

    @field_validator("classification_set_name", "video_set_name")
    @classmethod
    def _set_name(cls, v: str | None, info):
        if v is not None:
            problem = set_name_problem(v)
            if problem:
                raise ValueError(f"{info.field_name} {v!r}: {problem}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if not self.knn_temperature > 0 or not self.linear_base_lr > 0:
            raise ValueError("knn_temperature and linear_base_lr must be positive")
        if not self.bf16_parity_tolerance >= 0:
            raise ValueError(f"bf16_parity_tolerance must be >= 0, got {self.bf16_parity_tolerance}")
        if not 0 < self.attention_threshold <= 1:
            raise ValueError(f"attention_threshold must be in (0, 1], got {self.attention_threshold}")
        if self.nproc_per_node > 1 and self.task_runner != "threads":
            raise ValueError(f"nproc_per_node {self.nproc_per_node} and task_runner {self.task_runner} are two ways "
                             "to run the extraction in parallel: use torchrun processes (one per GPU of this "
                             "machine) or the task runner's workers, not both")
        if self.davis_max_frames is not None and self.davis_max_frames < 3:
            raise ValueError("davis_max_frames must be >= 3 (the first and last frames are not scored)")
        chosen = self.selected()
        if not chosen:
            raise ValueError("nothing to evaluate: give train_data and val_data (k-NN, linear probes) and/or "
                             "davis_root (attention maps, label propagation), or list evaluations")
        if any(e in CLASSIFICATION for e in chosen) and not (self.train_data and self.val_data):
            raise ValueError(f"evaluations {[e for e in chosen if e in CLASSIFICATION]} need train_data and val_data")
        if "linear" in chosen and self.crop_size is None:
            raise ValueError("crop_size none: the full linear probe trains on random-resized crops of crop_size "
                             "pixels; give a size (224), or evaluate knn/linear_fast only")
        if any(e in VIDEO for e in chosen) and not self.davis_root:
            raise ValueError(f"evaluations {[e for e in chosen if e in VIDEO]} need davis_root")
        if self.champion_metric is None:
            self.champion_metric = _default_champion_metric(self)
            # A derived default, not a choice: fields_set stays what the caller gave (a deployment run's partial
            # settings are merged onto the deployment's by the fields they set).
            self.__pydantic_fields_set__.discard("champion_metric")
        if self.champion_policy != "never" and metric_family(self.champion_metric, self) is None:
            raise ValueError(f"champion_metric {self.champion_metric!r} is not produced by the selected evaluations "
                             f"{chosen} (e.g. knn20_top1, linear_approx_best_top1, davis_jf_mean)")
        return self

    def selected(self) -> list[str]:
        """The evaluations that run, in a fixed order."""
        if self.evaluations is not None:
            return [e for e in EVALUATIONS if e in self.evaluations]
        out: list[str] = []
        if self.train_data and self.val_data:
            out += ["knn", "linear_fast"]
        if self.davis_root:
            out += ["attention", "davis"]
        return out

    def runs_bf16_parity(self) -> bool:
        """Whether the k-NN's bf16-vs-fp32 parity check runs."""
        return self.precision == "bf16" and self.bf16_parity and "knn" in self.selected()


def _default_champion_metric(settings: EvaluationSettings) -> str:
    chosen = settings.selected()
    if "knn" in chosen:
        return f"knn{20 if 20 in settings.knn_ks else settings.knn_ks[0]}_top1"
    for evaluation, metric in (("linear_fast", "linear_approx_best_top1"), ("linear", "linear_best_top1"),
                               ("davis", "davis_jf_mean"), ("attention", "attn_jaccard_best_head")):
        if evaluation in chosen:
            return metric
    raise ValueError("nothing to evaluate")


def metric_family(metric: str, settings: EvaluationSettings) -> str | None:
    """``"classification"`` or ``"video"`` for a metric that the selected evaluations produce, else None."""
    chosen = settings.selected()
    m = re.fullmatch(r"knn(\d+)_top[15]", metric)
    if m and "knn" in chosen and int(m.group(1)) in settings.knn_ks:
        return "classification"
    m = re.fullmatch(r"knn(\d+)_top1_bf16_minus_fp32", metric)
    if m and settings.runs_bf16_parity() and int(m.group(1)) in settings.knn_ks:
        return "classification"
    if metric in {f"linear_approx_{s}" for s in ("best_top1", "final_top1", "final_top5")} and "linear_fast" in chosen:
        return "classification"
    if metric in {f"linear_{s}" for s in ("best_top1", "final_top1", "final_top5")} and "linear" in chosen:
        return "classification"
    if metric.startswith("attn_jaccard_") and "attention" in chosen:
        return "video"
    if metric.startswith("davis_") and "davis" in chosen:
        return "video"
    return None


#: An evaluation set's hash: the first 12 hex digits of a sha256 (see ``preflight.evaluation_set_hashes``).
SET_HASH = re.compile(r"[0-9a-f]{12}")
_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def set_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an evaluation set in tag keys (``eval.<name>.<metric>``), or None."""
    if not _SET_NAME.fullmatch(name):
        return "use 1-64 letters, digits, '-' or '_', starting with a letter or digit (no dots: tag keys split on them)"
    if SET_HASH.fullmatch(name):
        return "12 hex digits read as an evaluation-set hash; choose a name"
    return None


def version_tag(set_name: str, metric: str) -> str:
    """The model-version tag holding ``metric`` measured on the evaluation set named ``set_name``. Versions
    evaluated before sets had names carry ``eval.<set hash>.<metric>`` instead (read by
    :func:`tasks.evaluation.recording.recorded_score`)."""
    return f"eval.{set_name}.{metric}"


def set_hash_tag(set_name: str) -> str:
    """The version tag holding the hash of the evaluation set named ``set_name``: a score under that name is
    comparable with another only when their hashes match."""
    return f"eval.{set_name}.set_hash"


def describe_validation_error(error: ValidationError) -> str:
    """A pydantic error on :class:`EvaluationSettings` as one line: ``field: message; ...``."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg'].removeprefix('Value error, ')}"
                     for err in error.errors())
