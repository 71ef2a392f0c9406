"""Prefect tasks of the ``dino-extract``, ``dino-evaluate`` and ``dino-reevaluate`` flows.

Each task does one thing with at most one side effect; clients (MLflow, boto3 through :mod:`dino_model.storage`)
are created inside the task; no task caches (every one reads state that changes). The computations themselves
live in :mod:`dino_model.eval`.

Where scores go (``H`` = the evaluation-set hash of the score's family, see :func:`evaluation_set_hashes`):

* the MLflow **model version**: tags ``eval.<H>.<metric>`` (e.g. ``eval.3f2a9c01b7de.knn20_top1``), plus
  ``eval.<H>.run_id`` (the evaluation run) and ``eval.<H>.set`` (what the set is);
* an MLflow **evaluation run** (experiment ``dino-evaluate`` by default): the same metrics, linked to the version's
  LoggedModel (``mlflow.log_metrics(..., model_id=...)``) so they also show on the logged model; attention
  overlays as PNG artifacts under ``attention/``;
* a Prefect **table artifact** ``dino-evaluate-<model>-v<version>``;
* the alias ``champion`` moves to the version when the champion policy says so (:func:`update_champion`).

Metric names: ``knn<k>_top1`` / ``knn<k>_top5``; ``linear_approx_best_top1`` / ``linear_approx_final_top1`` /
``linear_approx_final_top5`` (the fast probe on cached centre-crop features — an APPROXIMATION of the paper's
protocol); ``linear_best_top1`` / ``linear_final_top1`` / ``linear_final_top5`` (the full protocol);
``attn_jaccard_best_head`` / ``attn_jaccard_mean_heads`` / ``attn_jaccard_union_heads``; ``davis_jf_mean``,
``davis_j_mean``, ``davis_f_mean``, ``davis_j_recall``, ``davis_f_recall``, ``davis_j_decay``, ``davis_f_decay``
and ``davis_seq_<sequence>_jf``. Accuracies in percent, DAVIS and Jaccard scores in [0, 1].
With ``precision="bf16"`` the k-NN also gets its parity check against the fp32 reference
(:func:`knn_bf16_parity`): ``knn<k>_top1_bf16_minus_fp32`` (percentage points, on a bounded subset).

Feature extraction runs in the task's process by default; ``nproc_per_node > 1`` launches
``torchrun -m dino_model.eval.extract`` (one process per GPU, each over its own contiguous range of the samples,
see :mod:`dino_model.eval.extract`) and follows its output like the trainer's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .tracking import flatten, get_or_create_experiment

#: Tag on the evaluation run that ties it to the Prefect flow run (a retried flow reuses the run).
FLOW_RUN_TAG = "prefect.flow_run_id"
#: The alias moved to the best version.
CHAMPION_ALIAS = "champion"
EVALUATIONS = ("knn", "linear_fast", "linear", "attention", "davis")
CLASSIFICATION = ("knn", "linear_fast", "linear")
VIDEO = ("attention", "davis")
POLICIES = ("always", "if_better", "never")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[A-Za-z0-9_-]+))/?$")


class EvaluationInputError(ValueError):
    """The evaluation inputs are unusable (checked before any heavy work); the message lists every problem."""


class ModelVersionNotFound(ValueError):
    """The registered model, version or alias does not exist in the MLflow registry."""


def _logger():
    """The Prefect run logger inside a flow/task run, a plain logger when a task's ``.fn`` is called directly."""
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return logging.getLogger("tasks.evaluate")


# ------------------------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------------------------


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
    crop_size: int = Field(224, description="Centre-crop side (also the probe's random-resized-crop side).")
    batch_size: int = Field(64, description="Images per forward pass.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="Inference precision (fp32 = reference).")
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
    champion_metric: str | None = Field(None, description="Metric deciding the 'champion' alias; None = knn20_top1 "
                                        "(or the first k), else the first of linear_approx_best_top1, "
                                        "linear_best_top1, davis_jf_mean, attn_jaccard_best_head that runs.")
    champion_policy: Literal["always", "if_better", "never"] = Field(
        "if_better", description="always: move champion to the evaluated version; if_better: only when it beats "
                                 "the champion's score on the same evaluation set; never: leave it.")
    higher_is_better: bool = Field(True, description="Direction of champion_metric.")

    @field_validator("batch_size", "crop_size", "linear_n_last_blocks", "nproc_per_node", "linear_epochs", "linear_fast_epochs",
                     "linear_batch_size", "davis_short_side", "davis_multiple", "attention_frame_step",
                     "attention_size")
    @classmethod
    def _positive(cls, v: int, info):
        if v < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {v}")
        return v

    @field_validator("resize_size", "davis_max_frames", "attention_max_frames", "bf16_parity_train_samples",
                     "bf16_parity_val_samples")
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

    @model_validator(mode="after")
    def _consistent(self):
        if not self.knn_temperature > 0 or not self.linear_base_lr > 0:
            raise ValueError("knn_temperature and linear_base_lr must be positive")
        if not self.bf16_parity_tolerance >= 0:
            raise ValueError(f"bf16_parity_tolerance must be >= 0, got {self.bf16_parity_tolerance}")
        if not 0 < self.attention_threshold <= 1:
            raise ValueError(f"attention_threshold must be in (0, 1], got {self.attention_threshold}")
        if self.davis_max_frames is not None and self.davis_max_frames < 3:
            raise ValueError("davis_max_frames must be >= 3 (the first and last frames are not scored)")
        chosen = self.selected()
        if not chosen:
            raise ValueError("nothing to evaluate: give train_data and val_data (k-NN, linear probes) and/or "
                             "davis_root (attention maps, label propagation), or list evaluations")
        if any(e in CLASSIFICATION for e in chosen) and not (self.train_data and self.val_data):
            raise ValueError(f"evaluations {[e for e in chosen if e in CLASSIFICATION]} need train_data and val_data")
        if any(e in VIDEO for e in chosen) and not self.davis_root:
            raise ValueError(f"evaluations {[e for e in chosen if e in VIDEO]} need davis_root")
        if self.champion_metric is None:
            self.champion_metric = _default_champion_metric(self)
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


def version_tag(set_hash: str, metric: str) -> str:
    """The model-version tag holding ``metric`` measured on the evaluation set ``set_hash``."""
    return f"eval.{set_hash}.{metric}"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationInputError(f"device is {device!r} but this worker has no CUDA GPU")
    return device


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------------------------
# model registry
# ------------------------------------------------------------------------------------------------------------------


def parse_model_uri(model: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` -> (name, version, alias)."""
    m = _MODEL_URI.match(model or "")
    if not m:
        raise ModelVersionNotFound(f"model must be models:/<name>/<version> or models:/<name>@<alias>, got {model!r}")
    return m.group("name"), m.group("version"), m.group("alias")


def logged_model_id(mv) -> str | None:
    """The LoggedModel behind a model version: ``mv.model_id`` where the client fills it in, else the id in its
    ``models:/m-...`` source (MLflow 3.17's REST client leaves ``model_id`` empty)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    m = re.fullmatch(r"models:/(m-[0-9a-f]+)/?", mv.source or "")
    return m.group(1) if m else None


@task(name="resolve-model-version", cache_policy=NO_CACHE)
def resolve_model_version(model: str) -> dict[str, Any]:
    """Pin ``model`` (an alias or a version of a registered model) to one version, so an alias moving during the
    evaluation changes nothing. Raises :class:`ModelVersionNotFound` naming the model, version or alias."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, version, alias = parse_model_uri(model)
    client = MlflowClient()
    try:
        mv = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        what = f"version {version}" if version else f"alias {alias!r}"
        try:
            client.get_registered_model(name)
        except MlflowException:
            raise ModelVersionNotFound(f"registered model {name!r} does not exist (asked for {model})") from e
        raise ModelVersionNotFound(f"registered model {name!r} has no {what} (asked for {model})") from e
    info = {"name": name, "version": int(mv.version), "uri": f"models:/{name}/{mv.version}",
            "model_id": logged_model_id(mv), "run_id": mv.run_id, "tags": dict(mv.tags or {}),
            "aliases": list(getattr(mv, "aliases", []) or [])}
    _logger().info("evaluating %s (from %s)", info["uri"], model)
    return info


@task(name="find-versions-to-evaluate", cache_policy=NO_CACHE)
def find_versions_to_evaluate(registered_model: str, missing_tag: str | None = None,
                              versions: list[int] | None = None) -> list[int]:
    """Versions of ``registered_model`` (ascending) to evaluate: all of them (or those in ``versions``), keeping
    only those without the tag ``missing_tag`` when it is given."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        client.get_registered_model(registered_model)
    except MlflowException as e:
        raise ModelVersionNotFound(f"registered model {registered_model!r} does not exist") from e
    found = []
    for mv in client.search_model_versions(f"name = '{registered_model}'"):
        if versions and int(mv.version) not in versions:
            continue
        if missing_tag and missing_tag in (mv.tags or {}):
            continue
        found.append(int(mv.version))
    if versions:
        unknown = sorted(set(versions) - {int(mv.version) for mv in
                                         client.search_model_versions(f"name = '{registered_model}'")})
        if unknown:
            raise ModelVersionNotFound(f"registered model {registered_model!r} has no version(s) {unknown}")
    found.sort()
    _logger().info("%d version(s) of %s to evaluate%s: %s", len(found), registered_model,
                   f" (missing {missing_tag})" if missing_tag else "", found)
    return found


# ------------------------------------------------------------------------------------------------------------------
# pre-flight: every bad input is reported before a model runs
# ------------------------------------------------------------------------------------------------------------------


def _davis_listing(root: Path, names: list[str], frames: int | None) -> list[tuple[str, int]]:
    out = []
    for name in names:
        for sub in ("JPEGImages", "Annotations"):
            files = sorted((root / sub / "480p" / name).iterdir())
            out += [(f"{sub}/{name}/{p.name}", p.stat().st_size) for p in files[: frames or None]]
    return out


@task(name="check-evaluation-inputs", cache_policy=NO_CACHE)
def check_evaluation_inputs(settings: EvaluationSettings) -> dict[str, Any]:
    """Open every input and check it without running a model: shard sets readable and non-empty, every val class
    present in the training set, DAVIS sequences with frames and a first-frame mask (and, for label propagation,
    a mask for every frame), the device present. Raises :class:`EvaluationInputError` listing every problem.

    Returns the facts the flow needs: the evaluation set hashes (:func:`evaluation_set_hashes`), sample counts,
    the training classes and the val -> train label map."""
    from dino_model.eval.davis_propagation import PropagationConfig, list_sequences, load_sequence
    from dino_model.eval.shard_source import EvalShardSet
    from dino_model.eval.transforms import EvalTransform
    from dino_model.storage import StorageError

    chosen = settings.selected()
    problems: list[str] = []
    facts: dict[str, Any] = {"evaluations": chosen}
    try:
        facts["device"] = resolve_device(settings.device)
    except EvaluationInputError as e:
        problems.append(str(e))

    if any(e in CLASSIFICATION for e in chosen):
        sets = {}
        for split, uri in (("train", settings.train_data), ("val", settings.val_data)):
            try:
                sets[split] = EvalShardSet(uri)
            except (ValueError, StorageError, OSError) as e:
                problems.append(f"{split}_data: {e}")
        if len(sets) == 2:
            train, val = sets["train"], sets["val"]
            try:
                if not train.classes:
                    raise ValueError(f"training shard set {train.uri} is unlabelled: k-NN and probes need labels")
                facts["label_map"] = val.label_map_to(train.classes).tolist()
            except ValueError as e:
                problems.append(f"val_data: {e}")
            facts.update(train_samples=train.num_samples, val_samples=val.num_samples,
                         num_classes=len(train.classes))
            transform = EvalTransform(settings.resize_size, settings.crop_size)
            facts["classification_hash"] = _digest({
                "train": train.digest(), "val": val.digest(), "preprocessing": transform.describe(),
                "precision": settings.precision, "knn_temperature": settings.knn_temperature,
                "linear": [settings.linear_n_last_blocks, settings.linear_avgpool, settings.linear_epochs,
                           settings.linear_fast_epochs, settings.linear_batch_size, settings.linear_base_lr],
            })
            facts["classification_set"] = f"train={train.uri} ({train.num_samples}); val={val.uri} ({val.num_samples})"
        try:
            from dino_model.storage import open_store

            open_store(settings.features_root).check_writable()
        except (ValueError, StorageError, OSError) as e:
            problems.append(f"features_root: {settings.features_root} is not writable: {e}")

    if any(e in VIDEO for e in chosen):
        root = Path(settings.davis_root)
        names: list[str] = []
        try:
            names = list(settings.davis_sequences) if settings.davis_sequences else list_sequences(root)
            if not names:
                raise ValueError("no DAVIS sequence to evaluate")
        except (OSError, ValueError) as e:
            problems.append(f"davis_root: {e}")
        for name in names:
            try:
                seq = load_sequence(root, name)  # frames present and a first-frame mask, else a clear error
            except (OSError, ValueError) as e:
                problems.append(f"davis: {e}")
                continue
            if "davis" in chosen:
                kept = seq.annotations[: settings.davis_max_frames or None]
                missing = [f for f, a in zip(seq.frame_names, kept) if a is None]
                if missing:
                    problems.append(f"davis: sequence {name!r} has no ground truth for frame(s) {missing[:5]}")
                if len(kept) < 3:
                    problems.append(f"davis: sequence {name!r} has {len(kept)} frames; at least 3 are needed")
        if "davis" in chosen:
            try:
                PropagationConfig(short_side=settings.davis_short_side, multiple=settings.davis_multiple)
            except ValueError as e:
                problems.append(f"davis: {e}")
        if not any(p.startswith(("davis", "davis_root")) for p in problems):
            frames = max(settings.davis_max_frames or 0, settings.attention_max_frames or 0) or None
            facts["video_hash"] = _digest({
                "files": _davis_listing(root, names, frames), "precision": settings.precision,
                "davis": [settings.davis_max_frames, settings.davis_short_side, settings.davis_multiple],
                "attention": [settings.attention_frame_step, settings.attention_max_frames, settings.attention_size,
                              settings.attention_threshold],
            })
            facts["video_set"] = f"davis={root} ({', '.join(names)})"
            facts["davis_sequences"] = names
    if problems:
        raise EvaluationInputError("evaluation inputs are unusable:\n" + "\n".join(f" - {p}" for p in problems))
    _logger().info("inputs ok: %s", {k: v for k, v in facts.items() if k not in ("label_map",)})
    return facts


@task(name="check-extraction-input", cache_policy=NO_CACHE)
def check_extraction_input(data: str, classes_from: str | None = None) -> dict[str, Any]:
    """Open the shard set ``data`` (readable, non-empty) and, with ``classes_from`` (the training shard set),
    map its labels onto that set's class indices (every class must be there). Returns ``samples``,
    ``label_map`` (or None) and ``data_digest``."""
    from dino_model.eval.shard_source import EvalShardSet
    from dino_model.storage import StorageError

    try:
        shards = EvalShardSet(data)
        label_map = shards.label_map_to(EvalShardSet(classes_from).classes).tolist() if classes_from else None
    except (ValueError, StorageError, OSError) as e:
        raise EvaluationInputError(f"extraction input is unusable: {e}") from e
    return {"samples": shards.num_samples, "label_map": label_map, "data_digest": shards.digest()}


def evaluation_set_hashes(facts: dict[str, Any]) -> dict[str, str]:
    """``{"classification": H1, "video": H2}`` (those that apply): each hash covers the data (shard-set digests,
    DAVIS file listing) and every setting that changes a score of that family, so two scores under the same
    hash are comparable."""
    return {fam: facts[f"{fam}_hash"] for fam in ("classification", "video") if f"{fam}_hash" in facts}


# ------------------------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------------------------


#: The last registered version loaded in this process: ``(tracking URI, models:/name/N) -> CPU backbone``. A
#: registered version never changes, so the tasks of one evaluation download it once, not once per task.
_VERSION_CACHE: dict[tuple[str, str], Any] = {}


def load_model(model_uri: str, device: str):
    """The backbone of a registered version, a checkpoint or an export, in eval mode on ``device``."""
    import copy

    import mlflow

    import dino_model.mlflow_model  # noqa: F401 - registers the models:/ scheme with load_backbone
    from dino_model.export import load_backbone

    key = (mlflow.get_tracking_uri(), model_uri) if re.fullmatch(r"models:/[^/@]+/\d+", model_uri) else None
    if key is not None and key in _VERSION_CACHE:
        backbone = copy.deepcopy(_VERSION_CACHE[key])
    else:
        backbone = load_backbone(model_uri)
        if key is not None:
            _VERSION_CACHE.clear()
            _VERSION_CACHE[key] = copy.deepcopy(backbone)
    return backbone.to(device).eval()


def features_location(root: str, model_name: str, version: int, set_hash: str, kind: str) -> str:
    """``<root>/<model>/v<version>/<set hash>/<kind>`` (``+`` in the kind becomes ``-``: S3-safe keys)."""
    return f"{root.rstrip('/')}/{model_name}/v{version}/{set_hash}/{kind.replace('+', '-')}"


class _Progress:
    """Reports extraction progress as a Prefect progress artifact (at most every 2 s) inside a run."""

    def __init__(self, total: int, description: str):
        self.total, self.done, self.last = max(total, 1), 0, 0.0
        try:
            self.id = create_progress_artifact(0.0, description=description)
        except Exception:  # noqa: BLE001 - outside a flow run there is nothing to report to
            self.id = None

    def wrap(self, batches: Iterable):
        for batch in batches:
            yield batch
            self.done += len(batch[0])
            if self.id is not None and time.monotonic() - self.last > 2.0:
                self.last = time.monotonic()
                update_progress_artifact(self.id, 100.0 * self.done / self.total)

    def finish(self):
        if self.id is not None:
            update_progress_artifact(self.id, 100.0)


@task(name="extract-features", cache_policy=NO_CACHE)
def extract_split_features(
    model_uri: str,
    data: str,
    out_uri: str,
    split: str,
    metadata: dict[str, Any],
    resize_size: int | None = 256,
    crop_size: int | None = 224,
    batch_size: int = 64,
    n_last_blocks: int = 1,
    avgpool: bool = False,
    precision: str = "fp32",
    device: str = "auto",
    label_map: list[int] | None = None,
    nproc_per_node: int = 1,
) -> dict[str, Any]:
    """Run the backbone over every sample of the shard set ``data`` (in order, none dropped) and write
    ``<out_uri>/<split>/part-*.parquet``. Labels go through ``label_map`` (val -> train class indices). Checks
    that the rows written equal the manifest's sample count. ``nproc_per_node > 1``: the extraction runs as
    ``torchrun -m dino_model.eval.extract`` child processes (one per GPU), rank 0 checking the total."""
    import numpy as np

    from dino_model.eval.features import extract_features
    from dino_model.eval.shard_source import EvalShardSet
    from dino_model.eval.transforms import EvalTransform

    logger = _logger()
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if nproc_per_node > 1:
        return _extract_with_torchrun(model_uri, data, out_uri, split, metadata, resize_size, crop_size, batch_size,
                                      n_last_blocks, avgpool, precision, device, label_map, nproc_per_node)
    device = resolve_device(device)
    shards = EvalShardSet(data)
    backbone = load_model(model_uri, device)
    progress = _Progress(shards.num_samples, f"features[{split}] of {model_uri}")
    meta = {**metadata, "model_uri": model_uri, "data": shards.uri, "data_digest": shards.digest(),
            "classes_from": metadata.get("classes_from", shards.uri)}
    res = extract_features(
        backbone,
        progress.wrap(shards.batches(batch_size, np.asarray(label_map) if label_map is not None else None)),
        out_uri, split, meta, transform=EvalTransform(resize_size, crop_size), n_last_blocks=n_last_blocks,
        avgpool=avgpool, precision=precision, device=device, progress=False, total=shards.num_samples,
    )
    progress.finish()
    if res.num_rows != shards.num_samples:
        raise RuntimeError(f"wrote {res.num_rows} feature rows for {shards.num_samples} samples of {shards.uri}")
    logger.info("%s: %d x %d features (%s) -> %s", split, res.num_rows, res.dim, res.metadata["feature_kind"],
                res.uri)
    return {"uri": res.uri, "split": split, "num_rows": res.num_rows, "dim": res.dim, "files": res.files,
            "feature_kind": res.metadata["feature_kind"]}


def _extract_with_torchrun(model_uri, data, out_uri, split, metadata, resize_size, crop_size, batch_size,
                           n_last_blocks, avgpool, precision, device, label_map, nproc_per_node) -> dict[str, Any]:
    """The multi-process extraction: ``torchrun -m dino_model.eval.extract``, its output forwarded to the run logs
    and its per-rank progress records summed into the progress artifact."""
    import torch

    from dino_model.eval.shard_source import EvalShardSet

    from .trainer_process import LaunchSpec, run_trainer, torchrun_command

    logger = _logger()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda:"):
        raise EvaluationInputError(f"device {device!r} names one GPU, but nproc_per_node={nproc_per_node} processes "
                                   "take one GPU each (cuda:<local rank>): use device 'cuda' or 'auto'")
    resolve_device(device)
    shards = EvalShardSet(data)
    args = ["--model", model_uri, "--data", data, "--out", out_uri, "--split", split,
            "--resize", str(resize_size), "--crop", str(crop_size), "--batch-size", str(batch_size),
            "--n-last-blocks", str(n_last_blocks), "--precision", precision, "--device", device,
            "--metadata", json.dumps(metadata)]
    if avgpool:
        args.append("--avgpool")
    if label_map is not None:
        args += ["--label-map", ",".join(str(int(v)) for v in label_map)]
    cmd = torchrun_command(LaunchSpec(nproc_per_node=nproc_per_node), None, args, module="dino_model.eval.extract")
    progress = _Progress(shards.num_samples, f"features[{split}] of {model_uri} ({nproc_per_node} processes)")
    done_by_rank: dict[int, int] = {}

    def on_progress(record: dict) -> None:
        if record.get("event") == "step":
            done_by_rank[int(record["rank"])] = int(record["done"])
            progress.done = sum(done_by_rank.values())
            if progress.id is not None and time.monotonic() - progress.last > 2.0:
                progress.last = time.monotonic()
                update_progress_artifact(progress.id, 100.0 * progress.done / progress.total)

    logger.info("launching %s", " ".join(cmd[:8]) + " ...")
    end = run_trainer(cmd, {}, on_line=logger.info, on_progress=on_progress)
    progress.finish()
    if end is None or end.get("num_rows") != shards.num_samples:
        raise RuntimeError(f"the torchrun extraction of {shards.uri} reported {end and end.get('num_rows')} rows "
                           f"for {shards.num_samples} samples")
    logger.info("%s: %d x %d features (%s) -> %s, %d processes", split, end["num_rows"], end["dim"],
                end["feature_kind"], end["uri"], nproc_per_node)
    return {"uri": end["uri"], "split": split, "num_rows": end["num_rows"], "dim": end["dim"],
            "files": end["files"], "feature_kind": end["feature_kind"]}


def _read_pair(features_uri: str, expected: dict[str, int] | None):
    """Train and val features, checking the row counts against the shard sets and the labels against the rows."""
    from dino_model.eval.features import read_features

    out = {}
    for split in ("train", "val"):
        keys, labels, feats, meta = read_features(features_uri, split)
        if not (len(keys) == len(labels) == feats.shape[0]):
            raise ValueError(f"{features_uri}/{split}: {len(keys)} keys, {len(labels)} labels, {feats.shape[0]} "
                             "feature rows")
        if expected is not None and feats.shape[0] != expected[split]:
            raise ValueError(f"{features_uri}/{split} holds {feats.shape[0]} feature rows but the {split} shard set "
                             f"has {expected[split]} samples: re-extract the features")
        out[split] = (labels, feats, meta)
    if out["train"][2].get("feature_kind") != out["val"][2].get("feature_kind"):
        raise ValueError(f"{features_uri}: train and val hold different feature kinds")
    return out


# ------------------------------------------------------------------------------------------------------------------
# evaluations (no side effect: they return metrics)
# ------------------------------------------------------------------------------------------------------------------


@task(name="knn", cache_policy=NO_CACHE)
def knn_scores(features_uri: str, ks: list[int], temperature: float = 0.07, num_classes: int | None = None,
               device: str = "auto", expected: dict[str, int] | None = None) -> dict[str, float]:
    """Weighted k-NN (paper: T = 0.07) of val against train features read from Parquet: ``knn<k>_top1/top5``."""
    from dino_model.eval.knn import knn_classify

    d = _read_pair(features_uri, expected)
    res = knn_classify(d["train"][1], d["train"][0], d["val"][1], d["val"][0], ks=ks, T=temperature,
                       num_classes=num_classes, device=resolve_device(device))
    metrics = {}
    for k, r in res.items():
        metrics[f"knn{k}_top1"] = r["top1"]
        metrics[f"knn{k}_top5"] = r["top5"]
    _logger().info("k-NN: %s", ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
    return metrics


def bf16_parity_metrics(bf16: dict[int, dict[str, float]], fp32: dict[int, dict[str, float]],
                        tolerance: float) -> tuple[dict[str, float], list[str]]:
    """``knn<k>_top1_bf16_minus_fp32`` (points) for each k, and a warning for each k whose |difference| exceeds
    ``tolerance``."""
    metrics, warnings = {}, []
    for k in sorted(bf16):
        diff = bf16[k]["top1"] - fp32[k]["top1"]
        metrics[f"knn{k}_top1_bf16_minus_fp32"] = diff
        if abs(diff) > tolerance:
            warnings.append(f"bf16 k-NN parity: knn{k}_top1 differs by {diff:+.2f} points from fp32 "
                            f"({bf16[k]['top1']:.2f} vs {fp32[k]['top1']:.2f}), beyond the tolerance of "
                            f"{tolerance} points: the bf16 scores are not comparable with fp32 ones")
    return metrics, warnings


@task(name="knn-bf16-parity", cache_policy=NO_CACHE)
def knn_bf16_parity(model_uri: str, features_uri: str, label_map: list[int], num_classes: int,
                    settings: EvaluationSettings) -> dict[str, float]:
    """The parity check of a bf16 extraction: the weighted k-NN on the same subset (the first
    ``bf16_parity_train_samples`` training and ``bf16_parity_val_samples`` val samples, manifest order) with the
    stored bf16 features and with fp32 features computed here, in memory; returns
    ``knn<k>_top1_bf16_minus_fp32`` (points) and logs a warning when one exceeds ``bf16_parity_tolerance``."""
    import numpy as np

    from dino_model.eval.features import compute_features, read_features
    from dino_model.eval.knn import knn_classify
    from dino_model.eval.shard_source import EvalShardSet
    from dino_model.eval.transforms import EvalTransform

    logger = _logger()
    device = resolve_device(settings.device)
    backbone = load_model(model_uri, device)
    transform = EvalTransform(settings.resize_size, settings.crop_size)
    subsets = {}
    for split, data, limit, lmap in (("train", settings.train_data, settings.bf16_parity_train_samples, None),
                                     ("val", settings.val_data, settings.bf16_parity_val_samples, label_map)):
        shards = EvalShardSet(data)
        n = min(limit or shards.num_samples, shards.num_samples)
        keys, labels, fp32 = compute_features(
            backbone, shards.batches(settings.batch_size, np.asarray(lmap) if lmap is not None else None,
                                     sample_range=(0, n)),
            transform=transform, precision="fp32", device=device)
        stored_keys, stored_labels, stored, meta = read_features(features_uri, split)
        if meta.get("precision") != "bf16":
            raise ValueError(f"{features_uri}/{split} holds {meta.get('precision')} features, not bf16")
        row = {k: i for i, k in enumerate(stored_keys)}
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{features_uri}/{split} lacks {len(missing)} sample(s) of {data}, e.g. {missing[0]!r}: "
                             "re-extract the features")
        idx = np.array([row[k] for k in keys])
        if not np.array_equal(stored_labels[idx], labels):
            raise ValueError(f"{features_uri}/{split}: stored labels differ from the shard set's")
        subsets[split] = (labels, fp32, stored[idx])
    (train_labels, train_fp32, train_bf16), (val_labels, val_fp32, val_bf16) = subsets["train"], subsets["val"]
    # a class of the val subset that the training subset happens to lack cannot be voted for in either precision
    keep = np.isin(val_labels, train_labels)
    val_labels, val_fp32, val_bf16 = val_labels[keep], val_fp32[keep], val_bf16[keep]
    common = dict(ks=settings.knn_ks, T=settings.knn_temperature, num_classes=num_classes, device=device)
    bf16 = knn_classify(train_bf16, train_labels, val_bf16, val_labels, **common)
    fp32 = knn_classify(train_fp32, train_labels, val_fp32, val_labels, **common)
    metrics, warnings = bf16_parity_metrics(bf16, fp32, settings.bf16_parity_tolerance)
    logger.info("bf16 k-NN parity on %d train x %d val samples: %s", len(train_labels), len(val_labels),
                ", ".join(f"{k}={v:+.2f}" for k, v in metrics.items()))
    for w in warnings:
        logger.warning(w)
    return metrics


@task(name="linear-probe-fast", cache_policy=NO_CACHE)
def linear_probe_fast(features_uri: str, epochs: int = 100, batch_size: int = 256, base_lr: float = 0.001,
                      num_classes: int | None = None, device: str = "auto",
                      expected: dict[str, int] | None = None) -> dict[str, float]:
    """The APPROXIMATE linear probe on cached centre-crop features (no augmentation): ``linear_approx_*``."""
    from dino_model.eval.linear_probe import linear_probe_on_features

    d = _read_pair(features_uri, expected)
    res = linear_probe_on_features(d["train"][1], d["train"][0], d["val"][1], d["val"][0], epochs=epochs,
                                   batch_size=batch_size, base_lr=base_lr, num_classes=num_classes,
                                   device=resolve_device(device))
    assert res.approximate
    metrics = {"linear_approx_best_top1": res.best_top1, "linear_approx_final_top1": res.final_top1,
               "linear_approx_final_top5": res.final_top5}
    _logger().info("linear probe on cached features (approximate): %s", metrics)
    return metrics


@task(name="linear-probe", cache_policy=NO_CACHE)
def linear_probe_full(model_uri: str, train_data: str, val_data: str, label_map: list[int], num_classes: int,
                      settings: EvaluationSettings) -> dict[str, float]:
    """The paper's linear probe: random-resized crop + flip through the frozen backbone every epoch (shard order
    permuted per epoch), validated each epoch: ``linear_best_top1``, ``linear_final_top1``, ``linear_final_top5``."""
    import numpy as np

    from dino_model.eval.linear_probe import LinearProbeConfig, linear_probe
    from dino_model.eval.shard_source import EvalShardSet
    from dino_model.eval.transforms import EvalTransform

    logger = _logger()
    device = resolve_device(settings.device)
    train, val = EvalShardSet(train_data), EvalShardSet(val_data)
    vmap = np.asarray(label_map)
    backbone = load_model(model_uri, device)

    def train_batches(epoch: int):
        order = np.random.default_rng([0, epoch]).permutation(train.num_shards)
        return ((images, labels) for _, images, labels in train.batches(settings.linear_batch_size, shard_order=order))

    def val_batches(epoch: int):
        return ((images, labels) for _, images, labels in val.batches(settings.batch_size, label_map=vmap))

    cfg = LinearProbeConfig(
        epochs=settings.linear_epochs, base_lr=settings.linear_base_lr, batch_size=settings.linear_batch_size,
        n_last_blocks=settings.linear_n_last_blocks, avgpool=settings.linear_avgpool, crop_size=settings.crop_size,
        val_transform=EvalTransform(settings.resize_size, settings.crop_size), num_classes=num_classes,
        precision=settings.precision,
    )
    res = linear_probe(backbone, train_batches, val_batches, cfg, device=device,
                       on_epoch_end=lambda row: logger.info("linear probe epoch %d: %s", row["epoch"], row))
    return {"linear_best_top1": res.best_top1, "linear_final_top1": res.final_top1,
            "linear_final_top5": res.final_top5}


@task(name="attention-maps", cache_policy=NO_CACHE)
def attention_scores(model_uri: str, settings: EvaluationSettings, run_id: str | None = None) -> dict[str, float]:
    """Jaccard of the last block's attention masks (60 % mass per head) against DAVIS foreground masks:
    ``attn_jaccard_best_head/mean_heads/union_heads``. Side effect: the overlay PNG of each sequence's first
    scored frame is logged to the evaluation run under ``attention/``."""
    from dino_model.eval.attention_maps import davis_attention_scores

    device = resolve_device(settings.device)
    backbone = load_model(model_uri, device)
    res = davis_attention_scores(backbone, settings.davis_root, settings.davis_sequences,
                                 frame_step=settings.attention_frame_step, max_frames=settings.attention_max_frames,
                                 size=settings.attention_size, threshold=settings.attention_threshold,
                                 render=run_id is not None, device=device)
    if run_id is not None and res.overlays:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        with tempfile.TemporaryDirectory() as tmp:
            for seq, png in res.overlays.items():
                Path(tmp, f"{seq}.png").write_bytes(png)
            client.log_artifacts(run_id, tmp, artifact_path="attention")
    metrics = res.as_dict()
    _logger().info("attention maps on %d frames: %s", len(res.frames), metrics)
    return metrics


@task(name="davis-label-propagation", cache_policy=NO_CACHE)
def davis_scores(model_uri: str, settings: EvaluationSettings) -> dict[str, float]:
    """DAVIS-2017 semi-supervised label propagation and the official J&F: ``davis_*`` metrics. Side effect: the
    predicted indexed PNGs under ``settings.davis_predictions_uri`` when set."""
    from dino_model.eval.davis_propagation import PropagationConfig, evaluate_davis

    device = resolve_device(settings.device)
    backbone = load_model(model_uri, device)
    cfg = PropagationConfig(short_side=settings.davis_short_side, multiple=settings.davis_multiple)
    res = evaluate_davis(backbone, settings.davis_root, settings.davis_sequences, settings.davis_predictions_uri,
                         cfg, max_frames=settings.davis_max_frames, device=device, progress=False)
    metrics = res.scores.as_dict()
    _logger().info("DAVIS J&F %.4f (J %.4f, F %.4f) on %s", res.scores.jf_mean, res.scores.j_mean,
                   res.scores.f_mean, res.sequences)
    return metrics


# ------------------------------------------------------------------------------------------------------------------
# recording
# ------------------------------------------------------------------------------------------------------------------


@task(name="open-evaluation-run", cache_policy=NO_CACHE)
def open_evaluation_run(experiment: str, model: dict[str, Any], settings: EvaluationSettings,
                        hashes: dict[str, str], flow_run_id: str) -> str:
    """The MLflow run of this evaluation (found again by its flow-run tag when the flow is retried), tagged with
    the model version and the evaluation-set hashes, with the settings as params."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp_id = get_or_create_experiment(client, experiment)
    if flow_run_id != "local":
        found = client.search_runs([exp_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    tags = {FLOW_RUN_TAG: flow_run_id, "model_name": model["name"], "model_version": str(model["version"]),
            "model_uri": model["uri"], **{f"evalset.{k}": v for k, v in hashes.items()}}
    if model.get("run_id"):
        tags["training_run_id"] = model["run_id"]
    run = client.create_run(exp_id, run_name=f"eval-{model['name']}-v{model['version']}", tags=tags)
    params = [Param(k, v[:6000]) for k, v in flatten(settings.model_dump()).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    _logger().info("MLflow evaluation run %s in experiment %r", run.info.run_id, experiment)
    return run.info.run_id


@task(name="log-evaluation-metrics", cache_policy=NO_CACHE)
def log_evaluation_metrics(run_id: str, metrics: dict[str, float], model_id: str | None = None) -> None:
    """The scores as metrics of the evaluation run, linked to the version's LoggedModel when it has one (MLflow 3
    then lists them on the logged model and records it as the run's input)."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, run_id=run_id, model_id=model_id,
                       synchronous=True)


@task(name="tag-model-version", cache_policy=NO_CACHE)
def tag_model_version(name: str, version: int, tags: dict[str, str]) -> None:
    """Set ``tags`` on the model version (open-source MLflow versions hold tags, not metrics)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)


def score_tags(metrics: dict[str, float], families: dict[str, str], hashes: dict[str, str], run_id: str,
               sets: dict[str, str]) -> dict[str, str]:
    """The version tags for ``metrics``: ``eval.<H>.<metric>`` (``repr`` of the float, exact round trip), plus
    ``eval.<H>.run_id`` and ``eval.<H>.set`` for each evaluation set used."""
    tags = {version_tag(hashes[families[m]], m): repr(float(v)) for m, v in metrics.items()}
    for fam in sorted(set(families.values())):
        tags[f"eval.{hashes[fam]}.run_id"] = run_id
        tags[f"eval.{hashes[fam]}.set"] = sets[fam][:4000]
    return tags


@task(name="publish-scores", cache_policy=NO_CACHE)
def publish_scores(model: dict[str, Any], metrics: dict[str, float], families: dict[str, str],
                   hashes: dict[str, str], run_id: str) -> str:
    """A Prefect table artifact of the scores; returns its key."""
    slug = re.sub(r"[^a-z0-9-]+", "-", model["name"].lower()).strip("-") or "model"
    key = f"dino-evaluate-{slug}-v{model['version']}"
    rows = [{"metric": m, "value": round(float(v), 4), "evaluation set": hashes[families[m]],
             "approximate": m.startswith("linear_approx_")} for m, v in sorted(metrics.items())]
    create_table_artifact(rows, key=key, description=f"Scores of {model['uri']} (MLflow run {run_id})")
    return key


@task(name="update-champion", cache_policy=NO_CACHE)
def update_champion(name: str, version: int, metric: str, set_hash: str | None, score: float | None,
                    policy: str = "if_better", higher_is_better: bool = True) -> dict[str, Any]:
    """Move alias ``champion`` to ``version`` according to ``policy``:

    * ``always``: move it;
    * ``if_better``: move it when there is no champion yet, or when ``score`` beats the champion's score for
      ``metric`` on the same evaluation set (tag ``eval.<set_hash>.<metric>``); a champion without a score on
      this set keeps the alias (it must be re-evaluated on this set first — ``dino-reevaluate`` does that);
    * ``never``: leave it.

    Returns the decision: ``moved``, ``reason``, ``previous`` (version or None), ``previous_score``, ``score``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if policy not in POLICIES:
        raise ValueError(f"champion policy must be one of {POLICIES}, got {policy!r}")
    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        current = None
    previous = int(current.version) if current is not None else None
    decision: dict[str, Any] = {"moved": False, "previous": previous, "previous_score": None, "score": score,
                                "metric": metric, "policy": policy}
    if policy == "never":
        decision["reason"] = "policy is 'never'"
    elif previous == version:
        decision["reason"] = f"v{version} already is the champion"
    elif policy == "always":
        decision.update(moved=True, reason="policy is 'always'")
    elif score is None or set_hash is None:
        raise ValueError(f"policy 'if_better' needs a score for {metric!r}, none was computed")
    elif current is None:
        decision.update(moved=True, reason="no champion yet")
    else:
        raw = (current.tags or {}).get(version_tag(set_hash, metric))
        if raw is None:
            decision["reason"] = (f"champion v{previous} has no {metric} on evaluation set {set_hash}: re-evaluate "
                                  "it before comparing")
        else:
            prev = float(raw)
            decision["previous_score"] = prev
            better = score > prev if higher_is_better else score < prev
            decision.update(moved=better, reason=f"{metric} {score:.4f} vs champion v{previous} {prev:.4f}: "
                                                  f"{'better' if better else 'not better'}")
    if decision["moved"]:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, str(version))
    _logger().info("champion: %s (%s)", f"moved to v{version}" if decision["moved"] else "unchanged",
                   decision["reason"])
    return decision


@task(name="end-evaluation-run", cache_policy=NO_CACHE)
def end_evaluation_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark the evaluation run FINISHED or FAILED."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)


__all__ = [
    "CHAMPION_ALIAS",
    "EvaluationInputError",
    "EvaluationSettings",
    "ModelVersionNotFound",
    "attention_scores",
    "check_evaluation_inputs",
    "check_extraction_input",
    "davis_scores",
    "end_evaluation_run",
    "evaluation_set_hashes",
    "extract_split_features",
    "features_location",
    "find_versions_to_evaluate",
    "bf16_parity_metrics",
    "knn_bf16_parity",
    "knn_scores",
    "linear_probe_fast",
    "linear_probe_full",
    "log_evaluation_metrics",
    "metric_family",
    "open_evaluation_run",
    "parse_model_uri",
    "publish_scores",
    "resolve_model_version",
    "score_tags",
    "tag_model_version",
    "update_champion",
    "version_tag",
]
