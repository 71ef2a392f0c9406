"""The inputs of ``dino-evaluate`` / ``dino-reevaluate`` / ``dino-extract`` checked without running a model or
importing torch: shard sets readable, non-empty and complete, every val class present in the training set, the
DAVIS folder's sequences with frames and masks, URIs that parse, a device name that exists, and preprocessing that
would pad images with black (a warning).

The same functions run in the ``dino`` command before Prefect starts and in the flows' check tasks
(:mod:`tasks.evaluation.preflight`), which add what needs the worker itself: the device's presence and a probe
write to the features root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dino_model.data.davis_layout import DavisSequence, list_sequences, load_sequence
from dino_model.data.label_map import label_map
from dino_model.storage import StorageError, open_store

from .errors import EvaluationInputError, problems_message
from .evaluation_settings import CLASSIFICATION, VIDEO, EvaluationSettings
from .shard_sets import ShardSet, first_image_size, open_shard_set, shard_problems

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class EvaluationInputs:
    """What the checks found: the problems (each names its field), warnings, and what they opened."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    train: ShardSet | None = None
    val: ShardSet | None = None
    #: val class index -> train class index (or, for an extraction, data -> classes_from)
    label_map: list[int] | None = None
    davis_root: Path | None = None
    davis_sequences: list[DavisSequence] = field(default_factory=list)

    def raise_problems(self, title: str = "evaluation inputs are unusable") -> None:
        if self.problems:
            raise EvaluationInputError(problems_message(title, self.problems))


def device_problems(device: str) -> list[str]:
    if not _DEVICE.match(device or ""):
        return [f"device {device!r} is not a device name: use auto, cpu, cuda or cuda:N"]
    return []


def preprocessing_warnings(resize_size: int | None, crop_size: int | None, shards: ShardSet | None) -> list[str]:
    """Warnings for a centre crop larger than the image it is cut from (torchvision pads it with black): always
    when ``resize_size < crop_size``; without a resize, when the first image of ``shards`` is smaller."""
    if crop_size is None:
        return []
    if resize_size is not None:
        if resize_size < crop_size:
            return [f"resize_size {resize_size} is smaller than crop_size {crop_size}: every centre crop is padded "
                    f"with black; set resize_size >= crop_size (--resize, reference 256 with --crop 224)"]
        return []
    size = first_image_size(shards) if shards is not None else None
    if size is None or min(size) >= crop_size:
        return []
    w, h = size
    black = 1.0 - min(w, crop_size) * min(h, crop_size) / crop_size**2
    return [f"crop_size {crop_size} is larger than the images of {shards.uri} (the first is {w}x{h}) and "
            f"resize_size is none: each centre crop is {black:.0%} black padding; set --resize {crop_size} (or "
            f"more) or --crop {min(size)} (or less)"]


def _open(uri: str, name: str, problems: list[str]) -> ShardSet | None:
    try:
        shards = open_shard_set(uri)
    except (ValueError, StorageError, OSError) as e:
        problems.append(f"{name}: {e}")
        return None
    problems += [f"{name}: {p}" for p in shard_problems(shards)]
    return shards


def _uri_problems(name: str, uri: str | None) -> list[str]:
    if uri is None:
        return []
    try:
        open_store(uri)
    except ValueError as e:
        return [f"{name}: {e}"]
    return []


def evaluation_inputs(settings: EvaluationSettings) -> EvaluationInputs:
    """Check every input of an evaluation with these settings; never raises for bad input (see
    :meth:`EvaluationInputs.raise_problems`)."""
    chosen = settings.selected()
    found = EvaluationInputs()
    found.problems += device_problems(settings.device)
    if any(e in CLASSIFICATION for e in chosen):
        _classification_inputs(settings, found)
    if any(e in VIDEO for e in chosen):
        _video_inputs(settings, chosen, found)
    return found


def _classification_inputs(settings: EvaluationSettings, found: EvaluationInputs) -> None:
    found.train = _open(settings.train_data, "train_data", found.problems)
    found.val = _open(settings.val_data, "val_data", found.problems)
    if found.train is not None and found.val is not None:
        if not found.train.classes:
            found.problems.append(f"train_data: training shard set {found.train.uri} is unlabelled: k-NN and "
                                  "probes need labels (shard an ImageFolder or pass --labels to dino shard)")
        else:
            try:
                found.label_map = label_map(found.val.classes, found.train.classes, found.val.uri)
            except ValueError as e:
                found.problems.append(f"val_data: {e}")
    found.warnings += preprocessing_warnings(settings.resize_size, settings.crop_size, found.val or found.train)
    found.problems += _uri_problems("features_root", settings.features_root)


def _video_inputs(settings: EvaluationSettings, chosen: list[str], found: EvaluationInputs) -> None:
    root = Path(settings.davis_root)
    if not root.is_dir():
        found.problems.append(f"davis_root: {root} is not a folder: give a DAVIS-2017 folder (JPEGImages/480p, "
                              "Annotations/480p, ImageSets/2017/val.txt)")
        return
    found.davis_root = root
    try:
        names = list(settings.davis_sequences) if settings.davis_sequences else list_sequences(root)
        if not names:
            raise ValueError("no DAVIS sequence to evaluate")
    except (OSError, ValueError) as e:
        found.problems.append(f"davis_root: {e}")
        return
    for name in names:
        try:
            seq = load_sequence(root, name)  # frames present and a first-frame mask, else a clear error
        except (OSError, ValueError) as e:
            found.problems.append(f"davis: {e}")
            continue
        found.davis_sequences.append(seq)
        if "davis" in chosen:
            kept = seq.annotations[: settings.davis_max_frames or None]
            missing = [f for f, a in zip(seq.frame_names, kept) if a is None]
            if missing:
                found.problems.append(f"davis: sequence {name!r} has no ground truth for frame(s) {missing[:5]}")
            if len(kept) < 3:
                found.problems.append(f"davis: sequence {name!r} has {len(kept)} frames; at least 3 are needed")
    found.problems += _uri_problems("davis_predictions_uri", settings.davis_predictions_uri)


def extraction_inputs(data: str, classes_from: str | None, resize_size: int | None, crop_size: int | None,
                      output: str | None = None, device: str = "auto") -> EvaluationInputs:
    """Check the inputs of a feature extraction: the shard set ``data``, the training set ``classes_from`` whose
    class indices the labels take (every class of ``data`` must be there), the output URI, the device name and
    the preprocessing. Never raises for bad input."""
    found = EvaluationInputs()
    found.val = _open(data, "data", found.problems)
    if classes_from:
        found.train = _open(classes_from, "classes_from", found.problems)
        if found.val is not None and found.train is not None:
            try:
                found.label_map = label_map(found.val.classes, found.train.classes, found.val.uri)
            except ValueError as e:
                found.problems.append(f"classes_from: {e}")
    for name, size in (("resize_size", resize_size), ("crop_size", crop_size)):
        if size is not None and (not isinstance(size, int) or size < 1):
            found.problems.append(f"{name} must be a positive integer or none, got {size!r}")
    if not found.problems:
        found.warnings += preprocessing_warnings(resize_size, crop_size, found.val)
    found.problems += _uri_problems("output", output) + device_problems(device)
    return found


def check_evaluation_request(settings: EvaluationSettings) -> EvaluationInputs:
    """:func:`evaluation_inputs`, raising :class:`EvaluationInputError` listing every problem."""
    found = evaluation_inputs(settings)
    found.raise_problems()
    return found


def check_extraction_request(data: str, classes_from: str | None, resize_size: int | None, crop_size: int | None,
                             output: str | None = None, device: str = "auto") -> EvaluationInputs:
    """:func:`extraction_inputs`, raising :class:`EvaluationInputError` listing every problem."""
    found = extraction_inputs(data, classes_from, resize_size, crop_size, output, device)
    found.raise_problems("extraction input is unusable")
    return found
