"""The DINO paper's evaluations as a plain PyTorch library (no Prefect, no MLflow here).

* :mod:`.transforms` — evaluation preprocessing (resize 256 bicubic + centre crop 224, ImageNet normalisation).
* :mod:`.features` — batched feature extraction to a Parquet dataset on local disk or S3, and reading it back.
* :mod:`.knn` — weighted k-NN (T = 0.07, k in 10/20/100/200), chunked for ImageNet-size feature sets.
* :mod:`.linear_probe` — the linear probe on a frozen backbone (and a fast, approximate one on cached features).
* :mod:`.attention_maps` — last-block [CLS] attention, the 60 %-mass masks, overlays and Jaccard scores.
* :mod:`.davis_propagation` / :mod:`.davis_metrics` — DAVIS-2017 semi-supervised label propagation and J&F.
"""

from .features import backbone_features, extract_features, feature_kind, read_features
from .knn import knn_classify
from .linear_probe import LinearProbeConfig, LinearProbeResult, linear_probe, linear_probe_on_features

__all__ = ["backbone_features", "extract_features", "feature_kind", "knn_classify", "read_features",
           "LinearProbeConfig", "LinearProbeResult", "linear_probe", "linear_probe_on_features"]
