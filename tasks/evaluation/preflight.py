"""Pre-flight: every bad input (shard sets, classes, DAVIS sequences and masks, device, writable feature root) is
reported before a model runs; and the evaluation-set hashes that make two scores comparable. The checks that need
no side effect are :mod:`tasks.validation.evaluation_inputs` (also run by the ``dino`` command before Prefect
starts); the tasks add the device's presence and a probe write to the features root. Also the sets' human names
(the ``<name>`` of the version tags ``eval.<name>.<metric>``)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from dino_model.eval.score_names import TOP5_MIN_CLASSES
from tasks.validation import check_extraction_request, evaluation_inputs

from .common import EvaluationInputError, run_logger
from .settings import CLASSIFICATION, VIDEO, EvaluationSettings, resolve_device, set_name_problem

#: Folder or shard-set names that say only which split a set is: not a name by themselves.
_SPLIT_WORDS = {"train", "training", "val", "valid", "validation", "test", "eval", "evaluation", "shards"}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _davis_listing(root: Path, names: list[str], frames: int | None) -> list[tuple[str, int]]:
    out = []
    for name in names:
        for sub in ("JPEGImages", "Annotations"):
            files = sorted((root / sub / "480p" / name).iterdir())
            out += [(f"{sub}/{name}/{p.name}", p.stat().st_size) for p in files[: frames or None]]
    return out


@task(name="check-evaluation-inputs", cache_policy=NO_CACHE)
def check_evaluation_inputs(settings: EvaluationSettings) -> dict[str, Any]:
    """Open every input and check it without running a model: shard sets readable, non-empty and complete, every
    val class present in the training set, DAVIS sequences with frames and a first-frame mask (and, for label
    propagation, a mask for every frame) — :func:`tasks.validation.evaluation_inputs`, the checks ``dino
    evaluate`` runs before Prefect starts — then what needs this worker: the device present, the features root
    writable. Raises :class:`EvaluationInputError` listing every problem; logs the warnings (e.g. a crop larger
    than the images).

    Returns the facts the flow needs: the evaluation set hashes (:func:`evaluation_set_hashes`), sample counts,
    the training classes and the val -> train label map."""
    from dino_model.eval.transforms import EvalTransform
    from dino_model.storage import StorageError, open_store

    chosen = settings.selected()
    found = evaluation_inputs(settings)
    facts: dict[str, Any] = {"evaluations": chosen}
    if not any(p.startswith("device") for p in found.problems):
        try:
            facts["device"] = resolve_device(settings.device)
        except EvaluationInputError as e:
            found.problems.append(str(e))
    if any(e in CLASSIFICATION for e in chosen) and not any(p.startswith("features_root") for p in found.problems):
        try:
            open_store(settings.features_root).check_writable()
        except (ValueError, StorageError, OSError) as e:
            found.problems.append(f"features_root: {settings.features_root} is not writable: {e}")
    if (found.train is not None and settings.champion_policy != "never" and settings.champion_metric.endswith("_top5")
            and len(found.train.classes) < TOP5_MIN_CLASSES):
        found.problems.append(f"champion_metric: {settings.champion_metric} is not reported for the "
                              f"{len(found.train.classes)} classes of {found.train.uri} (top-5 needs at least "
                              f"{TOP5_MIN_CLASSES}); choose a top-1 metric")
    found.raise_problems()
    logger = run_logger()
    for warning in found.warnings:
        logger.warning(warning)

    if any(e in CLASSIFICATION for e in chosen):
        train, val = found.train, found.val
        facts.update(label_map=found.label_map, train_samples=train.num_samples, val_samples=val.num_samples,
                     num_classes=len(train.classes))
        facts["class_alignment"] = class_alignment(train.classes, val.classes, found.label_map)
        if facts["class_alignment"]["classes.val_to_train"] == "remapped":
            logger.info("val class indices differ from train's (%s): val labels are re-mapped to train's by class id",
                        facts["class_alignment"]["classes.remapped"])
        transform = EvalTransform(settings.resize_size, settings.crop_size)
        facts["classification_hash"] = _digest({
            "train": train.manifest.digest(), "val": val.manifest.digest(), "preprocessing": transform.describe(),
            "precision": settings.precision, "knn_temperature": settings.knn_temperature,
            "linear": [settings.linear_n_last_blocks, settings.linear_avgpool, settings.linear_epochs,
                       settings.linear_fast_epochs, settings.linear_batch_size, settings.linear_base_lr],
        })
        facts["classification_set"] = f"train={train.uri} ({train.num_samples}); val={val.uri} ({val.num_samples})"
        facts["classification_name"] = settings.classification_set_name or default_set_name(
            val.uri, val.manifest.name)
        facts["classification_datasets"] = {
            split: {"uri": s.uri, "name": default_set_name(s.uri, s.manifest.name),
                    "digest": s.manifest.digest()[:12], "samples": s.num_samples, "classes": len(s.classes)}
            for split, s in (("train", train), ("val", val))}

    if any(e in VIDEO for e in chosen):
        root, names = found.davis_root, [seq.name for seq in found.davis_sequences]
        frames = max(settings.davis_max_frames or 0, settings.attention_max_frames or 0) or None
        facts["video_hash"] = _digest({
            "files": _davis_listing(root, names, frames), "precision": settings.precision,
            "davis": [settings.davis_max_frames, settings.davis_short_side, settings.davis_multiple],
            "attention": [settings.attention_frame_step, settings.attention_max_frames, settings.attention_size,
                          settings.attention_threshold],
        })
        facts["video_set"] = f"davis={root} ({', '.join(names)})"
        facts["video_name"] = settings.video_set_name or default_set_name(str(Path(root).resolve()), "")
        facts["davis_sequences"] = names
    logger.info("inputs ok: %s", {k: v for k, v in facts.items() if k not in ("label_map", "class_alignment")})
    return facts


@task(name="check-extraction-input", cache_policy=NO_CACHE)
def check_extraction_input(data: str, classes_from: str | None = None, resize_size: int | None = None,
                           crop_size: int | None = None) -> dict[str, Any]:
    """Open the shard set ``data`` (readable, non-empty, complete) and, with ``classes_from`` (the training shard
    set), map its labels onto that set's class indices (every class must be there): the checks of
    :func:`tasks.validation.extraction_inputs`, which ``dino extract`` runs before Prefect starts. Logs a warning
    when the centre crop is larger than the images. Returns ``samples``, ``label_map`` (or None) and
    ``data_digest``."""
    found = check_extraction_request(data, classes_from, resize_size, crop_size)
    logger = run_logger()
    for warning in found.warnings:
        logger.warning(warning)
    return {"samples": found.val.num_samples, "label_map": found.label_map, "data_digest": found.val.manifest.digest()}


def class_alignment(train_classes: list[str], val_classes: list[str], label_map: list[int]) -> dict[str, str]:
    """How val labels were aligned with train's, as evaluation-run tags: ``classes.val_to_train`` is ``remapped``
    when some val class index differs from the train index of the same class id (the val shard set was indexed
    by another class map), else ``identity``; ``classes.remapped`` counts them; ``classes.{train,val}_sha256``
    are the two class maps' hashes (equal hashes: identical class maps)."""
    from dino_model.data.manifest import class_map_sha256

    moved = sum(1 for i, j in enumerate(label_map) if i != j)
    return {
        "classes.val_to_train": "remapped" if moved else "identity",
        "classes.remapped": f"{moved} of {len(val_classes)} val classes",
        "classes.train_sha256": class_map_sha256(list(train_classes)),
        "classes.val_sha256": class_map_sha256(list(val_classes)),
    }


def default_set_name(uri: str, manifest_name: str) -> str:
    """A shard set's (or a DAVIS folder's) human name: its manifest name, else its folder's name, else (when
    those only name a split, e.g. ``val``) the parent folder's name joined to it: ``.../imagenette-128/val`` ->
    ``imagenette-128-val``; characters a tag key cannot hold become ``-``."""
    parts = [p for p in re.split(r"[/\\]+", uri.split("://", 1)[-1].rstrip("/\\")) if p]
    candidates = [manifest_name, parts[-1] if parts else ""]
    if len(parts) >= 2:
        candidates.append(f"{parts[-2]}-{parts[-1]}")
    for raw in candidates:
        name = re.sub(r"[^A-Za-z0-9_-]+", "-", raw or "").strip("-_")[:64].rstrip("-_")
        if name and name.lower() not in _SPLIT_WORDS and set_name_problem(name) is None:
            return name
    return "evaluation-set"


def evaluation_set_names(facts: dict[str, Any]) -> dict[str, str]:
    """``{"classification": name, "video": name}`` (those that apply): the names of the version tags
    ``eval.<name>.<metric>``; the set's hash goes in its own tag ``eval.<name>.set_hash``."""
    return {fam: facts[f"{fam}_name"] for fam in ("classification", "video") if f"{fam}_name" in facts}


def evaluation_set_hashes(facts: dict[str, Any]) -> dict[str, str]:
    """``{"classification": H1, "video": H2}`` (those that apply): each hash covers the data (shard-set digests,
    DAVIS file listing) and every setting that changes a score of that family, so two scores under the same
    hash are comparable."""
    return {fam: facts[f"{fam}_hash"] for fam in ("classification", "video") if f"{fam}_hash" in facts}
