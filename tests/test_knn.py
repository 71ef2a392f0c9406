"""k-NN evaluation against hand-computed examples, tie rules, clamping, chunk invariance and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dino_model.eval.knn import knn_classify, nearest_neighbors


def test_weighted_vote_hand_computed():
    # train: e_x (class 0), e_y (class 1), (e_x + e_y)/sqrt2 (class 1); one test point at angle 30 degrees
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 1, 1])
    test = np.array([[math.cos(math.pi / 6), math.sin(math.pi / 6)]], dtype=np.float32)
    s0, s1, s2 = math.cos(math.pi / 6), math.sin(math.pi / 6), math.cos(math.pi / 12)
    # nearest neighbour is the diagonal (cos 15deg) -> class 1
    assert s2 > s0 > s1
    w0 = math.exp(s0 / 0.07)
    w1 = math.exp(s1 / 0.07) + math.exp(s2 / 0.07)
    assert w1 > w0  # with all three neighbours class 1 still wins the weighted vote
    res = knn_classify(train, labels, test, [1], ks=(1, 2, 3), T=0.07)
    assert res[1]["top1"] == 100.0 and res[2]["top1"] == 100.0 and res[3]["top1"] == 100.0
    # a test point labelled 0 with k=2: neighbours are the diagonal (class 1, sim .966) and e_x (class 0, .866)
    # -> class 1 wins top-1, class 0 is the second voted class -> top-5 hit
    res0 = knn_classify(train, labels, test, [0], ks=(2,), T=0.07)
    assert res0[2] == {"top1": 0.0, "top5": 100.0}


def test_vote_weights_decide_between_classes():
    # two class-0 neighbours at sim 0.5 against one class-1 neighbour at sim 0.6:
    # T=0.07: 2*exp(0.5/0.07)=2527 < exp(0.6/0.07)=5271 -> class 1; T=1: 2*e^0.5=3.30 > e^0.6=1.82 -> class 0
    a = math.acos(0.5)
    b = math.acos(0.6)
    train = np.array([[0.5, math.sin(a)], [0.5, -math.sin(a)], [0.6, math.sin(b)]], dtype=np.float32)
    labels = np.array([0, 0, 1])
    test = np.array([[1.0, 0.0]], dtype=np.float32)
    assert 2 * math.exp(0.5 / 0.07) < math.exp(0.6 / 0.07)
    assert knn_classify(train, labels, test, [1], ks=(3,), T=0.07)[3]["top1"] == 100.0
    assert knn_classify(train, labels, test, [0], ks=(3,), T=1.0)[3]["top1"] == 100.0


def test_neighbour_ties_go_to_lower_train_index():
    # two identical training features, labels 1 then 0: k=1 must take index 0 (label 1), whatever the chunking
    train = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    test = np.array([[1.0, 0.0]], dtype=np.float32)
    for chunk in (1, 2, 3, 100):
        res = knn_classify(train, [1, 0, 0], test, [1], ks=(1,), train_chunk_size=chunk)
        assert res[1]["top1"] == 100.0
        res = knn_classify(train, [0, 1, 0], test, [1], ks=(1,), train_chunk_size=chunk)
        assert res[1]["top1"] == 0.0


def test_class_ties_go_to_lower_class_index():
    # k=2: two equally similar neighbours of classes 3 and 1 -> equal scores -> class 1 predicted
    train = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    test = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    res = knn_classify(train, [3, 1], test, [1, 3], ks=(2,))
    assert res[2] == {"top1": 50.0, "top5": 100.0}


def test_unvoted_classes_never_count_in_top5():
    # 10 classes, k=1: only one class gets a vote; a test sample of another class is a miss even in top-5
    train = np.eye(10, dtype=np.float32)
    test = np.array([[1.0, 0.2] + [0.0] * 8], dtype=np.float32)  # nearest is class 0
    res = knn_classify(train, np.arange(10), test, [1], ks=(1, 2))
    assert res[1] == {"top1": 0.0, "top5": 0.0}
    assert res[2] == {"top1": 0.0, "top5": 100.0}


def test_k_larger_than_train_set_is_clamped():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(7, 5)).astype(np.float32)
    labels = rng.integers(0, 3, size=7)
    labels[:3] = [0, 1, 2]
    test = rng.normal(size=(4, 5)).astype(np.float32)
    tl = rng.integers(0, 3, size=4)
    res = knn_classify(train, labels, test, tl, ks=(7, 200))
    assert res[200] == res[7]


def _brute_force(train, labels, test, tlabels, k, T, C):
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = (qn @ tn.T).astype(np.float64)
    h1 = h5 = 0
    for r in range(len(test)):
        order = np.lexsort((np.arange(len(train)), -sims[r]))[:k]
        scores = np.zeros(C)
        np.add.at(scores, labels[order], np.exp(sims[r, order] / T))
        ranked = [c for c in np.lexsort((np.arange(C), -scores)) if scores[c] > 0][:5]
        h1 += ranked[0] == tlabels[r]
        h5 += tlabels[r] in ranked
    return 100.0 * h1 / len(test), 100.0 * h5 / len(test)


def test_chunking_matches_brute_force():
    rng = np.random.default_rng(1)
    C = 6
    train = rng.normal(size=(150, 8)).astype(np.float32)
    # exact duplicates create neighbour ties across chunk boundaries
    train[100:110] = train[0:10]
    labels = rng.integers(0, C, size=150)
    test = rng.normal(size=(37, 8)).astype(np.float32)
    test[:5] = train[:5]
    tl = rng.integers(0, C, size=37)
    expected = {k: _brute_force(train, labels, test, tl, k, 0.07, C) for k in (1, 10, 20)}
    for chunk, tchunk in ((1000, 100000), (5, 7), (37, 1), (3, 64)):
        res = knn_classify(train, labels, test, tl, ks=(1, 10, 20), chunk_size=chunk, train_chunk_size=tchunk)
        for k in (1, 10, 20):
            assert res[k]["top1"] == pytest.approx(expected[k][0])
            assert res[k]["top5"] == pytest.approx(expected[k][1])


def test_nearest_neighbors_order_and_ties():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]), dim=1)
    q = torch.tensor([[1.0, 0.0]])
    for tchunk in (1, 2, 4):
        v, i = nearest_neighbors(train, q, 3, train_chunk_size=tchunk)
        assert i.tolist() == [[0, 2, 3]]
        assert v[0].tolist() == pytest.approx([1.0, 1.0, math.sqrt(0.5)])


def test_torch_inputs_and_default_ks():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(300, 16, generator=g)
    labels = torch.arange(300) % 4
    # test points are noisy copies of training points: nearest-neighbour accuracy should be high
    test = train[:50] + 0.01 * torch.randn(50, 16, generator=g)
    res = knn_classify(train, labels, test, labels[:50])
    assert set(res) == {10, 20, 100, 200}
    assert all(0.0 <= r["top1"] <= r["top5"] <= 100.0 for r in res.values())
    assert knn_classify(train, labels, test, labels[:50], ks=(1,))[1]["top1"] == 100.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(train_labels=[0, 1]), "train_feats has 3 rows but train_labels has 2"),
        (dict(test_labels=[0, 1, 2]), "test_feats has 2 rows but test_labels has 3"),
        (dict(train_feats=np.zeros((0, 2), np.float32), train_labels=[]), "train_feats is empty"),
        (dict(test_feats=np.zeros((0, 2), np.float32), test_labels=[]), "test_feats is empty"),
        (dict(test_labels=[0, 5]), "no training sample: 5"),
        (dict(test_feats=np.ones((2, 3), np.float32)), "feature dimensions differ"),
        (dict(ks=(0,)), "ks must be positive"),
        (dict(num_classes=1), "num_classes=1"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(
        train_feats=np.eye(3, 2, dtype=np.float32),
        train_labels=[0, 1, 1],
        test_feats=np.eye(2, dtype=np.float32),
        test_labels=[0, 1],
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        knn_classify(**args)
