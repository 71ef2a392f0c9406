"""Weighted k-NN classification on frozen features — the DINO paper's k-NN evaluation (``eval_knn.py``).

Each test feature votes with its k nearest training features (cosine similarity of L2-normalised features); a
neighbour of class c at similarity s adds ``exp(s / T)`` to class c's score (T = 0.07). Top-1 / top-5 accuracy is
reported for every k in ``ks`` (default 10, 20, 100, 200), in percent like the reference.

Differences from the reference, all deliberate:

* Memory: test rows are processed ``chunk_size`` at a time and, within a row chunk, training columns
  ``train_chunk_size`` at a time with a running top-k merge, so 1.28 M train x 50 k test features fit on one GPU
  or in CPU RAM (peak ~ ``chunk_size x train_chunk_size`` floats, a few of them). No distributed launcher.
* Any test-set size (the reference divides the test set into 100 chunks and fails under 100 images) and any
  number of classes.
* ``k`` larger than the training set is clamped to the training-set size (every training sample votes).
* Ties are broken deterministically:
  - neighbours: among training samples with the same similarity, the one with the lower training index wins
    (the top-k set is the first k of the order (similarity desc, index asc));
  - classes: among classes with the same summed vote, the lower class index ranks first;
  - a class that received no vote is never a prediction, so top-5 with fewer than 5 voted classes counts only the
    voted ones (the reference would count arbitrary zero-score classes).
* Features are L2-normalised here (idempotent if they already are).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_T = 0.07


def _as_tensor(x, name: str, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def _select_topk(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic top-k per row of ``vals`` (rows x m), the columns being in ascending ``idx`` order per row.

    Returns the chosen (values, indices) sorted by (value desc, index asc). Ties at the k-th value go to the
    columns that come first (= the lower indices)."""
    m = vals.shape[1]
    if k >= m:
        chosen_v, chosen_i = vals, idx
    else:
        kth = torch.topk(vals, k, dim=1, largest=True, sorted=True).values[:, -1:]  # [rows, 1]
        take = vals >= kth
        if bool((take.sum(dim=1) != k).any()):  # some row has ties at the k-th value: keep the lowest columns
            greater = vals > kth
            equal = vals == kth
            need = k - greater.sum(dim=1, keepdim=True)  # how many tied entries each row still takes
            take = greater | (equal & (torch.cumsum(equal.to(torch.int32), dim=1) <= need))
        # exactly k True per row; nonzero returns them row-major, so columns stay in ascending order
        cols = take.nonzero(as_tuple=False)[:, 1].view(-1, k)
        chosen_v = torch.gather(vals, 1, cols)
        chosen_i = torch.gather(idx, 1, cols)
    # order by (value desc, index asc): the columns are index-ascending, and a stable sort keeps that among ties
    order = torch.sort(chosen_v, dim=1, descending=True, stable=True).indices
    return torch.gather(chosen_v, 1, order), torch.gather(chosen_i, 1, order)


def nearest_neighbors(
    train_feats: torch.Tensor, test_feats: torch.Tensor, k: int, train_chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` training neighbours (similarity, index) of each test row, by (similarity desc, index asc).

    Both inputs must already be L2-normalised and on the same device. Columns are scanned in chunks and merged."""
    n_train = train_feats.shape[0]
    k = min(k, n_train)
    rows = test_feats.shape[0]
    best_v = torch.empty(rows, 0, dtype=test_feats.dtype, device=test_feats.device)
    best_i = torch.empty(rows, 0, dtype=torch.long, device=test_feats.device)
    for start in range(0, n_train, train_chunk_size):
        block = train_feats[start : start + train_chunk_size]
        sims = test_feats @ block.T  # [rows, cols]
        col_idx = torch.arange(start, start + block.shape[0], device=sims.device).expand(rows, -1)
        v, i = _select_topk(sims, col_idx, k)
        # merge with the running best: make both halves index-ascending so ties resolve to the lower index
        if best_v.shape[1]:
            o = torch.sort(best_i, dim=1).indices
            bv, bi = torch.gather(best_v, 1, o), torch.gather(best_i, 1, o)
            o = torch.sort(i, dim=1).indices
            v, i = torch.gather(v, 1, o), torch.gather(i, 1, o)
            v, i = _select_topk(torch.cat([bv, v], 1), torch.cat([bi, i], 1), k)
        best_v, best_i = v, i
    return best_v, best_i


def vote(
    sims: torch.Tensor, neighbor_labels: torch.Tensor, num_classes: int, T: float = DEFAULT_T
) -> torch.Tensor:
    """Class scores ``[rows, num_classes]``: each neighbour adds ``exp(sim / T)`` to its class."""
    weights = (sims / T).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, neighbor_labels, weights)


def rank_predictions(scores: torch.Tensor, top: int = 5) -> torch.Tensor:
    """The ``top`` best classes per row by (score desc, class index asc); classes without any vote (score 0) are
    replaced by -1 so they never count as a hit."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top]
    voted = torch.gather(scores, 1, order) > 0
    return torch.where(voted, order, torch.full_like(order, -1))


def validate_features(train_feats, train_labels, test_feats, test_labels):
    """Check shapes, counts, emptiness and that every test class appears in the training set; return tensors."""
    tr_f = _as_tensor(train_feats, "train_feats")
    te_f = _as_tensor(test_feats, "test_feats")
    tr_l = _as_tensor(train_labels, "train_labels").long().reshape(-1)
    te_l = _as_tensor(test_labels, "test_labels").long().reshape(-1)
    for name, f in (("train_feats", tr_f), ("test_feats", te_f)):
        if f.dim() != 2:
            raise ValueError(f"{name} must be a 2-D [N, D] array, got shape {tuple(f.shape)}")
        if not torch.is_floating_point(f):
            raise ValueError(f"{name} must be floating point, got {f.dtype}")
    if tr_f.shape[0] == 0:
        raise ValueError("train_feats is empty: the k-NN needs at least one training feature")
    if te_f.shape[0] == 0:
        raise ValueError("test_feats is empty: nothing to evaluate")
    if tr_f.shape[0] != tr_l.shape[0]:
        raise ValueError(f"train_feats has {tr_f.shape[0]} rows but train_labels has {tr_l.shape[0]} labels")
    if te_f.shape[0] != te_l.shape[0]:
        raise ValueError(f"test_feats has {te_f.shape[0]} rows but test_labels has {te_l.shape[0]} labels")
    if tr_f.shape[1] != te_f.shape[1]:
        raise ValueError(f"feature dimensions differ: train {tr_f.shape[1]} vs test {te_f.shape[1]}")
    if (tr_l < 0).any() or (te_l < 0).any():
        raise ValueError("labels must be non-negative class indices (unlabelled samples, -1, cannot be scored)")
    missing = sorted(set(te_l.unique().tolist()) - set(tr_l.unique().tolist()))
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise ValueError(f"{len(missing)} test class(es) have no training sample: {shown}")
    return tr_f, tr_l, te_f, te_l


@torch.no_grad()
def knn_classify(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    ks: Iterable[int] = DEFAULT_KS,
    T: float = DEFAULT_T,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    train_chunk_size: int = 65536,
    device: str | torch.device | None = None,
) -> dict[int, dict[str, float]]:
    """Weighted k-NN accuracy of ``test_feats`` against ``train_feats`` for every k in ``ks``.

    Inputs: ``[N, D]`` float features and ``[N]`` integer labels (numpy or torch). ``num_classes`` defaults to the
    largest label + 1. ``device`` defaults to the training features' device (pass "cuda" to compute on a GPU).
    Returns ``{k: {"top1": %, "top5": %}}`` keyed by the requested k (a k above the training-set size is clamped
    to it; see the module docstring for the tie rules). Raises :class:`ValueError` for mismatched counts, empty
    sets, or test classes absent from the training set.
    """
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if not T > 0:
        raise ValueError(f"T must be positive, got {T}")
    if chunk_size < 1 or train_chunk_size < 1:
        raise ValueError("chunk_size and train_chunk_size must be positive")
    tr_f, tr_l, te_f, te_l = validate_features(train_feats, train_labels, test_feats, test_labels)
    max_label = int(max(tr_l.max().item(), te_l.max().item()))
    if num_classes is None:
        num_classes = max_label + 1
    elif num_classes <= max_label:
        raise ValueError(f"num_classes={num_classes} but a label is {max_label}")
    device = torch.device(device) if device is not None else tr_f.device
    tr_f = F.normalize(tr_f.to(device, torch.float32), dim=1)
    tr_l = tr_l.to(device)
    kmax = min(max(ks), tr_f.shape[0])
    hits1 = {k: 0 for k in ks}
    hits5 = {k: 0 for k in ks}
    for start in range(0, te_f.shape[0], chunk_size):
        q = F.normalize(te_f[start : start + chunk_size].to(device, torch.float32), dim=1)
        target = te_l[start : start + chunk_size].to(device)
        sims, idx = nearest_neighbors(tr_f, q, kmax, train_chunk_size)
        labels = tr_l[idx]
        for k in ks:
            kk = min(k, kmax)  # the neighbours are sorted, so the first kk are the top-kk
            preds = rank_predictions(vote(sims[:, :kk], labels[:, :kk], num_classes, T), top=5)
            correct = preds == target[:, None]
            hits1[k] += int(correct[:, 0].sum().item())
            hits5[k] += int(correct.any(dim=1).sum().item())
    n = te_f.shape[0]
    return {k: {"top1": 100.0 * hits1[k] / n, "top5": 100.0 * hits5[k] / n} for k in ks}


@torch.no_grad()
def knn_predict(
    train_feats,
    train_labels,
    test_feats,
    k: int = 20,
    T: float = DEFAULT_T,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    train_chunk_size: int = 65536,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """The weighted k-NN's top-1 class of every test row (int64 ``[N]``), with the rules and tie breaks of
    :func:`knn_classify`: its per-row predictions, for per-class accuracies and confusion matrices."""
    tr_f = _as_tensor(train_feats, "train_feats")
    te_f = _as_tensor(test_feats, "test_feats")
    tr_l = _as_tensor(train_labels, "train_labels").long().reshape(-1)
    if tr_f.dim() != 2 or te_f.dim() != 2 or tr_f.shape[1] != te_f.shape[1] or tr_f.shape[0] != tr_l.shape[0]:
        raise ValueError(f"features must be [N, D] with one label per training row, got train {tuple(tr_f.shape)}, "
                         f"{tr_l.shape[0]} labels, test {tuple(te_f.shape)}")
    if tr_f.shape[0] == 0:
        raise ValueError("train_feats is empty: the k-NN needs at least one training feature")
    num_classes = int(tr_l.max().item()) + 1 if num_classes is None else num_classes
    device = torch.device(device) if device is not None else tr_f.device
    tr_f = F.normalize(tr_f.to(device, torch.float32), dim=1)
    tr_l = tr_l.to(device)
    kk = min(k, tr_f.shape[0])
    out = []
    for start in range(0, te_f.shape[0], chunk_size):
        q = F.normalize(te_f[start : start + chunk_size].to(device, torch.float32), dim=1)
        sims, idx = nearest_neighbors(tr_f, q, kk, train_chunk_size)
        out.append(rank_predictions(vote(sims, tr_l[idx], num_classes, T), top=1)[:, 0].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)
