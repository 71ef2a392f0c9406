"""How many images a training source holds, without reading them: what resolves the ``small-data`` preset
(:func:`dino_model.config.small_data_preset`). Imports neither torch nor anything heavy."""

from __future__ import annotations

from ..storage import ObjectNotFound, open_store
from .image_folder import ImageFolderSource
from .manifest import load_manifest

__all__ = ["count_images"]


def count_images(uri: str) -> int:
    """The samples of the shard set at ``uri`` (from its manifest), or the image files of the ImageFolder there
    (one listing). Raises :class:`ValueError` when it is neither."""
    store = open_store(uri)
    try:
        return load_manifest(store).num_samples
    except ObjectNotFound:
        return ImageFolderSource(store).num_samples
