"""DINO loss against hand computations and the reference's pairwise formulation: crop pairing,
centring/sharpening, centre update, collapse indicators; the centre's all-reduce over 2 real gloo processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_model.losses import DINOLoss
from tests.reference_loss import pairwise_dino_loss


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_loss_matches_explicit_pair_loop():
    rng = np.random.default_rng(0)
    ncrops, B, K = 4, 3, 7
    s = rng.normal(size=(ncrops * B, K))
    t = rng.normal(size=(2 * B, K))
    center = rng.normal(size=(1, K)) * 0.1
    loss_fn = DINOLoss(K, ncrops)
    loss_fn.center.copy_(torch.tensor(center, dtype=torch.float32))
    got = loss_fn(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), 0.05).item()

    q = softmax((t - center) / 0.05)
    logp = np.log(softmax(s / 0.1))
    terms = []
    for i in range(2):
        for v in range(ncrops):
            if v == i:
                continue
            terms.append(np.mean(-(q[i * B:(i + 1) * B] * logp[v * B:(v + 1) * B]).sum(-1)))
    assert len(terms) == 2 * (ncrops - 1)
    assert got == pytest.approx(np.mean(terms), rel=1e-5)


def test_two_crops_by_hand():
    # ncrops = 2, B = 1, K = 2: only pairs (teacher 0, student 1) and (teacher 1, student 0).
    loss_fn = DINOLoss(2, 2)
    s = torch.tensor([[0.0, 0.1], [0.2, 0.0]])      # student logits (temperature 0.1 -> [0, 1], [2, 0])
    t = torch.tensor([[0.0, 0.04], [0.0, 0.0]])     # teacher logits (temperature 0.04 -> [0, 1], [0, 0])
    q0 = [1 / (1 + math.e), math.e / (1 + math.e)]
    q1 = [0.5, 0.5]
    logp1 = [2 - math.log(math.e ** 2 + 1), -math.log(math.e ** 2 + 1)]
    logp0 = [-math.log(1 + math.e), 1 - math.log(1 + math.e)]
    expected = (-(q0[0] * logp1[0] + q0[1] * logp1[1]) - (q1[0] * logp0[0] + q1[1] * logp0[1])) / 2
    assert loss_fn(s, t, 0.04).item() == pytest.approx(expected, rel=1e-6)


def test_same_view_pairs_are_skipped_gradient():
    # d loss / d s_v = sum over teachers i != v of (softmax(s_v / ts) - q_i) / ts / (n_pairs * B):
    # the global student views 0 and 1 only see the other global teacher view.
    ncrops, B, K = 3, 2, 5
    torch.manual_seed(0)
    s = torch.randn(ncrops * B, K, requires_grad=True)
    t = torch.randn(2 * B, K)
    loss_fn = DINOLoss(K, ncrops)
    loss_fn(s, t, 0.04).backward()
    q = torch.softmax(t / 0.04, dim=-1).chunk(2)
    p = torch.softmax(s.detach() / 0.1, dim=-1).chunk(ncrops)
    n_pairs = 2 * (ncrops - 1)
    expected = [
        (p[0] - q[1]) / 0.1 / (n_pairs * B),
        (p[1] - q[0]) / 0.1 / (n_pairs * B),
        ((p[2] - q[0]) + (p[2] - q[1])) / 0.1 / (n_pairs * B),
    ]
    assert torch.allclose(s.grad, torch.cat(expected), atol=1e-6)


def test_teacher_is_detached_and_centre_is_applied():
    loss_fn = DINOLoss(3, 2)
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    s = torch.zeros(2, 3, requires_grad=True)
    loss_fn.center.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    loss = loss_fn(s, t, 0.5)
    # centred teacher rows: [0, 0, 0] -> uniform; [-1, 1, 0] / 0.5; student uniform: CE = log 3 for both pairs.
    assert loss.item() == pytest.approx(math.log(3), rel=1e-6)
    loss.backward()
    assert t.grad is None


def test_centre_update_by_hand_and_state_dict():
    loss_fn = DINOLoss(2, 2, center_momentum=0.9)
    assert "center" in loss_fn.state_dict() and loss_fn.center.shape == (1, 2)
    loss_fn.update_center(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    assert torch.allclose(loss_fn.center, torch.tensor([[0.2, 0.4]]))  # 0.9*0 + 0.1*[2, 4]
    loss_fn.update_center(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    assert torch.allclose(loss_fn.center, torch.tensor([[0.9 * 0.2 + 0.1, 0.9 * 0.4]]))


def test_forward_does_not_update_centre():
    loss_fn = DINOLoss(4, 2)
    loss_fn(torch.randn(4, 4), torch.randn(4, 4), 0.04)
    assert torch.count_nonzero(loss_fn.center) == 0


@pytest.mark.parametrize("ncrops", [2, 4])
def test_lean_loss_equals_the_pairwise_reference_values_and_gradients(ncrops):
    g = torch.Generator().manual_seed(ncrops)
    batch, k = 5, 300
    crit = DINOLoss(k, ncrops)
    crit.center.copy_(torch.randn(1, k, generator=g))
    teacher = torch.randn(2 * batch, k, generator=g) * 3
    s1 = (torch.randn(ncrops * batch, k, generator=g) * 3).requires_grad_()
    s2 = s1.detach().clone().requires_grad_()
    ref = pairwise_dino_loss(s1, teacher, crit.center, 0.05, 0.1, ncrops)
    ref.backward()
    loss, stats = crit.loss_and_stats(s2, teacher, torch.tensor(0.05))
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(stats["entropy"], crit.teacher_stats(teacher, 0.05)["entropy"])


def test_invalid_arguments_and_shapes():
    with pytest.raises(ValueError, match="ncrops"):
        DINOLoss(4, 1)
    loss_fn = DINOLoss(4, 3)
    with pytest.raises(ValueError, match="student_output"):
        loss_fn(torch.randn(4, 4), torch.randn(4, 4), 0.04)
    with pytest.raises(ValueError, match="out_dim=4"):  # a head whose K is not the loss's
        loss_fn(torch.randn(6, 5), torch.randn(4, 5), 0.04)


def test_teacher_stats_collapse_indicators():
    K = 8
    loss_fn = DINOLoss(K, 2)
    # Uniform collapse: every teacher output equals the centre.
    stats = loss_fn.teacher_stats(torch.zeros(4, K), 0.04)
    assert stats["entropy"].item() == pytest.approx(math.log(K), rel=1e-6)
    assert stats["kl_to_uniform"].item() == pytest.approx(0.0, abs=1e-5)
    assert stats["kl_to_center"].item() == pytest.approx(0.0, abs=1e-5)
    # Distinct one-hot targets: entropy ~ 0, each sample far from the batch mean (KL = log 4).
    t = torch.eye(K)[:4] * 10.0
    stats = loss_fn.teacher_stats(t, 0.04)
    assert stats["entropy"].item() == pytest.approx(0.0, abs=1e-5)
    assert stats["kl_to_uniform"].item() == pytest.approx(math.log(K), rel=1e-5)
    assert stats["kl_to_center"].item() == pytest.approx(math.log(4), rel=1e-5)
    # One dimension dominating for all samples: entropy ~ 0 AND kl_to_center ~ 0.
    stats = loss_fn.teacher_stats(torch.eye(K)[[0, 0, 0, 0]] * 10.0, 0.04)
    assert stats["kl_to_center"].item() == pytest.approx(0.0, abs=1e-5)
    # A 2-way split by hand: q = [p, 1-p, 0...] with temperature 1.
    t = torch.full((2, K), -1e4)
    t[:, 0], t[:, 1] = 0.0, math.log(3.0)  # q = [1/4, 3/4]
    stats = loss_fn.teacher_stats(t, 1.0)
    assert stats["entropy"].item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-5)


def _centre_worker(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loss_fn = DINOLoss(2, 2)
        # Unequal per-rank batches: the centre uses the mean over all 3 rows of the global batch.
        local = torch.tensor([[1.0, 2.0], [3.0, 4.0]]) if rank == 0 else torch.tensor([[5.0, 9.0]])
        loss_fn.update_center(local)
        if rank == 0:
            torch.save(loss_fn.center, result_file)
    finally:
        dist.destroy_process_group()


def test_centre_update_all_reduces_over_ranks(tmp_path):
    result = tmp_path / "center.pt"
    mp.start_processes(_centre_worker, args=(str(tmp_path / "init"), str(result)), nprocs=2, start_method="spawn")
    center = torch.load(result, weights_only=True)
    assert torch.allclose(center, torch.tensor([[0.1 * 3.0, 0.1 * 5.0]]))
