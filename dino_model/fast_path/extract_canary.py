"""The extraction canary: a backbone's bf16-autocast features against its fp32 features, on the first batch.

Per sample, the cosine similarity of the two feature vectors. A relative error e between them gives
1 - cos ≈ e² / 2; the tolerance allows e = 32 u, the step canary's gradient tolerance, with u = 2^-8 bf16's unit
roundoff: ``min cos >= 1 - (32 u)² / 2`` = :data:`MIN_COSINE` (0.9922). Measured on this CPU, ViT-S/16 at 224 px
(random weights, [CLS] and the last-4-blocks + patch-average features alike): min cos 0.99995 (e ≈ 0.010).
On failure the extraction runs in fp32 (:func:`dino_model.eval.features.extract_features`).
"""

from __future__ import annotations

import torch

from .faults import injected

__all__ = ["MIN_COSINE", "compare_feature_precisions"]

MIN_COSINE = 1.0 - (32 * 2.0 ** -8) ** 2 / 2
#: How far the injected ``extract`` fault shifts every bf16 feature.
_FAULT_SHIFT = 0.5


def bf16_features(features: torch.Tensor) -> torch.Tensor:
    """The bf16 path's output, with the ``extract`` fault of :mod:`dino_model.fast_path.faults` applied."""
    return features + _FAULT_SHIFT if injected("extract") else features


@torch.inference_mode()
def compare_feature_precisions(features_of, x: torch.Tensor) -> tuple[str, dict[str, float]]:
    """``features_of(x, precision)`` in fp32 and in bf16 for one normalised batch ``x``: (failure in words, empty
    when every sample's cosine similarity reaches :data:`MIN_COSINE`; figures)."""
    reference = features_of(x, "fp32").float()
    fast = bf16_features(features_of(x, "bf16").float())
    cos = torch.nn.functional.cosine_similarity(fast, reference, dim=1)
    rel = (fast - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-30)
    figures = {"samples": float(x.shape[0]), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
               "max_rel_error": float(rel.max()), "min_cosine_tol": MIN_COSINE}
    if not figures["min_cosine"] >= MIN_COSINE:  # NaN fails too
        worst = int(cos.argmin())
        return (f"bf16 features differ from fp32: min cosine similarity {figures['min_cosine']:.5f} < "
                f"{MIN_COSINE:.4f} (sample {worst} of the first batch)"), figures
    return "", figures
