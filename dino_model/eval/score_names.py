"""How evaluation scores are named, ordered, rounded and labelled wherever a person reads them (model card, version
tags, Prefect artifacts, the evaluation report).

One unit convention: **every score is in percent** — accuracies as the paper reports them, and the attention-map
Jaccard and DAVIS J / F / J&F scores (fractions in [0, 1] inside :mod:`dino_model.eval.attention_maps` and
:mod:`dino_model.eval.davis_metrics`, like the official DAVIS toolkit) multiplied by 100, as the paper's tables
print them. bf16-vs-fp32 differences are percentage points.

    >>> ordered(["knn100_top1", "linear_approx_best_top1", "knn20_top1", "davis_jf_mean"])
    ['knn20_top1', 'knn100_top1', 'linear_approx_best_top1', 'davis_jf_mean']
    >>> label("knn20_top1"), display(99.66666666666667)
    ('k-NN 20 top-1', '99.67')

Order: k-NN top-1 with k = 20 first (the paper's headline number), then the other k in numeric order (never
alphabetical: knn20 before knn100), then top-5, then the linear probes, the attention Jaccard, DAVIS J&F and its
parts, per-sequence DAVIS scores last.
"""

from __future__ import annotations

import re
from typing import Iterable

#: The unit of every score, as stated in the model card and the report.
UNIT = "%"
#: Decimals kept wherever a score is shown or stored as a tag.
DECIMALS = 2
#: Below this many classes top-5 accuracy says nothing (it is 100 % with 5 classes), so it is not reported.
TOP5_MIN_CLASSES = 10
#: The k of the headline k-NN score.
HEADLINE_K = 20

_LINEAR = {
    "linear_approx_best_top1": (0, "linear probe (fast, approximate) best top-1"),
    "linear_approx_final_top1": (1, "linear probe (fast, approximate) final top-1"),
    "linear_approx_final_top5": (2, "linear probe (fast, approximate) final top-5"),
    "linear_best_top1": (3, "linear probe best top-1"),
    "linear_final_top1": (4, "linear probe final top-1"),
    "linear_final_top5": (5, "linear probe final top-5"),
}
_ATTENTION = {
    "attn_jaccard_best_head": (0, "attention Jaccard, best head"),
    "attn_jaccard_mean_heads": (1, "attention Jaccard, mean over heads"),
    "attn_jaccard_union_heads": (2, "attention Jaccard, union of heads"),
}
_DAVIS = {
    "davis_jf_mean": (0, "DAVIS J&F mean"),
    "davis_j_mean": (1, "DAVIS J mean"),
    "davis_f_mean": (2, "DAVIS F mean"),
    "davis_j_recall": (3, "DAVIS J recall"),
    "davis_f_recall": (4, "DAVIS F recall"),
    "davis_j_decay": (5, "DAVIS J decay"),
    "davis_f_decay": (6, "DAVIS F decay"),
}
_KNN = re.compile(r"knn(\d+)_top([15])")
_KNN_PARITY = re.compile(r"knn(\d+)_top1_bf16_minus_fp32")
_DAVIS_SEQ = re.compile(r"davis_seq_(.+)_jf")


def sort_key(metric: str) -> tuple:
    """The position of ``metric`` in the reading order (see the module docstring); unknown names go last,
    alphabetically."""
    m = _KNN.fullmatch(metric)
    if m:
        k, top = int(m.group(1)), int(m.group(2))
        return (0, top, k != HEADLINE_K, k, "")
    m = _KNN_PARITY.fullmatch(metric)
    if m:
        return (1, 0, False, int(m.group(1)), "")
    if metric in _LINEAR:
        return (2, _LINEAR[metric][0], False, 0, "")
    if metric in _ATTENTION:
        return (3, _ATTENTION[metric][0], False, 0, "")
    if metric in _DAVIS:
        return (4, _DAVIS[metric][0], False, 0, "")
    m = _DAVIS_SEQ.fullmatch(metric)
    if m:
        return (5, 0, False, 0, m.group(1))
    return (6, 0, False, 0, metric)


def ordered(metrics: Iterable[str]) -> list[str]:
    """``metrics`` in reading order."""
    return sorted(metrics, key=sort_key)


def label(metric: str) -> str:
    """A person's name for a metric: ``knn20_top1`` -> ``k-NN 20 top-1``."""
    m = _KNN.fullmatch(metric)
    if m:
        return f"k-NN {m.group(1)} top-{m.group(2)}"
    m = _KNN_PARITY.fullmatch(metric)
    if m:
        return f"k-NN {m.group(1)} top-1, bf16 minus fp32 (points)"
    for table in (_LINEAR, _ATTENTION, _DAVIS):
        if metric in table:
            return table[metric][1]
    m = _DAVIS_SEQ.fullmatch(metric)
    if m:
        return f"DAVIS J&F, sequence {m.group(1)}"
    return metric


def is_top5(metric: str) -> bool:
    return metric.endswith("_top5")


def is_fraction_metric(metric: str) -> bool:
    """Whether the library computes ``metric`` as a fraction in [0, 1] (attention Jaccard, DAVIS): the evaluation
    tasks multiply these by 100."""
    return metric.startswith(("attn_jaccard_", "davis_"))


def as_percent(metrics: dict[str, float]) -> dict[str, float]:
    """The library's scores with the fractions (:func:`is_fraction_metric`) turned into percent."""
    return {k: 100.0 * float(v) if is_fraction_metric(k) else float(v) for k, v in metrics.items()}


def rounded(value: float) -> float:
    """A score as shown and stored in tags: :data:`DECIMALS` decimals."""
    return round(float(value), DECIMALS)


def display(value: float) -> str:
    """``99.66666666666667`` -> ``'99.67'`` (fixed decimals, so a column of scores lines up)."""
    return f"{float(value):.{DECIMALS}f}"


def headline(metrics: Iterable[str]) -> str | None:
    """The score a person looks at first: the first of the reading order that is not a bf16 parity check."""
    for m in ordered(metrics):
        if not _KNN_PARITY.fullmatch(m):
            return m
    return None
