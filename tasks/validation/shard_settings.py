"""``dino-shard``'s groups of settings (:mod:`.settings_groups`): how the shards are cut and encoded (``shards``)
and where the shard tasks run (``runner``); and the flat parameter names they replace, still accepted with a
deprecation warning::

    prefect deployment run dino-shard/default --param source=/data/train \\
        --param shards='{"shard_size": 500}' --param runner='{"task_runner": "dask", "parallelism": 8}'

Prefect-free: the ``dino`` command builds the same groups before Prefect starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from dino_model.data.images import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY
from dino_model.data.shard_writer import ShardOptions, default_name, validate_request
from dino_model.data.sources import SourceSpec

from .settings_groups import Renamed, RunnerSettings, SettingsGroup


class ShardSettings(SettingsGroup):
    """How the dataset is cut into shards and how its images are encoded (:class:`ShardOptions`)."""

    name: str | None = Field(None, description="Shard name prefix (<name>-000000.tar); default: the source "
                                               "folder's name.")
    shard_size: int | None = Field(1000, description="At most this many samples per shard (None: only "
                                                     "shard_bytes limits).")
    shard_bytes: int | None = Field(None, description="Close a shard once its input bytes reach this (None: only "
                                                      "shard_size limits).")
    seed: int = Field(0, description="Seed of the global shuffle that mixes classes across shards.")
    quality: int = Field(DEFAULT_QUALITY, description="JPEG quality for images that must be re-encoded (CMYK JPEG, "
                                                      "PNG, WebP, ...).")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, description="Images with more pixels are rejected as decompression "
                                                            "bombs.")

    def options(self, source: str) -> ShardOptions:
        """The writer's options for ``source`` (its folder's name when ``name`` is not set); a bad value is a
        :class:`ValueError` naming the field."""
        return ShardOptions(name=self.name or default_name(source), shard_size=self.shard_size,
                            shard_bytes=self.shard_bytes, seed=self.seed, quality=self.quality,
                            max_pixels=self.max_pixels)


#: The groups, by parameter name.
SHARD_GROUPS = {"shards": ShardSettings, "runner": RunnerSettings}

#: The flat parameters of ``dino-shard`` before the groups, and where each went.
SHARD_RENAMES = {
    **{name: Renamed("shards", name) for name in ("name", "shard_size", "shard_bytes", "seed", "quality",
                                                   "max_pixels")},
    "task_runner": Renamed("runner", "task_runner"),
    "parallelism": Renamed("runner", "parallelism"),
}


@dataclass(frozen=True)
class ShardRequest:
    """One shard set to write: the source as the scanner reads it, the destination URI and the writer's options."""

    spec: SourceSpec
    destination: str
    options: ShardOptions

    def validate(self) -> None:
        """The cheap whole-input checks before anything is written (:func:`validate_request`): the destination URI
        parses, the source root and label files exist, a source folder holds at least one image file."""
        validate_request(self.spec, self.destination, self.options)
