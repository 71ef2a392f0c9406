"""The k-NN's blockwise top-k merge (:class:`RunningTopK`) against a full sort, with heavy ties, every block size
and the dense fallback; the k-NN on float16 features; non-finite features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dino_model.eval import knn
from dino_model.eval.knn import RunningTopK, knn_classify, knn_predict, nearest_neighbors


def _expected_topk(sims: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k columns of each row by (similarity desc, column asc), from a full sort."""
    s = sims.numpy()
    idx = np.stack([np.lexsort((np.arange(s.shape[1]), -row))[:k] for row in s])
    return np.take_along_axis(s, idx, 1), idx


def _running(sims: torch.Tensor, k: int, block: int) -> RunningTopK:
    top = RunningTopK(sims.shape[0], k)
    for start in range(0, sims.shape[1], block):
        top.update(sims[:, start : start + block].contiguous(), start)
    return top


def _tied_sims(rows: int, cols: int, levels: int, seed: int) -> torch.Tensor:
    """Similarities on a coarse grid (many exact ties), some rows all equal."""
    g = torch.Generator().manual_seed(seed)
    sims = torch.randint(-levels, levels + 1, (rows, cols), generator=g).float() / levels
    sims[0] = 0.5  # every column tied
    sims[1, ::3] = 1.0  # a third of the columns tied at the top
    return sims


@pytest.mark.parametrize("k", [1, 5, 64, 200])
@pytest.mark.parametrize("block", [1, 7, 64, 100, 1000, 5000])
def test_running_topk_equals_full_sort_with_ties(k, block):
    sims = _tied_sims(rows=9, cols=300 if block < 10 else 2000, levels=20, seed=k * 7 + block)
    top = _running(sims, k, block)
    values, indices = _expected_topk(sims, k)
    assert np.array_equal(top.indices.numpy(), indices)
    assert np.array_equal(top.values.numpy(), values)


def test_running_topk_continuous_values_and_late_neighbours():
    # ascending similarities: every block beats the kept ones, so each block's candidates all pass the first bound
    g = torch.Generator().manual_seed(3)
    sims = torch.randn(16, 20000, generator=g)
    sims[:4] = torch.linspace(-1, 1, 20000)
    for block in (256, 4096, 20000):
        top = _running(sims, 200, block)
        values, indices = _expected_topk(sims, 200)
        assert np.array_equal(top.indices.numpy(), indices)
        assert np.array_equal(top.values.numpy(), values)


def test_dense_fallback_for_massive_ties(monkeypatch):
    # more tied candidates in one block than the sparse merge takes: those rows go through the block's exact top-k
    monkeypatch.setattr(knn, "_MAX_CANDIDATES", 50)
    sims = _tied_sims(rows=6, cols=2000, levels=3, seed=1)
    for block in (128, 2000):
        top = _running(sims, 20, block)
        values, indices = _expected_topk(sims, 20)
        assert np.array_equal(top.indices.numpy(), indices)
        assert np.array_equal(top.values.numpy(), values)
    assert _running(sims, 20, 2000).indices[0].tolist() == list(range(20))  # all tied: the lowest indices


def test_fewer_columns_than_k_leave_unfilled_entries_until_more_come():
    top = RunningTopK(2, 4)
    top.update(torch.tensor([[0.1, 0.9], [0.3, 0.3]]), 0)
    assert top.indices.tolist() == [[1, 0, -1, -1], [0, 1, -1, -1]]
    top.update(torch.tensor([[0.5, 0.1, 0.2], [0.3, 0.4, 0.3]]), 2)
    assert top.indices.tolist() == [[1, 2, 4, 0], [3, 0, 1, 2]]


def test_blocks_must_come_in_order():
    top = RunningTopK(1, 2)
    top.update(torch.zeros(1, 3), 0)
    with pytest.raises(ValueError, match="expected the block at 3, got 5"):
        top.update(torch.zeros(1, 3), 5)


def test_nearest_neighbors_same_for_every_train_chunk():
    # small integers: every dot product is exact in float32, whatever the matmul's blocking, so ties are exact ties
    g = torch.Generator().manual_seed(0)
    train = torch.randint(-2, 3, (700, 6), generator=g).float()
    test = torch.randint(-2, 3, (11, 6), generator=g).float()
    v0, i0 = _expected_topk(test @ train.T, 50)
    for chunk in (1, 64, 65, 699, 10_000):
        v, i = nearest_neighbors(train, test, 50, train_chunk_size=chunk)
        assert np.array_equal(i.numpy(), i0) and np.array_equal(v.numpy(), v0)


def test_float16_features_score_as_their_float32_values():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(500, 16)).astype(np.float16)
    labels = rng.integers(0, 5, 500)
    test = rng.normal(size=(60, 16)).astype(np.float16)
    tl = rng.integers(0, 5, 60)
    half = knn_classify(train, labels, test, tl, ks=(1, 10, 50), train_chunk_size=128, chunk_size=16)
    full = knn_classify(train.astype(np.float32), labels, test.astype(np.float32), tl, ks=(1, 10, 50),
                        train_chunk_size=128, chunk_size=16)
    assert half == full
    assert np.array_equal(knn_predict(train, labels, test, k=10), knn_predict(train.astype(np.float32), labels,
                                                                             test.astype(np.float32), k=10))


@pytest.mark.parametrize("which", ["train", "test"])
def test_non_finite_features_are_refused(which):
    train = np.eye(4, dtype=np.float32)
    test = np.eye(4, dtype=np.float32)[:2].copy()
    (train if which == "train" else test)[1, 2] = np.nan
    with pytest.raises(ValueError, match=f"{which}_feats has non-finite values .* rows 0..1"):
        knn_classify(train, [0, 1, 2, 3], test, [0, 1], ks=(1,), train_chunk_size=2, chunk_size=2)


def test_knn_leaves_its_inputs_unchanged():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(300, 8)).astype(np.float32) * 5
    test = rng.normal(size=(20, 8)).astype(np.float32) * 5
    before = train.copy(), test.copy()
    knn_classify(train, np.arange(300) % 3, test, np.arange(20) % 3, ks=(5,), train_chunk_size=64)
    assert np.array_equal(train, before[0]) and np.array_equal(test, before[1])
