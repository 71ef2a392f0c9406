"""The learning curve during training: the teacher backbone's weighted k-NN top-1 on bounded labelled subsets,
measured on rank 0 before the first step and every ``monitor.every_epochs`` epochs (``monitor.*`` in
:mod:`dino_model.config`).

A collapse shows in the health verdicts (:mod:`dino_model.health`); whether the features are getting *better*
shows here: the first point (step 0) is the randomly initialised backbone, so a run that learns rises above it.
The subsets are the first ``train_samples`` / ``val_samples`` samples of the shard sets in manifest order
(``dino shard`` mixes classes across shards), decoded, resized and centre-cropped once and kept as uint8; each
measurement is one fp32 forward pass over them and :func:`dino_model.eval.knn.knn_classify` (k = 20, T = 0.07,
as the paper's evaluation). Its cost is measured by ``benchmarks/knn_monitor_cost.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from dino_model.config import ConfigError, DinoConfig
from dino_model.eval.features import backbone_features
from dino_model.eval.knn import knn_classify
from dino_model.eval.shard_source import EvalShardSet
from dino_model.eval.transforms import EvalTransform, normalize
from dino_model.storage import StorageError

__all__ = ["KnnSubset", "KnnMonitor", "load_subset", "monitor_every_epochs"]

#: The share of an epoch's images the learning curve may add by default (each costs ~1/9 of a trained image).
MONITORED_SHARE = 0.2

log = logging.getLogger("dino_model.train")


def monitor_every_epochs(cfg: DinoConfig, epoch_images: int) -> int:
    """``monitor.every_epochs``, or when it is null the default the config documents (about 2 % of the training
    time)."""
    if cfg.monitor.every_epochs is not None:
        return cfg.monitor.every_epochs
    monitored = cfg.monitor.train_samples + cfg.monitor.val_samples
    return max(1, math.ceil(monitored / (MONITORED_SHARE * max(epoch_images, 1))))


@dataclass
class KnnSubset:
    """Centre crops (uint8 ``[N, 3, S, S]``) and labels (int64 ``[N]``, in the memory's class indices)."""

    images: torch.Tensor
    labels: torch.Tensor


def load_subset(uri: str, samples: int, transform: EvalTransform, train_classes: list[str] | None = None,
                batch_size: int = 64) -> tuple[KnnSubset, list[str]]:
    """The first ``samples`` samples of the labelled shard set ``uri`` as a :class:`KnnSubset`, with labels mapped
    onto ``train_classes`` (by class id) when given; returns it with the set's own classes."""
    shards = EvalShardSet(uri)
    if not shards.classes:
        raise ConfigError(f"monitor: {uri} is an unlabelled shard set; the learning curve needs class labels")
    mapping = shards.label_map_to(train_classes) if train_classes is not None else None
    n = min(samples, shards.num_samples)
    images, labels = [], []
    for _, batch, batch_labels in shards.batches(batch_size, label_map=mapping, sample_range=(0, n)):
        images += [(transform.crop(img) * 255).round_().to(torch.uint8) for img in batch]
        labels.append(batch_labels)
    return KnnSubset(torch.stack(images), torch.cat(labels)), shards.classes


class KnnMonitor:
    """Rank 0's learning curve (see the module docstring): :meth:`measure` gives ``{metric: top-1 %}``."""

    def __init__(self, memory: KnnSubset, queries: KnnSubset, num_classes: int, k: int, temperature: float,
                 batch_size: int):
        self.memory, self.queries = memory, queries
        self.num_classes, self.k, self.temperature, self.batch_size = num_classes, k, temperature, batch_size
        self.metric = f"monitor.knn{k}_top1"

    @classmethod
    def from_config(cls, cfg: DinoConfig) -> "KnnMonitor":
        """Load the subsets ``monitor.*`` names (a :class:`ConfigError` names what is wrong with them)."""
        m = cfg.monitor
        train_uri = m.train_source or cfg.data.source
        crop = m.crop_size or cfg.crops.global_size
        transform = EvalTransform(resize_size=round(crop * 256 / 224), crop_size=crop)
        try:
            memory, classes = load_subset(train_uri, m.train_samples, transform, batch_size=m.batch_size)
            queries, _ = load_subset(m.val_source, m.val_samples, transform, classes, batch_size=m.batch_size)
        except ConfigError:
            raise
        except (ValueError, OSError, StorageError) as e:
            what = "monitor.train_source (default: data.source)" if not m.train_source else "monitor.train_source"
            raise ConfigError(f"monitor: the learning curve needs labelled shard sets ({what} = {train_uri!r}, "
                              f"monitor.val_source = {m.val_source!r}): {e}") from e
        log.info("learning curve: k-NN (k=%d) of %d samples of %s against %d of %s, %d px", m.k, len(queries.labels),
                 m.val_source, len(memory.labels), train_uri, crop)
        return cls(memory, queries, len(classes), m.k, m.temperature, m.batch_size)

    @torch.inference_mode()
    def _features(self, backbone: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = normalize(images[start:start + self.batch_size].to(device).float().div_(255))
            out.append(backbone_features(backbone, x).float())
        return torch.cat(out)

    def measure(self, backbone: torch.nn.Module) -> dict[str, float]:
        """The weighted k-NN top-1 (percent) of ``backbone`` (left in the mode it was in)."""
        device = next(backbone.parameters()).device
        was_training = backbone.training
        backbone.eval()
        try:
            memory = self._features(backbone, self.memory.images, device)
            queries = self._features(backbone, self.queries.images, device)
        finally:
            backbone.train(was_training)
        scores = knn_classify(memory, self.memory.labels, queries, self.queries.labels, ks=[self.k],
                              T=self.temperature, num_classes=self.num_classes)
        return {self.metric: scores[self.k]["top1"]}
