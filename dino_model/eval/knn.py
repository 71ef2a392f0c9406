"""Weighted k-NN classification on frozen features — the DINO paper's k-NN evaluation (``eval_knn.py``).

Each test feature votes with its k nearest training features (cosine similarity of L2-normalised features); a
neighbour of class c at similarity s adds ``exp(s / T)`` to class c's score (T = 0.07). Top-1 / top-5 accuracy is
reported for every k in ``ks`` (default 10, 20, 100, 200), in percent like the reference.

Differences from the reference, all deliberate:

* Memory and speed: the training features are read once, ``train_chunk_size`` rows at a time, each block
  L2-normalised (and moved to the device) as it is used and compared with every chunk of ``chunk_size`` test rows
  by one matmul into a reused buffer; a running top-k per test row (:class:`RunningTopK`) keeps the best k. Beyond
  the inputs themselves the k-NN holds the normalised test features, one training block, one
  ``chunk_size x train_chunk_size`` similarity buffer and k (similarity, index) pairs per test row: ImageNet's
  1.28 M x 384 training features need no second copy (nor, on a GPU, to be on the device at once), float16
  features (a half-precision store) stay float16 and are computed in float32 one block at a time. The merge looks
  at a block through one max-reduction per group of 64 columns and merges only the columns that can enter the
  top-k, so the time goes to the matmul (docs/benchmarks.md). No distributed launcher.
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

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_T = 0.07
#: Columns per group of the running top-k's max-reduction, and the most candidates of one row merged sparsely.
_GROUP = 64
_MAX_CANDIDATES = 4096


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


class RunningTopK:
    """The ``k`` best training neighbours (similarity, index) of each of ``rows`` queries seen so far, by
    (similarity desc, index asc), updated with blocks of similarity columns given in ascending index order.

    Exact, and cheap next to the matmul that produces the similarities:

    * every new column has a higher index than those already kept, so it can enter a row's top-k only with a
      similarity strictly above the row's current k-th one (on a tie the earlier column wins);
    * it must also be in the block's own top-k, so at least the k-th largest of the block's group maxima (groups of
      ``_GROUP`` columns: k groups hold k distinct columns at least that similar): the bound used while the kept
      top-k still has free places (the first block, whose k-th similarity is -inf);
    * one max-reduction over the block finds the groups that can hold such a column; only those are looked at, and
      the columns that pass both bounds (about k x ln(N / k) per row over N columns, not N) are merged with the
      kept ones by a stable sort.

    A row with more than ``_MAX_CANDIDATES`` passing columns in one block (massive ties) takes the block's exact
    top-k instead. Entries not yet filled hold similarity -inf and index -1."""

    def __init__(self, rows: int, k: int, device: torch.device | str = "cpu"):
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.values = torch.full((rows, k), -math.inf, dtype=torch.float32, device=device)
        self.indices = torch.full((rows, k), -1, dtype=torch.long, device=device)
        self.next_index = 0

    def update(self, sims: torch.Tensor, start: int) -> None:
        """Merge the similarity columns ``start .. start + sims.shape[1]`` (the next ones after those seen)."""
        if start != self.next_index:
            raise ValueError(f"columns must come in order: expected the block at {self.next_index}, got {start}")
        self.next_index = start + sims.shape[1]
        r, c, v = self._candidates(sims)
        if r.numel() == 0:
            return
        counts = torch.bincount(r, minlength=sims.shape[0])
        heavy = counts > _MAX_CANDIDATES
        if bool(heavy.any()):
            hrows = heavy.nonzero().squeeze(1)
            col_idx = torch.arange(start, start + sims.shape[1], device=sims.device).expand(hrows.numel(), -1)
            self._merge(hrows, *_select_topk(sims[hrows], col_idx, self.k))
            keep = ~heavy[r]
            r, c, v = r[keep], c[keep], v[keep]
            counts[hrows] = 0
            if r.numel() == 0:
                return
        # candidate j of row r goes to (slot of r among the rows with candidates, j - the row's first candidate)
        light = counts.nonzero().squeeze(1)
        slot = (torch.cumsum(counts > 0, 0) - 1)[r]
        pos = torch.arange(r.numel(), device=sims.device) - (torch.cumsum(counts, 0) - counts)[r]
        width = int(counts.max())
        cand_v = torch.full((light.numel(), width), -math.inf, dtype=self.values.dtype, device=sims.device)
        cand_i = torch.full((light.numel(), width), -1, dtype=torch.long, device=sims.device)
        cand_v[slot, pos] = v
        cand_i[slot, pos] = c + start
        self._merge(light, cand_v, cand_i)

    def _candidates(self, sims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, column, similarity) of the block's columns that pass both bounds, by row then column."""
        rows, cols = sims.shape
        kth = self.values[:, -1:]
        full = cols - cols % _GROUP
        found = []
        bound = None
        if full:
            groups = sims[:, :full].view(rows, full // _GROUP, _GROUP)
            gmax = groups.amax(dim=2)
            sel = gmax > kth
            if gmax.shape[1] >= self.k and bool(torch.isinf(kth).any()):  # only while a row has free places
                bound = torch.topk(gmax, self.k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
                sel &= gmax >= bound
            gr, gg = sel.nonzero(as_tuple=True)
            vals = groups[gr, gg]
            passing = vals > kth[gr]
            if bound is not None:
                passing &= vals >= bound[gr]
            p, j = passing.nonzero(as_tuple=True)
            found.append((gr[p], gg[p] * _GROUP + j, vals[p, j]))
        if full < cols:
            tail = sims[:, full:]
            passing = tail > kth
            if bound is not None:
                passing &= tail >= bound
            tr, j = passing.nonzero(as_tuple=True)
            found.append((tr, j + full, tail[tr, j]))
        if len(found) == 1:
            return found[0]
        r, c, v = (torch.cat(x) for x in zip(*found))
        order = torch.sort(r, stable=True).indices  # the tail's columns after the groups' within each row
        return r[order], c[order], v[order]

    def _merge(self, rows: torch.Tensor, cand_v: torch.Tensor, cand_i: torch.Tensor) -> None:
        """Merge candidates of higher indices than all kept ones, in ascending index order among equal similarities:
        a stable sort of [kept, candidates] by similarity then puts equal similarities in index order."""
        v = torch.cat([self.values[rows], cand_v], dim=1)
        i = torch.cat([self.indices[rows], cand_i], dim=1)
        order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values[rows] = torch.gather(v, 1, order)
        self.indices[rows] = torch.gather(i, 1, order)


def nearest_neighbors(
    train_feats: torch.Tensor, test_feats: torch.Tensor, k: int, train_chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` training neighbours (similarity, index) of each test row, by (similarity desc, index asc).

    Both inputs must already be L2-normalised and on the same device. Columns are scanned in chunks and merged."""
    n_train = train_feats.shape[0]
    top = RunningTopK(test_feats.shape[0], min(k, n_train), test_feats.device)
    for start in range(0, n_train, train_chunk_size):
        top.update(test_feats @ train_feats[start : start + train_chunk_size].T, start)
    return top.values, top.indices


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


def _normalized_rows(feats: torch.Tensor, start: int, end: int, device: torch.device, name: str) -> torch.Tensor:
    """Rows ``start .. end`` of ``feats`` as L2-normalised float32 on ``device`` (a new tensor: ``feats`` itself is
    never normalised in place, nor copied whole). The same arithmetic as ``F.normalize(x, dim=1)``; a NaN or an
    infinity makes its row's norm non-finite, which is checked on the norms rather than on every value."""
    block = feats[start:end].to(device, torch.float32)
    norms = torch.linalg.vector_norm(block, dim=1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError(f"{name} has non-finite values (NaN or inf) in rows {start}..{min(end, feats.shape[0]) - 1}")
    return block / norms.clamp_min(1e-12)


def _all_neighbors(tr_f: torch.Tensor, te_f: torch.Tensor, k: int, chunk_size: int, train_chunk_size: int,
                   device: torch.device, progress: bool) -> list[RunningTopK]:
    """The top-``k`` neighbours of every test row, one :class:`RunningTopK` per chunk of ``chunk_size`` test rows.

    The training features are read once, ``train_chunk_size`` rows at a time, each block normalised (and moved to
    ``device``) as it is used, then compared with every test chunk: memory beyond the inputs is the normalised test
    features, one normalised training block, one ``chunk_size x train_chunk_size`` similarity buffer (reused) and
    the running top-k of every test row."""
    n_train, n_test = tr_f.shape[0], te_f.shape[0]
    queries = [_normalized_rows(te_f, s, s + chunk_size, device, "test_feats") for s in range(0, n_test, chunk_size)]
    tops = [RunningTopK(q.shape[0], k, device) for q in queries]
    buffer = torch.empty(min(chunk_size, n_test) * min(train_chunk_size, n_train), device=device)
    with tqdm(total=n_train, disable=not progress, unit="row", desc=f"k-NN[{n_test} queries]") as bar:
        for start in range(0, n_train, train_chunk_size):
            block = _normalized_rows(tr_f, start, start + train_chunk_size, device, "train_feats")
            for q, top in zip(queries, tops):
                sims = buffer[: q.shape[0] * block.shape[0]].view(q.shape[0], block.shape[0])
                torch.mm(q, block.T, out=sims)
                top.update(sims, start)
            bar.update(block.shape[0])
    return tops


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
    progress: bool = False,
) -> dict[int, dict[str, float]]:
    """Weighted k-NN accuracy of ``test_feats`` against ``train_feats`` for every k in ``ks``.

    Inputs: ``[N, D]`` float features (float32 or float16, e.g. from a half-precision feature store: computed in
    float32 either way) and ``[N]`` integer labels (numpy or torch). ``num_classes`` defaults to the largest label +
    1. ``device`` defaults to the training features' device (pass "cuda" to compute on a GPU: the training features
    go there one block at a time). ``progress`` shows a bar over the training rows.
    Returns ``{k: {"top1": %, "top5": %}}`` keyed by the requested k (a k above the training-set size is clamped
    to it; see the module docstring for the tie rules). Raises :class:`ValueError` for mismatched counts, empty
    sets, non-finite features, or test classes absent from the training set.
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
    tr_l = tr_l.to(device)
    kmax = min(max(ks), tr_f.shape[0])
    tops = _all_neighbors(tr_f, te_f, kmax, chunk_size, train_chunk_size, device, progress)
    hits1 = {k: 0 for k in ks}
    hits5 = {k: 0 for k in ks}
    for start, top in zip(range(0, te_f.shape[0], chunk_size), tops):
        target = te_l[start : start + chunk_size].to(device)
        sims, labels = top.values, tr_l[top.indices]
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
    if te_f.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    num_classes = int(tr_l.max().item()) + 1 if num_classes is None else num_classes
    device = torch.device(device) if device is not None else tr_f.device
    tr_l = tr_l.to(device)
    tops = _all_neighbors(tr_f, te_f, min(k, tr_f.shape[0]), chunk_size, train_chunk_size, device, False)
    out = [rank_predictions(vote(t.values, tr_l[t.indices], num_classes, T), top=1)[:, 0].cpu() for t in tops]
    return torch.cat(out).numpy()
