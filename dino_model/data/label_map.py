"""Class indices of one shard set expressed in another's: the val -> train label map.

Train and val shard sets are written separately, so their class indices may differ (a class absent from val shifts
every later index). Evaluation aligns them by class id with :func:`label_map`, refusing a val class the training
set lacks. No torch here: the evaluation's input checks (``tasks/validation``) compute the map from the two
manifests before anything heavy is imported; :meth:`dino_model.eval.shard_source.EvalShardSet.label_map_to` uses
the same function.
"""

from __future__ import annotations

from typing import Sequence


def label_map(classes: Sequence[str], train_classes: Sequence[str], name: str) -> list[int]:
    """``map[i]`` = index in ``train_classes`` of ``classes[i]`` (the class ids of the shard set ``name``).

    Raises :class:`ValueError` listing the classes that ``train_classes`` lacks, or when either set is
    unlabelled."""
    if not classes:
        raise ValueError(f"shard set {name} is unlabelled (its manifest lists no class)")
    if not train_classes:
        raise ValueError("the training shard set is unlabelled (its manifest lists no class)")
    where = {c: i for i, c in enumerate(train_classes)}
    missing = [c for c in classes if c not in where]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"{len(missing)} class(es) of {name} have no training samples: {shown}")
    return [where[c] for c in classes]
