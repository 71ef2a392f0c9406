"""The DINO paper's evaluations as a plain PyTorch library (no Prefect, no MLflow here).

* :mod:`.transforms` — evaluation preprocessing (resize 256 bicubic + centre crop 224, ImageNet normalisation).
* :mod:`.features` — batched feature extraction to a Parquet dataset on local disk or S3, and reading it back.
* :mod:`.knn` — weighted k-NN (T = 0.07, k in 10/20/100/200), chunked for ImageNet-size feature sets.
* :mod:`.linear_probe` — the linear probe on a frozen backbone (and a fast, approximate one on cached features).
* :mod:`.attention_maps` — last-block [CLS] attention, the 60 %-mass masks, overlays and Jaccard scores.
* :mod:`.davis_propagation` / :mod:`.davis_metrics` — DAVIS-2017 semi-supervised label propagation and J&F.
* :mod:`.score_names` — how scores are named, ordered, rounded and labelled (every score in percent).
* :mod:`.report` / :mod:`.report_figures` — the self-contained HTML evaluation report and its matplotlib figures.
"""

from .attention_maps import analyze_image, attention_masks, davis_attention_scores, jaccard_scores, render_png
from .davis_metrics import DavisScores, evaluate_sequence, summarize
from .davis_propagation import PropagationConfig, evaluate_davis, propagate_sequence
from .features import backbone_features, extract_features, feature_kind, read_features
from .knn import knn_classify
from .linear_probe import LinearProbeConfig, LinearProbeResult, linear_probe, linear_probe_on_features

__all__ = [
    "DavisScores",
    "LinearProbeConfig",
    "LinearProbeResult",
    "PropagationConfig",
    "analyze_image",
    "attention_masks",
    "backbone_features",
    "davis_attention_scores",
    "evaluate_davis",
    "evaluate_sequence",
    "extract_features",
    "feature_kind",
    "jaccard_scores",
    "knn_classify",
    "linear_probe",
    "linear_probe_on_features",
    "propagate_sequence",
    "read_features",
    "render_png",
    "summarize",
]
